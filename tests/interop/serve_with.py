"""Our quickstart server with setting overrides, for interop tests that need short timers.

    python tests/interop/serve_with.py --port 4000 --libraries '{"file_expiration_days": 0}'

Same daemon and defaults as `verdant-server`; `--libraries`/`--core` are JSON objects of
`LibrarySettings`/`CoreSettings` fields to replace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import trio

from verdant_trio.service.config import quickstart_settings
from verdant_trio.service.daemon import run_until_signalled


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--libraries", default="{}")
    parser.add_argument("--core", default="{}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    settings = quickstart_settings(
        port=args.port, secret="interop-secret-interop-secret", host="127.0.0.1", data_dir=Path.cwd()
    )
    core = settings.core
    libraries = dataclasses.replace(core.libraries, **json.loads(args.libraries))
    core = dataclasses.replace(core, libraries=libraries, **json.loads(args.core))
    trio.run(run_until_signalled, dataclasses.replace(settings, core=core))
    return 0


if __name__ == "__main__":
    sys.exit(main())
