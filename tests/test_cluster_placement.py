"""The placement table: slots of library ids, the file format and its errors, moves."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest

from verdant_trio.service.cluster.haproxy import (
    JSON_KEY_PASSES,
    HaproxySettings,
    parse_node,
    render_config,
)
from verdant_trio.service.cluster.placement import (
    SLOT_COUNT,
    Placement,
    PlacementError,
    generate,
    moves_between,
    parse,
    rebalance,
    render,
    routing_key,
    slot_of,
)
from verdant_trio.service.cluster.tablefile import read_placement, write_placement

HEADER = f"#! verdant-trio placement format=1 slots={SLOT_COUNT} version=4"


def test_the_routing_key_keeps_what_every_json_writer_writes_raw() -> None:
    assert routing_key("my-library_1.0") == b"my-library_1.0"
    assert routing_key("a b!#$%()*,-.:;?@[]^_{|}~") == b"a b!#$%()*,-.:;?@[]^_{|}~"
    assert routing_key("a\"b\\c/d<e>f&g'h+i=j`k\x7fl") == b"abcdefghijkl"
    assert routing_key("über 日本 😀") == b"~ber ~~ ~"  # one mark per character, astral too
    assert routing_key("日本") == routing_key("中文") == b"~~"


def test_the_slot_is_crc32_of_the_key_modulo_the_slot_count() -> None:
    for lib in ("plain-lib", "über", "a/b", "日本", "x\\u0041"):
        assert slot_of(lib) == zlib.crc32(routing_key(lib)) % SLOT_COUNT
    assert slot_of("a/b") == slot_of("ab")  # the documented price of dropping characters
    assert slot_of("日本") == slot_of("~~")


def haproxy_key(payload: bytes) -> bytes:
    """The generated configuration's passes, run with Python's `re` on a payload as written."""
    written = re.fullmatch(rb'.*"lib":"((?:\\.|[^"\\])*)".*', payload, re.DOTALL)
    assert written is not None
    key = written.group(1)
    for regex, substitute in JSON_KEY_PASSES:
        key = re.sub(regex.encode(), substitute.encode(), key)
    return key


@pytest.mark.parametrize(
    "lib", ["über/\"x\"", "日本-1", "a\\u0041", "\\\\u00e9", "\u2028+=", "😀&<>", "Ω\\", "~ü"]
)
def test_the_passes_find_the_key_whether_the_payload_escapes_or_not(lib: str) -> None:
    escaped = json.dumps({"sub": "u", "lib": lib}, separators=(",", ":")).encode()
    raw = json.dumps({"sub": "u", "lib": lib}, separators=(",", ":"), ensure_ascii=False).encode()
    assert haproxy_key(escaped) == haproxy_key(raw) == routing_key(lib)


def test_a_generated_table_splits_the_slots_evenly_in_ranges_and_reads_back() -> None:
    table = generate(["a", "b", "c"])
    assert table.counts() == {"a": 1366, "b": 1365, "c": 1365}
    assert [str(r) for r in table.ranges()] == ["0:1365 a", "1366:2730 b", "2731:4095 c"]
    text = render(table)
    assert text.splitlines()[0] == f"#! verdant-trio placement format=1 slots={SLOT_COUNT} version=1"
    assert parse(text) == table


def test_rebalance_moves_only_what_it_must() -> None:
    three = generate(["a", "b", "c"])
    four = rebalance(three, ["a", "b", "c", "d"])
    assert four.version == 2
    assert four.counts() == {"a": 1024, "b": 1024, "c": 1024, "d": 1024}
    moves = moves_between(three, four)
    assert {m.target for m in moves} == {"d"}
    assert sum(m.count for m in moves) == 1024  # exactly d's share, nothing shuffled around
    two = rebalance(four, ["a", "c"])
    assert two.counts() == {"a": 2048, "c": 2048}
    assert all(four.owner(s) == two.owner(s) for s in range(SLOT_COUNT) if four.owner(s) in "ac")
    assert rebalance(two, ["a", "c"]) is two  # nothing to do: same table, same version


def test_moved_gives_slots_to_a_node_one_version_later() -> None:
    table = generate(["a", "b"]).moved([0, 1, 4095], "b")
    assert (table.version, table.owner(0), table.owner(2), table.owner(4095)) == (2, "b", "a", "b")
    assert [str(m) for m in moves_between(generate(["a", "b"]), table)] == ["0:1 a -> b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0:4095 a\n", "an entry before the header line"),
        (f"{HEADER}\n0:4094 a\n", "1 slots have no node: 4095"),
        (f"{HEADER}\n0:100 a\n100:4095 b\n", ":3: slot 100 is already given (line 2)"),
        (f"{HEADER}\n0:4096 a\n", "slot 4096 is outside 0-4095"),
        (f"{HEADER}\n9:3 a\n", "the range 9:3 is backwards"),
        (f"{HEADER}\n0:4095 a b\n", "expected '<slot> <node>'"),
        (f"{HEADER}\n0:4095 no.dots\n", "invalid node name 'no.dots'"),
        (f"{HEADER}\n0:4095 a\r\n", "carriage returns"),
        (f"{HEADER}\n{HEADER}\n", ":2: a second header line"),
        ("#! verdant-trio placement format=1 slots=1024 version=1\n", "this server uses 4096"),
        ("#! verdant-trio placement format=2 slots=4096 version=1\n", "format=2 is not format=1"),
        ("#! verdant-trio placement format=1 slots=4096\n", "version=<a positive integer>"),
        ("#! verdant-trio placement format=1 slots=4096 version=1 x=1\n", "unknown header field"),
        ("# nothing\n", "no header line"),
    ],
)
def test_a_broken_table_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(PlacementError) as caught:
        parse(text, "placement.map")
    assert str(caught.value).startswith("placement.map")
    assert message in str(caught.value)


def test_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "placement.map"
    write_placement(path, generate(["a"]))
    write_placement(path, rebalance(generate(["a"]), ["a", "b"]))
    assert read_placement(path).counts() == {"a": 2048, "b": 2048}
    assert [p.name for p in tmp_path.iterdir()] == ["placement.map"]
    with pytest.raises(PlacementError, match="cannot read"):
        read_placement(tmp_path / "missing.map")


def test_a_placement_refuses_impossible_contents() -> None:
    with pytest.raises(ValueError, match="4096 slots"):
        Placement(1, ("a",) * 10)
    with pytest.raises(ValueError, match="invalid node name"):
        Placement(1, ("a b",) * SLOT_COUNT)
    with pytest.raises(ValueError, match="unique"):
        generate(["a", "a"])


def test_the_haproxy_configuration_needs_an_address_for_every_owner() -> None:
    settings = HaproxySettings(placement_path=Path("/etc/verdant-trio/placement.map"))
    nodes = [parse_node("a=127.0.0.1:3301"), parse_node("b=[::1]:3302")]
    assert nodes[1].address == "[::1]:3302"
    config = render_config(generate(["a", "b"]), nodes, settings)
    assert "backend node_a" in config and "server b [::1]:3302 check" in config
    with pytest.raises(ValueError, match="no address: c"):
        render_config(generate(["a", "b", "c"]), nodes, settings)
    with pytest.raises(ValueError, match="must be absolute"):
        HaproxySettings(placement_path=Path("placement.map"))
    with pytest.raises(ValueError, match="name=host:port"):
        parse_node("a:3301")
