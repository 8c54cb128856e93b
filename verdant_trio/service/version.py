"""The installed package's version, for logs, `--version` and the build-info metric."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("verdant-trio")
    except metadata.PackageNotFoundError:
        return "unknown"
