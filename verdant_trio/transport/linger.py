"""The lingering close: how an HTTP connection is closed once hypercorn is done with it.

A refusal (413, 401, 400) is often answered before the request's body has arrived. Closing the
socket then, with the client's bytes still arriving, makes the kernel answer them with a reset,
and a client that writes its whole body before it reads (Node's `fetch`, Python's urllib) gets
EPIPE or ECONNRESET instead of the answer that is waiting in its receive buffer: it never learns
why, and may retry forever. So, like nginx's lingering close, the answer goes out, then our FIN
(a half-close: the client can still send), and what the client still sends is read and thrown
away until it ends its side of the connection; only then is the socket closed.

A client that never stops is cut off: the draining is bounded by a total time, a byte count and
a per-read timeout (a client that goes quiet), all in `LingerSettings` (`[limits] linger_*`).
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .settings import LingerSettings

log = logging.getLogger(__name__)

DRAIN_BYTES: Final = 64 * 1024


async def lingering_close(stream: trio.SocketStream, settings: LingerSettings, client: str) -> None:
    """Half-close `stream`, then discard what the peer sends until it ends its side or a bound
    is reached. The caller closes the socket afterwards, and owns it: nothing else may use it.

    Every read is a checkpoint, so a fast sender costs its own connection, not the event loop.
    """
    if settings.timeout_s <= 0 or settings.max_bytes <= 0:
        return  # configured off: the caller's close is the close
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # reset by the peer: nothing will arrive
    buffer = bytearray(DRAIN_BYTES)
    discarded = 0
    reason = "time"
    with trio.move_on_after(settings.timeout_s):
        while True:
            if discarded >= settings.max_bytes:
                reason = "bytes"
                break
            with trio.move_on_after(settings.read_timeout_s):
                try:
                    received = await stream.socket.recv_into(buffer)
                except OSError:
                    return  # reset: the peer is gone
                if not received:
                    return  # the peer ended its side: a clean close
                discarded += received
                continue
            reason = "quiet"
            break
    log.info(
        "lingering close cut short reason=%s discarded_bytes=%d client=%s",
        reason, discarded, client,
    )
