"""What travels in a library's inbox, and how the library's answers are encoded for its peers.

Every envelope comes from a connection, an HTTP request or the core's admin operations; the
library's task takes them in batches (`library.LibraryHost`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ..sync import authz
from ..sync.decisions import LibraryCore, Peer, Send
from ..sync.protocol import Ack, ClientMessage, Op, encode


@dataclass(slots=True)
class Message:
    """Messages from one realtime peer, in order (a connection forwards all it has at once)."""

    peer: Peer
    messages: list[ClientMessage]
    done: trio.Event | None = None


@dataclass(slots=True)
class Attach:
    peer: Peer


@dataclass(slots=True)
class Http:
    peer: Peer
    messages: list[ClientMessage]
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass(slots=True)
class Call:
    fn: Callable[[LibraryCore], Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class Wake:
    """Nothing to handle: the task looks at its departures (a detach never waits for room)."""


Envelope = Message | Attach | Http | Call | Wake
Work = Message | Http | Call
"""Envelopes handled in a batch transaction."""
WAKE: Final = Wake()


def carries_operations(envelope: Envelope) -> bool:
    if isinstance(envelope, (Message, Http)):
        return any(isinstance(m, Op) for m in envelope.messages)
    return False


def can_wait(envelope: Envelope) -> bool:
    """Operations and acknowledgements from realtime peers: nobody waits for an answer to an
    ack, and an operation's answer is worth a few milliseconds of batching under load."""
    return isinstance(envelope, Message) and all(
        isinstance(m, (Op, Ack)) for m in envelope.messages
    )


Encoded = list[tuple[str, bytes, list[Peer]]]
"""(message type, UTF-8 JSON, recipients)."""


def encode_sends(sends: list[Send]) -> Encoded:
    """Encode each message once per distinct view of it.

    Without restricted items one encoding serves every recipient. With them, each user sees
    only their own private operations and baselines, so recipients are grouped by user.
    """
    encoded: Encoded = []
    for send in sends:
        kind = send.message["type"]
        if not send.restricted:
            encoded.append((kind, encode(send.message), send.targets))
            continue
        by_user: dict[str, list[Peer]] = {}
        for peer in send.targets:
            by_user.setdefault(peer.user_id, []).append(peer)
        for user_id, peers in by_user.items():
            view = dict(send.message)
            for key in ("operations", "baselines"):
                # a pre-encoded array (orjson.Fragment) holds no restricted items
                if isinstance(view.get(key), list):
                    view[key] = authz.filter_visible(view[key], user_id)
            encoded.append((kind, encode(view), peers))
    return encoded
