"""`verdant-trio cluster move` and `rebalance`: moving slots between running nodes.

One move takes slots from one source to one target, over the node-to-node API (`transfer`):

1. **lock** every node of the table (and the target): one move at a time in the cluster, each
   node on the table version the plan was made from;
2. **release** on the source: its fence goes up (new requests for the slots are refused), their
   sockets close with 1012, their libraries finish their batch and close; it answers a manifest;
3. **receive** on the target: it pulls and checks every shard and file, installs them, and stays
   fenced; the totals it verified must equal the source's;
4. **commit**: the source applies the new table (written atomically, applied as on SIGHUP). This
   is the point of no return (see `transfer`);
5. the target gets the new table and is **unfenced** (it serves), then every other node gets the
   table, then **HAProxy** switches its map (`prepare/add/commit map`: no reload, no connection
   of another slot touched); the target is unfenced before HAProxy routes to it, so a client
   that reconnects during the switch is never held by a refusal at the new owner;
6. **finish**: the source deletes its copies (they went stale when the target began to serve);
   every lock goes.

A failure before step 4 undoes the move: the source serves its slots again, the target deletes
what it received; nothing acknowledged is lost, because the source's shards were only
checkpointed and read (a cancellation, Ctrl-C, undoes on its way out too). A failure after it
is retried until `post_commit_timeout_s`, then reported: the same command run again finishes
the move (the plan sees the nodes that lack the new table). If the orchestrator dies without a
word, the nodes' leases (`[cluster] move_timeout_s`) end the move on each node safely.

**Unavailability** of the moved libraries: from the release request (the fence) until the target
serves and HAProxy routes to it (or, undone, until the source serves again).

`plan_move` decides from what the nodes report (pure); `execute` runs one plan.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import trio

from .peer import PeerError
from .placement import (
    Placement,
    PlacementError,
    format_slots,
    moves_between,
    parse,
    rebalance,
    render,
)
from .runtime import RuntimeApiError as FrontError

log = logging.getLogger(__name__)

LEASE_MARGIN_S: Final = 1.0
"""Pre-commit work stops this long before the shortest lease, so the commit never races it."""
RETRY_INTERVAL_S: Final = 0.5
SOURCE, TARGET, BYSTANDER = "source", "target", "bystander"


class NodeApi(Protocol):
    """A node's internal listener, as the orchestration calls it (`peer.Peer`)."""

    name: str

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout_s: float = ...
    ) -> Any: ...


class Front(Protocol):
    """The routing in front of the nodes (HAProxy's runtime API: `runtime.HaproxyFront`)."""

    async def check_target(self, node: str) -> None:
        """`FrontError` (HAProxy's `RuntimeApiError`) unless requests can be routed to
        `node` (a backend, up)."""

    async def switch(self, table: Placement) -> None:
        """Route by `table` from now on, atomically; `FrontError` if it did not happen."""


class MoveRefused(Exception):
    """The move cannot start (the message says why and what to do); nothing was changed."""


class MoveError(Exception):
    """A step failed; the report says how far the move got."""


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as it reported itself before the move."""

    name: str
    table: Placement
    status: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class MovePlan:
    """One move: `slots` from `source` to `target`, from table `before` to table `after`."""

    move_id: str
    slots: frozenset[int]
    source: str | None
    """None: nothing to copy (the slots are on the target already; only tidying is left)."""
    target: str
    before: Placement
    after: Placement
    copy: bool
    """Release on the source and receive on the target."""
    commit: bool
    """The source still has to apply `after` (a new move); false when finishing one."""
    versions: Mapping[str, int]
    """Each node's table version, checked when it is locked."""
    roles: Mapping[str, str]
    lagging: tuple[str, ...]
    """Nodes that get `after` after the commit, the target first."""

    @property
    def kind(self) -> str:
        if self.commit:
            return "move"
        return "finish" if self.lagging else "tidy"

    def __str__(self) -> str:
        return f"{format_slots(self.slots)} {self.source or '-'} -> {self.target} ({self.kind})"


