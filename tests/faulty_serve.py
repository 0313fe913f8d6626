"""`walcache serve` with faults injected through our own seams (for tests).

    python tests/faulty_serve.py [--shm-limit BYTES] [--fail-fsync-from N] [--disk-free BYTES] \
        serve --data-dir DIR --socket PATH [serve options]

The daemon is the real one, started by the CLI's own ``main`` (logging, options, exit
codes); only its I/O goes through a seam: with --shm-limit its shared memory goes
through walcache.shm.writer.FaultyShmOps (/dev/shm is full once BYTES were claimed,
without filling the machine's); with --fail-fsync-from the fdatasyncs of the log from
the N-th on (counting from 1, recovery's included; the next thousand) fail with EIO,
through walcache.daemon.fileops.FaultyFileOps; with --disk-free the log's file system
has BYTES left to grow into (ENOSPC past them) until the process gets SIGUSR1, which
frees the space.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from walcache.cli import main
from walcache.daemon.fileops import FaultyFileOps
from walcache.shm.writer import FaultyShmOps


def faulty_main() -> int:
    faults = argparse.ArgumentParser()
    faults.add_argument("--shm-limit", type=int)
    faults.add_argument("--fail-fsync-from", type=int)
    faults.add_argument("--disk-free", type=int)
    fault_args, rest = faults.parse_known_args()
    seams: dict[str, Any] = {}
    if fault_args.shm_limit is not None:
        seams["shmops"] = FaultyShmOps(fault_args.shm_limit)
    if fault_args.fail_fsync_from is not None or fault_args.disk_free is not None:
        n = fault_args.fail_fsync_from
        fo = FaultyFileOps(
            fail_fsync_at=range(n, n + 1000) if n is not None else None, disk_free=fault_args.disk_free
        )
        signal.signal(signal.SIGUSR1, lambda signum, frame: fo.free_space())
        seams["fileops"] = fo
    return main(rest, **seams)


if __name__ == "__main__":
    sys.exit(faulty_main())
