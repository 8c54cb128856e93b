"""verdant-trio: a Trio sync server for Verdant local-first apps.

The embedding API: `create_verdant` returns a `Verdant` whose blueprint serves the sync endpoint
inside your Quart-Trio app; `TokenProvider` mints the tokens your app hands to clients.
"""

from .core import VerdantCore
from .embed import Verdant, create_verdant
from .errors import ErrorCode, VerdantError
from .files import FileStorage, LocalFileStorage
from .protocol import ReplicaType
from .tokens import TokenInfo, TokenProvider, TokenVerifier

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
