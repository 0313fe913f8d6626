"""The file-system seam: every durable I/O of the log goes through a FileOps.

:class:`FileOps` is the real thing (``os.pwrite``, ``os.fdatasync``, ``os.rename``,
a directory fsync, ``os.ftruncate``, ``os.unlink``). :class:`FaultyFileOps` is the
same thing with faults for tests, injected here and nowhere else (never by
patching the standard library):

* fail the n-th fdatasync with EIO (or any errno), fail the n-th write, fail
  the n-th directory fsync;
* run out of space (ENOSPC) after N bytes: the crossing write is short, the
  next one raises, as Linux does;
* a file system with ``disk_free`` bytes left: only writes past a file's end
  take space (overwrites of what a file already holds do not), and the one
  that finds none left raises ENOSPC; a test may set ``disk_free`` again
  (None: unlimited) to free space;
* short writes (each pwrite writes a random, non-empty prefix);
* "crash" after N bytes: the crossing write is cut there and every later
  call raises :class:`SimulatedCrash` (a BaseException, so no ``except
  OSError`` in the code under test can swallow it: the process is dead);
* "crash" right before the n-th call of one operation (``crash_at=("rename", 1)``),
  for tests parametrized over numbered crash points;
* process death: :meth:`FaultyFileOps.kill` closes the descriptors and keeps
  the page cache (what was written stays readable, still not durable);
* power loss: :meth:`FaultyFileOps.drop_unsynced` puts every file it touched
  back to what the last successful fdatasync made durable, and the directory
  entries of those files back to what the last fsync of their directory made
  durable. Files it never touched are left alone, whatever directory they share. With
  ``keep_fraction > 0`` a random subset of the unsynced 512-byte sectors (and
  possibly the new size) survive, the way a disk may have written some of the
  page cache back before the power went.

The durability model (what survives a power cut) is: file contents as of the
last fdatasync that returned without error; directory entries (creations,
renames, unlinks) as of the last fsync of the directory; files a process
found already present are durable as found. A failed fdatasync makes nothing
durable.
"""

from __future__ import annotations

import errno as errno_mod
import io
import os
import random
from collections.abc import Iterable
from pathlib import Path

__all__ = ["FileOps", "FaultyFileOps", "SimulatedCrash"]


