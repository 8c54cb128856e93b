"""Apply Verdant operations to JSON snapshots with the reference (JavaScript) semantics.

Every replica folds the same operations with `applyPatch` from `@verdant-web/common`; the
server must compute byte-for-byte what they compute, so this is a port of that function's
*behaviour*, including what JavaScript does with odd inputs (sparse arrays, `splice` index
clamping, properties set on arrays, strict-mode `TypeError`s).

Representation
--------------
* Snapshots are plain JSON values (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``).
* ``None`` as a snapshot means "no object": JavaScript's ``undefined`` (deleted or never
  initialized).  JavaScript treats a ``null`` base exactly like ``undefined`` and the reference
  server deletes the baseline for both, so they are not distinguished here.
* A patch field that is absent is JavaScript ``undefined`` (JSON cannot carry ``undefined``, so a
  client's ``{op: 'set', value: undefined}`` arrives without ``value``).

Ownership
---------
The base is handed over: it is mutated in place (like the reference) and returned, unless the
operation replaces it (``initialize`` returns a deep copy of the patch value, ``delete`` returns
``None``).  Values from patches are inserted by reference, never copied; that is safe because
only the top-level container of a snapshot is ever mutated, so treat nested values of both
snapshots and patches as immutable.

Fidelity
--------
Within one :func:`apply_operations` call the in-memory JavaScript state is modelled exactly:
array holes, ``undefined`` array elements, object keys set to ``undefined`` and non-index
properties set on arrays (all invisible in JSON but observable by later operations).  The
returned value is what ``JSON.stringify`` would write (holes and ``undefined`` elements become
``None``, ``undefined`` keys and array properties are dropped), so
:func:`apply_patch` is "JSON in, JSON out", like the reference server, which stores baselines as
JSON between rebases.  Dict key *order* is not reproduced (JavaScript lists integer-like keys
first), only JSON equality.

Whenever a faithful result is impossible this module raises :class:`PatchError` instead of
silently diverging, and a patch that raises has changed nothing (see ``PatchError.kind``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, cast

__all__ = [
    "MAX_SPARSE_LENGTH",
    "PatchError",
    "PatchErrorKind",
    "Snapshot",
    "apply_operations",
    "apply_patch",
    "check_patch",
    "is_file_ref",
    "is_object_ref",
    "is_ref",
]

Snapshot: TypeAlias = Any
"""A JSON value as parsed by ``json``/``orjson``; ``None`` means no object.  (``Any`` because
a precise recursive JSON type is invariant and rejects e.g. ``list[int]``.)"""
Ref: TypeAlias = dict[str, Any]

PatchErrorKind: TypeAlias = Literal["malformed", "invalid", "unsupported"]

MAX_SPARSE_LENGTH: Final = 1 << 20
"""Longest list a hole-creating write (``set`` of a far index or of ``length``) may produce.

JavaScript happily makes a sparse array of length 4294967295 and then fails to serialise it;
we refuse such writes with an ``unsupported`` :class:`PatchError` instead of allocating."""


class PatchError(ValueError):
    """A patch the server cannot apply; the base is left unchanged.

    ``kind`` says why:

    * ``"malformed"``: the patch does not have the shape of a Verdant patch (unknown ``op``,
      missing or wrongly typed structural field).  JavaScript would coerce or ignore these.
    * ``"invalid"``: well-formed, but the reference ``applyPatch`` throws on this base
      (e.g. ``list-insert`` with neither a truthy ``value`` nor ``values``).
    * ``"unsupported"``: JavaScript would accept it but the outcome depends on state this module
      deliberately does not model (prototype mutation, enormous sparse arrays).

    ``op`` is the patch's ``op`` when known; ``index`` the position of the failing operation
    when raised by :func:`apply_operations`.
    """

    def __init__(self, kind: PatchErrorKind, message: str, op: object = None) -> None:
        super().__init__(message)
        self.kind: PatchErrorKind = kind
        self.op = op
        self.index: int | None = None


class _Sentinel:
    """A JavaScript value that JSON cannot hold; lives only inside a fold."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# `undefined` (absent patch fields, undefined array elements) and an array hole.  They differ:
