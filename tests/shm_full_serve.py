"""`walcache serve` on a /dev/shm that is full once LIMIT bytes were claimed (for tests).

    python tests/shm_full_serve.py LIMIT serve --data-dir DIR --socket PATH [serve options]

The daemon is the real one, started the way the CLI starts it; only its shared
memory goes through walcache.shm.writer.FaultyShmOps (the table's seam for claiming
pages), so that a test can fill /dev/shm without filling the machine's.
"""

from __future__ import annotations

import logging
import os
import sys

from walcache.cli import build_parser
from walcache.config import load_serve_config
from walcache.daemon.server import run
from walcache.shm.writer import FaultyShmOps


def main() -> int:
    limit = int(sys.argv[1])
    args = build_parser().parse_args(sys.argv[2:])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(load_serve_config(args, os.environ), args=args, shmops=FaultyShmOps(limit))


if __name__ == "__main__":
    sys.exit(main())
