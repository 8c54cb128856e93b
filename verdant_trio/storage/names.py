"""Turning untrusted ids into file and directory names.

A library id comes from a signed token, a file id and file name from a client's upload: none of
them may ever be joined into a path raw. An id that is already a safe file name keeps its name,
so a `verdant-dbs/` directory written by the Node server (`<id>.sqlite`) opens unchanged; any
other id is encoded reversibly with a prefix no safe name can start with, or refused.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from typing import Final

from ..sync.errors import ErrorCode, VerdantError

_SAFE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENCODED_PREFIX: Final = "~"
"""Not in the safe alphabet, so an encoded name never collides with a kept one."""
MAX_ID_BYTES: Final = 150
"""Base32 of 150 bytes is 240 characters: still within the 255-byte file name limit."""


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def check_id(value: str, what: str) -> None:
    """Refuse ids no encoding should carry: empty, control characters, surrogates, absurd length."""
    if not isinstance(value, str) or not value:
        raise VerdantError(ErrorCode.INVALID_REQUEST, f"{what} must be a non-empty string")
    if _has_control(value):
        raise VerdantError(
            ErrorCode.INVALID_REQUEST, f"{what} must not contain control characters or NUL"
        )
    if len(value.encode()) > MAX_ID_BYTES:
        raise VerdantError(
            ErrorCode.INVALID_REQUEST, f"{what} is longer than {MAX_ID_BYTES} bytes"
        )


def is_safe_name(value: str) -> bool:
    return bool(_SAFE.fullmatch(value)) and len(value) <= 200


def encode_id(value: str, what: str = "id") -> str:
    """A file-system-safe, reversible name for an id (without extension)."""
    check_id(value, what)
    if is_safe_name(value):
        return value
    encoded = base64.b32encode(value.encode()).decode().rstrip("=").lower()
    return ENCODED_PREFIX + encoded


def decode_name(name: str) -> str:
    """The id a name was made from (inverse of `encode_id`)."""
    if name.startswith(ENCODED_PREFIX):
        body = name[len(ENCODED_PREFIX) :].upper()
        return base64.b32decode(body + "=" * (-len(body) % 8)).decode()
    return name


MAX_FILE_NAME_CHARS: Final = 200


def safe_file_name(name: str) -> str:
    """A display file name made safe to store as one path component (not reversible, by design).

    Path separators, NUL and control characters become `_`, leading dots are dropped (no `..`,
    no hidden files), and the name is shortened keeping its extension.
    """
    cleaned = "".join(
        "_" if ch in "/\\" or unicodedata.category(ch) in ("Cc", "Cs", "Cf") else ch
        for ch in name
    ).strip()
    cleaned = cleaned.lstrip(".").strip()
    if not cleaned:
        cleaned = "file"
    if len(cleaned) > MAX_FILE_NAME_CHARS:
        stem, dot, ext = cleaned.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            cleaned = stem[: MAX_FILE_NAME_CHARS - len(ext) - 1] + "." + ext
        else:
            cleaned = cleaned[:MAX_FILE_NAME_CHARS]
    while len(cleaned.encode()) > 240:
        cleaned = cleaned[:-1]
    return cleaned
