"""`cluster move` as orchestration, against nodes that answer like `transfer` does (fakes that
record what they are asked), so every failure path can be made to happen exactly where it
matters: before the commit a move is undone on every node and HAProxy is never touched; at the
commit an unclear answer is settled by asking the source; after it nothing is undone, the rest
is retried and what did not happen is reported for a second run.

The same orchestration against real nodes is in `test_cluster_transfer.py`, and with HAProxy and
real clients in `interop/test_cluster_move.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from verdant_trio.service.cluster.move import (
    MovePlan,
    MoveRefused,
    NodeView,
    execute,
    move_slots,
    plan_move,
    rebalance_moves,
    survey,
)
from verdant_trio.service.cluster.peer import PeerError
from verdant_trio.service.cluster.placement import (
    SLOT_COUNT,
    Placement,
    format_slots,
    generate,
    parse,
    parse_slots,
    rebalance,
    render,
)
from verdant_trio.service.cluster.runtime import RuntimeApiError

TOTALS = {"libraries": 2, "shards": 2, "files": 1, "size_bytes": 9000, "operations": 40,
          "baselines": 3, "replicas": 4}  # fmt: skip


@dataclass
class FakeNode:
    """A node's internal API: a table, a lock, and failures to inject by path."""

    name: str
    table: Placement
    calls: list[tuple[str, Any]]
    """Shared by every node: (node path, body) in the order asked."""
    fail: dict[str, list[BaseException]] = field(default_factory=dict)
    """`METHOD path` -> errors raised by the next calls to it (then it works)."""
    totals: dict[str, int] = field(default_factory=lambda: dict(TOTALS))
    lock: dict[str, Any] | None = None
    gone: bool = False
    """Unreachable from now on."""

    async def call(self, method: str, path: str, body: Any = None, *, timeout_s: float = 30) -> Any:
        await trio.sleep(0.01)  # every request takes a little time
        if self.gone:
            raise PeerError(self.name, f"{method} {path}: unreachable")
        self.calls.append((f"{self.name} {path}", body))
        errors = self.fail.get(f"{method} {path}")
        if errors:
            raise errors.pop(0)
        if path == "/cluster/status":
            return {"node": self.name, "version": self.table.version, "move": self.lock}
        if path == "/cluster/placement" and method == "GET":
            return render(self.table)
        if path == "/cluster/lock":
            self.lock = {"move": body["move"], "lease_left_s": 60.0}
            return {"node": self.name, **self.lock}
        if path in ("/cluster/release", "/cluster/receive"):
            return {"totals": dict(self.totals)}
        if path == "/cluster/placement":
            self.table = parse(body["table"])
            return {"version": self.table.version, "applied": True}
        if path == "/cluster/unfence":
            return {"serving": True}
        if path == "/cluster/finish":
            self.lock = None
            return {}
        raise AssertionError(f"unexpected {method} {path}")


@dataclass
class FakeFront:
    tables: list[Placement] = field(default_factory=list)
    fail: list[BaseException] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    async def check_target(self, node: str) -> None:
        self.checked.append(node)

    async def switch(self, table: Placement) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.tables.append(table)


