"""One daemon per data dir: an exclusive flock on DATA_DIR/LOCK, which also names the holder's pid.

The flock is the truth; the pid written into the file is for the error
message only. The kernel drops the lock when the holder dies, however it
dies, so a stale LOCK file never blocks a restart. The descriptor is
close-on-exec so a process the daemon spawns does not inherit the lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import DataDirLocked

__all__ = ["DataDirLock", "PidLockFile", "LOCK_NAME"]

LOCK_NAME = "LOCK"


class PidLockFile:
    """An exclusive, non-blocking flock on one file that also holds the holder's pid.

    The data-dir lock and compaction's COMPACT.lock are both this: the flock is
    the truth, the pid is for messages, and the kernel drops the lock however
    the holder dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock now (and write our pid), or return False if another process holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid the holder wrote (for messages), None if unknown yet."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return _holder_pid(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Clear the pid first, so nobody reads ours once the lock is someone else's.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock


class DataDirLock(PidLockFile):
    """``with DataDirLock(d): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(self.data_dir / LOCK_NAME)

    def acquire(self) -> None:
        """Take the lock or raise DataDirLocked naming the pid that holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.try_acquire():
            return
        pid = self.holder()
        who = f"pid {pid}" if pid is not None else "another process (pid not yet written)"
        raise DataDirLocked(
            f"data dir {self.data_dir} is in use by {who}: stop that daemon, "
            "or give this one another --data-dir",
            path=str(self.path),
            pid=pid,
        )

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _holder_pid(fd: int) -> int | None:
    # The holder writes its pid right after it gets the lock; give it a moment.
    deadline = time.monotonic() + 0.2
    while True:
        raw = os.pread(fd, 32, 0)
        try:
            return int(raw.decode().strip())
        except ValueError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