@dataclass
class MoveReport:
    """What one move did; `ok` and, for a failure, whether the switch had happened."""

    plan: MovePlan
    ok: bool = False
    committed: bool = False
    undone: bool = False
    uncertain: bool = False
    """The commit's outcome could not be learned (the source vanished during it)."""
    unavailable_s: float | None = None
    """Fence to served again (by the target, or by the source after an undo)."""
    timings: dict[str, float] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    left: list[str] = field(default_factory=list)
    """Steps after the switch that did not happen (a second run does them)."""

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "move": plan.move_id, "kind": plan.kind, "slots": format_slots(plan.slots),
            "source": plan.source, "target": plan.target, "version": plan.after.version,
            "ok": self.ok, "committed": self.committed, "undone": self.undone,
            "uncertain": self.uncertain, "unavailable_s": self.unavailable_s,
            "timings": self.timings, "totals": self.totals, "error": self.error,
            "left": self.left,
        }

    def summary(self) -> str:
        plan = self.plan
        head = f"move {plan.move_id}: slots {format_slots(plan.slots)} {plan.source or '-'} -> {plan.target}"
        unavailable = (
            f", unavailable {self.unavailable_s:.3f} s" if self.unavailable_s is not None else ""
        )
        moved = (
            f" ({self.totals.get('libraries', 0)} libraries, {self.totals.get('size_bytes', 0)} bytes)"
            if self.totals else ""
        )
        if self.ok:
            return f"{head}: done, table version {plan.after.version}{moved}{unavailable}"
        if self.undone:
            return f"{head}: failed and undone{unavailable}: {self.error}"
        if self.uncertain:
            return (f"{head}: failed during the switch and its outcome is unknown: {self.error}. "
                    f"Once {plan.source} answers, run the same command again.")
        if self.committed:
            return (f"{head}: switched to table version {plan.after.version}, then failed: "
                    f"{self.error}. Not done: {', '.join(self.left)}. Run the same command "
                    "again to finish.")
        return f"{head}: failed: {self.error}"


def new_move_id(version: int) -> str:
    return f"v{version}-{secrets.token_hex(4)}"


# -- what the nodes say -------------------------------------------------------------------------


async def survey(nodes: Mapping[str, NodeApi]) -> dict[str, NodeView]:
    """Every node's status and table, asked at once; `MoveRefused` if one cannot be asked."""
    views: dict[str, NodeView] = {}
    problems: list[str] = []

    async def ask(name: str, api: NodeApi) -> None:
        try:
            status = await api.call("GET", "/cluster/status")
            text = await api.call("GET", "/cluster/placement")
            views[name] = NodeView(name, parse(str(text), f"{name}'s table"), status)
        except (PeerError, PlacementError) as exc:
            problems.append(str(exc))

    async with trio.open_nursery() as nursery:
        for name, api in nodes.items():
            nursery.start_soon(ask, name, api)
    if problems:
        raise MoveRefused(
            "every node must answer before slots move: " + "; ".join(sorted(problems))
        )
    return views


