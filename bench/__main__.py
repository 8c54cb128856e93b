"""`python -m bench`: the load generator. See "Benchmarks" in the README.

    python -m bench --servers ours,node --scenario all --json bench/results/run.json
    python -m bench --url http://127.0.0.1:3242 --secret S [--server-pid PID] --scenario fanout
    python -m bench --servers ours,cluster-1 --interleave 0.5 --scenario libraries

With `--servers`, each scenario gets a fresh server in a fresh data directory, pinned with
`taskset` to `--server-core` while the generator pins itself to `--generator-core`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import trio

from .replica import Endpoint
from .report import render_table
from .scenarios import INTERLEAVED, SCENARIOS, Options
from .servers import Target, cpu_model, git_revision, node_version, start_server
from .turns import Turns

DEFAULT_SECRET = "bench-secret-0123456789abcdef0123"


def server_pids(text: str) -> dict[str, int]:
    """`1234` (one process), or `n1=1234,haproxy=1240` (several, each named)."""
    if text.isdigit():
        return {"": int(text)}
    pids: dict[str, int] = {}
    for part in text.split(","):
        name, _, pid = part.partition("=")
        if not name or not pid.isdigit():
            raise argparse.ArgumentTypeError(f"expected PID or NAME=PID,..., got {text!r}")
        pids[name] = int(pid)
    return pids


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--servers", default=None,
                       help='comma-separated servers to start: "ours", "node", "cluster-N" '
                       "(cluster-dev: N nodes behind HAProxy, all on the server core) "
                       "(default: ours)")
    where.add_argument("--url", help="an already running server's base URL (http://host:port)")
    p.add_argument("--secret", default=None, help="token secret of the server")
    p.add_argument("--server-pid", type=server_pids, default={},
                   help="with --url: pid to read CPU and memory from, or NAME=PID,... for a "
                   "server of several processes (a cluster's nodes and HAProxy)")
    p.add_argument("--sync-path", default="/verdant")
    p.add_argument("--scenario", default="all",
                   help=f"comma-separated: {', '.join(SCENARIOS)} or all")
    p.add_argument("--json", type=Path, help="write all figures to this file")
    p.add_argument("--client", choices=["lean", "trio-websocket"], default="lean")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--generator-core", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin server and generator")
    p.add_argument("--log-level", default="INFO", help="our server's log level (default INFO)")
    p.add_argument("--quick", action="store_true",
                   help="small settings for a smoke run (5 s windows, fewer connections)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record our server with py-spy (collapsed stacks) into DIR; "
                   "summarise with python -m bench.profile DIR/FILE")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy each server's log here")
    p.add_argument("--repeat", type=int, default=1, help="run each scenario N times")
    p.add_argument("--interleave", type=float, metavar="SLICE_S",
                   help="with two --servers: run both at once, loaded in turns of SLICE_S "
                   f"seconds, so both see the same machine ({', '.join(sorted(INTERLEAVED))})")
    d = Options()
    p.add_argument("--duration", type=float, default=d.duration_s, help="measurement window (s)")
    p.add_argument("--warmup", type=float, default=d.warmup_s)
    p.add_argument("--listeners", type=int, default=d.listeners)
    p.add_argument("--window", type=int, default=d.window, help="fan-out: op messages in flight")
    p.add_argument("--libraries", type=int, default=d.libraries)
    p.add_argument("--library-window", type=int, default=d.library_window,
                   help="libraries: op messages in flight per writer")
    p.add_argument("--idle-connections", type=int, default=d.idle_connections)
    p.add_argument("--idle-libraries", type=int, default=d.idle_libraries)
    p.add_argument("--idle-hold", type=float, default=d.idle_hold_s)
    p.add_argument("--initial-ops", type=int, default=d.initial_ops)
    p.add_argument("--initial-repeats", type=int, default=d.initial_repeats)
    p.add_argument("--http-requesters", type=int, default=d.http_requesters)
    p.add_argument("--http-ops", type=int, default=d.http_ops)
    p.add_argument("--no-acks", action="store_true",
                   help="listeners do not ack op-re (real clients do)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    opts = Options(
        duration_s=args.duration, warmup_s=args.warmup, listeners=args.listeners,
        window=args.window, libraries=args.libraries, library_window=args.library_window,
        idle_connections=args.idle_connections, idle_libraries=args.idle_libraries,
        idle_hold_s=args.idle_hold, initial_ops=args.initial_ops,
        initial_repeats=args.initial_repeats, http_requesters=args.http_requesters,
        http_ops=args.http_ops, acks=not args.no_acks,
    )
    if args.quick:
        opts.duration_s, opts.warmup_s = min(opts.duration_s, 5.0), min(opts.warmup_s, 1.0)
        opts.idle_connections = min(opts.idle_connections, 200)
        opts.idle_hold_s = min(opts.idle_hold_s, 5.0)
        opts.initial_ops = min(opts.initial_ops, 10_000)
        opts.initial_repeats = 1
        opts.libraries = min(opts.libraries, 20)
    return opts


async def run_scenario(name: str, target: Target, client: str, opts: Options) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        assert target.secret is not None
        endpoint = Endpoint(target.sync_url, target.secret, client, nursery)
        result = await SCENARIOS[name](target, endpoint, opts)
        nursery.cancel_scope.cancel()
    return result


async def run_interleaved(
    name: str, targets: list[Target], client: str, opts: Options, slice_s: float
) -> list[dict[str, Any]]:
    """One scenario on each target at once, sending in turns (see `bench.turns`)."""
    turns = Turns(len(targets), slice_s)
    results: list[dict[str, Any]] = [{} for _ in targets]
    async with trio.open_nursery() as nursery:

        async def one(index: int, target: Target) -> None:
            assert target.secret is not None
            turn = turns.party(index)
            endpoint = Endpoint(target.sync_url, target.secret, client, nursery)
            try:
                results[index] = await SCENARIOS[name](
                    target, endpoint, dataclasses.replace(opts, turn=turn)
                )
            finally:
                turn.finished()

        async with trio.open_nursery() as runs:
            runs.start_soon(turns.conduct)
            for index, target in enumerate(targets):
                runs.start_soon(one, index, target)
        nursery.cancel_scope.cancel()
    for result, given in zip(results, turns.turns_given, strict=True):
        result["interleaved"] = {"slice_s": slice_s, "turns": given}
    return results


@contextlib.contextmanager
def profiled(target: Target, output: Path | None) -> Iterator[None]:
    """py-spy on the server for the whole scenario.

    `--gil`: only the thread holding the GIL is sampled. On a server pinned to one core a
    runnable thread waiting for the core looks active to py-spy, so plain sampling counts
    the worker threads' waits as work; GIL samples are the Python CPU time. What runs with
    the GIL released (SQLite's own work, fsync, socket syscalls) is not in these samples.
    """
    if output is None or target.pid is None:
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "py-spy"
    GIL_ARGS = ["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else ["--nonblocking", "--threads"]
    spy = subprocess.Popen(
        [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(target.pid), "--rate", "200",
         *GIL_ARGS, "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()


def fresh_server(
    args: argparse.Namespace, server: str, name: str, attempt: int, secret: str, pin: bool
) -> contextlib.AbstractContextManager[Target]:
    """A new server of kind `server` for one attempt of scenario `name`, with its log kept
    under `--keep-logs` when asked."""
    return start_server(
        server, secret=secret, core=args.server_core if pin else None, log_level=args.log_level,
        keep_log=args.keep_logs / f"{server}-{name}-{attempt + 1}.log" if args.keep_logs else None,
    )


def record(
    results: dict[str, dict[str, list[dict[str, Any]]]], server: str, name: str,
    result: dict[str, Any],
) -> None:
    results.setdefault(server, {}).setdefault(name, []).append(result)
    print(f"[bench] {server} {name}: " + orjson.dumps(result).decode()[:600],
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    opts = options(args)
    pin = not args.no_pin and not args.url
    if pin:
        os.sched_setaffinity(0, {args.generator_core})
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    servers = ["url"] if args.url else (args.servers or "ours").split(",")
    secret = args.secret or DEFAULT_SECRET
    if args.interleave is not None:
        if len(servers) != 2 or args.url:
            print("--interleave needs --servers with two servers", file=sys.stderr)
            return 2
        if set(names) - INTERLEAVED:
            print(f"--interleave runs only {', '.join(sorted(INTERLEAVED))}", file=sys.stderr)
            return 2
    for server in servers if args.interleave is None else []:
        for name in names:
            for attempt in range(args.repeat):
                print(f"[bench] {server} {name} ({attempt + 1}/{args.repeat}) ...",
                      file=sys.stderr, flush=True)
                if server == "url":
                    pids: dict[str, int] = args.server_pid
                    target = Target("url", args.url, secret, sync_path=args.sync_path,
                                    pid=pids.get(""), pids={k: v for k, v in pids.items() if k})
                    result = trio.run(run_scenario, name, target, args.client, opts)
                else:
                    with fresh_server(args, server, name, attempt, secret, pin) as target:
                        profile = None
                        if args.profile and server == "ours":
                            profile = args.profile / f"{server}-{name}-{attempt + 1}.txt"
                        with profiled(target, profile):
                            result = trio.run(run_scenario, name, target, args.client, opts)
                record(results, server, name, result)
    for name in names if args.interleave is not None else []:
        for attempt in range(args.repeat):
            print(f"[bench] {' + '.join(servers)} {name}, in turns of {args.interleave} s "
                  f"({attempt + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            with contextlib.ExitStack() as stack:
                targets = [
                    stack.enter_context(fresh_server(args, server, name, attempt, secret, pin))
                    for server in servers
                ]
                pair = trio.run(run_interleaved, name, targets, args.client, opts, args.interleave)
            for server, result in zip(servers, pair, strict=True):
                record(results, server, name, result)
    report = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "node": node_version(), "kernel": platform.release(),
            "load_average_at_end": os.getloadavg(),
        },
        "revision": git_revision(),
        "client": args.client,
        "pinned": {"server_core": args.server_core, "generator_core": args.generator_core}
        if pin else None,
        "options": opts.__dict__,
        "results": results,
    }
    table = render_table(results)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        args.json.with_suffix(".md").write_text(table + "\n")
        print(f"figures written to {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
