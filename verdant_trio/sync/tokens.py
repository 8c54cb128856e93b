"""Sync access tokens: minting (for apps and tools) and verification (for every request).

Tokens are HS256 JWTs with the claims the Verdant client and server read: `sub` (user), `lib`
(library), `url` (sync endpoint), `file` (file endpoint), `role`, `type` (`ReplicaType`), `exp`.
Verification pins the algorithm, so a token signed with `none` or RS256 is invalid, and maps every
failure to a Verdant error code: 4010 no token, 4011 invalid, 4012 expired.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from .errors import ErrorCode, VerdantError
from .protocol import ReplicaType

ALGORITHM: Final = "HS256"
_UNITS_S: Final = {
    "ms": 0.001, "msec": 0.001, "msecs": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    "y": 31557600, "yr": 31557600, "yrs": 31557600, "year": 31557600, "years": 31557600,
}  # fmt: skip
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_duration_s(value: str | int | float) -> float:
    """Seconds from a number or an `ms`-style string ("1d", "12h", "30 minutes"), as `expiresIn`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '1d', '12h', '30m')")
    unit = match.group(2).lower() or "ms"
    if unit not in _UNITS_S:
        raise ValueError(f"unknown duration unit {match.group(2)!r} in {value!r}")
    return float(match.group(1)) * _UNITS_S[unit]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a verified token grants. Never log `token`."""

    user_id: str
    library_id: str
    sync_endpoint: str | None
    role: str | None
    type: ReplicaType
    token: str

    def __repr__(self) -> str:  # keeps the token out of logs and tracebacks
        return (
            f"TokenInfo(user_id={self.user_id!r}, library_id={self.library_id!r}, "
            f"type={self.type.name})"
        )


class TokenProvider:
    """Mints tokens the way the reference `TokenProvider` does, for apps and the CLI."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a token secret is required")
        self._secret = secret

    def get_token(
        self,
        library_id: str,
        user_id: str,
        sync_endpoint: str,
        role: str | None = None,
        type: ReplicaType = ReplicaType.REALTIME,
        expires_in: str | int | float = "1d",
        file_endpoint: str | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "lib": library_id,
            "url": sync_endpoint,
            "type": int(type),
            "iat": now,
            "exp": now + int(parse_duration_s(expires_in)),
        }
        if file_endpoint is not None:
            claims["file"] = file_endpoint
        if role is not None:
            claims["role"] = role
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


class TokenVerifier:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a token secret is required")
        self._secret = secret

    def verify(self, token: str | None) -> TokenInfo:
        if not token:
            raise VerdantError(ErrorCode.NO_TOKEN, "a sync token is required")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub"], "verify_exp": True},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise VerdantError(ErrorCode.TOKEN_EXPIRED, "the sync token has expired") from None
        except jwt.PyJWTError as exc:
            raise VerdantError(ErrorCode.INVALID_TOKEN, f"invalid sync token ({exc})") from None
        user_id = claims.get("sub")
        library_id = claims.get("lib")
        if not isinstance(user_id, str) or not user_id:
            raise VerdantError(ErrorCode.INVALID_TOKEN, "invalid sync token (no user in 'sub')")
        if not isinstance(library_id, str) or not library_id:
            raise VerdantError(ErrorCode.INVALID_TOKEN, "invalid sync token (no library in 'lib')")
        return TokenInfo(
            user_id=user_id,
            library_id=library_id,
            sync_endpoint=claims.get("url") if isinstance(claims.get("url"), str) else None,
            role=claims.get("role") if isinstance(claims.get("role"), str) else None,
            type=_replica_type(claims.get("type")),
            token=token,
        )


def _replica_type(value: Any) -> ReplicaType:
    """The reference's dev server mints `type` from a query string, so "4" must mean 4 here.

    (The Node server compares the string with the enum and so grants write access to a "4"
    token; we normalise instead.) A token without a type is a realtime token, as the reference
    `TokenProvider` mints by default.
    """
    if value is None:
        return ReplicaType.REALTIME
    try:
        number = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, float) and value != number:
        number = -1
    try:
        return ReplicaType(number)
    except ValueError:
        raise VerdantError(
            ErrorCode.INVALID_TOKEN, f"invalid sync token (unknown replica type {value!r})"
        ) from None