def plan_move(
    views: Mapping[str, NodeView],
    slots: Iterable[int],
    target: str,
    *,
    tidy: bool = True,
    move_id: Callable[[int], str] = new_move_id,
) -> MovePlan | None:
    """The next move that brings `slots` to `target`; when they are all there, a plan that only
    tidies (`tidy`), or None.

    Slots owned by several nodes take one move per source (one commit point each): call again
    after each. When nodes lag one table version behind the others after a move that switched
    but did not finish, the plan finishes that move (and only that one).
    """
    wanted = frozenset(slots)
    if not wanted:
        raise MoveRefused("no slots to move")
    if target not in views:
        raise MoveRefused(f"no node {target} among those known ({', '.join(sorted(views))}); "
                          "add its internal address to [cluster] peers")
    locked = [f"{name} (move {view.status['move']['move']}, "
              f"{view.status['move'].get('lease_left_s', 0):.0f} s of its lease left)"
              for name, view in sorted(views.items()) if view.status.get("move")]
    if locked:
        raise MoveRefused(f"a move holds {', '.join(locked)}: wait for it to end (or for its "
                          "lease), then run this again")
    newest = max(view.table.version for view in views.values())
    at_newest = [view for view in views.values() if view.table.version == newest]
    table = at_newest[0].table
    if any(view.table.owners != table.owners for view in at_newest):
        raise MoveRefused(f"the nodes hold different tables of version {newest}: repair by hand "
                          "(README: Running a cluster)")
    unknown = sorted(set(table.nodes) - set(views))
    if unknown:
        raise MoveRefused(f"the table names {', '.join(unknown)}, whose internal address is "
                          "not known here ([cluster] peers)")
    versions = {name: view.table.version for name, view in views.items()}
    lagging = sorted(name for name, view in views.items() if view.table.version < newest)
    if lagging:
        return _plan_finish(views, lagging, table, wanted, target, versions, move_id)
    by_source: dict[str, set[int]] = {}
    for slot in sorted(wanted):
        if table.owners[slot] != target:
            by_source.setdefault(table.owners[slot], set()).add(slot)
    if not by_source:
        if not tidy:
            return None
        # Nothing to copy: the finish drops copies other nodes may still hold (a run that
        # failed before its last step), and HAProxy's map is set to the table again.
        roles = {name: (BYSTANDER if name == target else SOURCE) for name in views}
        return MovePlan(move_id(table.version), wanted, None, target, table, table, False,
                        False, versions, roles, ())
    source = min(by_source, key=lambda name: min(by_source[name]))
    moving = frozenset(by_source[source])
    after = table.moved(moving, target)
    roles = {name: BYSTANDER for name in views}
    roles[source], roles[target] = SOURCE, TARGET
    others = sorted(name for name in views if name not in (source, target))
    return MovePlan(move_id(after.version), moving, source, target, table, after, True, True,
                    versions, roles, (target, *others))


def _plan_finish(
    views: Mapping[str, NodeView],
    lagging: Sequence[str],
    newest: Placement,
    wanted: frozenset[int],
    target: str,
    versions: Mapping[str, int],
    move_id: Callable[[int], str],
) -> MovePlan:
    behind = views[lagging[0]].table
    pending = moves_between(behind, newest)
    pairs = {(m.source, m.target) for m in pending}
    consistent = all(views[name].table.owners == behind.owners for name in lagging)
    if not consistent or behind.version != newest.version - 1 or len(pairs) != 1:
        raise MoveRefused(
            f"{', '.join(lagging)} lag behind table version {newest.version} in a way a move "
            "does not explain: repair by hand (README: Running a cluster)"
        )
    (source, pending_target), = pairs
    pending_slots = frozenset(s for m in pending for s in range(m.first, m.last + 1))
    if pending_target != target or pending_slots != wanted:
        raise MoveRefused(
            f"a move switched but did not finish ({', '.join(lagging)} still run version "
            f"{behind.version}): finish it first with `verdant-trio cluster move "
            f"{format_slots(pending_slots)} --to {pending_target}`"
        )
    copy = target in lagging  # the target never got the table: copy again (the source kept it)
    roles = {name: BYSTANDER for name in views}
    if copy:
        roles[source], roles[target] = SOURCE, TARGET
    ordered = tuple(sorted(lagging, key=lambda name: (name != target, name)))
    return MovePlan(move_id(newest.version), wanted, source, target, behind, newest, copy,
                    False, versions, roles, ordered)


# -- doing it -----------------------------------------------------------------------------------


