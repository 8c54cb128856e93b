"""Unit tests for verdant_trio.sync.patches.

Expected values are what the reference `applyPatch` (@verdant-web/common, HEAD for `list-set`
and `list-remove`) computes, serialised with JSON.stringify; test_patches_differential.py
checks the same against the real JavaScript where 2.3.1 and HEAD agree.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from verdant_trio.sync.patches import (
    MAX_SPARSE_LENGTH,
    PatchError,
    apply_operations,
    apply_patch,
    check_patch,
    is_file_ref,
    is_object_ref,
    is_ref,
)

R1 = {"@@type": "ref", "id": "doc/1:a"}
R2 = {"@@type": "ref", "id": "doc/1:b"}
F1 = {"@@type": "file", "id": "file-1"}


def ref(oid: str) -> dict[str, Any]:
    return {"@@type": "ref", "id": oid}


def fileref(fid: str) -> dict[str, Any]:
    return {"@@type": "file", "id": fid}


def fold(base: Any, *patches: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """Run patches through apply_operations; returns (snapshot, deleted refs)."""
    refs: list[dict[str, Any]] = []
    ops = [{"oid": "doc/1", "timestamp": f"t{i}", "data": patch} for i, patch in enumerate(patches)]
    return apply_operations(base, ops, refs), refs


# --------------------------------------------------------------------------- refs


def test_ref_predicates() -> None:
    assert is_object_ref(R1) and is_ref(R1) and not is_file_ref(R1)
    assert is_file_ref(F1) and is_ref(F1) and not is_object_ref(F1)
    for other in [{"id": "x"}, {"@@type": "other"}, "ref", None, [R1], {"@@type": ["ref"]}]:
        assert not is_ref(other)


# --------------------------------------------------------------------------- initialize / deleted


def test_initialize_deep_copies_the_value() -> None:
    value = {"a": [1, {"b": 2}], "c": R1}
    patch = {"op": "initialize", "value": value}
    result = apply_patch(None, patch)
    assert result == value
    result["a"][1]["b"] = 99
    result["a"].append(3)
    assert patch["value"] == {"a": [1, {"b": 2}], "c": R1}


def test_initialize_replaces_an_existing_snapshot() -> None:
    assert fold({"old": 1}, {"op": "initialize", "value": [1]})[0] == [1]
    assert fold([1, 2], {"op": "initialize", "value": {"a": 1}})[0] == {"a": 1}


def test_initialize_without_value_or_with_null_means_no_object() -> None:
    assert apply_patch({"a": 1}, {"op": "initialize"}) is None
    assert apply_patch({"a": 1}, {"op": "initialize", "value": None}) is None


def test_initialize_with_primitive_value() -> None:
    assert fold(None, {"op": "initialize", "value": "abc"}, {"op": "remove", "name": "9"})[0] == "abc"


@pytest.mark.parametrize(
    "patch",
    [
        {"op": "set", "name": "a", "value": 1},
        {"op": "remove", "name": "a"},
        {"op": "list-push", "value": 1},
        {"op": "list-set", "index": 0, "value": 1},
        {"op": "list-insert", "index": 0},  # would throw on a list; a deleted object ignores it
        {"op": "list-remove", "value": R1},
        {"op": "delete"},
        {"op": "touch"},
    ],
)
def test_deleted_objects_stay_deleted(patch: dict[str, Any]) -> None:
    refs: list[dict[str, Any]] = []
    assert apply_patch(None, patch, refs) is None
    assert refs == []


def test_initialize_revives_a_deleted_object() -> None:
    assert fold({"a": R1}, {"op": "delete"}, {"op": "set", "name": "a", "value": 1})[0] is None
    assert fold({"a": 1}, {"op": "delete"}, {"op": "initialize", "value": {"b": 2}})[0] == {"b": 2}


def test_initialize_drops_proto_keys_like_clone_deep() -> None:
    # cloneDeep assigns clone['__proto__'] = v, which sets a prototype instead of a property
    value = {"a": 1, "__proto__": 5, "n": {"__proto__": {"x": 1}, "y": 2}, "l": [{"__proto__": None}]}
    assert apply_patch(None, {"op": "initialize", "value": value}) == {"a": 1, "n": {"y": 2}, "l": [{}]}


@pytest.mark.parametrize(
    "value",
    [
        {"__proto__": {"x": R1}},  # top-level prototype: later reads would see inherited refs
        {"__proto__": None},
        {"n": {"__proto__": {"@@type": "ref", "id": "x"}}},  # nested object would look like a ref
        {"n": [{"__proto__": {"__proto__": {"id": 1}}}]},
    ],
)
def test_initialize_with_a_prototype_that_matters_is_unsupported(value: Any) -> None:
    with pytest.raises(PatchError) as info:
        apply_patch({"keep": 1}, {"op": "initialize", "value": value})
    assert info.value.kind == "unsupported"


# --------------------------------------------------------------------------- set / remove


def test_set_and_remove_on_objects_collect_replaced_refs() -> None:
    base = {"a": R1, "b": F1, "c": 1}
    result, refs = fold(
        base,
        {"op": "set", "name": "a", "value": R2},
        {"op": "remove", "name": "b"},
        {"op": "set", "name": "c", "value": 2},
        {"op": "remove", "name": "missing"},
    )
    assert result is base  # mutated in place
    assert result == {"a": R2, "c": 2}
    assert refs == [R1, F1]


def test_set_without_value_removes_the_key_from_json() -> None:
    result, refs = fold({"a": R1, "b": 1}, {"op": "set", "name": "a"})
    assert result == {"b": 1}
    assert refs == [R1]


def test_a_key_set_to_undefined_keeps_its_place_in_key_order() -> None:
    # Object.values order decides the order `delete` reports refs in
    result, refs = fold(
        {"a": 1, "b": 2},
        {"op": "set", "name": "a"},
        {"op": "set", "name": "a", "value": R1},
        {"op": "set", "name": "b", "value": R2},
        {"op": "delete"},
    )
    assert (result, refs) == (None, [R1, R2])
    result, refs = fold(
        {"a": 1, "b": 2},
        {"op": "remove", "name": "a"},
        {"op": "set", "name": "a", "value": R1},
        {"op": "set", "name": "b", "value": R2},
        {"op": "delete"},
    )
    assert (result, refs) == (None, [R2, R1])


def test_set_with_numeric_names_uses_javascript_property_keys() -> None:
    names: list[Any] = [1, 1.0, -0.0, 1.5, 1e21, 1e-7, 2**53 + 1, 0.1, 1e20, 1.5e-6, -2.5e-7, 2**70]
    result = fold({}, *({"op": "set", "name": n, "value": i} for i, n in enumerate(names)))[0]
    assert result == {
        "1": 1, "0": 2, "1.5": 3, "1e+21": 4, "1e-7": 5, "9007199254740992": 6, "0.1": 7,
        "100000000000000000000": 8, "0.0000015": 9, "-2.5e-7": 10, "1.1805916207174113e+21": 11,
    }  # fmt: skip


def test_set_proto_is_ignored_for_primitives_and_unsupported_for_objects() -> None:
    assert fold({"a": 1}, {"op": "set", "name": "__proto__", "value": 5})[0] == {"a": 1}
    assert fold([1], {"op": "set", "name": "__proto__", "value": "x"})[0] == [1]
    assert fold(7, {"op": "set", "name": "__proto__", "value": {}})[0] == 7
    base: Any
    for base in ({"a": 1}, [1]):
        value: Any
        for value in ({}, [], None):
            with pytest.raises(PatchError) as info:
                apply_patch(base, {"op": "set", "name": "__proto__", "value": value})
            assert info.value.kind == "unsupported"
            assert base == ({"a": 1} if isinstance(base, dict) else [1])


def test_an_own_proto_key_from_stored_json_is_an_ordinary_property() -> None:
    assert fold({"__proto__": 1}, {"op": "set", "name": "__proto__", "value": {"x": 1}})[0] == {"__proto__": {"x": 1}}
    assert fold({"__proto__": R1}, {"op": "remove", "name": "__proto__"}) == ({}, [R1])


def test_set_on_a_list_index_and_past_the_end_leaves_holes() -> None:
    result, refs = fold([R1, 2], {"op": "set", "name": "0", "value": "x"}, {"op": "set", "name": 4, "value": "y"})
    assert result == ["x", 2, None, None, "y"]
    assert refs == [R1]


def test_non_index_properties_on_lists_vanish_from_json_but_are_remembered() -> None:
    result, refs = fold(
        [1, 2],
        {"op": "set", "name": "foo", "value": R1},
        {"op": "set", "name": "-1", "value": R2},
        {"op": "set", "name": "01", "value": 3},
        {"op": "set", "name": 4294967295, "value": 4},
        {"op": "set", "name": "foo", "value": 5},  # replaces R1: reported
        {"op": "list-delete", "index": -1, "count": 1},  # reads base[-1], i.e. property "-1"
    )
    assert result == [1]
    assert refs == [R1, R2]


def test_list_properties_do_not_survive_between_apply_patch_calls() -> None:
    # JSON in, JSON out: like the reference server's stored baseline
    base = apply_patch([1, 2], {"op": "set", "name": "foo", "value": R1})
    refs: list[dict[str, Any]] = []
    assert apply_patch(base, {"op": "remove", "name": "foo"}, refs) == [1, 2]
    assert refs == []


def test_set_length_truncates_and_extends() -> None:
    assert fold([1, 2, 3], {"op": "set", "name": "length", "value": 1})[0] == [1]
    assert fold([1], {"op": "set", "name": "length", "value": " 0x3 "})[0] == [1, None, None]
    assert fold([1, 2], {"op": "set", "name": "length", "value": [[0]]})[0] == []
    assert fold([1, 2], {"op": "set", "name": "length", "value": None})[0] == []


@pytest.mark.parametrize("value", [-1, 0.5, 2**32, "abc", {}, [1, 2], "Infinity", None])
def test_set_invalid_length_throws_range_error(value: Any) -> None:
    patch: dict[str, Any] = {"op": "set", "name": "length"}
    if value is not None:
        patch["value"] = value  # absent value: undefined -> NaN
    base = [1, 2]
    with pytest.raises(PatchError) as info:
        apply_patch(base, patch)
    assert info.value.kind == "invalid"
    assert base == [1, 2]


def test_growing_a_list_with_holes_is_capped() -> None:
    base = [1]
    with pytest.raises(PatchError) as info:
        apply_patch(base, {"op": "set", "name": str(MAX_SPARSE_LENGTH), "value": 1})
    assert info.value.kind == "unsupported"
    with pytest.raises(PatchError):
        apply_patch(base, {"op": "set", "name": "length", "value": MAX_SPARSE_LENGTH + 1})
    assert base == [1]
    assert len(fold([1], {"op": "set", "name": "length", "value": MAX_SPARSE_LENGTH})[0]) == MAX_SPARSE_LENGTH


@pytest.mark.parametrize("base", [5, 0, True, False, "abc", ""])
def test_set_on_a_primitive_throws(base: Any) -> None:
    with pytest.raises(PatchError) as info:
        apply_patch(base, {"op": "set", "name": "x", "value": 1})
    assert info.value.kind == "invalid"


def test_remove_on_lists_leaves_a_hole() -> None:
    result, refs = fold([1, R1, 3], {"op": "remove", "name": 1}, {"op": "remove", "name": 7})
    assert result == [1, None, 3]
    assert refs == [R1]


def test_remove_length_of_a_list_throws() -> None:
    with pytest.raises(PatchError) as info:
        apply_patch([1], {"op": "remove", "name": "length"})
    assert info.value.kind == "invalid"


def test_remove_on_strings_throws_only_for_own_properties() -> None:
    for name in ["0", 2, "length"]:
        with pytest.raises(PatchError):
            apply_patch("abc", {"op": "remove", "name": name})
    assert apply_patch("abc", {"op": "remove", "name": 3}) == "abc"
    assert apply_patch("abc", {"op": "remove", "name": "01"}) == "abc"
    assert apply_patch("😀", {"op": "remove", "name": 2}) == "😀"  # length 2 in UTF-16
    with pytest.raises(PatchError):
        apply_patch("😀", {"op": "remove", "name": 1})
    assert apply_patch(5, {"op": "remove", "name": "x"}) == 5


# --------------------------------------------------------------------------- list-set (HEAD only)


def test_list_set_replaces_and_reports_the_old_ref() -> None:
    result, refs = fold([R1, 2], {"op": "list-set", "index": 0, "value": R2})
    assert result == [R2, 2]
    assert refs == [R1]


def test_list_set_past_the_end_leaves_holes_and_negative_index_is_a_property() -> None:
    assert fold([1], {"op": "list-set", "index": 3, "value": 4})[0] == [1, None, None, 4]
    result, refs = fold(
        [1],
        {"op": "list-set", "index": -1, "value": R1},
        {"op": "list-set", "index": 1.5, "value": 2},
        {"op": "list-set", "index": -1, "value": 3},
    )
    assert result == [1]
    assert refs == [R1]


def test_list_set_without_value_writes_undefined() -> None:
    result, _ = fold(
        [1, 2],
        {"op": "list-set", "index": 0},
        {"op": "list-remove", "value": None},  # undefined is not null
    )
    assert result == [None, 2]


# --------------------------------------------------------------------------- list ops on non-lists


@pytest.mark.parametrize(
    "patch",
    [
        {"op": "list-push", "value": 1},
        {"op": "list-set", "index": 0, "value": 1},
        {"op": "list-insert", "index": 0},  # no value at all: still ignored on non-lists
        {"op": "list-delete", "index": 0, "count": 1},
        {"op": "list-move-by-index", "from": 0, "to": 1},
        {"op": "list-move-by-ref", "value": R1, "index": 0},
        {"op": "list-remove", "value": R1},
        {"op": "list-add", "value": 1},
    ],
)
@pytest.mark.parametrize("base", [{"0": R1, "1": 2}, "abc", 5, True])
def test_list_ops_on_non_lists_are_skipped(patch: dict[str, Any], base: Any) -> None:
    before = copy.deepcopy(base)
    assert fold(base, patch) == (before, [])


# --------------------------------------------------------------------------- list-push / list-insert


def test_list_push() -> None:
    assert fold([1], {"op": "list-push", "value": R1}, {"op": "list-push"})[0] == [1, R1, None]


def test_list_push_inserts_the_value_by_reference() -> None:
    value = {"x": 1}
    result = apply_patch([], {"op": "list-push", "value": value})
    assert result == [value] and result[0] is value


@pytest.mark.parametrize(
    ("index", "expected"),
    [(0, ["x", 1, 2, 3]), (2, [1, 2, "x", 3]), (9, [1, 2, 3, "x"]), (-1, [1, 2, "x", 3]), (-9, ["x", 1, 2, 3]),
     (1.9, [1, "x", 2, 3]), (-1.5, [1, 2, "x", 3]), (1e300, [1, 2, 3, "x"])],
)  # fmt: skip
def test_list_insert_uses_splice_index_rules(index: Any, expected: list[Any]) -> None:
    assert fold([1, 2, 3], {"op": "list-insert", "index": index, "value": "x"})[0] == expected


def test_list_insert_values_and_truthiness_of_value() -> None:
    assert fold([1], {"op": "list-insert", "index": 0, "values": [7, 8]})[0] == [7, 8, 1]
    # a falsy value falls through to values
    assert fold([1], {"op": "list-insert", "index": 0, "value": 0, "values": [7]})[0] == [7, 1]
    assert fold([1], {"op": "list-insert", "index": 0, "value": "", "values": []})[0] == [1]
    # a truthy value wins over values; {} and [] are truthy
    assert fold([1], {"op": "list-insert", "index": 1, "value": {}, "values": [7]})[0] == [1, {}]
    assert fold([1], {"op": "list-insert", "index": 1, "value": []})[0] == [1, []]


@pytest.mark.parametrize("value", [0, "", False, None, "missing"])
def test_list_insert_without_truthy_value_or_values_throws(value: Any) -> None:
    patch: dict[str, Any] = {"op": "list-insert", "index": 0}
    if value != "missing":
        patch["value"] = value
    base = [1, 2]
    with pytest.raises(PatchError) as info:
        apply_patch(base, patch)
    assert info.value.kind == "invalid"
    assert base == [1, 2]


# --------------------------------------------------------------------------- list-delete


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [(1, 1, [0, 2, 3, 4]), (1, 2, [0, 3, 4]), (3, 10, [0, 1, 2]), (7, 1, [0, 1, 2, 3, 4]), (-2, 1, [0, 1, 2, 4]),
     (-9, 2, [2, 3, 4]), (0, -1, [0, 1, 2, 3, 4]), (1.7, 1.9, [0, 2, 3, 4]), (0, 1e300, []), (2, 0.5, [0, 1, 2, 3, 4])],
)  # fmt: skip
def test_list_delete_uses_splice_rules(index: Any, count: Any, expected: list[Any]) -> None:
    assert fold([0, 1, 2, 3, 4], {"op": "list-delete", "index": index, "count": count})[0] == expected


def test_list_delete_reports_only_the_first_deleted_ref() -> None:
    result, refs = fold([R1, R2, F1], {"op": "list-delete", "index": 0, "count": 3})
    assert result == []
    assert refs == [R1]
    # a negative index reads property "-1", not the last item, even though splice removes it
    assert fold([R1, R2], {"op": "list-delete", "index": -1, "count": 1}) == ([R1], [])


# --------------------------------------------------------------------------- moves


def test_list_move_by_index() -> None:
    assert fold(["a", "b", "c"], {"op": "list-move-by-index", "from": 0, "to": 2})[0] == ["b", "c", "a"]
    assert fold(["a", "b", "c"], {"op": "list-move-by-index", "from": -1, "to": 0})[0] == ["c", "a", "b"]


def test_list_move_by_index_from_out_of_range_inserts_undefined() -> None:
    assert fold(["a", "b"], {"op": "list-move-by-index", "from": 5, "to": 0})[0] == [None, "a", "b"]


def test_list_move_by_ref() -> None:
    result = fold([R1, R2, F1], {"op": "list-move-by-ref", "value": ref("doc/1:b"), "index": 0})[0]
    assert result == [R2, R1, F1]
    result = fold([R1, F1], {"op": "list-move-by-ref", "value": fileref("file-1"), "index": 0})[0]
    assert result == [F1, R1]


def test_list_move_by_ref_with_a_missing_ref_moves_the_last_item() -> None:
    # findIndex gives -1 and splice(-1, 1) takes the last item
    result = fold([R1, R2, "c"], {"op": "list-move-by-ref", "value": ref("doc/1:zzz"), "index": 0})[0]
    assert result == ["c", R1, R2]
    assert fold([], {"op": "list-move-by-ref", "value": R1, "index": 0})[0] == [None]


def test_list_move_by_ref_type_matters() -> None:
    # a file ref with the same id is not the object ref: the last item moves instead
    assert fold([F1, 1], {"op": "list-move-by-ref", "value": ref("file-1"), "index": 0})[0] == [1, F1]


def test_moving_a_hole_inserts_undefined() -> None:
    result, _ = fold(
        [1, 2, 3],
        {"op": "remove", "name": 0},  # hole at 0
        {"op": "list-move-by-index", "from": 0, "to": 2},  # hole becomes an undefined item
        {"op": "list-remove", "value": None},  # neither hole nor undefined is null
    )
    assert result == [2, 3, None]
    result, _ = fold(
        [1, 2, 3],
        {"op": "remove", "name": 0},
        {"op": "list-move-by-index", "from": 0, "to": 2},
        {"op": "list-remove"},  # removes undefined items (a hole would stay)
    )
    assert result == [2, 3]


# --------------------------------------------------------------------------- list-remove


def test_list_remove_primitives_all_first_last() -> None:
    base = ["a", 1, "a", True, "a", 1.0]
    assert fold(list(base), {"op": "list-remove", "value": "a"})[0] == [1, True, 1.0]
    assert fold(list(base), {"op": "list-remove", "value": "a", "only": "first"})[0] == [1, "a", True, "a", 1.0]
    assert fold(list(base), {"op": "list-remove", "value": "a", "only": "last"})[0] == ["a", 1, "a", True, 1.0]
    # strict equality: 1 === 1.0, but true !== 1
    assert fold(list(base), {"op": "list-remove", "value": 1})[0] == ["a", "a", True, "a"]
    assert fold(list(base), {"op": "list-remove", "value": True})[0] == ["a", 1, "a", "a", 1.0]


def test_list_remove_refs_compares_type_and_id() -> None:
    r1_again = ref("doc/1:a")
    base = [R1, F1, ref("file-1"), R2, r1_again, fileref("doc/1:a")]
    result, refs = fold(copy.deepcopy(base), {"op": "list-remove", "value": ref("doc/1:a")})
    assert result == [F1, ref("file-1"), R2, fileref("doc/1:a")]
    assert refs == [R1, r1_again]
    result, refs = fold(copy.deepcopy(base), {"op": "list-remove", "value": fileref("file-1"), "only": "last"})
    assert result == [R1, ref("file-1"), R2, r1_again, fileref("doc/1:a")]
    assert refs == [F1]
    result, refs = fold(copy.deepcopy(base), {"op": "list-remove", "value": ref("doc/1:a"), "only": "last"})
    assert result == [R1, F1, ref("file-1"), R2, fileref("doc/1:a")]
    assert refs == [r1_again]


def test_list_remove_ref_skips_null_and_plain_objects() -> None:
    # (2.3.1 read `.id` of every item and crashed on null; HEAD checks isRef first)
    base = [None, {"id": "doc/1:a"}, "doc/1:a", R1]
    assert fold(base, {"op": "list-remove", "value": ref("doc/1:a")}) == ([None, {"id": "doc/1:a"}, "doc/1:a"], [R1])
    assert fold([None], {"op": "list-remove", "value": R1})[1] == []


def test_list_remove_plain_objects_never_match() -> None:
    assert fold([{"a": 1}], {"op": "list-remove", "value": {"a": 1}})[0] == [{"a": 1}]


def test_list_remove_undefined_and_null_and_holes() -> None:
    result, _ = fold(
        [None, 1, 2],
        {"op": "list-push"},  # undefined item
        {"op": "remove", "name": 1},  # hole
        {"op": "list-remove"},  # removes the undefined item only
    )
    assert result == [None, None, 2]
    result, _ = fold([None, 1, 2], {"op": "remove", "name": 1}, {"op": "list-remove", "value": None})
    assert result == [None, 2]  # the null went, the hole stayed


def test_list_remove_compares_large_integers_as_doubles() -> None:
    assert fold([2**53, 1], {"op": "list-remove", "value": 2**53 + 1})[0] == [1]


# --------------------------------------------------------------------------- list-add


def test_list_add_is_set_like() -> None:
    assert fold(["a", 1], {"op": "list-add", "value": "a"}, {"op": "list-add", "value": "b"})[0] == ["a", 1, "b"]
    assert fold([True], {"op": "list-add", "value": 1})[0] == [True, 1]
    assert fold([1.0], {"op": "list-add", "value": 1})[0] == [1.0]


def test_list_add_object_refs_compare_by_id_only() -> None:
    assert fold([R1], {"op": "list-add", "value": ref("doc/1:a")})[0] == [R1]
    assert fold([R1], {"op": "list-add", "value": {"@@type": "ref", "id": "doc/1:a", "extra": 1}})[0] == [R1]
    assert fold([fileref("doc/1:a")], {"op": "list-add", "value": R1})[0] == [fileref("doc/1:a"), R1]


def test_list_add_file_refs_and_objects_are_always_added() -> None:
    # compared with ===, i.e. by identity, so a separately parsed equal value is new
    assert fold([F1], {"op": "list-add", "value": fileref("file-1")})[0] == [F1, F1]
    assert fold([{}], {"op": "list-add", "value": {}})[0] == [{}, {}]


def test_list_add_undefined() -> None:
    assert fold([None], {"op": "list-add"}, {"op": "list-add"})[0] == [None, None]


# --------------------------------------------------------------------------- delete / touch


def test_delete_collects_refs_in_javascript_key_order() -> None:
    base = {"b": ref("b"), "2": ref("2"), "a": fileref("a"), "1": ref("1"), "x": 1, "4294967295": ref("big")}
    result, refs = fold(base, {"op": "delete"})
    assert result is None
    assert refs == [ref("1"), ref("2"), ref("b"), fileref("a"), ref("big")]


def test_delete_collects_refs_of_list_items_and_not_of_properties() -> None:
    result, refs = fold(
        [R1, 1, F1], {"op": "remove", "name": 0}, {"op": "set", "name": "p", "value": R2}, {"op": "delete"}
    )
    assert result is None
    assert refs == [R1, F1]


def test_delete_of_a_primitive_and_without_a_refs_list() -> None:
    assert fold("abc", {"op": "delete"}) == (None, [])
    assert apply_patch({"a": R1}, {"op": "delete"}) is None


def test_touch_is_a_no_op() -> None:
    base = {"a": 1}
    assert apply_patch(base, {"op": "touch"}) is base


# --------------------------------------------------------------------------- JS-only state


def test_constructor_property_on_a_list_breaks_splice() -> None:
    # splice consults arr.constructor[Symbol.species]; a primitive there throws
    ops = [{"op": "set", "name": "constructor", "value": "x"}]
    for patch in [
        {"op": "list-insert", "index": 0, "value": 1},
        {"op": "list-delete", "index": 0, "count": 1},
        {"op": "list-move-by-index", "from": 0, "to": 1},
        {"op": "list-remove", "value": 1},
    ]:
        with pytest.raises(PatchError) as info:
            fold([1, 2], *ops, patch)
        assert info.value.kind == "invalid"
    # push does not splice, an object constructor is harmless, a removal restores it
    assert fold([1], *ops, {"op": "list-push", "value": 2})[0] == [1, 2]
    delete_first = {"op": "list-delete", "index": 0, "count": 1}
    assert fold([1], {"op": "set", "name": "constructor", "value": {}}, delete_first)[0] == []
    assert fold([1], *ops, {"op": "remove", "name": "constructor"}, delete_first)[0] == []


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "patch",
    [
        None,
        [],
        "set",
        {},
        {"op": 5},
        {"op": "bogus"},
        {"op": "set", "value": 1},
        {"op": "set", "name": True, "value": 1},
        {"op": "set", "name": None},
        {"op": "remove", "name": ["a"]},
        {"op": "list-set", "index": "0", "value": 1},
        {"op": "list-insert", "index": None, "value": 1},
        {"op": "list-insert", "index": 0, "values": "ab"},
        {"op": "list-insert", "index": 0, "value": 1, "values": None},
        {"op": "list-delete", "index": 0},
        {"op": "list-delete", "index": 0, "count": "1"},
        {"op": "list-move-by-index", "from": 0},
        {"op": "list-move-by-index", "from": False, "to": 1},
        {"op": "list-move-by-ref", "index": 0},
        {"op": "list-move-by-ref", "value": R1},
        {"op": "list-remove", "value": 1, "only": "all"},
        {"op": "list-remove", "value": 1, "only": None},
    ],
)
def test_malformed_patches_raise_and_leave_base_unchanged(patch: Any) -> None:
    base = [1, R1, {"a": 2}]
    refs: list[dict[str, Any]] = []
    with pytest.raises(PatchError) as info:
        apply_patch(base, patch, refs)
    assert info.value.kind == "malformed"
    assert base == [1, R1, {"a": 2}] and refs == []
    with pytest.raises(PatchError):
        check_patch(patch)


def test_malformed_patch_is_rejected_even_for_a_deleted_object() -> None:
    with pytest.raises(PatchError, match="unsupported patch operation: 'bogus'"):
        apply_patch(None, {"op": "bogus"})


def test_check_patch_returns_the_op() -> None:
    assert check_patch({"op": "list-insert", "index": 0}) == "list-insert"


# --------------------------------------------------------------------------- apply_operations


def test_apply_operations_folds_a_document_lifecycle() -> None:
    result, refs = fold(
        None,
        {"op": "initialize", "value": {"title": "a", "items": ref("doc/1:items"), "img": F1}},
        {"op": "set", "name": "title", "value": "b"},
        {"op": "set", "name": "img", "value": fileref("file-2")},
        {"op": "remove", "name": "items"},
    )
    assert result == {"title": "b", "img": fileref("file-2")}
    assert refs == [F1, ref("doc/1:items")]


def test_apply_operations_never_initialized_gives_none() -> None:
    assert fold(None, {"op": "set", "name": "a", "value": 1}, {"op": "list-push", "value": 1}) == (None, [])
    assert apply_operations(None, []) is None


def test_apply_operations_accepts_an_iterator() -> None:
    ops = ({"oid": "o", "timestamp": str(i), "data": {"op": "list-push", "value": i}} for i in range(3))
    assert apply_operations([], ops) == [0, 1, 2]


def test_apply_operations_checks_every_shape_before_applying() -> None:
    base = {"a": 1}
    ops = [
        {"oid": "o", "timestamp": "1", "data": {"op": "set", "name": "a", "value": 2}},
        {"oid": "o", "timestamp": "2", "data": {"op": "set"}},
    ]
    with pytest.raises(PatchError) as info:
        apply_operations(base, ops)
    assert (info.value.kind, info.value.index) == ("malformed", 1)
    assert base == {"a": 1}
    with pytest.raises(PatchError):
        apply_operations(base, [{"oid": "o", "timestamp": "1"}])


def test_apply_operations_runtime_error_reports_index_and_cleans_up() -> None:
    base = [1]
    ops = [
        {"oid": "o", "timestamp": "1", "data": {"op": "list-push"}},  # undefined item
        {"oid": "o", "timestamp": "2", "data": {"op": "list-insert", "index": 0, "value": 0}},
    ]
    with pytest.raises(PatchError) as info:
        apply_operations(base, ops)
    assert (info.value.kind, info.value.index) == ("invalid", 1)
    assert base == [1, None]  # earlier operations applied in place; no sentinel leaks


def test_apply_operations_on_error_skips_and_continues() -> None:
    errors: list[PatchError] = []
    ops = [
        {"oid": "o", "timestamp": "1", "data": {"op": "list-push", "value": 1}},
        {"oid": "o", "timestamp": "2", "data": {"op": "bogus"}},
        {"oid": "o", "timestamp": "3", "data": {"op": "list-insert", "index": 0}},
        {"oid": "o", "timestamp": "4", "data": {"op": "list-push", "value": 2}},
    ]
    assert apply_operations([], ops, on_error=errors.append) == [1, 2]
    assert [(e.index, e.kind) for e in errors] == [(1, "malformed"), (2, "invalid")]


def test_apply_operations_keeps_javascript_state_that_apply_patch_drops() -> None:
    # In one fold a removed item is a hole, which list-remove(null) skips; between
    # apply_patch calls it has become a JSON null.
    patches: list[dict[str, Any]] = [{"op": "remove", "name": 1}, {"op": "list-remove", "value": None}]
    assert fold([1, 2, 3], *patches)[0] == [1, None, 3]
    state: Any = [1, 2, 3]
    for patch in patches:
        state = apply_patch(state, patch)
    assert state == [1, 3]


def test_apply_operations_is_fast_enough_for_rebases() -> None:
    import time

    ops = [{"oid": "o", "timestamp": str(i), "data": {"op": "list-push", "value": i}} for i in range(20000)]
    ops += [{"oid": "o", "timestamp": "x", "data": {"op": "set", "name": str(i), "value": -i}} for i in range(20000)]
    started = time.perf_counter()
    result = apply_operations([], ops)
    assert result == [-i for i in range(20000)]
    assert time.perf_counter() - started < 2.0
