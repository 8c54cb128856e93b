"""What the core reports as it works: the seam between the sync core and metrics.

The core calls an `Observer`; `metrics.PrometheusObserver` turns the calls into Prometheus
series. Keeping the seam this small means the core never imports a metrics library and tests
can count events with a plain object.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def connection_opened(self, transport: str, replica_type: int) -> None:
        """`transport` is "websocket" or "http"."""

    def connection_closed(self, transport: str, replica_type: int) -> None: ...

    def message_in(self, kind: str) -> None:
        """A client message of this type arrived ("invalid" for refused ones)."""

    def message_out(self, kind: str, recipients: int) -> None:
        """A server message of this type was handed to `recipients` peers."""

    def operations_stored(self, count: int) -> None: ...

    def operations_recovered(self, count: int) -> None:
        """Operations a library restored from a replica lacked, brought back by a replica."""

    def replicas_resynced(self, count: int) -> None:
        """Replicas that re-sent their history to a library restored from a replica."""

    def rebase(self, duration_s: float, operations: int) -> None: ...

    def slow_consumer(self) -> None:
        """A connection was closed because its outbound queue was full."""

    def library_opened(self) -> None: ...

    def library_closed(self) -> None: ...

    def upload(self, size_bytes: int) -> None: ...

    def refused(self, transport: str) -> None:
        """A request for a library this server does not own was refused ("websocket", "http")."""


class NullObserver:
    def connection_opened(self, transport: str, replica_type: int) -> None:
        pass

    def connection_closed(self, transport: str, replica_type: int) -> None:
        pass

    def message_in(self, kind: str) -> None:
        pass

    def message_out(self, kind: str, recipients: int) -> None:
        pass

    def operations_stored(self, count: int) -> None:
        pass

    def operations_recovered(self, count: int) -> None:
        pass

    def replicas_resynced(self, count: int) -> None:
        pass

    def rebase(self, duration_s: float, operations: int) -> None:
        pass

    def slow_consumer(self) -> None:
        pass

    def library_opened(self) -> None:
        pass

    def library_closed(self) -> None:
        pass

    def upload(self, size_bytes: int) -> None:
        pass

    def refused(self, transport: str) -> None:
        pass


NULL_OBSERVER = NullObserver()