class FileOps:
    """Real durable I/O on local files (the daemon's default)."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """One pwrite; may write fewer bytes than given (see :meth:`pwrite_all`)."""
        return os.pwrite(fd, data, offset)

    def pwrite_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``, continuing after short writes."""
        view = memoryview(data)
        while view:
            n = self.pwrite(fd, view, offset)
            if n <= 0:
                # Never expected from a regular file, but looping on it would hang the flusher.
                raise OSError(errno_mod.EIO, "pwrite wrote nothing")
            view = view[n:]
            offset += n

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsize(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def read_file(self, path: Path) -> bytes:
        """The whole file in one bytes object (one read: FileIO sizes it by fstat)."""
        with io.FileIO(path, "r") as f:
            return f.readall()

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, path: Path) -> None:
        """Make creations, renames and unlinks in directory ``path`` durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)


class SimulatedCrash(BaseException):
    """Raised by FaultyFileOps once its crash point is reached: the 'process' died there."""


class FaultyFileOps(FileOps):
    """FileOps with injectable faults and a model of what survives power loss (see module doc)."""

    def __init__(
        self,
        *,
        fail_fsync_at: int | Iterable[int] | None = None,
        fsync_errno: int = errno_mod.EIO,
        fail_write_at: int | Iterable[int] | None = None,
        write_errno: int = errno_mod.EIO,
        fail_dir_fsync_at: int | Iterable[int] | None = None,
        dir_fsync_errno: int = errno_mod.EIO,
        enospc_after: int | None = None,
        disk_free: int | None = None,
        short_write_max: int | None = None,
        crash_after_bytes: int | None = None,
        crash_at: tuple[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.fail_fsync_at = _as_set(fail_fsync_at)
        self.fsync_errno = fsync_errno
        self.fail_write_at = _as_set(fail_write_at)
        self.write_errno = write_errno
        self.fail_dir_fsync_at = _as_set(fail_dir_fsync_at)
        self.dir_fsync_errno = dir_fsync_errno
        self.enospc_after = enospc_after
        self.disk_free = disk_free
        self._space_freed = False  # free_space() was called: the next write lifts the limit
        self.short_write_max = short_write_max
        self.crash_after_bytes = crash_after_bytes
        self.crash_at = crash_at
        self.calls: dict[str, int] = {}  # operation name -> calls so far
        self.rng = random.Random(seed)
        # Counters tests assert on.
        self.fsyncs = 0  # fdatasync calls, failed ones included
        self.dir_fsyncs = 0
        self.dirs_synced: list[Path] = []
        self.writes = 0  # pwrite calls
        self.bytes_written = 0
        self.crashed = False
        # Durability model.
        self._fd_ino: dict[int, int] = {}
        self._fd_path: dict[int, Path] = {}
        self._durable: dict[int, bytes] = {}  # ino -> content at its last good fdatasync
        self._dirs: dict[Path, dict[str, int]] = {}  # dir -> durable entries (name -> ino)
        # Only names this object opened, created, renamed or unlinked are ever reverted: a power
        # cut is simulated for the files under test, never for anything else in their directories.
        self._touched: dict[Path, set[str]] = {}

    # ----------------------------------------------------------------- helpers

    def _alive(self) -> None:
        if self.crashed:
            raise SimulatedCrash("the process already crashed")

    def _enter(self, op: str) -> None:
        self._alive()
        n = self.calls[op] = self.calls.get(op, 0) + 1
        if self.crash_at == (op, n):
            self.crashed = True
            raise SimulatedCrash(f"crash before {op} #{n}")

    def _touch(self, path: Path) -> None:
        d, name = path.parent, path.name
        if d not in self._dirs:
            self._dirs[d] = _listing(d)  # entries found at the first touch are durable as found
        self._touched.setdefault(d, set()).add(name)
        ino = self._dirs[d].get(name)
        if ino is not None and ino not in self._durable and path.exists() and os.stat(path).st_ino == ino:
            self._durable[ino] = _read(path)  # a file found on disk: durable as found

    def synced_length(self, path: Path) -> int:
        """Length of ``path``'s content that the last good fdatasync made durable."""
        return len(self._durable.get(os.stat(path).st_ino, b""))

    # ----------------------------------------------------------------- FileOps

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        self._enter("open")
        path = Path(path)
        self._touch(path)
        existed = path.exists()
        fd = super().open(path, flags, mode)
        ino = os.fstat(fd).st_ino
        if not existed:
            self._durable[ino] = b""  # created now: nothing of it is durable yet
        else:
            self._durable.setdefault(ino, _read(path))
        self._fd_ino[fd] = ino
        self._fd_path[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self._fd_ino.pop(fd, None)
        self._fd_path.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self._enter("pwrite")
        self.writes += 1
        if self.writes in self.fail_write_at:
            raise OSError(self.write_errno, os.strerror(self.write_errno), str(self._fd_path.get(fd)))
        view = memoryview(data)
        n = len(view)
        if self.short_write_max is not None and n > 1:
            n = self.rng.randint(1, min(n, self.short_write_max))
        if self.enospc_after is not None:
            room = self.enospc_after - self.bytes_written
            if room <= 0:
                raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC), str(self._fd_path.get(fd)))
            n = min(n, room)
        if self._space_freed:
            self._space_freed, self.disk_free = False, None
        free = self.disk_free
        if free is not None:
            size = os.fstat(fd).st_size
            grows = max(0, offset + n - max(size, offset))
            if grows > free:
                n = max(size - offset, 0) + free  # what fits: the overwrite, then the space left
                if n <= 0:
                    raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC), str(self._fd_path.get(fd)))
            self.disk_free = free - max(0, offset + n - max(size, offset))
        if self.crash_after_bytes is not None and self.bytes_written + n >= self.crash_after_bytes:
            cut = self.crash_after_bytes - self.bytes_written
            if cut > 0:
                super().pwrite(fd, view[:cut], offset)
                self.bytes_written += cut
            self.crashed = True
            raise SimulatedCrash(f"crash after {self.crash_after_bytes} bytes written")
        written = super().pwrite(fd, view[:n], offset)
        self.bytes_written += written
        return written

    def free_space(self) -> None:
        """Lift ``disk_free`` (someone deleted files): safe from a signal handler, since only
        the next pwrite (the log's are serialized by its writer) changes the budget."""
        self._space_freed = True

    def fdatasync(self, fd: int) -> None:
        self._enter("fdatasync")
        self.fsyncs += 1
        if self.fsyncs in self.fail_fsync_at:
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno), str(self._fd_path.get(fd)))
        # What was written before the call: a write made while the sync runs (another
        # thread, outside the writer's lock) is not promised by it.
        before = os.pread(fd, os.fstat(fd).st_size, 0)
        self.device_sync(fd)
        self._durable[self._fd_ino[fd]] = before

    def device_sync(self, fd: int) -> None:
        """The real fdatasync, once the model has noted what it covers (a test may slow it)."""
        super().fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        self._enter("ftruncate")
        super().ftruncate(fd, size)

    def read_file(self, path: Path) -> bytes:
        self._alive()
        return super().read_file(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._enter("rename")
        self._touch(Path(src))
        self._touch(Path(dst))
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        self._enter("unlink")
        self._touch(Path(path))
        super().unlink(path)

    def fsync_dir(self, path: Path) -> None:
        self._enter("fsync_dir")
        self.dir_fsyncs += 1
        if self.dir_fsyncs in self.fail_dir_fsync_at:
            raise OSError(self.dir_fsync_errno, os.strerror(self.dir_fsync_errno), str(path))
        self.dirs_synced.append(Path(path))
        super().fsync_dir(path)
        self._dirs[Path(path)] = _listing(Path(path))

    # ----------------------------------------------------------------- crashes

    def kill(self) -> None:
        """The process died, the machine did not: close its descriptors, keep the page cache.

        Unsynced bytes stay readable (and still not durable): a later
        :meth:`drop_unsynced` on this same object can still take them away.
        """
        for fd in list(self._fd_ino):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd_ino.clear()
        self._fd_path.clear()
        self.crashed = False

    def drop_unsynced(self, *, keep_fraction: float = 0.0, sector: int = 512, seed: int | None = None) -> None:
        """Simulate a power cut: every file this object touched reverts to its durable state.

        Open descriptors are closed (the process died with the machine). With
        ``keep_fraction`` > 0 each unsynced sector that differs survives with
        that probability, and a changed file size survives with it too.
        """
        rng = random.Random(seed) if seed is not None else self.rng
        for fd in list(self._fd_ino):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd_ino.clear()
        self._fd_path.clear()
        for d, names in self._touched.items():
            durable_entries = self._dirs.get(d, {})
            current = _listing(d)
            for name in sorted(names):
                path = d / name
                cur, dur = current.get(name), durable_entries.get(name)
                if cur is not None and cur != dur:
                    os.unlink(path)  # this directory entry never became durable
                    cur = None
                if dur is None:
                    continue
                content = self._durable.get(dur, b"")
                if cur == dur:
                    content = _mix(content, _read(path), keep_fraction, sector, rng)
                with open(path, "wb") as f:  # same inode if it still exists, else a new file
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
            self._dirs[d] = _listing(d)
            for name in names:
                ino = self._dirs[d].get(name)
                if ino is not None:
                    self._durable[ino] = _read(d / name)
        self.crashed = False


def _as_set(v: int | Iterable[int] | None) -> set[int]:
    if v is None:
        return set()
    if isinstance(v, int):
        return {v}
    return set(v)


def _listing(d: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in os.scandir(d):
        if entry.is_file(follow_symlinks=False):
            out[entry.name] = entry.inode()
    return out


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _mix(durable: bytes, current: bytes, keep: float, sector: int, rng: random.Random) -> bytes:
    """What a disk may hold after a power cut: durable bytes plus some unsynced sectors."""
    if keep <= 0.0 or durable == current:
        return durable
    size = len(current) if len(current) != len(durable) and rng.random() < keep else len(durable)
    old = durable.ljust(size, b"\0")[:size]
    new = current.ljust(size, b"\0")[:size]
    out = bytearray(old)
    for start in range(0, size, sector):
        end = min(start + sector, size)
        if old[start:end] != new[start:end] and rng.random() < keep:
            out[start:end] = new[start:end]
    return bytes(out)