# `indexOf(undefined)` finds undefined elements but skips holes, `findIndex` visits both.
_UNDEFINED: Final = _Sentinel("undefined")
_HOLE: Final = _Sentinel("<hole>")

_MAX_SAFE_INT: Final = 2**53
_MAX_ARRAY_INDEX: Final = 2**32 - 2


# --------------------------------------------------------------------------- refs


def is_object_ref(value: object) -> bool:
    """``{'@@type': 'ref', 'id': ...}``: a pointer to a nested object."""
    return isinstance(value, dict) and value.get("@@type") == "ref"


def is_file_ref(value: object) -> bool:
    """``{'@@type': 'file', 'id': ...}``: a pointer to an uploaded file."""
    return isinstance(value, dict) and value.get("@@type") == "file"


def is_ref(value: object) -> bool:
    """Object or file ref; these are what removals report in ``deleted_refs``."""
    return isinstance(value, dict) and value.get("@@type") in ("ref", "file")


def _compare_refs(a: object, b: object) -> bool:
    """``compareRefs``: identical, or refs of the same ``@@type`` with ``===`` ids."""
    if _js_eq(a, b):
        return True
    if not (is_ref(a) and is_ref(b)):
        return False
    assert isinstance(a, dict) and isinstance(b, dict)
    return a["@@type"] == b["@@type"] and _js_eq(a.get("id", _UNDEFINED), b.get("id", _UNDEFINED))


# --------------------------------------------------------------------------- JS value semantics


def _int_to_double(value: int) -> float:
    """The double JavaScript would have parsed this integer literal into."""
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _js_eq(a: object, b: object) -> bool:
    """``a === b`` for JSON values (objects by identity, numbers as doubles)."""
    if a is b:
        return not (type(a) is float and a != a)
    ta = type(a)
    tb = type(b)
    if ta is str:
        return tb is str and a == b
    if ta is int or ta is float:
        if tb is not int and tb is not float:
            return False
        x = cast(float, a)
        y = cast(float, b)
        if x == y:
            return True
        # integers beyond 2**53 are compared as the doubles JavaScript parsed them into
        return (abs(x) > _MAX_SAFE_INT or abs(y) > _MAX_SAFE_INT) and _as_double(x) == _as_double(y)
    return False


def _as_double(value: float) -> float:
    return _int_to_double(value) if type(value) is int else value


def _js_truthy(value: object) -> bool:
    if value is None or value is _UNDEFINED or value is False:
        return False
    if type(value) is int or type(value) is float:
        return value == value and value != 0
    if type(value) is str:
        return value != ""
    return True


def _number_to_string(value: int | float) -> str:
    """ECMAScript ``Number::toString`` (property keys from numeric names/indices)."""
    if type(value) is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return str(value)
        value = _int_to_double(value)
    if value != value:
        return "NaN"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value < 0:
        return "-" + _number_to_string(-value)
    # repr() gives the shortest round-tripping digits, as JavaScript does; only the layout differs.
    mantissa, _, exp = repr(value).partition("e")
    int_part, _, frac = mantissa.partition(".")
    digits = int_part + frac
    point = len(int_part) + (int(exp) if exp else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(e)}"


def _property_key(name: str | int | float) -> str:
    return name if type(name) is str else _number_to_string(name)  # type: ignore[arg-type]


def _array_index(key: str) -> int | None:
    """The index if ``key`` is a canonical array index ("0".."4294967294"), else ``None``."""
    if key == "0":
        return 0
    if not key or len(key) > 10 or not ("1" <= key[0] <= "9") or not (key.isascii() and key.isdigit()):
        return None
    index = int(key)
    return index if index <= _MAX_ARRAY_INDEX else None


# StrWhiteSpaceChar: WhiteSpace and LineTerminator code points.
_JS_WHITESPACE: Final = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_DECIMAL_RE: Final = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_NON_DECIMAL_RE: Final = re.compile(r"0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)")
_RADIX: Final = {"x": 16, "o": 8, "b": 2}


