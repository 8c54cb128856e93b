"""Authorization keys on operations and baselines (`@verdant-web/common` `authz`).

A key is `base64("u:<user>:*")`: the data belongs to that user only. Pure: no I/O.

Two rules meet here. `key_problem` says whether a string is a key at all, whoever sends it
(the protocol refuses anything else). `claim` says whether the sender may use it: only for
itself, since a key naming someone else would let one user plant data that only another sees,
and rewrites the forms of the sender's own key that real clients send into the one we store.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable, Sequence
from typing import Any, Final

ORIGINATOR_SUBJECT: Final = "$$_originator_$$"
"""The subject a local-only replica writes before it knows which user it belongs to."""

USER_SCOPE: Final = "u"
ALL_ACTIONS: Final = "*"


def only_user(user_id: str) -> str:
    return base64.b64encode(f"u:{user_id}:*".encode()).decode()


ORIGINATOR_KEY: Final = only_user(ORIGINATOR_SUBJECT)


MAX_KEY_CHARS: Final = 512
"""Room for a user id of some 380 bytes; it also bounds what the cache below can hold."""


def key_problem(key: str) -> str | None:
    """Why `key` is not a well-formed authorization key, or None when it is."""
    if len(key) > MAX_KEY_CHARS:  # checked outside the cache, which then holds only short keys
        return f"is longer than {MAX_KEY_CHARS} characters"
    return _key_problem(key)


@functools.lru_cache(maxsize=1024)
def _key_problem(key: str) -> str | None:
    """The rule behind `key_problem`.

    Well-formed is what real clients produce, `onlyUser(id)` = `u:<id>:*` encoded by Node's
    `Buffer` or a browser's `btoa`, and nothing looser:
    - canonical standard base64 (padded, no whitespace, no stray bits): both encoders make
      exactly that, and one spelling per key lets the server compare keys as strings;
    - the text is UTF-8 (`Buffer`), or else read as Latin-1: `btoa` encodes each character of
      a user id with characters U+0080..U+00FF as one byte (it throws on anything higher);
    - three `:`-separated parts, as the reference's `authz.decode` requires (a subject with a
      `:` cannot be represented; the client's own `decode` throws on it too);
    - scope `u` and action `*`: the only ones any client makes. The reference's filter reads
      only the subject, so a `g:<group>:*` key would reach a *user* of that name; we cannot
      enforce another scope, so we refuse it instead of guessing;
    - a non-empty subject.
    Cached: a sync of 50,000 operations carries the same one or two keys over and over.
    """
    if not key:
        return "is empty (send null, or no 'authz', for public data)"
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        return "is not base64"
    if base64.b64encode(raw) != key.encode("ascii"):
        return "is not canonical base64 (standard alphabet, '=' padding, as btoa makes)"
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != USER_SCOPE or parts[2] != ALL_ACTIONS or not parts[1]:
        return "does not decode to 'u:<user>:*'"
    return None


@functools.lru_cache(maxsize=256)
def _own_keys(user_id: str) -> tuple[str | None, frozenset[str]]:
    """The key we store for data private to `user_id` (None when a key cannot name it) and
    the other keys its own clients send for the same meaning."""
    if ":" in user_id or not user_id:
        return None, frozenset()
    canonical = only_user(user_id)
    aliases = {ORIGINATOR_KEY}
    try:
        aliases.add(base64.b64encode(f"u:{user_id}:*".encode("latin-1")).decode())
    except UnicodeEncodeError:
        pass  # btoa throws for such an id: no browser client sends this form
    aliases.discard(canonical)
    return canonical, frozenset(aliases)


def claim(items: Sequence[dict[str, Any]], user_id: str) -> int | None:
    """Make every key in `items` the sender's own stored key, or refuse.

    Accepted: no key (public), the sender's key, the originator placeholder (a replica's "only
    me": the current client rewrites it in `op` messages but not in its `sync` messages, which
    go to the socket or the pull request directly, so offline edits arrive with it) and the
    Latin-1 form a browser makes for the sender's id; the last two are rewritten to the
    sender's key, in place. Returns the index of the first key naming anyone else, leaving
    `items` untouched then. Keys must already be well-formed (`key_problem`).
    """
    canonical, aliases = _own_keys(user_id)
    settled = (None, canonical)
    # one comprehension over the common case: it runs for every operation of a large sync
    others = [i for i, item in enumerate(items) if item.get("authz") not in settled]
    for index in others:
        if items[index]["authz"] not in aliases:
            return index
    for index in others:
        items[index]["authz"] = canonical
    return None


def can_own_private_data(user_id: str) -> bool:
    return _own_keys(user_id)[0] is not None


def subject_of(key: str) -> str | None:
    """The user a stored key restricts data to, or None when the key cannot be read.

    Lenient on purpose: it reads what is already stored (including databases written by the
    Node server, which decodes keys as leniently). An unreadable key restricts the data to
    nobody rather than to everybody: private data must never leak because a key was malformed.
    """
    try:
        decoded = base64.b64decode(key + "=" * (-len(key) % 4), validate=False).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    parts = decoded.split(":")
    if len(parts) != 3:
        return None
    return parts[1]


def visible_to(item: dict[str, Any], user_id: str) -> bool:
    key = item.get("authz")
    if not key:
        return True
    return subject_of(key) == user_id


def filter_visible(items: Iterable[dict[str, Any]], user_id: str) -> list[dict[str, Any]]:
    return [item for item in items if visible_to(item, user_id)]


def any_restricted(items: Iterable[dict[str, Any]]) -> bool:
    return any(item.get("authz") for item in items)
