"""One daemon per data dir and per socket: exclusive flocks that also name the holder's pid.

DATA_DIR/LOCK guards the data dir; ``<socket>.lock``, next to the socket,
guards the socket path (two daemons of different data dirs given the same
``--socket``). The flock is the truth; the pid written into the file is for
the error message only. A lock file is never removed: unlinking it while
another process is about to lock it would let two processes hold "the" lock
on two inodes. The kernel drops the lock when the holder dies, however it
dies, so a stale LOCK file never blocks a restart. The descriptor is
close-on-exec so a process the daemon spawns does not inherit the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, DataDirLocked

__all__ = ["DataDirLock", "PidLockFile", "SocketLock", "LOCK_NAME"]

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
        # O_NOFOLLOW: a symlink planted in a shared directory must not get truncated through.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # drops the flock too
            raise
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

    def who(self) -> tuple[int | None, str]:
        """(pid, "pid N") of the holder, for a refusal; the pid is None if not written yet."""
        pid = self.holder()
        return pid, f"pid {pid}" if pid is not None else "another process (pid not yet written)"

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
        pid, who = self.who()
        raise DataDirLocked(
            f"data dir {self.data_dir} is in use by {who}: stop that daemon first "
            "(or start this daemon with another --data-dir)",
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


class SocketLock(PidLockFile):
    """``<socket>.lock``: held from before recovery until after the socket is removed.

    Without it a daemon could only probe the socket path, which leaves two
    windows: a daemon still recovering has no socket yet (a second one would
    publish a table and only then find the socket taken), and one between bind
    and listen refuses connections like a dead daemon's socket (a second one
    would unlink it and take the path).
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        super().__init__(self.socket_path.with_name(self.socket_path.name + ".lock"))

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the pid that holds it (or the problem)."""
        try:
            if self.try_acquire():
                return
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.EACCES, errno.EPERM):
                raise  # ENOSPC, EIO, EROFS...: may pass, so not a configuration error
            # A symlink (refused by O_NOFOLLOW), a directory, a file we may not open.
            raise ConfigError(
                f"cannot take the socket lock {self.path}: {exc.strerror or exc}: "
                "remove what is there or pass another --socket"
            ) from None
        _pid, who = self.who()
        raise ConfigError(
            f"socket {self.socket_path} is in use by {who} (it holds {self.path.name}): "
            "stop that daemon or pass another --socket"
        )


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