def _string_to_number(text: str) -> float:
    text = text.strip(_JS_WHITESPACE)
    if not text:
        return 0.0
    if _DECIMAL_RE.fullmatch(text):
        return float(text)
    if _NON_DECIMAL_RE.fullmatch(text):
        return _int_to_double(int(text[2:], _RADIX[text[1].lower()]))
    return math.nan


def _to_display_string(value: object) -> str:
    """``ToString`` of an array element inside ``Array.prototype.join``."""
    if value is None or value is _UNDEFINED or value is _HOLE:
        return ""
    if type(value) is str:
        return value
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return _number_to_string(value)
    if isinstance(value, list):
        return ",".join(_to_display_string(item) for item in value)
    return "[object Object]"


def _to_number(value: object) -> float:
    """``ToNumber`` (needed when a ``set`` assigns an array's ``length``)."""
    if value is _UNDEFINED:
        return math.nan
    if value is None or value is False:
        return 0.0
    if value is True:
        return 1.0
    if type(value) is int:
        return _int_to_double(value)
    if type(value) is float:
        return value
    if type(value) is str:
        return _string_to_number(value)
    if isinstance(value, list):
        try:
            return _string_to_number(_to_display_string(value))
        except RecursionError:
            raise PatchError("unsupported", "array length value nested too deeply") from None
    return math.nan


def _to_integer(value: int | float) -> int | float:
    """``ToIntegerOrInfinity`` for a JSON number."""
    if type(value) is int:
        return value
    if value != value:
        return 0
    if math.isinf(value):
        return value
    return math.trunc(value)


def _relative_index(value: int | float, length: int) -> int:
    relative = _to_integer(value)
    if relative < 0:
        return int(max(length + relative, 0))
    return int(min(relative, length))


def _splice(items: list[Any], start: int | float, delete_count: int | float, insert: Sequence[Any] = ()) -> list[Any]:
    """``Array.prototype.splice(start, deleteCount, ...insert)``; holes move as holes."""
    length = len(items)
    begin = _relative_index(start, length)
    count = int(min(max(_to_integer(delete_count), 0), length - begin))
    removed = items[begin : begin + count]
    items[begin : begin + count] = insert
    return removed


def _js_ordered_values(obj: dict[str, Any]) -> list[Any]:
    """``Object.values`` order: array-index keys ascending, then insertion order."""
    indexed: list[tuple[int, Any]] = []
    named: list[Any] = []
    for key, value in obj.items():
        index = _array_index(key)
        if index is None:
            named.append(value)
        else:
            indexed.append((index, value))
    if not indexed:
        return named
    indexed.sort(key=lambda pair: pair[0])
    return [value for _, value in indexed] + named


def _is_objectish(value: object) -> bool:
    """Would assigning this to ``__proto__`` change a prototype?"""
    return value is None or isinstance(value, (dict, list))


def _proto_supplies_ref_fields(proto: object) -> bool:
    """Would an object inheriting from ``proto`` look like a ref to ``isRef``/``compareRefs``?"""
    while isinstance(proto, dict):
        if "@@type" in proto or "id" in proto:
            return True
        proto = proto.get("__proto__")
    return False


def _clone(value: Any) -> Any:
    """``cloneDeep`` of a JSON value, iteratively (no recursion limit on hostile nesting).

    ``cloneDeep`` copies with ``clone[key] = v``, so a ``__proto__`` key becomes the clone's
    prototype instead of a property: it disappears from the JSON.
    """
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        if isinstance(source, dict):
            for key, item in source.items():
                if key == "__proto__":
                    if _proto_supplies_ref_fields(item):
                        raise PatchError(
                            "unsupported", "initialize: a nested __proto__ would make an object look like a ref"
                        )
                    continue
                if isinstance(item, (dict, list)):
                    copy: Any = {} if isinstance(item, dict) else []
                    stack.append((item, copy))
                    item = copy
                target[key] = item
        else:
            for item in source:
                if isinstance(item, (dict, list)):
                    copy = {} if isinstance(item, dict) else []
                    stack.append((item, copy))
                    item = copy
                target.append(item)
    return root


# --------------------------------------------------------------------------- validation

