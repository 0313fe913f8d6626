"""`walcache serve` with faults injected through our own seams (for tests).

    python tests/faulty_serve.py [--shm-limit BYTES] [--fail-fsync-from N] \
        serve --data-dir DIR --socket PATH [serve options]

The daemon is the real one, started the way the CLI starts it; only its I/O goes
through a seam: with --shm-limit its shared memory goes through
walcache.shm.writer.FaultyShmOps (/dev/shm is full once BYTES were claimed, without
filling the machine's); with --fail-fsync-from the fdatasyncs of the log from the
N-th on (counting from 1, recovery's included; the next thousand) fail with EIO, through
walcache.daemon.fileops.FaultyFileOps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from walcache.cli import build_parser
from walcache.config import load_serve_config
from walcache.daemon.fileops import FaultyFileOps
from walcache.daemon.server import run
from walcache.shm.writer import FaultyShmOps


def main() -> int:
    faults = argparse.ArgumentParser()
    faults.add_argument("--shm-limit", type=int)
    faults.add_argument("--fail-fsync-from", type=int)
    fault_args, rest = faults.parse_known_args()
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shmops = FaultyShmOps(fault_args.shm_limit) if fault_args.shm_limit is not None else None
    fileops = None
    if fault_args.fail_fsync_from is not None:
        fileops = FaultyFileOps(fail_fsync_at=range(fault_args.fail_fsync_from, fault_args.fail_fsync_from + 1000))
    return run(load_serve_config(args, os.environ), args=args, fileops=fileops, shmops=shmops)


if __name__ == "__main__":
    sys.exit(main())
