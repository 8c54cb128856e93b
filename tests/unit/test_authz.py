"""Authorization keys: which strings are keys at all, and which a sender may use.

The accepted encodings are checked against the real encoders the client uses (`Buffer` in
Node, `btoa` in browsers; Node has both), not against our own `only_user`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verdant_trio.sync import authz
from verdant_trio.sync.authz import (
    ORIGINATOR_KEY,
    claim,
    key_problem,
    only_user,
    visible_to,
)


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


BOB = b64(b"u:bob:*")  # 7 bytes: ends in "=="
TILDES = only_user("~~~")  # has a "+"
assert BOB.endswith("==") and "+" in TILDES


@pytest.mark.parametrize(
    "key",
    [
        only_user("alice"),
        BOB,
        ORIGINATOR_KEY,
        only_user("rené"),  # UTF-8, as Buffer encodes
        b64("u:rené:*".encode("latin-1")),  # Latin-1, as btoa encodes
        only_user("日本"),
        only_user("a" * 300),
        only_user("google-oauth2|1234"),
        TILDES,
    ],
)
def test_keys_real_clients_make_are_well_formed(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize(
    "key, problem",
    [
        ("%%%not-an-authz-key%%%", "is not base64"),
        ("", "is empty"),
        ("u:alice:*", "is not base64"),  # not encoded at all
        (BOB.rstrip("="), "is not base64"),  # padding dropped
        (BOB[:-3] + "h==", "is not canonical"),  # same bytes, stray low bits set
        (BOB[:4] + "\n" + BOB[4:], "is not base64"),
        (" " + BOB, "is not base64"),
        (BOB + "é", "is not base64"),
        (TILDES.replace("+", "-"), "is not base64"),  # the URL-safe alphabet
        (b64(b"private"), "does not decode to 'u:<user>:*'"),
        (b64(b"u:bob"), "does not decode to 'u:<user>:*'"),
        (b64(b"u:github:123:*"), "does not decode to 'u:<user>:*'"),  # 4 parts
        (b64(b"u::*"), "does not decode to 'u:<user>:*'"),
        (b64(b"g:team:*"), "does not decode to 'u:<user>:*'"),  # another scope
        (b64(b"u:bob:read"), "does not decode to 'u:<user>:*'"),  # another action
        (b64(b"U:bob:*"), "does not decode to 'u:<user>:*'"),
    ],
)
def test_malformed_keys_are_named(key: str, problem: str) -> None:
    found = key_problem(key)
    assert found is not None and found.startswith(problem), found


users = st.text(min_size=1, max_size=60).filter(lambda u: ":" not in u)


@given(users)
def test_every_users_key_is_well_formed_and_claimable(user: str) -> None:
    key = only_user(user)
    assert key_problem(key) is None
    items = [{"authz": key}]
    assert claim(items, user) is None
    assert items == [{"authz": key}]
    assert visible_to(items[0], user)


@given(users, users)
def test_nobody_may_claim_another_users_key(sender: str, owner: str) -> None:
    items: list[dict[str, Any]] = [{"oid": "a"}, {"authz": ORIGINATOR_KEY}, {"authz": only_user(owner)}]
    result = claim(items, sender)
    try:  # what the sender's browser sends for its own id (see the next tests)
        browser = b64(f"u:{sender}:*".encode("latin-1"))
    except UnicodeEncodeError:
        browser = None
    if only_user(owner) in (only_user(sender), browser):
        assert result is None
        assert [item.get("authz") for item in items] == [None, only_user(sender), only_user(sender)]
    else:
        assert result == 2
        assert items[1] == {"authz": ORIGINATOR_KEY}  # a refused message is left as it came


def test_public_items_stay_public() -> None:
    items: list[dict[str, Any]] = [{"oid": "a"}, {"oid": "b", "authz": None}]
    assert claim(items, "alice") is None
    assert items == [{"oid": "a"}, {"oid": "b", "authz": None}]


def test_a_browsers_latin1_key_becomes_the_senders_utf8_key() -> None:
    browser = b64("u:rené:*".encode("latin-1"))
    items = [{"authz": browser}]
    assert claim(items, "rené") is None
    assert items == [{"authz": only_user("rené")}]
    assert visible_to(items[0], "rené")
    # the same string from anybody else is someone else's key
    assert claim([{"authz": browser}], "alice") == 0


def test_latin1_and_utf8_spellings_never_cross_users() -> None:
    """`btoa("u:Ã©:*")` and `Buffer("u:é:*")` are the same bytes: each sender gets its own."""
    shared = b64("u:Ã©:*".encode("latin-1"))
    assert shared == only_user("é")
    from_browser = [{"authz": shared}]
    assert claim(from_browser, "Ã©") is None
    assert from_browser == [{"authz": only_user("Ã©")}]
    assert visible_to(from_browser[0], "Ã©") and not visible_to(from_browser[0], "é")
    from_node = [{"authz": shared}]
    assert claim(from_node, "é") is None
    assert from_node == [{"authz": shared}]
    assert visible_to(from_node[0], "é") and not visible_to(from_node[0], "Ã©")


def test_a_user_id_with_a_colon_cannot_own_private_data() -> None:
    assert not authz.can_own_private_data("github:123")
    assert authz.can_own_private_data("github|123")
    for key in (ORIGINATOR_KEY, only_user("github:123"), only_user("github")):
        assert claim([{"authz": key}], "github:123") == 0
    assert claim([{"oid": "public"}], "github:123") is None


def test_the_encoders_real_clients_use_make_keys_we_accept() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; the interop tests need it too (Node >= 20)")
    ids = ["alice", "rené", "日本", "$$_originator_$$", "a+b/c=d", "x" * 200, "ÿþ"]
    script = (
        "const ids = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(ids.map((id) => {"
        "  let browser = null;"
        "  try { browser = btoa(`u:${id}:*`); } catch (e) {}"
        "  return [Buffer.from(`u:${id}:*`).toString('base64'), browser];"
        "})));"
    )
    out = subprocess.run(
        [node, "-e", script, json.dumps(ids)], capture_output=True, text=True, check=True, timeout=30
    )
    made = json.loads(out.stdout)
    assert made[2][1] is None  # btoa cannot encode "日本": no browser client sends it
    for user, (buffer_key, btoa_key) in zip(ids, made, strict=True):
        assert buffer_key == only_user(user)
        for key in filter(None, (buffer_key, btoa_key)):
            assert key_problem(key) is None, (user, key)
            items = [{"authz": key}]
            assert claim(items, user) is None, (user, key)
            assert items == [{"authz": only_user(user)}]


def test_a_long_key_is_refused_before_it_is_decoded_or_cached() -> None:
    long_key = only_user("x" * 1000)
    assert key_problem(long_key) == f"is longer than {authz.MAX_KEY_CHARS} characters"
    assert key_problem(only_user("x" * 380)) is None
