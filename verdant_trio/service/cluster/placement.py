"""Which node owns a library: its slot, and the placement table from slots to nodes.

**The slot** of a library id is `crc32(routing_key(id)) % SLOT_COUNT`, and HAProxy computes the
same from the token with its own converters (`haproxy.py`), so the two agree without any code of
ours in HAProxy. The routing key is what HAProxy can read the same from every token, whoever
minted it:

- ASCII letters, digits and the punctuation in `KEY_PUNCTUATION` are kept: every JSON writer we
  know of (PyJWT, Node's `jsonwebtoken` and `jose`, Go, PHP, .NET, Gson, Jackson, serde) writes
  them raw;
- every other ASCII character is dropped: some writer escapes it (PHP `\\/`, Go `<>&`, .NET
  `<>&'+` and the backquote, Gson `<>&='`; `"`, `\\` and control characters always);
- every non-ASCII character becomes one `~` (`NON_ASCII_MARK`): PyJWT writes it as `\\uXXXX`
  (two of them for a character outside the BMP), `jsonwebtoken` as raw UTF-8, and HAProxy can
  count characters in both forms but cannot turn one form into the other.

The price: ids that differ only in dropped characters share a slot (`a/b` and `ab`), and so do
ids that differ only in which non-ASCII characters they have (`日本` and `中文` are both `~~`).
That moves load, never correctness: a slot is only a unit of placement.

`SLOT_COUNT` is part of the stored data's meaning (file URLs carry slots), so it never changes.

**The placement table** is a text file that every node and HAProxy read, HAProxy as a `map_int`
map file, so there is nothing to convert:

    #! verdant-trio placement format=1 slots=4096 version=3
    # any other line starting with '#' is a comment
    0:1365 node-1
    1366:2730 node-2
    2731:4095 node-3

Each entry is `<first>:<last> <node>` (inclusive) or `<slot> <node>`; every slot appears
exactly once. `version` grows with every change, so a node can tell an older table from a newer
one. Node names are what HAProxy names backends after, so they are short and plain.
"""

from __future__ import annotations

import re
import string
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

SLOT_COUNT: Final = 4096
"""Fixed forever: a library's slot is stored in the file URLs clients keep."""

KEY_PUNCTUATION: Final = " !#$%()*,-.:;?@[]^_{|}~"
"""The punctuation kept in a routing key: ASCII that no JSON writer we know of escapes.

Left out on purpose: `"` and `\\` (always escaped), `/` (PHP), `<`, `>`, `&` (Go, .NET, Gson),
`'` (.NET, Gson), `+` and the backquote (.NET), `=` (Gson), and DEL (Python).
"""
KEY_CHARACTERS: Final = frozenset(string.ascii_letters + string.digits + KEY_PUNCTUATION)
NON_ASCII_MARK: Final = "~"
"""What each non-ASCII character counts as in a routing key."""

FORMAT_VERSION: Final = 1
MAX_NODES: Final = 256
NODE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
"""A node name is an HAProxy backend and server name, a map value and a systemd instance name."""

_HEADER: Final = "#! verdant-trio placement"
_HEADER_FIELD: Final = re.compile(r"([a-z]+)=(0|[1-9][0-9]{0,17})")
_NUMBER: Final = r"(?:0|[1-9][0-9]{0,5})"
_ENTRY: Final = re.compile(rf"({_NUMBER})(?::({_NUMBER}))?[ \t]+(\S+)")


def routing_key(library_id: str) -> bytes:
    """The part of a library id that HAProxy reads the same from every token: see the module."""
    return "".join(
        ch if ch in KEY_CHARACTERS else NON_ASCII_MARK if ch > "\x7f" else ""
        for ch in library_id
    ).encode("ascii")


def slot_of(library_id: str) -> int:
    """The slot of a library id, as HAProxy computes it (`crc32` then `mod`)."""
    return zlib.crc32(routing_key(library_id)) % SLOT_COUNT


