"""Websocket close codes, all in one place: the ones RFC 6455 defines that we send, and the two
application codes of our own (4000-4999). Clients read them: `@verdant-web/store` reconnects
after any close, and a refusal before the upgrade is an HTTP status instead (`errors`)."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    """The server is shutting down; clients reconnect elsewhere or later."""
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    """A text message that is not UTF-8."""
    POLICY = 1008
    """Too many invalid messages, or a flood of control frames."""
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    """The server could not handle what the client sent; it reconnects and resyncs."""
    SERVICE_RESTART = 1012
    """This node stopped serving the library (its slot moved to another node of a cluster):
    clients reconnect at once, with the same token, and the front routes them to the owner."""
    TRY_AGAIN_LATER = 1013
    """A slow consumer, a library restarting, no memory for a large message: come back."""
    EVICTED = 4001
    """The library was evicted; clients reconnect and re-upload from their replicas."""
    IDLE = 4008
    """No frame, not even a heartbeat, within the idle timeout."""
