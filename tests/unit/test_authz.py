"""Authorization keys: which strings are keys at all.

The accepted encodings are checked against the real encoders the client uses (`Buffer` in
Node, `btoa` in browsers; Node has both), not against our own `only_user`.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from verdant_trio import authz
from verdant_trio.authz import ORIGINATOR_SUBJECT, key_problem, only_user


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
        only_user(ORIGINATOR_SUBJECT),
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
    for user, (buffer_key, btoa_key) in zip(ids, made):
        assert buffer_key == only_user(user)
        for key in filter(None, (buffer_key, btoa_key)):
            assert key_problem(key) is None, (user, key)


def test_a_long_key_is_refused_before_it_is_decoded_or_cached() -> None:
    long_key = only_user("x" * 1000)
    assert key_problem(long_key) == f"is longer than {authz.MAX_KEY_CHARS} characters"
    assert key_problem(only_user("x" * 380)) is None