def check_node_name(name: str) -> str:
    """`name` if it can name a node, else `ValueError` saying what a name may be."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise ValueError(
            f"invalid node name {name!r}: use 1-63 ASCII letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


class PlacementError(ValueError):
    """A placement table that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class SlotRange:
    """Consecutive slots `first..last` (inclusive) owned by one node."""

    first: int
    last: int
    node: str

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    @property
    def key(self) -> str:
        """The slots as a map key: `first:last`, or `slot` alone (HAProxy's integer ranges)."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    def __str__(self) -> str:
        return f"{self.key} {self.node}"


@dataclass(frozen=True, slots=True)
class SlotMove:
    """Slots `first..last` (inclusive) that go from `source` to `target`."""

    first: int
    last: int
    source: str
    target: str

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        slots = str(self.first) if self.first == self.last else f"{self.first}:{self.last}"
        return f"{slots} {self.source} -> {self.target}"


@dataclass(frozen=True, slots=True)
class Placement:
    """Slot → node for every slot, and the table's version."""

    version: int
    owners: tuple[str, ...]
    """`owners[slot]` is the node that owns `slot`; exactly `SLOT_COUNT` entries."""

    def __post_init__(self) -> None:
        if len(self.owners) != SLOT_COUNT:
            raise ValueError(f"a placement has {SLOT_COUNT} slots, got {len(self.owners)}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"a placement version is a positive integer, got {self.version!r}")
        names = set(self.owners)
        for name in names:
            check_node_name(name)
        if len(names) > MAX_NODES:
            raise ValueError(f"a placement has at most {MAX_NODES} nodes, got {len(names)}")

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes that own at least one slot, in the order of their first slot."""
        return tuple(dict.fromkeys(self.owners))

    def owner(self, slot: int) -> str:
        return self.owners[slot]

    def owner_of(self, library_id: str) -> str:
        return self.owners[slot_of(library_id)]

    def slots_of(self, node: str) -> frozenset[int]:
        return frozenset(slot for slot, owner in enumerate(self.owners) if owner == node)

    def counts(self) -> dict[str, int]:
        """Slots per node."""
        return dict(Counter(self.owners))

    def ranges(self) -> list[SlotRange]:
        """The table as maximal runs of consecutive slots with one owner."""
        return [SlotRange(first, last, node) for first, last, node in _runs(self.owners)]

    def moved(self, slots: Iterable[int], target: str) -> Placement:
        """This table with `slots` given to `target`, one version later."""
        check_node_name(target)
        owners = list(self.owners)
        for slot in slots:
            if not 0 <= slot < SLOT_COUNT:
                raise ValueError(f"slot {slot} is outside 0-{SLOT_COUNT - 1}")
            owners[slot] = target
        return Placement(self.version + 1, tuple(owners))


def _runs(owners: Sequence[str]) -> Iterator[tuple[int, int, str]]:
    first = 0
    for slot in range(1, len(owners) + 1):
        if slot == len(owners) or owners[slot] != owners[first]:
            yield first, slot - 1, owners[first]
            first = slot


def _check_node_list(nodes: Sequence[str]) -> list[str]:
    names = [check_node_name(node) for node in nodes]
    if not names:
        raise ValueError("a cluster needs at least one node")
    if len(names) > MAX_NODES:
        raise ValueError(f"a cluster has at most {MAX_NODES} nodes, got {len(names)}")
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise ValueError(f"node names must be unique: {', '.join(duplicates)} repeated")
    return names


def generate(nodes: Sequence[str]) -> Placement:
    """A first table: the slots split into one contiguous, near-equal range per node, in order."""
    names = _check_node_list(nodes)
    base, extra = divmod(SLOT_COUNT, len(names))
    owners: list[str] = []
    for index, name in enumerate(names):
        owners.extend([name] * (base + (1 if index < extra else 0)))
    return Placement(1, tuple(owners))


def rebalance(current: Placement, nodes: Sequence[str]) -> Placement:
    """The table for a new node list that moves as few slots as possible, one version later.

    Each node in `nodes` ends with `SLOT_COUNT // len(nodes)` slots, the first
    `SLOT_COUNT % len(nodes)` of them with one more. A node keeps its slots (lowest first) up to
    its share; the slots of removed nodes and the excess of the others go, in slot order, to the
    nodes short of their share, in list order, so the ranges stay mostly contiguous.
    """
    names = _check_node_list(nodes)
    base, extra = divmod(SLOT_COUNT, len(names))
    share = {name: base + (1 if index < extra else 0) for index, name in enumerate(names)}
    kept: Counter[str] = Counter()
    owners: list[str | None] = []
    for owner in current.owners:
        if owner in share and kept[owner] < share[owner]:
            kept[owner] += 1
            owners.append(owner)
        else:
            owners.append(None)
    short = iter([name for name in names for _ in range(share[name] - kept[name])])
    result = tuple(owner if owner is not None else next(short) for owner in owners)
    if result == current.owners:
        return current
    return Placement(current.version + 1, result)


def moves_between(old: Placement, new: Placement) -> list[SlotMove]:
    """What changes from `old` to `new`, as runs of consecutive slots with one source and target."""
    pairs = [f"{a}\0{b}" if a != b else "" for a, b in zip(old.owners, new.owners, strict=True)]
    moves = []
    for first, last, pair in _runs(pairs):
        if pair:
            source, target = pair.split("\0")
            moves.append(SlotMove(first, last, source, target))
    return moves


def render(placement: Placement) -> str:
    """The table file's text (see the module docstring); `parse` reads it back."""
    counts = ", ".join(f"{node} {n}" for node, n in placement.counts().items())
    lines = [
        f"{_HEADER} format={FORMAT_VERSION} slots={SLOT_COUNT} version={placement.version}",
        "# Which verdant-trio node owns each library slot. Every node and HAProxy read this",
        "# file; HAProxy as a map_int map: '<first>:<last> <node>' (inclusive) or '<slot> <node>'.",
        "# Change it with `verdant-trio cluster move` or `rebalance`, never by hand on one node.",
        f"# slots per node: {counts}",
    ]
    lines.extend(str(run) for run in placement.ranges())
    return "\n".join(lines) + "\n"


def parse(text: str, source: str = "placement table") -> Placement:
    """Read a table, refusing anything HAProxy and the nodes might read differently."""
    version: int | None = None
    owners: list[str | None] = [None] * SLOT_COUNT
    first_line: dict[int, int] = {}

    def fail(lineno: int | None, message: str) -> PlacementError:
        where = f"{source}:{lineno}" if lineno is not None else source
        return PlacementError(f"{where}: {message}")

    if "\r" in text:
        raise fail(None, "carriage returns (HAProxy would read them into node names)")
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t")
        if line.startswith(_HEADER):
            if version is not None:
                raise fail(lineno, "a second header line")
            try:
                version = _parse_header(line[len(_HEADER) :])
            except ValueError as exc:
                raise fail(lineno, str(exc)) from None
            continue
        if not line or line.startswith("#"):
            continue
        if version is None:
            raise fail(lineno, f"an entry before the header line ({_HEADER} format=...)")
        match = _ENTRY.fullmatch(line)
        if not match:
            raise fail(lineno, f"expected '<slot> <node>' or '<first>:<last> <node>', got {line!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        node = match.group(3)
        if not NODE_NAME.fullmatch(node):
            raise fail(lineno, f"invalid node name {node!r}")
        if last < first:
            raise fail(lineno, f"the range {first}:{last} is backwards")
        if last >= SLOT_COUNT:
            raise fail(lineno, f"slot {last} is outside 0-{SLOT_COUNT - 1}")
        for slot in range(first, last + 1):
            if owners[slot] is not None:
                raise fail(lineno, f"slot {slot} is already given (line {first_line[slot]})")
            owners[slot] = node
            first_line[slot] = lineno
    if version is None:
        raise fail(None, f"no header line ({_HEADER} format={FORMAT_VERSION} ...)")
    missing = [slot for slot, owner in enumerate(owners) if owner is None]
    if missing:
        shown = ", ".join(_missing_runs(missing)[:5])
        raise fail(None, f"{len(missing)} slots have no node: {shown}")
    try:
        return Placement(version, tuple(o for o in owners if o is not None))
    except ValueError as exc:
        raise fail(None, str(exc)) from None


def _parse_header(rest: str) -> int:
    """The version from a header line's fields; `ValueError` says what is wrong."""
    fields: dict[str, int] = {}
    for word in rest.split():
        match = _HEADER_FIELD.fullmatch(word)
        if not match or match.group(1) in fields:
            raise ValueError(f"unreadable header field {word!r}")
        fields[match.group(1)] = int(match.group(2))
    unknown = sorted(set(fields) - {"format", "slots", "version"})
    if unknown:
        raise ValueError(f"unknown header field {unknown[0]!r}")
    if fields.get("format") != FORMAT_VERSION:
        raise ValueError(f"format={fields.get('format')} is not format={FORMAT_VERSION}")
    if fields.get("slots") != SLOT_COUNT:
        raise ValueError(f"the table has slots={fields.get('slots')}, this server uses {SLOT_COUNT}")
    version = fields.get("version")
    if version is None or version < 1:
        raise ValueError("the header needs version=<a positive integer>")
    return version


def _missing_runs(slots: list[int]) -> list[str]:
    runs: list[list[int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot - 1:
            runs[-1][1] = slot
        else:
            runs.append([slot, slot])
    return [str(a) if a == b else f"{a}:{b}" for a, b in runs]


def format_slots(slots: Iterable[int]) -> str:
    """Slots as `first:last` runs and single slots, comma-separated (`0:9,17`); `parse_slots`
    reads it back. How the CLI takes slots and the node-to-node API sends them."""
    return ",".join(_missing_runs(sorted(set(slots))))


def parse_slots(text: str) -> frozenset[int]:
    """`0:9,17,100:200` -> those slots; `ValueError` for anything else (an empty list too)."""
    if not isinstance(text, str):
        raise ValueError(f"slots are text like 0:9,17, got {text!r}")
    slots: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(rf"\s*({_NUMBER})(?::({_NUMBER}))?\s*", part)
        if not match:
            raise ValueError(f"expected a slot or first:last, got {part.strip()!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first or last >= SLOT_COUNT:
            raise ValueError(f"{part.strip()}: slots are 0-{SLOT_COUNT - 1}, first:last ascending")
        slots.update(range(first, last + 1))
    return frozenset(slots)