_KNOWN_OPS: Final = frozenset(
    {
        "initialize",
        "set",
        "remove",
        "list-set",
        "list-push",
        "list-insert",
        "list-delete",
        "list-move-by-index",
        "list-move-by-ref",
        "list-remove",
        "list-add",
        "delete",
        "touch",
    }
)
_NUMBER_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "list-set": ("index",),
    "list-insert": ("index",),
    "list-delete": ("index", "count"),
    "list-move-by-index": ("from", "to"),
    "list-move-by-ref": ("index",),
}


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def _malformed(op: object, message: str) -> PatchError:
    return PatchError("malformed", f"malformed {op!s} patch: {message}", op)


def check_patch(patch: object) -> str:
    """Check a patch's shape (per the TypeScript types) and return its ``op``.

    Only structural fields are checked; ``value`` payloads are opaque JSON.  Raises a
    ``malformed`` :class:`PatchError`.  Useful at the edge, before storing an operation.
    """
    if type(patch) is not dict and not isinstance(patch, Mapping):  # (ABC check is slow)
        raise PatchError("malformed", f"patch must be an object, got {type(patch).__name__}")
    op = patch.get("op")
    if type(op) is not str:
        raise PatchError("malformed", f"patch op must be a string, got {op!r}")
    if op not in _KNOWN_OPS:
        raise PatchError("malformed", f"unsupported patch operation: {op!r}", op)
    if op == "set" or op == "remove":
        name = patch.get("name")
        if type(name) is not str and not _is_number(name):
            raise _malformed(op, f"name must be a string or number, got {name!r}")
    else:
        for field in _NUMBER_FIELDS.get(op, ()):
            if not _is_number(patch.get(field)):
                raise _malformed(op, f"{field} must be a number, got {patch.get(field)!r}")
        if op == "list-insert":
            if "values" in patch and not isinstance(patch["values"], list):
                raise _malformed(op, "values must be a list")
        elif op == "list-move-by-ref":
            if "value" not in patch:
                raise _malformed(op, "value (the ref to move) is required")
        elif op == "list-remove" and "only" in patch and patch["only"] not in ("first", "last"):
            raise _malformed(op, f"only must be 'first' or 'last', got {patch['only']!r}")
    return op


def _check_operation(operation: object) -> tuple[str, Mapping[str, Any]]:
    if type(operation) is not dict and not isinstance(operation, Mapping):
        raise PatchError("malformed", f"operation must be an object, got {type(operation).__name__}")
    data = operation.get("data")
    return check_patch(data), data  # type: ignore[return-value]


# --------------------------------------------------------------------------- the fold


