"""The results table: one row per figure, one column per server, medians over repeats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Getter = Callable[[dict[str, Any]], Any]


def _get(*path: str) -> Getter:
    def get(result: dict[str, Any]) -> Any:
        value: Any = result
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get


ROWS: dict[str, list[tuple[str, Getter]]] = {
    "fanout": [
        ("acked ops/s", _get("acked_ops_per_s")),
        ("acked ops per server CPU-s", _get("ops_per_server_cpu_s")),
        ("delivered msgs/s (all listeners)", _get("delivered_msgs_per_s")),
        ("delivered ops/s (all listeners)", _get("delivered_ops_per_s")),
        ("frames per op per listener", _get("frames_per_acked_op_per_listener")),
        ("writer→listener p50 ms", _get("latency_writer_to_listener", "p50_ms")),
        ("writer→listener p99 ms", _get("latency_writer_to_listener", "p99_ms")),
        ("server CPU share", _get("server_cpu_share")),
        ("generator CPU share", _get("generator_cpu_share")),
        ("all delivered", _get("all_delivered")),
    ],
    "fanout-noack": [],
    "libraries": [
        ("acked ops/s", _get("acked_ops_per_s")),
        ("acked ops per server CPU-s", _get("ops_per_server_cpu_s")),
        ("writer→peer p50 ms", _get("latency_writer_to_peer", "p50_ms")),
        ("writer→peer p99 ms", _get("latency_writer_to_peer", "p99_ms")),
        ("server CPU share", _get("server_cpu_share")),
        ("generator CPU share", _get("generator_cpu_share")),
        ("all delivered", _get("all_delivered")),
    ],
    "idle": [
        ("connections", _get("connections")),
        ("server CPU ms per connection (connect+sync)", _get("cpu_ms_per_connection")),
        ("server KB per connection", _get("kb_per_connection")),
        ("idle server CPU ms per connection per min", _get("idle_cpu_ms_per_connection_per_min")),
        ("connect+sync wall s", _get("connect_s")),
        ("closed by server", _get("connections_closed_by_server")),
    ],
    "initial": [
        ("operations in response", _get("operations_in_response")),
        ("response bytes", _get("bytes")),
        ("time ms (median)", _get("time_ms_median")),
        ("server CPU s (median)", _get("server_cpu_s_median")),
        ("server peak RSS MB", _get("peak_rss_mb")),
        ("peak RSS over pre-sync RSS MB", _get("peak_rss_over_before_mb")),
    ],
    "http": [
        ("requests/s", _get("requests_per_s")),
        ("ops/s", _get("ops_per_s")),
        ("ops per server CPU-s", _get("ops_per_server_cpu_s")),
        ("request p50 ms", _get("latency_request", "p50_ms")),
        ("request p99 ms", _get("latency_request", "p99_ms")),
        ("server CPU share", _get("server_cpu_share")),
        ("errors", _get("errors")),
    ],
}


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[0] if len(set(map(str, values))) == 1 else "/".join(map(str, values))
    values = sorted(values)
    return values[len(values) // 2]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _by_process(result: dict[str, Any]) -> str | None:
    figures = result.get("cpu_us_per_op_by_process")
    if not isinstance(figures, dict):
        return None
    return " · ".join(f"{name} {value:,.0f}" for name, value in figures.items())


CLUSTER_ROWS: list[tuple[str, Getter]] = [
    ("server CPU µs per acked op", _get("server_cpu_us_per_op")),
    ("  of which HAProxy (cluster)", _get("haproxy_cpu_us_per_op")),
    ("  of which nodes (cluster)", _get("nodes_cpu_us_per_op")),
    ("  µs per op by process (cluster)", _by_process),
]
for _scenario in ("fanout", "libraries", "http"):
    _at = next(i for i, (label, _) in enumerate(ROWS[_scenario]) if "per server CPU-s" in label)
    ROWS[_scenario][_at + 1 : _at + 1] = CLUSTER_ROWS
ROWS["fanout-noack"] = ROWS["fanout"]


def render_table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    servers = list(results)
    ratio = len(servers) == 2
    header = ["scenario", "figure", *servers] + ([f"{servers[0]}/{servers[1]}"] if ratio else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    scenarios = [s for s in ROWS if any(s in results[srv] for srv in servers)]
    for scenario in scenarios:
        for label, get in ROWS[scenario]:
            values = [_median([get(r) for r in results[srv].get(scenario, [])]) for srv in servers]
            cells = [scenario, label, *(_fmt(v) for v in values)]
            if ratio:
                a, b = values
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and not isinstance(a, bool):
                    cells.append(f"{a / b:.2f}×")
                else:
                    cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
