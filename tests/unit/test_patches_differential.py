"""Differential test: verdant_trio.sync.patches against the real JavaScript `applyOperations`.

Random operation sequences go through `@verdant-web/common@2.3.1` (one Node process for the
whole module, cases batched over stdin/stdout, see js/apply_patches.mjs) and through
`apply_operations`; the JSON each side would put on the wire, the deleted refs, and whether
the fold threw must agree.

Known, deliberate gaps in what is generated (each covered by unit tests instead):
* `list-set` does not exist in 2.3.1 (HEAD only).
* `list-remove` by ref changed after 2.3.1 (HEAD compares refs by type+id and no longer reads
  `.id` of null items); cases where the two versions disagree are steered away from.
* Patches that are malformed or that this module refuses as "unsupported" are regenerated.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verdant_trio.sync.patches import (
    PatchError,
    apply_operations,
    is_file_ref,
    is_object_ref,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "js" / "apply_patches.mjs"
SETUP_HINT = "run `npm ci --prefix tests/interop/node` (needs Node >= 20)"

T = TypeVar("T")


# --------------------------------------------------------------------------- the JS oracle


def _common_dir() -> Path:
    configured = os.environ.get("VERDANT_COMMON_DIR")
    if configured:
        return Path(configured)
    return REPO / "tests" / "interop" / "node" / "node_modules" / "@verdant-web" / "common"


class Oracle:
    """One long-lived Node process answering batches of cases."""

    def __init__(self) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail(f"node is not on PATH; {SETUP_HINT}")
        common = _common_dir()
        if not (common / "package.json").is_file():
            pytest.fail(f"@verdant-web/common not found at {common}; {SETUP_HINT}")
        self.proc = subprocess.Popen(
            [node, str(SCRIPT), str(common)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        hello = self._read_line()
        self.version = json.loads(hello)["version"]

    def _read_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            pytest.fail(f"the Node oracle died: {self.proc.stderr.read()}\n{SETUP_HINT}")
        return line

    def run(self, cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cases, allow_nan=False) + "\n")
        self.proc.stdin.flush()
        results: list[dict[str, Any]] = json.loads(self._read_line())
        assert len(results) == len(cases)
        return results

    def close(self) -> None:
        self.proc.communicate(timeout=10)  # EOF on stdin ends the script; closes the pipes


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    instance = Oracle()
    yield instance
    instance.close()


# --------------------------------------------------------------------------- case generation


class Chooser(Protocol):
    def pick(self, options: Sequence[T]) -> T: ...

    def integer(self, low: int, high: int) -> int: ...


class RandomChooser:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rnd.randrange(len(options))]

    def integer(self, low: int, high: int) -> int:
        return self.rnd.randint(low, high)


class DataChooser:
    """Hypothesis-driven choices, so failures shrink."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def pick(self, options: Sequence[T]) -> T:
        return options[self.data.draw(st.integers(0, len(options) - 1))]

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))


MISSING: Any = object()  # the key is left out (JavaScript `undefined`)


def oref(n: int) -> dict[str, Any]:
    return {"@@type": "ref", "id": f"doc/1:r{n}"}


def fref(n: int) -> dict[str, Any]:
    return {"@@type": "file", "id": f"file-{n}"}


PRIMITIVES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 0.5, -0.0, 1.0, 1e300, 9007199254740993, 9007199254740992,
    "", "a", "b", "0", "1", " 2 ", "0x10", "1e3", "Infinity", "doc/1:r0", "file-0",
]  # fmt: skip
REFS: list[Any] = [oref(0), oref(1), oref(2), fref(0), fref(1), {"@@type": "file", "id": "file-0", "alt": "x"}]
ODD_REFS: list[Any] = [
    {"@@type": "ref"},
    {"@@type": "ref", "id": 1},
    {"@@type": "file", "id": "doc/1:r0"},
    {"id": "doc/1:r0"},
    {"@@type": "other", "id": "doc/1:r0"},
]
OBJECTS: list[Any] = [
    {}, {"a": 1}, {"a": oref(1)}, [], [1, "a"], [[2]], [None], ["3"], [oref(0)],
    {"__proto__": 1}, {"__proto__": {}}, {"__proto__": None}, {"__proto__": {"x": 1}},
    {"__proto__": {"id": "doc/1:r0"}}, {"k": {"__proto__": [1]}},
]  # fmt: skip
NAMES: list[Any] = [
    "a", "b", "c", "x", "id", "@@type", "length", "length", "__proto__", "constructor", "toString",
    "0", "1", "2", "3", "7", "-1", "1.5", "01", "4294967295", "4294967294",
    0, 1, 2, 5, -1, 1.5, 1.0, -0.0, 1e21, 1e-7, 4294967295,
]  # fmt: skip
INDICES: list[Any] = [*range(-7, 9), 0.5, -0.5, 1.5, -1.5, 1e300, -1e300, 1.0, -0.0, 9007199254740993]
COUNTS: list[Any] = [-1, 0, 1, 1, 2, 3, 10, 0.5, 1.5, 1e300, -1e300]


