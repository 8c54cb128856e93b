"""Verdant error codes and the one domain error the edges translate into HTTP and close codes.

The numeric codes are the ones `@verdant-web/common` defines (`VerdantErrorCode`); clients read
`{"code": N}` bodies and act on some of them (4012 makes a pull client drop its cached token).
"""

from __future__ import annotations

import enum
from typing import Final


class ErrorCode(enum.IntEnum):
    INVALID_REQUEST = 4000
    BODY_REQUIRED = 4001
    NO_TOKEN = 4010
    INVALID_TOKEN = 4011
    TOKEN_EXPIRED = 4012
    FORBIDDEN = 4030
    NOT_FOUND = 4040
    PAYLOAD_TOO_LARGE = 4130
    UNEXPECTED = 5000
    CONFIGURATION_ERROR = 5010
    NO_FILE_STORAGE = 5011
    UNAVAILABLE = 5030


class VerdantError(Exception):
    """An error with a Verdant code; the HTTP status is `code // 10`, as in the reference."""

    def __init__(
        self, code: ErrorCode, message: str | None = None, *, retry_after_s: int | None = None
    ) -> None:
        self.code: Final = code
        self.message: Final = message or code.name.lower().replace("_", " ")
        self.retry_after_s: Final = retry_after_s
        """Sent as `Retry-After` (a refusal that a retry soon will get past)."""
        super().__init__(f"{int(code)}: {self.message}")

    @property
    def http_status(self) -> int:
        status = int(self.code) // 10
        return status if status < 600 else 500

    def to_body(self) -> dict[str, object]:
        """The JSON body clients recognise (`isVerdantErrorResponse`), plus a human message."""
        return {"code": int(self.code), "message": self.message}


class Disconnected(Exception):
    """The websocket is gone (closed by the peer, or the transport failed): the transports
    raise it and the connections end on it, so it lives below both."""
