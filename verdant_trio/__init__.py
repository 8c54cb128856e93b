"""verdant-trio: a Trio sync server for Verdant local-first apps.

The embedding API: `create_verdant` returns a `Verdant` whose blueprint serves the sync endpoint
inside your Quart-Trio app; `TokenProvider` mints the tokens your app hands to clients.
"""

from .engine.core import VerdantCore
from .service.embed import Verdant, create_verdant
from .storage.files import FileStorage, LocalFileStorage
from .sync.errors import ErrorCode, VerdantError
from .sync.protocol import ReplicaType
from .sync.tokens import TokenInfo, TokenProvider, TokenVerifier

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