def cluster(names: tuple[str, ...] = ("n1", "n2", "n3")) -> tuple[dict[str, FakeNode], list[tuple[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    table = generate(list(names))
    return {name: FakeNode(name, table, calls) for name in names}, calls


def posts(calls: list[tuple[str, Any]]) -> list[str]:
    """Every request that changes something, in order (the placement GETs have no body)."""
    return [what for what, body in calls if body is not None]


async def plan_for(nodes: dict[str, FakeNode], slots: str, target: str) -> MovePlan:
    plan = plan_move(await survey(nodes), parse_slots(slots), target, move_id=lambda v: f"m{v}")
    assert plan is not None
    return plan


MOVE_STEPS = [
    "n1 /cluster/lock", "n3 /cluster/lock", "n2 /cluster/lock",
    "n1 /cluster/release", "n3 /cluster/receive",
    "n1 /cluster/placement",  # the commit
    "n3 /cluster/placement", "n3 /cluster/unfence", "n2 /cluster/placement",
    "n1 /cluster/finish", "n2 /cluster/finish", "n3 /cluster/finish",
]


async def test_a_move_locks_releases_copies_commits_at_the_source_then_switches_the_rest() -> None:
    nodes, calls = cluster()
    front = FakeFront()
    plan = await plan_for(nodes, "0:9", "n3")
    assert (plan.source, plan.target, plan.kind, plan.after.version) == ("n1", "n3", "move", 2)
    calls.clear()
    report = await execute(plan, nodes, front)
    assert report.ok and report.committed and not report.undone, report
    assert posts(calls) == MOVE_STEPS
    assert [t.version for t in front.tables] == [2] and front.checked == ["n3"]
    assert {node.table.version for node in nodes.values()} == {2}
    assert all(nodes["n1"].table.owners[s] == "n3" for s in range(10))
    assert report.totals == TOTALS
    assert report.unavailable_s is not None and report.unavailable_s > 0
    assert all(node.lock is None for node in nodes.values())
    # the unfence names the move and its slots; the finishes say done
    finishes = [body for what, body in calls if what.endswith("/cluster/finish")]
    assert {(b["role"], b["outcome"]) for b in finishes} == {
        ("source", "done"), ("target", "done"), ("bystander", "done")
    }


@pytest.mark.parametrize("failing", ["/cluster/release", "/cluster/receive"])
async def test_a_failure_before_the_commit_undoes_the_move_everywhere(failing: str) -> None:
    nodes, calls = cluster()
    front = FakeFront()
    owner = "n1" if failing == "/cluster/release" else "n3"
    nodes[owner].fail[f"POST {failing}"] = [PeerError(owner, "422 the copy does not match", status=422)]
    plan = await plan_for(nodes, "0:9", "n3")
    calls.clear()
    report = await execute(plan, nodes, front)
    assert report.undone and not report.ok and not report.committed
    assert "does not match" in (report.error or "")
    changes = posts(calls)
    assert not any(what.endswith("/cluster/placement") for what in changes)
    undo = [(what, body["role"], body["outcome"]) for what, body in calls
            if what.endswith("/cluster/finish")]
    # the source first: it serves again before anything else
    assert undo == [("n1 /cluster/finish", "source", "undo"),
                    ("n2 /cluster/finish", "bystander", "undo"),
                    ("n3 /cluster/finish", "target", "undo")]
    assert front.tables == []
    assert {node.table.version for node in nodes.values()} == {1}
    assert report.unavailable_s is not None  # fence to undone
    assert "failed and undone" in report.summary()


async def test_totals_that_differ_between_source_and_target_undo_the_move() -> None:
    nodes, _calls = cluster()
    nodes["n3"].totals = {**TOTALS, "operations": TOTALS["operations"] - 1}
    plan = await plan_for(nodes, "0:9", "n3")
    report = await execute(plan, nodes, FakeFront())
    assert report.undone and "verified" in (report.error or "")
    assert {node.table.version for node in nodes.values()} == {1}


async def test_a_commit_the_source_refuses_undoes_the_move() -> None:
    nodes, _calls = cluster()
    nodes["n1"].fail["POST /cluster/placement"] = [
        PeerError("n1", "409 move does not hold this node", status=409)
    ]
    plan = await plan_for(nodes, "0:9", "n3")
    report = await execute(plan, nodes, FakeFront())
    assert report.undone and not report.committed
    assert nodes["n3"].table.version == 1  # the target never got the table


async def test_a_commit_whose_answer_is_lost_is_settled_by_asking_the_source() -> None:
    nodes, _calls = cluster()
    plan = await plan_for(nodes, "0:9", "n3")
    source = nodes["n1"]
    real_call = source.call

    async def applies_then_drops_the_answer(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        answer = await real_call(method, path, body, **kw)
        if method == "POST" and path == "/cluster/placement":
            raise PeerError("n1", "POST /cluster/placement: timed out")
        return answer

    source.call = applies_then_drops_the_answer  # type: ignore[method-assign]
    report = await execute(plan, nodes, FakeFront())
    assert report.ok and report.committed, report
    assert {node.table.version for node in nodes.values()} == {2}


async def test_a_source_that_vanishes_during_the_commit_leaves_the_move_uncertain_not_undone(
    autojump_clock: trio.abc.Clock,
) -> None:
    nodes, calls = cluster()
    plan = await plan_for(nodes, "0:9", "n3")
    source = nodes["n1"]
    real_call = source.call

    async def vanishes(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        if method == "POST" and path == "/cluster/placement":
            source.gone = True
        return await real_call(method, path, body, **kw)

    source.call = vanishes  # type: ignore[method-assign]
    calls.clear()
    report = await execute(plan, nodes, FakeFront())
    assert report.uncertain and not report.undone and not report.ok
    # nothing is undone (the source may have switched) and nothing goes forward
    assert not any(what.endswith("/cluster/finish") for what in posts(calls))
    assert nodes["n3"].table.version == 1
    assert "outcome is unknown" in report.summary()


async def test_a_commit_judged_refused_that_lands_late_is_reported_as_switched(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The source applies the table after its answer timed out and after a first look at its
    version: the undo waits for it (the node's finish waits for requests in flight), and the
    report says the move switched, so that a second run finishes it."""
    nodes, _calls = cluster()
    plan = await plan_for(nodes, "0:9", "n3")
    source = nodes["n1"]
    real_call = source.call
    pending: list[Any] = []

    async def slow_commit(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        if method == "POST" and path == "/cluster/placement":
            pending.append(body)
            raise PeerError("n1", "POST /cluster/placement: timed out")
        if path == "/cluster/finish" and pending:  # the commit completes before the undo
            source.table = parse(pending.pop()["table"])
        return await real_call(method, path, body, **kw)

    source.call = slow_commit  # type: ignore[method-assign]
    report = await execute(plan, nodes, FakeFront())
    assert report.committed and not report.undone and not report.ok, report
    assert source.table.version == 2 and nodes["n3"].table.version == 1
    assert "Run the same command again" in report.summary()


async def test_a_move_cancelled_before_the_commit_is_undone_on_the_way_out() -> None:
    nodes, calls = cluster()
    plan = await plan_for(nodes, "0:9", "n3")
    target = nodes["n3"]
    real_call = target.call
    receiving = trio.Event()

    async def slow_receive(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        if path == "/cluster/receive":
            receiving.set()
            await trio.sleep_forever()
        return await real_call(method, path, body, **kw)

    target.call = slow_receive  # type: ignore[method-assign]
    calls.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(execute, plan, nodes, FakeFront())
        await receiving.wait()
        nursery.cancel_scope.cancel()  # Ctrl-C
    undo = [(what, body["outcome"]) for what, body in calls if what.endswith("/cluster/finish")]
    assert undo == [("n1 /cluster/finish", "undo"), ("n2 /cluster/finish", "undo"),
                    ("n3 /cluster/finish", "undo")]
    assert all(node.lock is None for node in nodes.values())


async def test_after_the_commit_failures_are_retried_and_never_undone(
    autojump_clock: trio.abc.Clock,
) -> None:
    nodes, calls = cluster()
    front = FakeFront(fail=[RuntimeApiError("cannot reach HAProxy")] * 2)
    plan = await plan_for(nodes, "0:9", "n3")
    report = await execute(plan, nodes, front)
    assert report.ok, report  # the third try switched the map
    assert [t.version for t in front.tables] == [2]

    nodes, calls = cluster()
    front = FakeFront(fail=[RuntimeApiError("cannot reach HAProxy")] * 10_000)
    plan = await plan_for(nodes, "0:9", "n3")
    report = await execute(plan, nodes, front, post_commit_timeout_s=5)
    assert report.committed and not report.ok and not report.undone
    assert report.left == ["HAProxy's map", "finish on n1", "finish on n2", "finish on n3"]
    assert {node.table.version for node in nodes.values()} == {2}  # the nodes did switch
    assert not any(body.get("outcome") == "undo" for what, body in calls
                   if what.endswith("/cluster/finish"))
    assert "Run the same command again" in report.summary()


async def test_a_node_that_refuses_its_lock_leaves_nothing_locked() -> None:
    nodes, calls = cluster()
    nodes["n2"].fail["POST /cluster/lock"] = [PeerError("n2", "409 locked by move x", status=409)]
    plan = await plan_for(nodes, "0:9", "n3")
    calls.clear()
    report = await execute(plan, nodes, FakeFront())
    assert report.undone and report.unavailable_s is None  # nothing was fenced
    assert posts(calls) == [
        "n1 /cluster/lock", "n3 /cluster/lock", "n2 /cluster/lock",
        "n1 /cluster/finish", "n3 /cluster/finish",
    ]
    assert all(node.lock is None for node in nodes.values())


# -- the plan -----------------------------------------------------------------------------------


def views(tables: dict[str, Placement], moves: dict[str, dict[str, Any]] | None = None) -> dict[str, NodeView]:
    return {
        name: NodeView(name, table, {"version": table.version, "move": (moves or {}).get(name)})
        for name, table in tables.items()
    }


def test_the_plan_refuses_while_a_move_holds_a_node_or_the_tables_disagree() -> None:
    table = generate(["n1", "n2"])
    with pytest.raises(MoveRefused, match="a move holds n2"):
        plan_move(views({"n1": table, "n2": table}, {"n2": {"move": "x", "lease_left_s": 12}}),
                  {0}, "n2")
    other = Placement(2, tuple(reversed(table.owners)))
    same_version = Placement(2, table.owners)
    with pytest.raises(MoveRefused, match="different tables of version 2"):
        plan_move(views({"n1": other, "n2": same_version}), {0}, "n2")
    with pytest.raises(MoveRefused, match="no node n9"):
        plan_move(views({"n1": table, "n2": table}), {0}, "n9")
    with pytest.raises(MoveRefused, match="lag behind"):  # two versions behind: not one move
        plan_move(views({"n1": table.moved({0}, "n2").moved({1}, "n2"), "n2": table}), {0}, "n2")


def test_slots_already_on_the_target_only_tidy() -> None:
    table = generate(["n1", "n2"])
    plan = plan_move(views({"n1": table, "n2": table}), {SLOT_COUNT - 1}, "n2")
    assert plan is not None and plan.kind == "tidy" and not plan.copy and not plan.commit
    assert plan.roles == {"n1": "source", "n2": "bystander"}  # n1 drops any copies it kept
    assert plan_move(views({"n1": table, "n2": table}), {SLOT_COUNT - 1}, "n2", tidy=False) is None


async def test_a_move_that_switched_but_did_not_finish_is_finished_by_the_same_command() -> None:
    nodes, calls = cluster()
    before = nodes["n1"].table
    after = before.moved(range(10), "n3")
    nodes["n1"].table = after  # the source committed; n3 and n2 never got the table
    with pytest.raises(MoveRefused, match=r"cluster move 0:9 --to n3"):
        plan_move(await survey(nodes), parse_slots("0:4"), "n3")
    plan = await plan_for(nodes, "0:9", "n3")
    assert (plan.kind, plan.copy, plan.commit, plan.lagging) == ("finish", True, False, ("n3", "n2"))
    assert plan.before is not None and plan.before.version == 1 and plan.after == after
    calls.clear()
    report = await execute(plan, nodes, FakeFront())
    assert report.ok
    # copied again from n1 (which kept its copies), no second commit
    assert posts(calls) == [
        "n1 /cluster/lock", "n3 /cluster/lock", "n2 /cluster/lock",
        "n1 /cluster/release", "n3 /cluster/receive",
        "n3 /cluster/placement", "n3 /cluster/unfence", "n2 /cluster/placement",
        "n1 /cluster/finish", "n2 /cluster/finish", "n3 /cluster/finish",
    ]
    assert {node.table.version for node in nodes.values()} == {2}


async def test_slots_of_two_owners_move_in_one_move_per_owner() -> None:
    nodes, _calls = cluster()
    border = next(s for s in range(SLOT_COUNT) if nodes["n1"].table.owners[s] == "n2")
    slots = set(range(border - 2, border + 3))
    reports = await move_slots(nodes, FakeFront(), slots, "n3")
    assert [(r.plan.source, format_slots(r.plan.slots), r.plan.after.version) for r in reports] == [
        ("n1", f"{border - 2}:{border - 1}", 2), ("n2", f"{border}:{border + 2}", 3),
    ]
    assert all(r.ok for r in reports)
    assert all(nodes["n2"].table.owners[s] == "n3" for s in slots)


def test_a_rebalance_is_cut_into_moves_of_bounded_size() -> None:
    table = generate(["n1", "n2"])
    pieces = rebalance_moves(table, ["n1", "n2", "n3"], 100)
    wanted = rebalance(table, ["n1", "n2", "n3"])
    assert all(len(slots) <= 100 for slots, _ in pieces)
    moved = {slot: target for slots, target in pieces for slot in slots}
    assert moved == {s: wanted.owners[s] for s in range(SLOT_COUNT) if wanted.owners[s] != table.owners[s]}
    assert {target for _, target in pieces} == {"n3"}


# -- the command line ---------------------------------------------------------------------------


def test_the_commands_refuse_what_they_cannot_use(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from verdant_trio.service.cli import main
    from verdant_trio.service.cluster.tablefile import write_placement

    write_placement(tmp_path / "placement.map", generate(["n1", "n2"]))
    config = tmp_path / "n1.toml"
    config.write_text(
        '[auth]\ntoken_secret = "0123456789abcdef0123456789abcdef"\n'
        f'[storage]\ndatabases_dir = "{tmp_path / "dbs"}"\n'
        f'[cluster]\nnode_id = "n1"\nplacement_file = "{tmp_path / "placement.map"}"\n'
    )
    cases = [
        (["cluster", "move", "5", "--to", "n2"], "--config"),
        (["cluster", "move", "5:2", "--to", "n2", "-c", str(config)], "SLOTS: 5:2"),
        (["cluster", "move", "--to", "n2", "-c", str(config)], "name the slots"),
        (["cluster", "move", "5", "--to", "n2", "-c", str(config)], "internal_port is not set"),
        (["cluster", "status", "-c", str(config)], "internal_port is not set"),
        (["cluster", "rebalance", "--nodes", "n1,n2", "-c", str(config)], "internal_port"),
    ]
    for argv, problem in cases:
        assert main(argv) == 1, argv
        assert problem in capsys.readouterr().err, argv
