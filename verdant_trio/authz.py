"""Authorization keys on operations and baselines (`@verdant-web/common` `authz`).

A key is `base64("u:<user>:*")`: the data belongs to that user only. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any, Final

ORIGINATOR_SUBJECT: Final = "$$_originator_$$"
"""The subject a local-only replica writes before it knows which user it belongs to."""


def only_user(user_id: str) -> str:
    return base64.b64encode(f"u:{user_id}:*".encode()).decode()


def subject_of(key: str) -> str | None:
    """The user a key restricts data to, or None when the key cannot be read.

    An unreadable key restricts the data to nobody rather than to everybody: private data must
    never leak because a key was malformed.
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


def rewrite_originator(items: Iterable[dict[str, Any]], user_id: str) -> None:
    """Give data a local-only replica marked "only me" to the user who now syncs it (in place)."""
    replacement = only_user(user_id)
    for item in items:
        key = item.get("authz")
        if key and subject_of(key) == ORIGINATOR_SUBJECT:
            item["authz"] = replacement