async def execute(
    plan: MovePlan,
    nodes: Mapping[str, NodeApi],
    front: Front | None,
    *,
    post_commit_timeout_s: float = 60.0,
    on_step: Callable[[str], None] | None = None,
) -> MoveReport:
    """Run one plan (see the module for the steps and what a failure does)."""
    report = MoveReport(plan)
    say = on_step or (lambda text: log.info("%s", text))
    slots = format_slots(plan.slots)
    locked: list[str] = []
    fenced_at: float | None = None
    commit_sent = False
    try:
        deadline = await _lock_all(plan, nodes, locked, say)
        if front is not None and plan.copy:
            await front.check_target(plan.target)
        if plan.copy:
            assert plan.source is not None
            source, target = nodes[plan.source], nodes[plan.target]
            fenced_at = trio.current_time()
            say(f"release: {plan.source} fences slots {slots} and closes their libraries")
            released = await _call(source, "/cluster/release", {"move": plan.move_id}, deadline)
            report.timings["release_s"] = round(trio.current_time() - fenced_at, 4)
            say(f"copy: {plan.target} pulls {released['totals']['libraries']} libraries "
                f"({released['totals']['size_bytes']} bytes) from {plan.source} and checks them")
            started = trio.current_time()
            received = await _call(target, "/cluster/receive", {"move": plan.move_id}, deadline)
            report.timings["copy_s"] = round(trio.current_time() - started, 4)
            if received["totals"] != released["totals"]:
                raise MoveError(f"{plan.target} verified {received['totals']}, "
                                f"{plan.source} described {released['totals']}")
            report.totals = dict(released["totals"])
        if plan.commit:
            assert plan.source is not None
            say(f"switch: {plan.source} applies table version {plan.after.version}")
            started = trio.current_time()
            commit_sent = True
            await _commit(plan, nodes[plan.source], report, deadline)
            report.timings["commit_s"] = round(trio.current_time() - started, 4)
    except (PeerError, MoveError, FrontError, trio.TooSlowError) as exc:
        report.error = _why(exc)
        report.unavailable_s = _since(fenced_at)
        if report.uncertain:
            return report
        say(f"undo: {report.error}")
        await _undo(plan, nodes, locked)
        if commit_sent and plan.source is not None and (
            await _version_of(nodes[plan.source]) == plan.after.version
        ):
            # The source was still applying the table when it was judged refused: the undo
            # waited for it, so the move did switch (the target dropped its copies: a second
            # run copies again from the source, which keeps its own).
            report.committed = True
            report.left = ["the rest of the move"]
            return report
        report.undone = True
        report.unavailable_s = _since(fenced_at)
        return report
    except BaseException:  # cancelled (Ctrl-C): undo what is certain to be undoable, then go
        if not commit_sent:
            with trio.CancelScope(shield=True), trio.move_on_after(15):
                await _undo(plan, nodes, locked)
        raise
    report.committed = plan.commit or plan.kind != "tidy"
    try:
        await _after_switch(plan, nodes, front, report, fenced_at, post_commit_timeout_s, say)
    except (PeerError, MoveError, FrontError, trio.TooSlowError) as exc:
        report.error = _why(exc)
        return report
    report.ok = True
    return report


async def _lock_all(
    plan: MovePlan, nodes: Mapping[str, NodeApi], locked: list[str], say: Callable[[str], None]
) -> float:
    """Lock every node; the deadline the pre-commit steps must meet (the shortest lease)."""
    say(f"lock: move {plan.move_id} ({plan.kind}) on {', '.join(sorted(plan.roles))}")
    lease_end = None
    for name in sorted(plan.roles, key=lambda n: (plan.roles[n] == BYSTANDER, n)):
        role = plan.roles[name]
        peer = plan.target if role == SOURCE else plan.source if role == TARGET else None
        # (a tidy plan's sources have nothing to send; their lock only lets them drop copies)
        answer = await nodes[name].call("POST", "/cluster/lock", {
            "move": plan.move_id, "role": role, "slots": format_slots(plan.slots),
            "version": plan.versions[name], "peer": peer,
        })
        locked.append(name)
        ends = trio.current_time() + float(answer["lease_left_s"])
        lease_end = ends if lease_end is None else min(lease_end, ends)
    assert lease_end is not None
    return lease_end - LEASE_MARGIN_S


