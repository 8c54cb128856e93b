"""The HTTP side's settings, as plain frozen dataclasses (no Quart, no hypercorn: checking a
configuration must not load the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AppSettings:
    sync_path: str = "/verdant"
    admin_path: str | None = "/admin"
    admin_token: str | None = None
    """None with `admin_open` False: admin API disabled."""
    admin_open: bool = False
    """Quickstart only: the admin API needs no token."""
    dev_token_secret: str | None = None
    """Quickstart only: serve `GET /auth/{library}` minting tokens with this secret."""
    cors_origins: tuple[str, ...] | None = None
    """None: reflect any origin, like the reference CLI server."""
    max_body_bytes: int = 100 * 1024 * 1024
    body_timeout_s: float = 300.0
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LingerSettings:
    """Bounds on the draining after a connection's last answer."""

    timeout_s: float = 30.0
    """Total time a closing connection may keep sending (nginx's `lingering_time`)."""
    read_timeout_s: float = 5.0
    """A closing connection that sends nothing for this long is closed (`lingering_timeout`)."""
    max_bytes: int = 128 * 1024 * 1024
    """Bytes read and discarded at most; room for a refused upload of the default maximum size
    (100 MiB) to be read to its end."""