def gen_value(c: Chooser) -> Any:
    kind = c.pick(["primitive", "primitive", "primitive", "ref", "ref", "odd", "object", "missing"])
    if kind == "primitive":
        return c.pick(PRIMITIVES)
    if kind == "ref":
        return c.pick(REFS)
    if kind == "odd":
        return c.pick(ODD_REFS)
    if kind == "object":
        return c.pick(OBJECTS)
    return MISSING


def gen_present_value(c: Chooser) -> Any:
    value = gen_value(c)
    return None if value is MISSING else value


def gen_container(c: Chooser, kind: str) -> Any:
    if kind == "list":
        return [gen_present_value(c) for _ in range(c.integer(0, 6))]
    if kind == "dict":
        out = {}
        for _ in range(c.integer(0, 4)):
            out[str(c.pick(NAMES))] = gen_present_value(c)
        return out
    return c.pick(["abc", 5, 0, True, False, "", "1", "a\U0001f600"])


def gen_base(c: Chooser) -> Any:
    kind = c.pick(["list", "list", "list", "dict", "dict", "missing", "null", "primitive"])
    if kind == "missing":
        return MISSING
    if kind == "null":
        return None
    return gen_container(c, kind)


def put(patch: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    if value is not MISSING:
        patch[key] = value
    return patch


def gen_list_value(c: Chooser, state: Any) -> Any:
    """Often an item already in the list, so removals/moves/adds actually hit."""
    if isinstance(state, list) and state and c.integer(0, 1):
        return c.pick(state)
    return gen_value(c)


LIST_OPS = [
    "list-push", "list-insert", "list-delete", "list-move-by-index", "list-move-by-ref", "list-remove", "list-add",
]  # fmt: skip
OTHER_OPS = ["set", "remove", "initialize", "delete", "touch"]


def gen_patch(c: Chooser, state: Any) -> dict[str, Any]:
    if isinstance(state, list):
        op = c.pick([*LIST_OPS, *LIST_OPS, "set", "remove", "initialize", "delete", "touch"])
    elif state is None:
        op = c.pick(["initialize", "initialize", "set", "list-push", "delete", "touch"])
    else:
        op = c.pick([*OTHER_OPS, "set", "set", "remove", *LIST_OPS[:3]])
    patch: dict[str, Any] = {"op": op}
    if op == "set":
        patch["name"] = c.pick(NAMES)
        put(patch, "value", gen_value(c))
    elif op == "remove":
        patch["name"] = c.pick(NAMES)
    elif op == "initialize":
        kind = c.pick(["list", "list", "dict", "dict", "primitive", "odd"])
        put(patch, "value", c.pick([MISSING, None, *OBJECTS]) if kind == "odd" else gen_container(c, kind))
    elif op == "list-push":
        put(patch, "value", gen_value(c))
    elif op == "list-insert":
        patch["index"] = c.pick(INDICES)
        shape = c.pick(["value", "value", "values", "both", "neither"])
        if shape in ("value", "both"):
            put(patch, "value", gen_value(c))
        if shape in ("values", "both"):
            patch["values"] = [gen_present_value(c) for _ in range(c.integer(0, 3))]
    elif op == "list-delete":
        patch["index"] = c.pick(INDICES)
        patch["count"] = c.pick(COUNTS)
    elif op == "list-move-by-index":
        patch["from"] = c.pick(INDICES)
        patch["to"] = c.pick(INDICES)
    elif op == "list-move-by-ref":
        patch["value"] = gen_list_value(c, state)
        if patch["value"] is MISSING:
            patch["value"] = oref(9)
        patch["index"] = c.pick(INDICES)
    elif op == "list-remove":
        put(patch, "value", gen_list_value(c, state))
        put(patch, "only", c.pick([MISSING, MISSING, "first", "last"]))
    elif op == "list-add":
        put(patch, "value", gen_list_value(c, state))
    fresh: dict[str, Any] = json.loads(json.dumps(patch))  # new objects, as JSON.parse makes on the JS side
    return fresh


def _id_of(item: Any) -> Any:
    return item.get("id", MISSING) if isinstance(item, dict) else MISSING


def _same_id(a: Any, b: Any) -> bool:
    if a is MISSING or b is MISSING:
        return a is b
    return type(a) is type(b) and a == b


def diverges_from_head(state: Any, patch: dict[str, Any]) -> bool:
    """Would 2.3.1's `list-remove` behave differently from HEAD's (which we implement)?

    2.3.1: an object-ref value matches any item with `item.id === value.id` (throwing on
    null/undefined items); a file-ref value is looked up with `indexOf` (identity, never found).
    Conservative: the (finished) state shows holes and undefined items as None.
    """
    if patch["op"] != "list-remove" or not isinstance(state, list):
        return False
    value = patch.get("value", MISSING)
    if is_object_ref(value):
        for item in state:
            if item is None:
                return True
            if not is_object_ref(item) and _same_id(_id_of(item), _id_of(value)):
                return True
        return False
    if is_file_ref(value):
        return any(is_file_ref(item) and _same_id(_id_of(item), _id_of(value)) for item in state)
    return False


def gen_case(c: Chooser, stats: Counter[str] | None = None) -> dict[str, Any]:
    """A base and up to 10 operations; ends early at an operation JavaScript throws on.

    Each candidate is checked by replaying the whole prefix with `apply_operations` (the
    in-fold state, holes and all, is what decides whether 2.3.1 and HEAD agree).
    """
    base = gen_base(c)
    start = None if base is MISSING else base
    state = copy.deepcopy(start)
    ops: list[dict[str, Any]] = []
    for step in range(c.integer(1, 10)):
        for _attempt in range(8):
            patch = gen_patch(c, state)
            if diverges_from_head(state, patch):
                continue
            candidate = [*ops, {"oid": "doc/1:x", "timestamp": f"t{step}", "data": patch}]
            try:
                next_state = apply_operations(copy.deepcopy(start), candidate)
            except PatchError as error:
                if error.kind != "invalid":
                    continue  # malformed/unsupported: not comparable with JavaScript
                if stats is not None:
                    stats["ends-in-js-error"] += 1
                return _case(base, candidate)
            ops, state = candidate, next_state
            if stats is not None:
                stats[patch["op"]] += 1
            break
    return _case(base, ops)


def _case(base: Any, ops: list[dict[str, Any]]) -> dict[str, Any]:
    case: dict[str, Any] = {"ops": ops}
    if base is not MISSING:
        case["base"] = base
    fresh: dict[str, Any] = json.loads(json.dumps(case))
    return fresh


# --------------------------------------------------------------------------- comparison


def canonical(value: Any) -> Any:
    """JSON as JavaScript reads it: every number is a double, -0 prints as 0."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) + 0.0
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return {key: canonical(item) for key, item in value.items()}


def run_python(case: dict[str, Any]) -> dict[str, Any]:
    case = json.loads(json.dumps(case))
    refs: list[dict[str, Any]] = []
    try:
        result = apply_operations(case.get("base"), case["ops"], refs)
    except PatchError as error:
        return {"ok": False, "kind": error.kind, "error": str(error), "refs": canonical(refs)}
    return {"ok": True, "value": canonical(result), "refs": canonical(refs)}


def mismatch(case: dict[str, Any], js: dict[str, Any]) -> str | None:
    """None if Python agrees with the JavaScript result for this case, else a description."""
    py = run_python(case)
    js_refs = canonical(json.loads(js["refs"]))
    if js["ok"]:
        js_value = None if js["json"] is None else canonical(json.loads(js["json"]))
        if not py["ok"]:
            return f"python raised {py['kind']}: {py['error']}; javascript returned {js['json']}"
        if py["value"] != js_value:
            return f"python {json.dumps(py['value'])} != javascript {js['json']}"
    else:
        if py["ok"]:
            return f"javascript threw {js['error']}; python returned {json.dumps(py['value'])}"
        if py["kind"] != "invalid":
            return f"javascript threw {js['error']}; python raised {py['kind']}: {py['error']}"
    if not js["ok"] and py["refs"] == js_refs[:-1]:
        # The reference pushes a removed ref just before `splice` throws; we raise first.
        return None
    if py["refs"] != js_refs:
        return f"deleted refs: python {json.dumps(py['refs'])} != javascript {js['refs']}"
    return None


def shortest_failing(oracle: Oracle, case: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The shortest prefix of the case's operations that still disagrees, for the report."""
    prefixes = [{**case, "ops": case["ops"][:n]} for n in range(1, len(case["ops"]) + 1)]
    for prefix, js in zip(prefixes, oracle.run(prefixes), strict=True):
        problem = mismatch(prefix, js)
        if problem:
            return prefix, problem
    raise AssertionError("case no longer fails")


# --------------------------------------------------------------------------- tests

SEEDED_CASES = 3000


def test_oracle_is_the_pinned_release(oracle: Oracle) -> None:
    assert oracle.version == "2.3.1"


def test_matches_javascript_on_seeded_sequences(oracle: Oracle) -> None:
    chooser = RandomChooser(seed=20240601)
    stats: Counter[str] = Counter()
    started = time.perf_counter()
    cases = [gen_case(chooser, stats) for _ in range(SEEDED_CASES)]
    results = oracle.run(cases)
    failures = [(case, problem) for case, js in zip(cases, results, strict=True) if (problem := mismatch(case, js))]
    elapsed = time.perf_counter() - started
    print(f"{len(cases)} cases, {sum(len(c['ops']) for c in cases)} operations in {elapsed:.2f}s: {dict(stats)}")
    if failures:
        case, problem = shortest_failing(oracle, failures[0][0])
        pytest.fail(f"{len(failures)}/{len(cases)} cases disagree; first, minimised:\n{json.dumps(case)}\n{problem}")
    # the generator must keep exercising every operation and the JavaScript error paths
    for op in [*LIST_OPS, *OTHER_OPS]:
        assert stats[op] >= 100, (op, stats)
    assert stats["ends-in-js-error"] >= 50, stats
    assert sum(1 for js in results if not js["ok"]) == stats["ends-in-js-error"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_matches_javascript_hypothesis(oracle: Oracle, data: st.DataObject) -> None:
    case = gen_case(DataChooser(data))
    (js,) = oracle.run([case])
    problem = mismatch(case, js)
    assert problem is None, f"{json.dumps(case)}\n{problem}"


def test_comparison_detects_disagreement(oracle: Oracle) -> None:
    """Guard against a vacuous comparison: a wrong answer must be reported."""
    case = {"base": [1, 2, 3], "ops": [{"oid": "o", "timestamp": "t", "data": {"op": "list-push", "value": 4}}]}
    (js,) = oracle.run([case])
    assert mismatch(case, js) is None
    wrong = {**js, "json": "[1,2,3]"}
    assert mismatch(case, wrong) is not None
    assert mismatch(case, {**js, "refs": json.dumps([oref(0)])}) is not None


def _single_op_cases(base: Any, patches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_case(base, [{"oid": "doc/1:x", "timestamp": "t", "data": patch}]) for patch in patches]


def _assert_all_match(oracle: Oracle, cases: list[dict[str, Any]]) -> None:
    problems = [
        f"{json.dumps(case)}\n  {problem}"
        for case, js in zip(cases, oracle.run(cases), strict=True)
        if (problem := mismatch(case, js))
    ]
    assert not problems, "\n".join(problems[:10])


def test_numeric_property_keys_match_javascript(oracle: Oracle) -> None:
    """Number::toString for numeric `name`s: random doubles of every magnitude, plus edges."""
    rnd = random.Random(7)
    names: list[Any] = [0.1, 1e21, 1e-6, 1e-7, 123456789012345680000.0, 2**53 + 1, -(2**70), 5e-324, 1.7976931348623157e308]
    for _ in range(400):  # random bit patterns across the whole exponent range
        names.append(float.fromhex(f"{rnd.choice('+-')}0x1.{rnd.getrandbits(52):013x}p{rnd.randint(-1022, 1023)}"))
    names += [rnd.uniform(-1e6, 1e6) for _ in range(100)] + [rnd.randint(-(2**64), 2**64) for _ in range(100)]
    _assert_all_match(oracle, _single_op_cases({}, [{"op": "set", "name": name, "value": 1} for name in names]))


def test_array_length_coercion_matches_javascript(oracle: Oracle) -> None:
    """`set` of a list's `length` runs ToNumber on the value: strings, arrays, booleans, null."""
    values: list[Any] = [
        0, 1, 2, 5, -1, 0.5, 2.0, -0.0, 4294967296, 1e300, True, False, None, {}, [], [4], [[2]], ["0x3"], [1, 2],
        [None], "", " ", "3", " 3 ", "\u00a0\n3\u3000", "0x1F", "0X1f", "0b11", "0o7", "+0x1", "-0x1", "1e1",
        ".5e1", "5.", "+3", "-0", "1_0", "\u0663", "Infinity", "-Infinity", "infinity", "3px", "0x", "1e", "00012",
    ]  # fmt: skip
    patches = [{"op": "set", "name": "length", "value": value} for value in values]
    patches.append({"op": "set", "name": "length"})
    _assert_all_match(oracle, _single_op_cases([1, 2, 3], patches))