async def _call(api: NodeApi, path: str, body: Any, deadline: float) -> Any:
    left = deadline - trio.current_time()
    if left <= 0:
        raise trio.TooSlowError
    with trio.fail_at(deadline):
        return await api.call("POST", path, body, timeout_s=left)


async def _commit(plan: MovePlan, source: NodeApi, report: MoveReport, deadline: float) -> None:
    body = {"move": plan.move_id, "table": render(plan.after)}
    try:
        await _call(source, "/cluster/placement", body, deadline)
    except (PeerError, trio.TooSlowError) as exc:
        if isinstance(exc, PeerError) and exc.refused:
            raise
        # The request may have reached the source: its version says whether it took the table.
        version = await _version_of(source)
        if version == plan.after.version:
            report.committed = True
            return
        if version is None:
            report.uncertain = True
        raise
    report.committed = True


async def _version_of(api: NodeApi) -> int | None:
    with trio.move_on_after(10):
        while True:
            try:
                return int((await api.call("GET", "/cluster/status", timeout_s=3))["version"])
            except PeerError:
                await trio.sleep(RETRY_INTERVAL_S)
    return None


async def _undo(plan: MovePlan, nodes: Mapping[str, NodeApi], locked: Sequence[str]) -> None:
    """Best effort on every locked node; what fails is left to the node's lease."""
    order = sorted(locked, key=lambda n: (plan.roles[n] != SOURCE, n))  # the source serves first
    for name in order:
        try:
            with trio.fail_after(30):
                await nodes[name].call("POST", "/cluster/finish", {
                    "move": plan.move_id, "role": plan.roles[name],
                    "slots": format_slots(plan.slots), "outcome": "undo",
                })
        except (PeerError, trio.TooSlowError) as exc:
            log.error("undo failed on %s; its lease will end the move there: %s", name, _why(exc))


async def _after_switch(
    plan: MovePlan,
    nodes: Mapping[str, NodeApi],
    front: Front | None,
    report: MoveReport,
    fenced_at: float | None,
    timeout_s: float,
    say: Callable[[str], None],
) -> None:
    deadline = trio.current_time() + timeout_s
    slots = format_slots(plan.slots)
    table = {"move": plan.move_id, "table": render(plan.after)}
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def served_again() -> None:
        if fenced_at is not None:
            report.unavailable_s = _since(fenced_at)

    async def unfence_target() -> None:
        answer = await nodes[plan.target].call(
            "POST", "/cluster/unfence", {"move": plan.move_id, "slots": slots}
        )
        if not answer.get("serving"):
            raise MoveError(f"{plan.target} does not serve slots {slots} after unfencing")
        if front is None:
            served_again()

    async def switch_front() -> None:
        assert front is not None
        await front.switch(plan.after)
        served_again()

    for name in plan.lagging:
        steps.append((f"table version {plan.after.version} on {name}",
                      partial(_post, nodes[name], "/cluster/placement", table)))
        if name == plan.target and plan.copy:
            steps.append((f"unfence {plan.target}", unfence_target))
    if front is not None:
        steps.append(("HAProxy's map", switch_front))
    for name in sorted(plan.roles, key=lambda n: (plan.roles[n] != SOURCE, n)):
        steps.append((f"finish on {name}", partial(_post, nodes[name], "/cluster/finish", {
            "move": plan.move_id, "role": plan.roles[name], "slots": slots, "outcome": "done",
        })))
    for index, (name, action) in enumerate(steps):
        say(f"after the switch: {name}")
        try:
            await _retrying(action, deadline)
        except BaseException:
            report.left = [n for n, _ in steps[index:]]
            raise


