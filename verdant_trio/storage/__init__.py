"""Per-library SQLite shards compatible with the Node server's `sqlShard` storage."""

from .shard import Shard

__all__ = ["Shard"]
