"""Appending to the log: seqnos, group commit, fsync policies, segment files.

Threads. ``encode()`` runs on the daemon's event-loop thread and touches no
file: it assigns the next seqno and builds the record bytes (it reads
``durable_seqno``, an int the flusher replaces atomically under the GIL; a
stale value only makes the record claim less, which is safe). ``append()``,
``sync()``, ``sync_if_due()``, ``rotate()``, ``seal()`` and ``close()`` do the
I/O and are serialized by one lock. The daemon calls them from its flusher
thread, except that under ``interval`` and ``never`` (and ``always`` with one
connection) its loop thread appends, and so may rotate, itself; ``sync`` also
comes from shutdown. ``os.pwrite`` and ``os.fdatasync`` release the GIL, so the
loop keeps encoding while a group is being synced. One exception to the lock:
under ``interval`` with ``sync_in_background`` set (the daemon sets it),
``sync_if_due()`` runs its fdatasync outside the lock, so the loop thread's
appends go on meanwhile instead of waiting for an interval's worth of writes to
reach the disk (``bench/bench_put.py --policy interval``); a rotation, a sync
or a close waits for that fdatasync before it touches the descriptor.

Group commit. ``append(data)`` takes many encoded records joined together,
writes them with one pwrite (continued after short writes) and, under policy
``always``, syncs them with one fdatasync before returning: the caller may
acknowledge every record in ``data`` once it returns. Policies:

* ``always``: fdatasync before append returns (survives power loss);
* ``interval``: fdatasync when ``interval_ms`` have passed since the last one,
  checked at each append (unless ``sync_in_background``) and by
  ``sync_if_due()`` (an acknowledged write survives a process crash; power loss
  may take the last interval);
* ``never``: the OS writes back when it likes (survives a process crash only);
  segments are still synced when they are sealed and at close.

Failure. Any error from a write, an fdatasync, a truncate or a segment
creation sets ``failed``: that call raises :class:`walcache.LogFailed`, and so
does every later append, sync and encode. Nothing is retried: after a failed
fdatasync Linux may have dropped the dirty pages and a second fdatasync would
"succeed" without the data (PostgreSQL's fsync lesson). The daemon stops
acknowledging; a restart recovers from what reached the disk.

One exception: no space (ENOSPC, EDQUOT) while the log grows, that is while an
extent is zero-filled or the next segment is created up to its rename (its
.tmp, fdatasync included: that file is removed, never retried), raises
:class:`walcache.LogFull` and leaves the writer usable. No byte of the group was
written then (it is written only into space already filled), so the group is
refused whole and nothing is lost; the caller takes its seqnos back
(:meth:`WalWriter.take_back_unwritten`) and the next append retries the growth.

Space. Segment files grow in zero-filled extents (``EXTENT_BYTES``): records
then overwrite allocated blocks, so an fdatasync has no size or extent change
to journal (about 30 % cheaper on the target disk: fdatasync p50 74-84 us vs
113-120 us for a growing file, bench/bench_wal.py), and running out of space
shows up when an extent is added rather than in the middle of a group. The
sync after an extent is added pays for it, so extents are kept small.

Segments. ``append`` seals the current segment and starts the next when the
group would not fit in ``segment_bytes`` (a group never straddles segments; a
group larger than ``segment_bytes`` gets a segment of its own). Sealing and
creating are numbered steps, each a possible crash point (recovery handles
every one of them)::

    1. trim the sealed segment to its last record and fdatasync it: every
       segment but the newest is complete and durable;
    2. write the next segment's header (+ first extent) to wal-<n>.log.tmp and
       fdatasync it;
    3. rename it to wal-<n>.log;
    4. fsync the directory;
    5. switch appends to it and close the sealed one.

A crash before 3 leaves a .tmp that open_log deletes; after 3 the new segment
is an empty newest segment whose first seqno continues the sealed one.

Sealing for compaction. ``seal()`` is step 1 of compaction (compaction.py):
it rotates at a group boundary (the flusher calls it between appends) and
returns ``(K, S)``: every record up to seqno S lies in segments <= K, which
are complete and durable, and segment K+1 starts at S+1. The writer never
touches a sealed segment again, so the compactor may delete segments <= K
once a snapshot of the state at S is named by the manifest.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError, LogFailed, LogFull, StorageError
from .fileops import FileOps
from .walformat import (
    SEGMENT_HEADER_SIZE,
    Op,
    encode_record,
    encode_segment_header,
    group_bounds,
    segment_name,
)

__all__ = ["WalWriter", "POLICIES", "EXTENT_BYTES", "DEFAULT_SEGMENT_BYTES", "create_segment"]

log = logging.getLogger("walcache.wal")

# Errors that mean "no room": the log refuses the group and stays usable (module doc).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# fdatasync latencies kept for stats: enough for a stable p99, cheap to sort per stats call.
SYNC_SAMPLES = 10_000

POLICIES = ("always", "interval", "never")
# Small extents: the fdatasync after an extent is added writes all its zeros (and the
# new size) while every writer in its group waits. With 4 KiB values and 16 clients
# (bench_put.py, alternating runs, bench/results/extent-size-20261126/) 4 MiB extents
# gave put p99 9.1-11.5 ms and 19.3-20.2k puts/s, 256 KiB gave 1.2-1.3 ms and
# 23.1-23.8k; 100-byte puts did not change (an extent lasts 2,000 of them).
EXTENT_BYTES = 256 << 10
DEFAULT_SEGMENT_BYTES = 64 << 20
_ZEROS = bytes(1 << 20)


def _fill_zeros(fileops: FileOps, fd: int, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(_ZEROS))
        fileops.pwrite_all(fd, memoryview(_ZEROS)[:n], start)
        start += n


def create_segment(
    fileops: FileOps, data_dir: Path, segno: int, first_seqno: int, salt: int, size: int
) -> tuple[int, Path]:
    """Steps 2-4 (see module doc): a new durable segment of ``size`` bytes; returns (fd, path)."""
    final = data_dir / segment_name(segno)
    tmp = final.with_name(final.name + ".tmp")
    if final.exists():
        raise StorageError(f"{final} already exists; refusing to overwrite a segment", path=str(final))
    fd = fileops.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    renamed = False
    try:
        fileops.pwrite_all(fd, encode_segment_header(segno, first_seqno, time.time_ns(), salt), 0)
        _fill_zeros(fileops, fd, SEGMENT_HEADER_SIZE, max(size, SEGMENT_HEADER_SIZE))
        fileops.fdatasync(fd)
        fileops.rename(tmp, final)
        renamed = True
        fileops.fsync_dir(data_dir)
    except OSError:
        fileops.close(fd)
        if not renamed:  # e.g. no space: give back what the .tmp took (open_log would, later)
            try:
                fileops.unlink(tmp)
            except OSError:
                pass
        raise
    except BaseException:
        fileops.close(fd)
        raise
    log.info("started segment %s (first seqno %d)", final.name, first_seqno)
    return fd, final


class WalWriter:
    """The only writer of one log; made by :func:`walcache.daemon.recovery.open_log`."""

    def __init__(
        self,
        data_dir: Path,
        fileops: FileOps,
        *,
        fd: int,
        path: Path,
        segno: int,
        salt: int,
        offset: int,
        file_size: int,
        last_seqno: int,
        policy: str = "always",
        interval_ms: int = 1000,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check_config(policy, interval_ms, segment_bytes)
        # Seconds, for the interval policy and the sync latencies (tests pass a fake one).
        self.clock = clock
        # The directory this log lives in: new segments go into it by path, so a data
        # dir moved (and maybe replaced) under a running daemon must stop the log, not
        # split it across two directories.
        st = os.stat(data_dir)
        self._dir_id = (st.st_dev, st.st_ino)
        self.data_dir = data_dir
        self.fileops = fileops
        self.policy = policy
        self.interval_ms = interval_ms
        self.segment_bytes = segment_bytes
        self.extent_bytes = min(EXTENT_BYTES, segment_bytes)
        self.salt = salt
        self.path = path
        self.segno = segno
        self.offset = offset  # where the next record goes
        self.next_seqno = last_seqno + 1  # what encode() assigns next (loop thread)
        self.written_seqno = last_seqno  # last seqno handed to pwrite
        # Recovery synced the segment before handing it over, so everything replayed is durable.
        self.durable_seqno = last_seqno
        self.failed = False
        self.closed = False
        # Counters for stats and tests.
        self.appends = 0
        self.syncs = 0
        self.bytes_appended = 0
        self.last_sync_seconds = 0.0
        # Every fdatasync's seconds, the most recent SYNC_SAMPLES (stats' fsync p50/p99),
        # whichever call made it: a group's append, an interval's timed sync, a rotation.
        self.sync_latencies: deque[float] = deque(maxlen=SYNC_SAMPLES)
        self._fd = fd
        self._file_size = file_size
        self._dirty = False  # bytes written since the last good fdatasync
        self._last_sync = self.clock()
        self._lock = threading.Lock()
        self._failure: LogFailed | None = None
        # --fsync interval in the daemon: appends never sync; the timed syncs are
        # sync_if_due()'s, outside the lock (rotations, sync() and close() still sync).
        self.sync_in_background = False
        self._syncing = False  # a sync_if_due() fdatasync is in flight, outside the lock
        self._sync_done = threading.Condition(self._lock)

    @staticmethod
    def check_config(policy: str, interval_ms: int, segment_bytes: int) -> None:
        """ConfigError unless these writer settings are usable."""
        if policy not in POLICIES:
            raise ConfigError(f"fsync policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if policy == "interval" and interval_ms <= 0:
            raise ConfigError(f"fsync interval must be a positive number of ms, not {interval_ms}")
        if segment_bytes < 4096:
            raise ConfigError(f"segment size must be at least 4096 bytes, not {segment_bytes}")

    # ----------------------------------------------------------- loop thread

    def encode(self, ops: Sequence[Op]) -> tuple[int, bytes]:
        """Assign the next seqno to ``ops`` and return (seqno, record bytes). Touches no file.

        Every seqno handed out must later be appended, in order (append()
        refuses a gap), or be taken back with :meth:`take_back_unwritten`.
        ValueError (bad ops) leaves the counter unchanged.
        """
        if self.failed or self.closed:
            raise self._unusable()
        seqno = self.next_seqno
        data = encode_record(seqno, ops, durable_seqno=self.durable_seqno, salt=self.salt)
        self.next_seqno = seqno + 1
        return seqno, data

    def take_back_unwritten(self) -> int:
        """After LogFull: every record encoded but not written is void, and the next
        encode() reuses its seqno. Returns that seqno.

        The encoding thread calls it when no append is running or can start before it
        returns (the daemon's flusher refuses every group until told to resume).
        """
        self.next_seqno = self.written_seqno + 1
        return self.next_seqno

    # ----------------------------------------------- flusher thread (or the loop, see above)

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Write a group of encoded records (one pwrite; one fdatasync under ``always``).

        Returns once the group is written (and synced, per policy). Raises
        LogFailed on any I/O error, now and on every later call; ValueError if
        ``data`` is not whole records continuing the seqnos (nothing written).
        """
        with self._lock:
            if self.failed or self.closed:
                raise self._unusable()
            if not data:
                return
            first, last, _count = group_bounds(data)
            if first != self.written_seqno + 1:
                raise ValueError(
                    f"records must be appended in seqno order: group starts at {first}, "
                    f"the log is at {self.written_seqno}"
                )
            n = len(data)
            try:
                if self.offset > SEGMENT_HEADER_SIZE and self.offset + n > self.segment_bytes:
                    self._rotate_locked(first)
                self._reserve(n)
                self.fileops.pwrite_all(self._fd, data, self.offset)
            except OSError as exc:
                raise self._fail(exc, "write") from exc
            self.offset += n
            self.written_seqno = last
            self._dirty = True
            self.appends += 1
            self.bytes_appended += n
            if self.policy == "always" or (
                self.policy == "interval" and not self.sync_in_background and self._due()
            ):
                self._sync_locked()

    def sync(self) -> None:
        """fdatasync what was appended (no-op if nothing is pending). LogFailed on error."""
        with self._lock:
            if self.failed or self.closed:
                raise self._unusable()
            self._sync_locked()

    def sync_if_due(self) -> None:
        """Under ``interval``: sync if the interval has passed since the last sync.

        With ``sync_in_background`` the fdatasync runs outside the lock: appends made
        meanwhile are not waited for and stay pending for the next sync (the records
        written before it started become durable). A second caller while one sync is
        in flight returns without syncing.
        """
        with self._lock:
            if self.failed or self.closed:
                raise self._unusable()
            if self.policy != "interval" or not self._due():
                return
            if self._syncing:  # another caller's sync is in flight (the daemon has one caller)
                return
            if not self.sync_in_background:
                self._sync_locked()
                return
            fd, target, t0 = self._fd, self.written_seqno, self.clock()
            self._syncing = True
            self._dirty = False  # an append from now on sets it again
            self._last_sync = t0
        err: BaseException | None = None
        try:
            self.fileops.fdatasync(fd)
        except BaseException as exc:  # noqa: BLE001 - raised below, once nobody can wait forever
            err = exc
        with self._lock:
            self._syncing = False
            self._sync_done.notify_all()
            if err is None:
                self._synced(t0, target)
            elif isinstance(err, OSError):
                raise self._fail(err, "fdatasync") from err
            else:
                self._dirty = True  # nothing was promised: a later sync must still run
                raise err

    def sync_due_in(self) -> float | None:
        """Under ``interval``: seconds until the unsynced writes are due (0 if overdue), or
        None when nothing is waiting for an fdatasync. The flusher sleeps this long, so
        that no write waits more than the interval for its sync."""
        if not self._dirty:
            return None
        return max(0.0, self._last_sync + self.interval_ms / 1000.0 - self.clock())

    def rotate(self) -> int:
        """Seal the current segment and start the next (steps 1-5); returns the sealed segno.

        When the current segment holds no record yet, nothing happens and its
        segno is returned: that segment is then NOT sealed (it is the one being
        appended to). Compaction must use :meth:`seal`, which says which
        segments are really sealed.
        """
        with self._lock:
            if self.failed or self.closed:
                raise self._unusable()
            if self.offset == SEGMENT_HEADER_SIZE:
                return self.segno
            sealed = self.segno
            try:
                self._rotate_locked(self.written_seqno + 1)
            except OSError as exc:
                raise self._fail(exc, "rotate") from exc
            return sealed

    def seal(self) -> tuple[int, int]:
        """Compaction step 1: ``(K, S)`` such that segments <= K hold exactly the records <= S.

        Rotates if the current segment holds records (it becomes K; K+1 starts
        at S+1). If it holds none, nothing is written: the records <= S are all
        in older segments, which the rotation that ended them trimmed and
        synced, and the current segment (K+1) starts at S+1. ``(0, 0)`` for a
        log with no record at all. LogFailed on I/O errors, as append.
        """
        with self._lock:
            if self.failed or self.closed:
                raise self._unusable()
            seal_seqno = self.written_seqno
            if self.offset == SEGMENT_HEADER_SIZE:
                return (self.segno - 1 if seal_seqno else 0), seal_seqno
            sealed = self.segno
            try:
                self._rotate_locked(seal_seqno + 1)
            except OSError as exc:
                raise self._fail(exc, "seal") from exc
            return sealed, seal_seqno

    def close(self) -> None:
        """Sync (unless failed) and close. Idempotent; LogFailed if the final sync fails."""
        with self._lock:
            if self.closed:
                return
            try:
                while self._syncing:  # the descriptor is closed below
                    self._sync_done.wait()
                if not self.failed:
                    self._sync_locked()
            finally:
                self.closed = True
                self.fileops.close(self._fd)

    # ----------------------------------------------------------- internals

    def _due(self) -> bool:
        # The same sum as sync_due_in: the flusher, woken when that reaches 0, must find it due.
        return self.sync_due_in() == 0.0

    def _sync_locked(self) -> None:
        self._wait_for_background_sync()
        if not self._dirty:
            return
        target = self.written_seqno
        t0 = self.clock()
        try:
            self.fileops.fdatasync(self._fd)
        except OSError as exc:
            raise self._fail(exc, "fdatasync") from exc
        self._dirty = False
        self._last_sync = self.clock()
        self._synced(t0, target)

    def _synced(self, t0: float, target: int) -> None:
        """An fdatasync that started at ``t0`` returned: every record <= ``target`` is durable."""
        now = self.clock()
        self.last_sync_seconds = now - t0
        self.sync_latencies.append(now - t0)
        self.syncs += 1
        self.durable_seqno = max(self.durable_seqno, target)

    def _wait_for_background_sync(self) -> None:
        """Under the lock: let a sync_if_due() fdatasync in flight return before the fd is used.

        LogFailed if that fdatasync failed: a caller that waited must not sync the same
        descriptor again (nothing is retried) nor go on writing.
        """
        while self._syncing:
            self._sync_done.wait()
        if self.failed:
            raise self._unusable()

    def _reserve(self, n: int) -> None:
        """Make sure ``[offset, offset+n)`` lies in zero-filled, allocated space."""
        need = self.offset + n
        if need <= self._file_size:
            return
        ext = self.extent_bytes
        new_size = max(need, min(-(-need // ext) * ext, self.segment_bytes))
        try:
            _fill_zeros(self.fileops, self._fd, self._file_size, new_size)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise self._no_space(exc, f"extend {self.path.name} to {new_size} bytes") from exc
            raise
        self._file_size = new_size
        self._dirty = True

    def _rotate_locked(self, first_seqno: int) -> None:
        self._wait_for_background_sync()  # it may be syncing the descriptor closed below
        # 1. Trim and seal: every segment but the newest is complete and durable. (Already
        # done when an earlier rotation stopped at step 2 for want of space.)
        if self._file_size != self.offset or self._dirty:
            self.fileops.ftruncate(self._fd, self.offset)
            self._file_size = self.offset
            self._dirty = True
            self._sync_locked()
        # 2-4. The next segment, durable under its final name, in the same directory.
        self.check_dir()
        final = self.data_dir / segment_name(self.segno + 1)
        try:
            fd, path = create_segment(
                self.fileops, self.data_dir, self.segno + 1, first_seqno, self.salt, self.extent_bytes
            )
        except OSError as exc:
            # Refused only while nothing of the new segment is left; once renamed (its
            # directory fsync failed) it names seqnos the old one must not take: fatal.
            if exc.errno in _NO_SPACE and not final.exists():
                raise self._no_space(exc, f"start segment {final.name}") from exc
            raise
        # 5. Switch.
        old = self._fd
        self._fd, self.path, self.segno = fd, path, self.segno + 1
        self.offset = SEGMENT_HEADER_SIZE
        self._file_size = max(self.extent_bytes, SEGMENT_HEADER_SIZE)
        self.fileops.close(old)

    def check_dir(self) -> None:
        """OSError (ESTALE) if the data dir's path no longer names the directory this log
        was opened in: it was moved (and maybe replaced) while the daemon ran."""
        try:
            st = os.stat(self.data_dir)
            same = (st.st_dev, st.st_ino) == self._dir_id
        except FileNotFoundError:
            same = False
        if not same:
            raise OSError(
                errno.ESTALE,
                f"{self.data_dir} is no longer the directory this log was opened in "
                "(moved or replaced while the daemon ran)",
            )

    def _no_space(self, exc: OSError, what: str) -> LogFull:
        """No room to grow the log: this group is refused unwritten; the writer stays usable."""
        return LogFull(
            f"no disk space to {what} ({exc.strerror}, errno {exc.errno}): this write was not "
            f"logged, nor applied; free space on the file system of {self.data_dir} and retry",
            path=str(self.path),
            offset=self.offset,
            errno=exc.errno,
        )

    def _fail(self, exc: OSError, what: str) -> LogFailed:
        self.failed = True
        err = LogFailed(
            f"{what} of {self.path} at offset {self.offset} failed: {exc.strerror or exc} "
            f"(errno {exc.errno}); the log accepts no more writes and nothing is retried. "
            "Restart the daemon: recovery replays what reached the disk.",
            path=str(self.path),
            offset=self.offset,
            errno=exc.errno,
        )
        self._failure = err
        log.error("%s", err)
        return err

    def _unusable(self) -> LogFailed:
        if self._failure is not None:
            return LogFailed(
                f"the log failed earlier and accepts no more writes: {self._failure}",
                path=self._failure.path,
                offset=self._failure.offset,
                errno=self._failure.errno,
            )
        return LogFailed("the log is closed", path=str(self.path))