async def _post(api: NodeApi, path: str, body: Any) -> None:
    await api.call("POST", path, body)


async def _retrying(action: Callable[[], Awaitable[None]], deadline: float) -> None:
    """Until it works or the deadline; a refusal (the node answered no) is final."""
    while True:
        try:
            with trio.fail_at(deadline):
                await action()
            return
        except PeerError as exc:
            if exc.refused or trio.current_time() + RETRY_INTERVAL_S >= deadline:
                raise
            log.warning("retrying: %s", exc)
        except FrontError as exc:
            if trio.current_time() + RETRY_INTERVAL_S >= deadline:
                raise
            log.warning("retrying: %s", exc)
        await trio.sleep(RETRY_INTERVAL_S)


def _since(start: float | None) -> float | None:
    return None if start is None else round(trio.current_time() - start, 4)


def _why(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "the move did not finish within the nodes' lease ([cluster] move_timeout_s)"
    return str(exc)


# -- many moves ---------------------------------------------------------------------------------


def rebalance_moves(
    current: Placement, nodes: Sequence[str], max_slots: int
) -> list[tuple[frozenset[int], str]]:
    """The moves (slots, target) that take `current` to `rebalance(current, nodes)`: one per
    source and target, cut into pieces of at most `max_slots` (each piece is unavailable only
    while it moves)."""
    if max_slots < 1:
        raise ValueError("at least one slot per move")
    wanted = rebalance(current, nodes)
    grouped: dict[tuple[str, str], list[int]] = {}
    for move in moves_between(current, wanted):
        grouped.setdefault((move.source, move.target), []).extend(range(move.first, move.last + 1))
    pieces = []
    for (_source, target), slots in grouped.items():
        for start in range(0, len(slots), max_slots):
            pieces.append((frozenset(slots[start : start + max_slots]), target))
    return pieces


async def move_slots(
    nodes: Mapping[str, NodeApi],
    front: Front | None,
    slots: Iterable[int],
    target: str,
    *,
    post_commit_timeout_s: float = 60.0,
    on_step: Callable[[str], None] | None = None,
) -> list[MoveReport]:
    """Bring `slots` to `target`, one move per source, stopping at the first failure."""
    wanted = frozenset(slots)
    reports: list[MoveReport] = []
    for attempt in range(len(wanted) + 1):  # each move takes at least one slot, or ends it
        plan = plan_move(await survey(nodes), wanted, target, tidy=attempt == 0)
        if plan is None:
            break
        report = await execute(plan, nodes, front, post_commit_timeout_s=post_commit_timeout_s,
                               on_step=on_step)
        reports.append(report)
        if not report.ok or not plan.commit:
            break
    return reports


async def rebalance_slots(
    nodes: Mapping[str, NodeApi],
    front: Front | None,
    node_list: Sequence[str],
    *,
    max_slots: int = 256,
    post_commit_timeout_s: float = 60.0,
    on_step: Callable[[str], None] | None = None,
    on_report: Callable[[MoveReport], None] | None = None,
) -> list[MoveReport]:
    """Move slots until `node_list` shares them as `placement.rebalance` says, one move after
    another (at most `max_slots` each), stopping at the first failure."""
    views = await survey(nodes)
    unknown = sorted(set(node_list) - set(views))
    if unknown:
        raise MoveRefused(f"no internal address for {', '.join(unknown)} in [cluster] peers")
    newest = max((view.table for view in views.values()), key=lambda table: table.version)
    reports: list[MoveReport] = []
    for index, (slots, target) in enumerate(rebalance_moves(newest, node_list, max_slots)):
        plan = plan_move(views if index == 0 else await survey(nodes), slots, target, tidy=False)
        if plan is None:
            continue
        report = await execute(plan, nodes, front, post_commit_timeout_s=post_commit_timeout_s,
                               on_step=on_step)
        reports.append(report)
        if on_report is not None:
            on_report(report)
        if not report.ok or not plan.commit:
            break
    return reports
