"""Summarise a py-spy collapsed-stack file: where the server's CPU goes.

    python -m bench.profile bench/results/profiles/ours-fanout-1.txt [--top 30] [--filter verdant_trio]

Self time is the share of samples whose innermost frame is the function; inclusive time is the
share of samples with the function anywhere on the stack (counted once per sample).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LOCATION = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def frame_key(frame: str) -> str:
    """`func (path/to/module.py:123)` → `func (module.py)`: one entry per function."""
    match = _LOCATION.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    short = "/".join(path.split("/")[-2:])
    return f"{match.group('name')} ({short})"


def summarise(path: Path, top: int, contains: str | None, thread: str | None = None) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = [f for f in stack.split(";") if f]
        if raw and raw[0].startswith("thread ("):
            name = raw.pop(0)
            if thread == "main" and "MainThread" not in name:
                continue
            if thread == "workers" and "MainThread" in name:
                continue
        elif thread is not None:
            raise SystemExit("this profile has no thread names (record with --threads)")
        frames = [frame_key(f) for f in raw]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for key in set(frames):
            inclusive[key] += count
    lines = [f"{path}: {total} samples"]
    for title, counter in (("self", self_time), ("inclusive", inclusive)):
        lines.append(f"\n-- top {top} by {title} time --")
        shown = 0
        for key, count in counter.most_common():
            if contains and contains not in key:
                continue
            lines.append(f"{100 * count / max(1, total):6.1f}%  {key}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--filter", default=None, help="only functions whose key contains this")
    p.add_argument("--thread", choices=["main", "workers"], help="only the event loop's thread, "
                   "or only the worker threads (profiles recorded with --threads)")
    args = p.parse_args(argv)
    print(summarise(args.file, args.top, args.filter, args.thread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