class _Fold:
    """One object's state while operations are applied, including JS-only state.

    ``dirty`` means the top-level container may hold ``_HOLE``/``_UNDEFINED`` (an object keeps
    a property set to undefined: it is invisible in JSON but keeps its key order); ``expando`` holds
    non-index properties assigned to it.  Both die with the list (initialize/delete).
    """

    __slots__ = ("dirty", "expando", "refs", "value")

    def __init__(self, value: Any, refs: list[Ref] | None) -> None:
        self.value = value
        self.refs = refs
        self.dirty = False
        self.expando: dict[str, Any] | None = None

    def finish(self) -> Any:
        """What ``JSON.stringify`` writes: holes/undefined items are null, undefined keys absent."""
        value = self.value
        if self.dirty:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is _HOLE or item is _UNDEFINED:
                        value[i] = None
            elif isinstance(value, dict):
                for key in [key for key, item in value.items() if item is _UNDEFINED]:
                    del value[key]
        self.dirty = False
        return value

    def _replace(self, value: Any) -> None:
        self.value = value
        self.dirty = False
        self.expando = None

    def _check_ref(self, field: object) -> None:
        if self.refs is not None and is_ref(field):
            self.refs.append(field)  # type: ignore[arg-type]

    def apply(self, op: str, patch: Mapping[str, Any]) -> None:
        """Apply a patch whose shape :func:`check_patch` accepted."""
        base = self.value
        try:
            if base is None:
                if op == "initialize":
                    self._replace(_clone_initial(patch.get("value")))
            elif isinstance(base, list):
                _LIST_HANDLERS[op](self, base, patch)
            elif op in _ANY_HANDLERS:
                _ANY_HANDLERS[op](self, base, patch)
            # else: a list op on a non-list, which the reference logs and skips
        except PatchError as error:
            if error.op is None:
                error.op = op
            raise

    # -- property access on the top-level list, including non-index properties

    def _list_get(self, base: list[Any], key: str) -> Any:
        index = _array_index(key)
        if index is not None:
            return base[index] if index < len(base) else _UNDEFINED
        if key == "length":
            return len(base)
        return self.expando.get(key, _UNDEFINED) if self.expando else _UNDEFINED

    def _check_splice(self) -> None:
        """``splice`` builds its result via ``arr.constructor[Symbol.species]``.

        Setting a non-index property ``constructor`` on the list to a primitive (or null)
        makes every later ``splice`` throw; an object there is harmless (no ``@@species``).
        """
        expando = self.expando
        if expando and "constructor" in expando and not isinstance(expando["constructor"], (dict, list)):
            raise PatchError("invalid", "TypeError: object.constructor[Symbol.species] is not a constructor")

    def _grow(self, base: list[Any], length: int) -> None:
        """Extend with holes, as assigning past the end (or ``length``) does."""
        if length > MAX_SPARSE_LENGTH:
            raise PatchError(
                "unsupported", f"refusing to grow a list to {length} items with holes (max {MAX_SPARSE_LENGTH})"
            )
        base.extend([_HOLE] * (length - len(base)))
        self.dirty = True

    def _list_assign(self, base: list[Any], key: str, value: Any) -> None:
        """``base[key] = value`` (preceded by the reference's ``checkRef(base[key])``)."""
        index = _array_index(key)
        if index is not None:
            if index < len(base):
                self._check_ref(base[index])
                base[index] = value
            elif index == len(base):
                base.append(value)
            else:
                self._grow(base, index + 1)
                base[index] = value
            if value is _UNDEFINED:
                self.dirty = True
        elif key == "length":
            number = _to_number(value)
            if not (number >= 0 and number <= 2**32 - 1 and number == math.floor(number)):
                raise PatchError("invalid", f"RangeError: Invalid array length {_to_display_string(value)!r}")
            length = int(number)
            if length < len(base):
                del base[length:]
            elif length > len(base):
                self._grow(base, length)
        elif key == "__proto__":
            if _is_objectish(value):
                raise PatchError("unsupported", "set: replacing a list's prototype is not supported")
        else:
            expando = self.expando
            if expando is None:
                expando = self.expando = {}
            self._check_ref(expando.get(key))
            if value is _UNDEFINED:
                expando.pop(key, None)
            else:
                expando[key] = value

    # -- list operations (base is the top-level list)

    def _list_set(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        self._list_assign(base, _property_key(patch["index"]), patch.get("value", _UNDEFINED))

    def _list_push(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        value = patch.get("value", _UNDEFINED)
        base.append(value)
        if value is _UNDEFINED:
            self.dirty = True

    def _list_insert(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        value = patch.get("value", _UNDEFINED)
        if _js_truthy(value):
            self._check_splice()
            _splice(base, patch["index"], 0, (value,))
        elif "values" in patch:
            self._check_splice()
            _splice(base, patch["index"], 0, patch["values"])
        else:
            # JS: `if (!value && !values) throw` (and spreading undefined would throw too).
            raise PatchError("invalid", "list-insert: expected a truthy value or values", "list-insert")

    def _list_delete(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        # Only the item at `index` is checked for refs, even when `count` > 1.
        self._check_splice()
        self._check_ref(self._list_get(base, _property_key(patch["index"])))
        _splice(base, patch["index"], patch["count"])

    def _move(self, base: list[Any], source: int | float, target: int | float) -> None:
        self._check_splice()
        removed = _splice(base, source, 1)
        # Moving nothing (out of range) or a hole inserts `undefined`.
        item = removed[0] if removed else _UNDEFINED
        if item is _HOLE or item is _UNDEFINED:
            item = _UNDEFINED
            self.dirty = True
        _splice(base, target, 0, (item,))

    def _list_move_by_index(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        self._move(base, patch["from"], patch["to"])

    def _list_move_by_ref(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        value = patch["value"]
        found = -1  # not found: splice(-1, 1) moves the *last* item
        for i, item in enumerate(base):
            if _compare_refs(_UNDEFINED if item is _HOLE else item, value):
                found = i
                break
        self._move(base, found, patch["index"])

    def _list_remove(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        value = patch.get("value", _UNDEFINED)
        only = patch.get("only")
        matches: Callable[[Any], bool]
        if is_ref(value):
            # compareRefs: the same object, or a ref with the same @@type and id (holes are not refs)
            ref_type = value["@@type"]
            ref_id = value.get("id", _UNDEFINED)

            def matches(item: Any) -> bool:
                return item is value or (
                    type(item) is dict and item.get("@@type") == ref_type and _js_eq(item.get("id", _UNDEFINED), ref_id)
                )

        else:
            # indexOf/lastIndexOf: strict equality, skipping holes
            def matches(item: Any) -> bool:
                return item is not _HOLE and _js_eq(item, value)

        if only == "first" or only == "last":
            positions: Iterable[int] = range(len(base)) if only == "first" else range(len(base) - 1, -1, -1)
            for i in positions:
                if matches(base[i]):
                    self._check_splice()
                    self._check_ref(base[i])
                    del base[i]
                    return
            return
        kept = []
        removed = []
        for item in base:
            if matches(item):
                removed.append(item)
            else:
                kept.append(item)
        if removed:
            self._check_splice()
            for item in removed:
                self._check_ref(item)
            base[:] = kept

    def _list_add(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        value = patch.get("value", _UNDEFINED)
        if is_object_ref(value):
            value_id = value.get("id", _UNDEFINED)
            for item in base:
                if type(item) is dict and item.get("@@type") == "ref":
                    if _js_eq(item.get("id", _UNDEFINED), value_id):
                        return
                elif item is value:
                    return
        else:
            for item in base:
                # `some` skips holes; file refs and plain objects compare by identity
                if item is not _HOLE and _js_eq(item, value):
                    return
        base.append(value)
        if value is _UNDEFINED:
            self.dirty = True

    def _list_property_set(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        self._list_assign(base, _property_key(patch["name"]), patch.get("value", _UNDEFINED))

    def _list_property_remove(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        key = _property_key(patch["name"])
        index = _array_index(key)
        if index is not None:
            if index < len(base):
                self._check_ref(base[index])
                base[index] = _HOLE  # `delete arr[i]` leaves a hole, length unchanged
                self.dirty = True
        elif key == "length":
            raise PatchError("invalid", "TypeError: Cannot delete property 'length' of [object Array]", "remove")
        elif self.expando and key in self.expando:
            self._check_ref(self.expando.pop(key))

    def _list_delete_object(self, base: list[Any], patch: Mapping[str, Any]) -> None:
        for item in base:  # forEach skips holes; expando properties are not visited
            self._check_ref(item)
        self._replace(None)

    # -- operations on any non-list, non-deleted base

    def _set(self, base: Any, patch: Mapping[str, Any]) -> None:
        key = _property_key(patch["name"])
        value = patch.get("value", _UNDEFINED)
        if isinstance(base, dict):
            if key in base:
                self._check_ref(base[key])
            elif key == "__proto__":
                # Not an own property: the assignment hits Object.prototype's __proto__ setter.
                if _is_objectish(value):
                    raise PatchError("unsupported", "set: replacing an object's prototype is not supported", "set")
                return
            base[key] = value
            if value is _UNDEFINED:  # absent from JSON, but keeps its place in key order
                self.dirty = True
        elif key != "__proto__":  # the __proto__ setter ignores primitives
            raise PatchError(
                "invalid", f"TypeError: Cannot create property {key!r} on {type(base).__name__} {base!r}", "set"
            )

    def _remove(self, base: Any, patch: Mapping[str, Any]) -> None:
        key = _property_key(patch["name"])
        if isinstance(base, dict):
            if key in base:
                self._check_ref(base.pop(key))
        elif type(base) is str:
            index = _array_index(key)
            if key == "length" or (index is not None and index < len(base.encode("utf-16-le")) // 2):
                raise PatchError("invalid", f"TypeError: Cannot delete property {key!r} of [object String]", "remove")

    def _delete(self, base: Any, patch: Mapping[str, Any]) -> None:
        if isinstance(base, dict):
            for item in _js_ordered_values(base):
                self._check_ref(item)
        self._replace(None)

    def _initialize(self, base: Any, patch: Mapping[str, Any]) -> None:
        self._replace(_clone_initial(patch.get("value")))

    def _touch(self, base: Any, patch: Mapping[str, Any]) -> None:
        pass


def _clone_initial(value: Any) -> Any:
    if isinstance(value, dict) and "__proto__" in value and _is_objectish(value["__proto__"]):
        raise PatchError("unsupported", "initialize: a top-level __proto__ object would become the prototype")
    return _clone(value)


_Handler: TypeAlias = Callable[[_Fold, Any, Mapping[str, Any]], None]

_ANY_HANDLERS: Final[dict[str, _Handler]] = {
    "set": _Fold._set,
    "remove": _Fold._remove,
    "delete": _Fold._delete,
    "initialize": _Fold._initialize,
    "touch": _Fold._touch,
}
_LIST_HANDLERS: Final[dict[str, _Handler]] = {
    "set": _Fold._list_property_set,
    "remove": _Fold._list_property_remove,
    "delete": _Fold._list_delete_object,
    "initialize": _Fold._initialize,
    "touch": _Fold._touch,
    "list-set": _Fold._list_set,
    "list-push": _Fold._list_push,
    "list-insert": _Fold._list_insert,
    "list-delete": _Fold._list_delete,
    "list-move-by-index": _Fold._list_move_by_index,
    "list-move-by-ref": _Fold._list_move_by_ref,
    "list-remove": _Fold._list_remove,
    "list-add": _Fold._list_add,
}


# --------------------------------------------------------------------------- public API


def apply_patch(base: Snapshot, patch: Mapping[str, Any], deleted_refs: list[Ref] | None = None) -> Snapshot:
    """Apply one patch; returns the new snapshot (``None``: deleted / not initialized).

    ``base`` is mutated in place and usually returned.  Refs removed by the patch are appended
    to ``deleted_refs``.  On :class:`PatchError` neither ``base`` nor ``deleted_refs`` changed.
    JSON in, JSON out: JavaScript-only state (holes, array properties) does not survive between
    calls, exactly as with the reference server's stored baselines; fold a sequence with
    :func:`apply_operations` to keep it.
    """
    op = check_patch(patch)
    fold = _Fold(base, deleted_refs)
    try:
        fold.apply(op, patch)
    finally:
        result = fold.finish()
    return result


def apply_operations(
    base: Snapshot,
    operations: Iterable[Mapping[str, Any]],
    deleted_refs: list[Ref] | None = None,
    *,
    on_error: Callable[[PatchError], None] | None = None,
) -> Snapshot:
    """Fold ``{oid, timestamp, data, authz?}`` operations (already in order) onto ``base``.

    Returns ``None`` for a deleted or never-initialized object ("no baseline").  Ownership as
    for :func:`apply_patch`.

    Without ``on_error`` every operation's shape is checked first, so a malformed one raises
    before anything changes; an ``invalid``/``unsupported`` error raises with earlier
    operations already applied to ``base`` in place (``error.index`` says which failed).
    With ``on_error`` each failing operation is reported (``error.index`` set) and skipped, and
    the fold continues; raise from the callback to abort.
    """
    fold = _Fold(base, deleted_refs)
    try:
        if on_error is None:
            checked = []
            for i, operation in enumerate(operations):
                try:
                    checked.append(_check_operation(operation))
                except PatchError as error:
                    error.index = i
                    raise
            for i, (op, patch) in enumerate(checked):
                try:
                    fold.apply(op, patch)
                except PatchError as error:
                    error.index = i
                    raise
        else:  # streams: `operations` may be a cursor
            for i, operation in enumerate(operations):
                try:
                    op, patch = _check_operation(operation)
                    fold.apply(op, patch)
                except PatchError as error:
                    error.index = i
                    on_error(error)
    finally:
        result = fold.finish()
    return result
