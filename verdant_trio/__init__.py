"""verdant-trio: a Trio sync server for Verdant local-first apps.

The embedding API: `create_verdant` returns a `Verdant` whose blueprint serves the sync endpoint
inside your Quart-Trio app; `TokenProvider` mints the tokens your app hands to clients.

The names below are imported when first used, so that importing one part of the package (the
command line checking a configuration, say) does not load the HTTP server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.core import VerdantCore
    from .service.embed import Verdant, create_verdant
    from .storage.files import FileStorage, LocalFileStorage
    from .sync.errors import ErrorCode, VerdantError
    from .sync.protocol import ReplicaType
    from .sync.tokens import TokenInfo, TokenProvider, TokenVerifier

_EXPORTS = {
    "ErrorCode": "sync.errors",
    "FileStorage": "storage.files",
    "LocalFileStorage": "storage.files",
    "ReplicaType": "sync.protocol",
    "TokenInfo": "sync.tokens",
    "TokenProvider": "sync.tokens",
    "TokenVerifier": "sync.tokens",
    "Verdant": "service.embed",
    "VerdantCore": "engine.core",
    "VerdantError": "sync.errors",
    "create_verdant": "service.embed",
}
__all__ = [
    "ErrorCode",
    "FileStorage",
    "LocalFileStorage",
    "ReplicaType",
    "TokenInfo",
    "TokenProvider",
    "TokenVerifier",
    "Verdant",
    "VerdantCore",
    "VerdantError",
    "create_verdant",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
