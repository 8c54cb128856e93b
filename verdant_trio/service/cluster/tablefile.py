"""The placement table on disk: read and checked, or replaced atomically.

Kept apart from `placement`, which is pure logic over text, so that what a slot is and how a
table reads can be used (and tested) with no file in sight.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .placement import Placement, PlacementError, parse, render


def read_placement(path: str | os.PathLike[str]) -> Placement:
    """Load and check a table file; `PlacementError` names the file and line of any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PlacementError(f"{path}: cannot read the placement table: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PlacementError(f"{path}: the placement table is not UTF-8 text") from None
    return parse(text, str(path))


def write_placement(path: str | os.PathLike[str], placement: Placement) -> None:
    """Replace the table file atomically: a reader sees the old table or the new one, whole.

    The partial file's name is unique, so writers of one file (the nodes of a dev cluster share
    theirs, and a move writes it on each) never write into each other's partial file."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(render(placement))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
