"""The walcache daemon: socket server, group commit, publish, acknowledge.

One process, two threads:

- the **loop thread** (``selectors``) accepts connections, parses requests
  (walcache.protocol), validates them, assigns sequence numbers and encodes log
  records, applies durable batches to the shared table and writes replies;
- the **flusher thread** owns the log file: it writes one batch of records and
  fdatasyncs it (``WalWriter.append``) while the loop goes on reading the next
  requests. ``os.pwrite`` and ``os.fdatasync`` release the GIL. Under ``--fsync
  interval`` (and ``never``) the loop writes each round's batch itself, a
  page-cache copy, and under ``interval`` the flusher makes the timed syncs,
  beside those writes (``WalWriter.sync_in_background``).

Group commit needs no timer: while one batch is being synced, the loop hands the
records of every request that arrives (from any connection) to the flusher at
the end of each loop round; when the sync returns, the flusher takes all of them
as the next batch at once, without a round trip through the loop. One fdatasync
acknowledges all of it. The requests wait in ``queue``, in arrival order, until
the batch holding their record is durable.

The write path, in this order (the architecture contract):

1. a request arrives and is validated; its record is encoded (seqno assigned);
2. the flusher writes the batch and, under ``--fsync always``, fdatasyncs it;
3. the loop thread applies the batch to the shared table (``apply_ops``, the
   same function recovery uses);
4. only then are the replies queued, in request order per connection.

Requests that do not write (ping, stats, get) are answered at once when their
connection has nothing in flight, and otherwise queue behind its writes so that
replies always come back in request order (pipelining).

An fsync or write error is never retried: the batch is answered with LogFailed,
nothing of it is applied, and the daemon exits non-zero so that the next start
recovers from the log (systemd restarts it).

Compaction (the procedure and its crash table are in compaction.py). The
daemon's part: decide when (``walcache compact``, or automatically once the
log is at least ``compact_min_bytes`` and ``compact_dead_ratio`` of it is
dead), seal on the flusher thread between two batches, wait until the table
has applied every record up to the seal, start the compactor process, answer
its handshake, read its result line, and keep the figures for ``stats()``.
The loop never waits for the compactor: its stdout is one more fd in the
selector. One compaction at a time; a failure backs off (5 s, doubling up
to 10 min) and is logged; a manual request is not held back by the backoff.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..codec import check_encoded_key, check_encoded_value
from ..config import ServeConfig, diff, format_value, group_id, load_serve_config
from ..errors import (
    CacheFull,
    ConfigError,
    DaemonUnavailable,
    InvalidValue,
    KeyTooLarge,
    LogFailed,
    LogFull,
    ProtocolError,
    ServerError,
    ValueTooLarge,
    WalcacheError,
)
from ..paths import ensure_private_dir, shm_namespace
from ..protocol import MAX_TTL_MS, PROTOCOL_VERSION, BadRequest, Request, ServerProtocol
from ..shm.layout import SLOT_SIZE, chunk_words
from ..shm.writer import ShmOps, ShmTable
from . import notify
from .apply import OP_DELETE, OP_PUT, Applier, DictTable
from .compaction import EXIT_BUSY, EXIT_ORPHANED, compactor_command
from .fileops import FileOps
from .lock import DataDirLock, SocketLock
from .recovery import open_log
from .walformat import parse_segment_name, parse_snapshot_name

log = logging.getLogger("walcache.daemon")

# What each write op answers, given how many deleted keys existed (apply_ops' count).
_WRITE_RESULT: dict[str, Callable[[int], Any]] = {
    "put": lambda existed: None,
    "put_many": lambda existed: None,
    "delete": lambda existed: existed > 0,
    "delete_many": lambda existed: existed,
}
WRITE_OPS = frozenset(_WRITE_RESULT)
_PEERCRED = struct.Struct("3i")
READ_CHUNK = 256 * 1024
# --busy-poll-us backs off after this many fruitless polls in a row, then polls one
# chance in BUSY_POLL_REPROBE until a poll finds a request again.
BUSY_POLL_MISSES = 4
BUSY_POLL_REPROBE = 64


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Conn:
    __slots__ = ("sock", "proto", "out", "inflight", "events", "closing", "uid", "pid", "name", "parked")

    def __init__(self, sock: socket.socket, max_frame: int, uid: int, pid: int, name: str) -> None:
        self.sock = sock
        self.proto = ServerProtocol(max_frame)
        self.out = bytearray()
        self.inflight = 0  # requests of this connection queued or being synced
        self.events = selectors.EVENT_READ  # what the selector watches for it now
        self.closing = False  # close once ``out`` is drained
        self.uid = uid
        self.pid = pid
        self.name = name
        # Waiting for a compaction's answer: its later requests stay unparsed, so that
        # replies keep request order.
        self.parked = False


class _Item:
    """One request waiting for its batch: the reply is computed at completion."""

    __slots__ = ("conn", "req_id", "kind", "op", "ops", "seqno", "footprint", "words", "result")

    def __init__(self, conn: _Conn, req_id: int, kind: str, op: str = "") -> None:
        self.conn = conn
        self.req_id = req_id
        self.kind = kind  # "write", "read" or "error"
        self.op = op
        self.ops: list[tuple[int, bytes, int, bytes, int]] | None = None
        self.seqno = 0
        self.footprint = 0
        self.words = 0  # data words its puts may take in the shared table (ShmTable.reserve)
        self.result: Any = None  # read: a callable; error: the exception


# Commit latencies reported by stats() are over the most recent samples: enough for a
# stable p99, cheap enough to sort on every stats call (fsyncs: WalWriter.sync_latencies).
LATENCY_SAMPLES = 10_000


class _SealRequest:
    """A flusher job: seal the log (compaction step 1) between two batches."""


_SEAL = _SealRequest()


class _ResumeRequest:
    """A flusher job: the loop took back the seqnos of the groups the log had no room
    for (LogFull); append the groups handed over after this job again."""


_RESUME = _ResumeRequest()


class _Unwritten(Exception):
    """A flusher report: a group handed over after a LogFull, refused unwritten (its
    requests were already answered with that LogFull)."""


class _Flusher(threading.Thread):
    """Writes and syncs one batch at a time; tells the loop when it is done.

    The hand-off costs what a batch of a few puts costs to parse, so it is kept
    to the minimum (each thread switch is a futex and a context switch, which a
    VM makes dearer; a hand-off through queue.Queue and a pipe write per batch
    took 5.7 futex calls, a pipe write and two pipe reads per batch, measured with
    strace at 4 clients):

    - loop -> flusher: ``submit`` appends to a deque and releases ``_bell``, a
      lock used as a binary semaphore (the loop only releases it, and only when it
      is held; the flusher only acquires it), instead of a Queue's Condition;
    - flusher -> loop: the result goes on ``done``; the wake-up pipe is written
      only when the loop is (about to be) asleep in select (``loop_waiting``).
      The loop sets that flag, then looks at ``done``/``seals`` before it sleeps;
      the flusher appends, then reads the flag. Under the GIL both orders are
      total, so either the loop sees the result or the flusher sees the flag.
    """

    def __init__(self, writer: Any, wake_fd: int, interval_s: float | None) -> None:
        super().__init__(name="walcache-flusher", daemon=True)
        self.writer = writer
        self.wake_fd = wake_fd
        self.interval_s = interval_s
        if interval_s is not None:
            # --fsync interval: this thread makes every timed sync, outside the writer's
            # lock, so that the loop thread's appends never wait for an fdatasync.
            writer.sync_in_background = True
        self.jobs: deque[bytes | _SealRequest | _ResumeRequest | None] = deque()
        # After a LogFull, until the loop's _RESUME: groups are refused unwritten.
        self.refusing = False
        self._bell = threading.Lock()
        self._bell.acquire()  # held: nothing submitted since the flusher last looked
        self.loop_waiting = False  # set by the loop around select (see the class doc)
        # Finished groups for the loop: (error or None, records, last seqno, seconds).
        self.done: deque[tuple[BaseException | None, int, int, float]] = deque()
        # Seal results for the loop: (sealed segno K, seal seqno S) or the error.
        self.seals: deque[tuple[int, int] | BaseException] = deque()
        # Recent figures for stats: whole appends (write + sync); the syncs alone are the writer's.
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def submit_records(self, records: list[bytes]) -> None:
        """Hand over encoded records, in seqno order (loop thread only).

        ``deque.extend`` of a list runs in C under the GIL, so the flusher sees a
        hand-off whole or not at all.
        """
        self.jobs.extend(records)
        self._ring()

    def submit(self, job: _SealRequest | _ResumeRequest | None) -> None:
        """A seal (between two groups), a resume (after a LogFull) or None (stop); loop thread only."""
        self.jobs.append(job)
        self._ring()

    def _ring(self) -> None:
        # Only the loop releases and only when held, so the check cannot race the flusher.
        if self._bell.locked():
            self._bell.release()

    def _tell_loop(self, what: bytes) -> None:
        if self.loop_waiting:
            os.write(self.wake_fd, what)

    def idle_timeout(self) -> float:
        """Seconds to sleep with no job (-1: until one comes).

        --fsync interval: until the unsynced writes are due, not a whole interval
        after the last append (a write would then wait up to twice the interval);
        with nothing unsynced, an interval (the loop thread may append meanwhile,
        without ringing the bell).
        """
        if self.interval_s is None:
            return -1.0
        due_in = self.writer.sync_due_in()
        return self.interval_s if due_in is None else due_in

    def run(self) -> None:
        jobs = self.jobs
        writer = self.writer
        while True:
            if self.interval_s is not None and writer.sync_due_in() == 0.0:
                # --fsync interval: appends never sync (sync_in_background); this thread
                # makes every timed sync, before any job that waits.
                try:
                    writer.sync_if_due()
                except BaseException as exc:  # noqa: BLE001 - reported to the loop
                    self.done.append((exc, 0, 0, 0.0))
                    os.write(self.wake_fd, b"f")
                    return
            if not jobs:
                # Woken by a job, or when the writes are due (the timed sync is above). A
                # spurious wake-up (a release for a job already taken) only loops once more.
                self._bell.acquire(timeout=self.idle_timeout())
                continue
            if type(jobs[0]) is bytes:
                # Group commit: every record handed over while the previous group was
                # being synced goes into this one (the loop only appends on the right).
                parts: list[bytes] = []
                while jobs:
                    rec = jobs[0]
                    if not isinstance(rec, bytes):
                        break
                    jobs.popleft()
                    parts.append(rec)
                if self.refusing:
                    # Its seqnos follow a group that was not written: it cannot be either.
                    self.done.append((_Unwritten(), len(parts), 0, 0.0))
                    self._tell_loop(b"d")
                    continue
                t0 = time.perf_counter()
                err: BaseException | None = None
                try:
                    writer.append(b"".join(parts))
                except LogFull as exc:  # nothing of it was written; the log stays usable
                    err = exc
                    self.refusing = True
                except BaseException as exc:  # noqa: BLE001 - any failure stops acks
                    err = exc
                dt = time.perf_counter() - t0
                if err is None:
                    self.latencies.append(dt)
                # written_seqno is the group's last record: only this thread appends
                # while records are handed over.
                self.done.append((err, len(parts), writer.written_seqno, dt))
                self._tell_loop(b"d")
                continue
            job = jobs.popleft()
            if job is None:
                return
            if job is _RESUME:
                self.refusing = False
                continue
            # A job boundary is a group boundary: every record handed over before it is appended.
            try:
                self.seals.append(writer.seal())
            except BaseException as exc:  # noqa: BLE001 - reported to the loop
                self.seals.append(exc)
            self._tell_loop(b"s")


# Descriptors the daemon holds besides connections: log segments, the shared table,
# locks, the listener, the selector, pipes, a compactor's pipes, what psutil opens.
FDS_BESIDES_CONNECTIONS = 64
WARN_EVERY_S = 10.0  # warnings that come per connection or per write (accept, a full log): this often
COMPACT_REPLY_WAIT_S = 3.0  # below the client's default 5 s timeout
COMPACT_BACKOFF_FIRST_S = 5.0
COMPACT_IDLE_GRACE_S = 10.0  # then a compactor still waiting for idle CPU gets nice 19
COMPACT_BACKOFF_MAX_S = 600.0


@dataclass
class _Compaction:
    """The one compaction in progress: sealing -> applying -> running -> exiting."""

    trigger: str  # "manual" or "auto"
    started: float  # time.time()
    t0: float  # time.monotonic()
    bytes_before: int
    phase: str = "sealing"
    seal_seqno: int = 0
    next_segno: int = 0
    proc: subprocess.Popen[bytes] | None = None
    out: bytearray = field(default_factory=bytearray)
    result: dict[str, Any] | None = None
    waiters: list[tuple[_Conn, int]] = field(default_factory=list)  # parked `compact` requests
    reply_deadline: float = float("inf")
    exit_wait_until: float = 0.0
    promoted: bool = False  # lifted out of SCHED_IDLE after waiting too long for idle CPU


class Daemon:
    """``walcache serve``: owns the data dir, the log, the shared table and the socket."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        args: Any = None,
        fileops: FileOps | None = None,
        shmops: ShmOps | None = None,
    ) -> None:
        self.cfg = config
        self.args = args
        self.fileops = fileops
        self.shmops = shmops
        self.data_dir = Path(config.data_dir)
        self.socket_path = Path(config.socket)
        self.namespace = shm_namespace(self.data_dir)
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self.conns: dict[int, _Conn] = {}
        # Every queued request not yet answered, in arrival order (writes waiting for
        # their group's sync, and the reads and errors queued behind them).
        self.queue: deque[_Item] = deque()
        self.pending_footprint = 0
        # What the logged, not yet applied writes may take in the shared table, reserved
        # before each is logged (ShmTable.reserve): put ops, and their data words.
        self.pending_puts = 0
        self.pending_words = 0
        self.unsent: list[bytes] = []  # records encoded this round, not yet written or handed over
        self.outstanding = 0  # records handed to the flusher and not yet reported back
        self.stopping = False
        self.exit_code = 0
        self.fatal: BaseException | None = None
        self.logged_seqno = 0  # highest seqno whose batch the flusher completed
        self.batches = 0
        self.batched_records = 0
        self.reload_requested = False
        # --busy-poll-us: polls run, polls that found something, rounds that could poll,
        # polls in a row that found nothing (see _busy_poll).
        self.polls = self.poll_hits = self.poll_chances = self.poll_misses = 0
        self.stop_requested = 0  # the signal number once SIGTERM/SIGINT arrived
        self.listener: socket.socket | None = None
        self._socket_ino: tuple[int, int] | None = None
        # No room for the log (LogFull): writes refused, and the warning held back.
        self.log_full_refusals = 0
        self._warn_log_full = _HeldWarning("writes refused")
        # Out of descriptors: this one is given up to accept a connection and refuse it.
        self._spare_fd: int | None = None
        self._warn_accept = _HeldWarning("accept problems")
        # Compaction (see the module doc).
        self.compaction: _Compaction | None = None
        self.compactions = 0
        self.compaction_failures = 0
        self.last_compaction: dict[str, Any] | None = None
        self.last_compaction_error: dict[str, Any] | None = None
        self.snapshot_seqno = 0  # the seal point of the snapshot the MANIFEST names
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._acct_segno = -1  # the active segment when _acct_sealed was measured
        self._acct_sealed = 0  # bytes of the snapshot and every sealed segment

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Lock, recover, publish, listen (in that order; READY=1 comes after)."""
        cfg = self.cfg
        ensure_private_dir(self.data_dir)
        self.lock = DataDirLock(self.data_dir)
        self.lock.acquire()
        # The socket path is ours before recovery and before a table is published for
        # this data dir: another daemon given the same --socket is refused here.
        ensure_private_dir(self.socket_path.parent)
        self.socket_lock = SocketLock(self.socket_path)
        self.socket_lock.acquire()
        self._refuse_a_taken_socket()
        gid = _group_id(cfg.shm_group)
        t0 = time.perf_counter()
        # Replay into a dict through the same apply_ops as live writes, then build
        # the shared table once, sized for what was recovered: inserting a million
        # keys one by one (growing as it goes) took 3-4 s, the bulk build 0.2 s.
        staging = DictTable()
        now = _now_ms()
        self.writer, report = open_log(
            self.data_dir,
            Applier(staging, now),
            fileops=self.fileops,
            policy=cfg.fsync,
            interval_ms=cfg.fsync_interval_ms,
            segment_bytes=cfg.segment_bytes,
        )
        self.logged_seqno = self.writer.next_seqno - 1
        self.table = ShmTable.build(
            self.namespace,
            staging.entries,
            applied_seqno=self.logged_seqno,
            capacity=max(16, cfg.initial_capacity),
            max_memory=cfg.max_memory,
            mode=0o640 if gid is not None else 0o600,
            gid=gid,
            shmops=self.shmops,
            data_reserve=cfg.shm_reserve,
        )
        self.snapshot_seqno = report.snapshot.seal_seqno if report.snapshot is not None else 0
        self.table.publish()
        del staging
        log.info(
            "recovered %d records (last seqno %d) into %d keys in %.3f s; published /%s",
            report.records,
            report.last_seqno,
            len(self.table),
            time.perf_counter() - t0,
            self.namespace,
        )
        used, limit = self.table.used_bytes, cfg.max_memory
        if limit is not None and used > limit:
            log.warning(
                "the recovered data takes %d bytes, over --max-memory %d: puts that need more "
                "room are refused with CacheFull until deletes free some (or raise --max-memory)",
                used, limit,
            )  # fmt: skip
        self._listen()
        self._fit_fd_limit()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.wake_r, self.wake_w = rfd, wfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self.sel.register(rfd, selectors.EVENT_READ, "wake")
        interval = cfg.fsync_interval_ms / 1000.0 if cfg.fsync == "interval" else None
        self.flusher = _Flusher(self.writer, wfd, interval)
        self.flusher.start()

    def _fit_fd_limit(self) -> None:
        """Raise RLIMIT_NOFILE (soft, up to hard) to fit --max-connections, as Redis does for
        maxclients; warn when the hard limit does not (connections past it are refused)."""
        need = self.cfg.max_connections + FDS_BESIDES_CONNECTIONS
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (OSError, ValueError) as exc:
                log.warning("could not raise RLIMIT_NOFILE to %d: %s", new, exc)
        if soft != resource.RLIM_INFINITY and soft < need:
            log.warning(
                "RLIMIT_NOFILE is %d: about %d connections fit, not --max-connections %d; "
                "past that, connections are refused (raise LimitNOFILE= or ulimit -n)",
                soft, max(0, soft - FDS_BESIDES_CONNECTIONS), self.cfg.max_connections,
            )  # fmt: skip

    def _refuse_a_taken_socket(self) -> None:
        """ConfigError if a process answers on our socket path; a dead daemon's socket is removed.

        Only the holder of the socket lock gets here, so a socket that refuses the
        probe is not a walcache daemon's between bind and listen; something that
        does not take the lock (another program given the same path) may still
        answer, and is left alone."""
        path = self.socket_path
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            # Never unlink what is not a socket: a wrong --socket may name a file of the
            # log (or anything else); replacing it would lose it.
            what = "a directory" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "a file"
            raise ConfigError(
                f"--socket {path} is {what}, not a socket: refusing to replace it; pass another --socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # a dead daemon's socket: safe to replace
        else:
            raise ConfigError(f"another daemon already listens on {path}: stop it or pass another --socket")
        finally:
            probe.close()

    def _listen(self) -> None:
        path = self.socket_path
        # Again: something that does not take the socket lock may have bound it meanwhile.
        self._refuse_a_taken_socket()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window where the socket is wider than asked
        try:
            s.bind(str(path))
        finally:
            os.umask(old_umask)
        gid = _group_id(self.cfg.socket_group)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, self.cfg.socket_mode)
        s.listen(512)
        s.setblocking(False)
        st = path.stat()
        self._socket_ino = (st.st_dev, st.st_ino)
        self.listener = s
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.sel.register(s, selectors.EVENT_READ, "accept")
        log.info("listening on %s (mode %o)", path, self.cfg.socket_mode)

    # ------------------------------------------------------------------- loop

    def serve_forever(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        wd = notify.watchdog_interval()
        tick = min(1.0, wd) if wd else 1.0
        notify.ready(self._status_line())
        log.info(
            "ready: pid %d, fsync %s, %d keys%s",
            os.getpid(),
            self.cfg.fsync,
            len(self.table),
            f", watchdog ping every {tick:g} s" if wd else "",
        )
        next_tick = time.monotonic() + tick
        flusher = self.flusher
        select = self.sel.select
        served = False  # the last round read a connection
        while True:
            timeout = max(0.0, min(next_tick, self._compaction_deadline()) - time.monotonic())
            flusher.loop_waiting = True
            if flusher.done or flusher.seals:
                timeout = 0.0  # the flusher finished while this thread was busy: no pipe byte comes
            if served and timeout > 0.0 and self.outstanding == 0 and self.cfg.busy_poll_us:
                events = self._busy_poll(timeout)
            else:
                events = select(timeout)
            flusher.loop_waiting = False
            served = False
            for key, mask in events:
                tag = key.data
                if tag == "accept":
                    self._accept()
                elif tag == "wake":
                    self._drain_wake()
                elif tag == "compactor":
                    self._on_compactor_output()
                else:
                    conn: _Conn = tag
                    served = True
                    try:
                        if mask & selectors.EVENT_READ:
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                            self._write(conn)
                    except Exception:  # noqa: BLE001 - one connection never stops the daemon
                        log.exception("closing %s after an unexpected error", conn.name)
                        self._close(conn)
            if flusher.done:
                self._on_flushed()
            # Once per round, after every ready socket was read: what arrived
            # from all connections meanwhile is one batch.
            self._dispatch()
            if self.stop_requested and not self.stopping:
                log.info(
                    "received %s: finishing in-flight writes",
                    signal.Signals(self.stop_requested).name,
                )
                self._begin_stop()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            self._compaction_step()  # cheap when idle: a few integer compares
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick
                self.table.heartbeat()
                # Expired entries read as missing already; this frees their space.
                self.table.purge_expired()
                self._restore_table_names()
                self._check_data_dir()
                if wd:
                    notify.watchdog()
            if self.stopping and self._drained():
                break
        return self._shutdown()

    def _check_data_dir(self) -> None:
        """Once a tick: stop if the data dir was moved or replaced under the daemon. Its log
        goes on in the moved directory, but a second daemon could take the old path (a
        new, unlocked directory) and with it this table's namespace."""
        if self.fatal is not None or self.stopping:
            return
        try:
            self.writer.check_dir()
        except OSError as exc:
            self._fail(exc, what="the data dir check")

    def _restore_table_names(self) -> None:
        """Once a tick: put the table's names back if something removed them from /dev/shm."""
        try:
            self.table.restore_names(self.pending_puts, self.pending_words)
        except Exception:  # noqa: BLE001 - e.g. /dev/shm full: readers already attached go on
            log.exception("could not restore the shared table's names in /dev/shm")

    def _busy_poll(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        """``select(timeout)``, after polling without sleeping for up to --busy-poll-us.

        Used after a round that read a request, while no sync is in flight (while one
        is, the clients are waiting for it and polling only takes CPU from it). So it
        serves a connection that writes alone (its sync runs on this thread), reads
        handed to the daemon and the other fsync policies; with several connections
        writing under --fsync always, replies go out in rounds the flusher's pipe
        starts, and those do not poll. A
        thread woken from epoll_wait costs tens of microseconds here, more in a VM
        (the waker sends an interrupt to a halted vCPU): one client's durable put took
        175-200 us p50 sleeping and 140 us polling, with fdatasync at 85 us, and less
        CPU per put in both processes. Polling pays only while the next request comes
        within the window: after BUSY_POLL_MISSES polls in a row found nothing, only
        one chance in BUSY_POLL_REPROBE polls, until one finds something again. The
        flusher and the signal handlers write the wake-up pipe as they do for a
        sleeping select (``loop_waiting`` stays set), so a poll sees them too.
        """
        self.poll_chances += 1
        if self.poll_misses >= BUSY_POLL_MISSES and self.poll_chances % BUSY_POLL_REPROBE:
            return self.sel.select(timeout)
        self.polls += 1
        select = self.sel.select
        start = time.perf_counter()
        deadline = start + min(self.cfg.busy_poll_us / 1e6, timeout)  # never past the tick
        while True:
            events = select(0)
            if events:
                self.poll_misses = 0
                self.poll_hits += 1
                return events
            now = time.perf_counter()
            if now >= deadline:
                break
        self.poll_misses += 1
        return select(max(0.0, timeout - (now - start)))

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the handler runs between any two bytecodes of the loop, which
        # must not find its listener closed under it; the loop stops at its next round.
        self.stop_requested = signum

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    def _begin_stop(self) -> None:
        self.stopping = True
        notify.stopping()
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
            self._remove_socket()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    def _drained(self) -> bool:
        # After a failure the flusher may never report back (a hung device): do not wait for it.
        return not self.queue and (self.outstanding == 0 or self.fatal is not None)

    def _remove_socket(self) -> None:
        try:
            st = self.socket_path.stat()
            if (st.st_dev, st.st_ino) == self._socket_ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    # -------------------------------------------------------------- accepting

    def _accept(self) -> None:
        if self.listener is None:
            return
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_for_want_of_fds(exc):
                    continue
                self._warn_accept(f"accept failed: {exc}")
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            refuse = None
            if self.cfg.allow_uids is not None and uid not in self.cfg.allow_uids:
                refuse = DaemonUnavailable(f"the daemon refused uid {uid}: it is not in allow_uids")
            elif len(self.conns) >= self.cfg.max_connections:
                refuse = DaemonUnavailable(
                    f"the daemon refused the connection: it has {self.cfg.max_connections} "
                    "already (--max-connections)"
                )
            if refuse is not None:
                log.warning("refused connection from pid %d uid %d: %s", pid, uid, refuse)
                _refuse(sock, refuse)
                continue
            sock.setblocking(False)
            conn = _Conn(sock, self.cfg.max_frame_bytes, uid, pid, f"pid {pid} uid {uid}")
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _refuse_for_want_of_fds(self, exc: OSError) -> bool:
        """Out of descriptors: accept the waiting connection on the spare one, tell it
        why and close it (True), so that it is refused at once instead of waiting in the
        backlog, and select does not report the listener ready forever (a busy loop).
        False when there is no spare descriptor to do it with."""
        if self._spare_fd is None:
            return False
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            assert self.listener is not None
            sock, _ = self.listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            refuse = DaemonUnavailable(
                f"the daemon refused the connection: it is out of file descriptors ({exc.strerror}; "
                f"{len(self.conns)} connections open): raise its RLIMIT_NOFILE (LimitNOFILE=, ulimit -n) "
                "or lower --max-connections"
            )
            self._warn_accept(str(refuse))
            _refuse(sock, refuse)
        try:  # once the refused connection's descriptor is free again
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # taken meanwhile (another thread): the next EMFILE is only logged
        return sock is not None

    # ---------------------------------------------------------------- reading

    def _read(self, conn: _Conn) -> None:
        # Into one buffer the loop thread reuses: recv(READ_CHUNK) allocated (and then
        # shrank) a 256 KiB bytes object per call; the decoder copies what it keeps.
        try:
            n = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._close(conn)
            return
        if conn.closing or self.stopping:
            return  # after an error or during shutdown, input is ignored
        conn.proto.receive_data(self._rview[:n])
        self._parse_requests(conn)

    def _parse_requests(self, conn: _Conn) -> None:
        while not conn.parked:
            try:
                req = conn.proto.next_request()
            except BadRequest as bad:
                self._answer_now_or_queue(conn, bad.req_id, bad.error)
                continue
            except ProtocolError as exc:
                log.warning("closing %s: %s", conn.name, exc)
                self._send(conn, ServerProtocol.error(0, exc))
                conn.closing = True
                self._update_interest(conn)
                return
            if req is None:
                break
            self._handle(conn, req)
        self._update_interest(conn)

    def _answer_now_or_queue(self, conn: _Conn, req_id: int, error: WalcacheError) -> None:
        if conn.inflight == 0:
            self._send(conn, ServerProtocol.error(req_id, error))
        else:
            item = _Item(conn, req_id, "error")
            item.result = error
            self._enqueue(item)

    def _enqueue(self, item: _Item) -> None:
        item.conn.inflight += 1
        self.queue.append(item)

    def _handle(self, conn: _Conn, req: Request) -> None:
        op, args, req_id = req.op, req.args, req.req_id
        if op in WRITE_OPS:
            try:
                ops, footprint, words = self._validate_write(op, args)
                if words:
                    # Room in the shared table for this write and every one before it
                    # that is not applied yet: applying a logged record must not fail.
                    self.table.reserve(
                        self.pending_puts + len(ops), self.pending_words + words, lambda: self._unapplied(ops)
                    )
            except WalcacheError as exc:
                self._answer_now_or_queue(conn, req_id, exc)
                return
            item = _Item(conn, req_id, "write", op)
            item.ops = ops
            item.footprint = footprint
            item.words = words
            try:
                item.seqno, record = self.writer.encode(ops)
            except LogFailed as exc:
                self._answer_now_or_queue(conn, req_id, exc)  # the flusher's failure is on its way
                return
            except ValueError as exc:  # a field the log format cannot hold
                self._answer_now_or_queue(conn, req_id, InvalidValue(f"cannot log this write: {exc}"))
                return
            self.pending_footprint += footprint
            if words:
                self.pending_puts += len(ops)
                self.pending_words += words
            self.unsent.append(record)
            self._enqueue(item)
            return
        if op == "hello":
            reader: Callable[[], Any] = lambda: self._hello(args[0])
        elif op == "ping":
            reader = lambda: "pong"
        elif op == "stats":
            reader = self.stats
        elif op == "get":
            reader = lambda: self._get(args[0])
        elif op == "compact":
            if conn.inflight == 0:
                self._compact_request(conn, req_id)
                return
            reader = self._compact  # pipelined behind writes: answer in order, without waiting
        else:  # pragma: no cover - protocol.OPS and this dispatch list change together
            raise AssertionError(op)
        if conn.inflight == 0:
            self._send(conn, self._evaluate(req_id, reader))
        else:
            item = _Item(conn, req_id, "read")
            item.result = reader
            self._enqueue(item)

    def _evaluate(self, req_id: int, reader: Callable[[], Any]) -> bytes:
        try:
            return ServerProtocol.reply(req_id, reader())
        except WalcacheError as exc:
            return ServerProtocol.error(req_id, exc)
        except Exception as exc:  # noqa: BLE001 - never let one request stop the daemon
            log.exception("request failed")
            return ServerProtocol.error(req_id, ServerError(f"{type(exc).__name__}: {exc}"))

    def _validate_write(
        self, op: str, args: tuple[Any, ...]
    ) -> tuple[list[tuple[int, bytes, int, bytes, int]], int, int]:
        """(ops, footprint against --max-memory, data words its puts may take) or the error."""
        cfg = self.cfg
        if op == "put" or op == "put_many":
            if op == "put":
                entries = [(args[0], args[1], args[2])]
                ttl_ms = args[3]
            else:
                entries = [tuple(e) for e in args[0]]
                ttl_ms = args[1]
            if ttl_ms is not None and not 0 < ttl_ms <= MAX_TTL_MS:
                raise InvalidValue(
                    f"ttl must be a positive number of seconds up to {MAX_TTL_MS // 1000}, "
                    f"not {ttl_ms / 1000}"
                )
            expiry = _now_ms() + ttl_ms if ttl_ms else 0
            ops = []
            words = 0
            for key, vflag, value in entries:
                self._check_key(key)
                if len(value) > cfg.max_value_bytes:
                    raise ValueTooLarge(
                        f"value of {len(value)} bytes exceeds max_value_bytes={cfg.max_value_bytes}"
                    )
                check_encoded_value(vflag, value)
                words += chunk_words(len(key), len(value))
                ops.append((OP_PUT, key, vflag, value, expiry))
            if not ops:
                raise ProtocolError("put_many needs at least one entry")
            need = (words << 3) + len(ops) * SLOT_SIZE  # the footprint of every entry (layout.footprint)
            limit = cfg.max_memory
            if limit and self.table.used_bytes + self.pending_footprint + need > limit:
                # Near the limit, count what the overwritten values give back.
                need -= self._overwritten_footprint(entries)
            if limit and self.table.used_bytes + self.pending_footprint + need > limit:
                raise CacheFull(
                    f"the shared table would exceed max_memory={limit} bytes "
                    f"({self.table.used_bytes} used): delete keys or raise --max-memory"
                )
            return ops, need, words
        keys = [args[0]] if op == "delete" else list(args[0])
        for key in keys:
            self._check_key(key)
        if not keys:
            raise ProtocolError("delete_many needs at least one key")
        return [(OP_DELETE, key, 0, b"", 0) for key in keys], 0, 0

    def _unapplied(self, ops: list[Any]) -> Iterator[tuple[bytes, int, bool]]:
        """The changes of every write not yet applied, then of ``ops``, for ShmTable.reserve."""
        pending = [it.ops for it in self.queue if it.kind == "write" and it.ops is not None]
        for optype, key, _vflag, value, expiry in chain.from_iterable((*pending, ops)):
            yield key, len(value) if optype == OP_PUT else -1, expiry != 0

    def _overwritten_footprint(self, entries: list[Any]) -> int:
        freed = 0
        for key in {e[0] for e in entries}:
            old = self.table.lookup(key)
            if old is not None:
                freed += self.table.footprint(len(key), len(old[1]))
        return freed

    def _check_key(self, key: bytes) -> None:
        if len(key) > self.cfg.max_key_bytes:
            raise KeyTooLarge(
                f"key of {len(key)} bytes exceeds max_key_bytes={self.cfg.max_key_bytes}"
            )
        check_encoded_key(key)

    # -------------------------------------------------------- group commit

    def _dispatch(self) -> None:
        """Once per loop round: write this round's records here, or hand them to the flusher.

        The flusher exists so that an fdatasync never stalls the event loop:
        while it syncs, this thread goes on reading requests from every
        connection and hands their records over at the end of each round; when a
        sync returns, the flusher writes everything handed over meanwhile as the
        next group, without waiting for this thread (one fdatasync for all of it).
        A hand-off still costs thread switches, so the group is written on this
        thread when nobody can be stalled by it and nothing is in flight:
        - without a per-group fdatasync (--fsync interval or never) the write is
          a page-cache copy (one client's put: 59 us p50 here, 111 us through
          the flusher);
        - with a single connection, the only client the sync could stall is the
          one waiting for it (one client's durable put: 138 us vs 178 us p50,
          fdatasync 71-74 us, measured side by side).
        """
        records = self.unsent
        if not records:
            return
        self.unsent = []
        if self.outstanding == 0 and (self.cfg.fsync != "always" or len(self.conns) <= 1):
            self._append_here(records)
        else:
            self.outstanding += len(records)
            self.flusher.submit_records(records)

    def _append_here(self, records: list[bytes]) -> None:
        t0 = time.perf_counter()
        writer = self.writer
        try:
            writer.append(b"".join(records))
        except LogFull as exc:  # nothing was written: refuse these, go on
            self._refuse_unwritten(exc)
            return
        except Exception as exc:  # noqa: BLE001 - any failure stops acks
            self._fail(exc)
            return
        self.flusher.latencies.append(time.perf_counter() - t0)
        self.logged_seqno = writer.written_seqno
        self.batches += 1
        self.batched_records += len(records)
        self._complete_ready()

    def _drain_wake(self) -> None:
        """The pipe only wakes select (flusher results, signals); what happened is read elsewhere."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _on_flushed(self) -> None:
        done = self.flusher.done
        while done:
            err, n, last_seqno, _dt = done.popleft()
            self.outstanding -= n
            if self.fatal is not None:
                continue  # after a failure nothing more is applied or acked
            if isinstance(err, _Unwritten):
                continue  # its requests were refused with the LogFull before it
            if isinstance(err, LogFull):
                self._refuse_unwritten(err)
                self.flusher.submit(_RESUME)  # after every group it must refuse
                continue
            if err is not None:
                self._fail(err)
                continue
            self.logged_seqno = last_seqno
            self.batches += 1
            self.batched_records += n
        if self.fatal is None:
            self._complete_ready()

    def _complete_ready(self) -> None:
        """Apply and answer, in arrival order, every queued request whose record is durable."""
        queue = self.queue
        logged = self.logged_seqno
        apply: Applier | None = None
        touched: set[_Conn] = set()
        while queue:
            it = queue[0]
            conn = it.conn
            if it.kind == "write":
                if it.seqno > logged:
                    break  # its group is still being written: so is everything after it
                assert it.ops is not None
                # Ack invariant: the write (and, under --fsync always, the fdatasync)
                # of the group holding this record returned before this line runs
                # (logged_seqno only moves past a seqno once that call returned);
                # only now may the record become visible and be acked.
                assert it.seqno <= self.logged_seqno, (it.seqno, self.logged_seqno)
                if apply is None:
                    # apply_ops bound to the table and this round's clock
                    apply = Applier(self.table, _now_ms())
                try:
                    existed = apply(it.seqno, it.ops)
                except Exception as exc:  # noqa: BLE001 - e.g. /dev/shm full while growing
                    # The record is in the log but not in the table: acking anything
                    # after it would break "a client reads its own writes". Stop; the
                    # next start rebuilds the table from the log.
                    for c in touched:
                        self._flush_out(c)
                    self._fail(exc, what="applying a logged batch to the shared table")
                    return
                self.pending_footprint -= it.footprint
                if it.words:
                    self.pending_puts -= len(it.ops)
                    self.pending_words -= it.words
                reply = ServerProtocol.reply(it.req_id, _WRITE_RESULT[it.op](existed))
            elif it.kind == "read":
                reply = self._evaluate(it.req_id, it.result)
            else:
                reply = ServerProtocol.error(it.req_id, it.result)
            queue.popleft()
            conn.inflight -= 1
            if conn.sock.fileno() >= 0:
                conn.out += reply
                touched.add(conn)
        for c in touched:
            self._flush_out(c)

    def _refuse_unwritten(self, err: LogFull) -> None:
        """The log had no room for a group (LogFull): none of it was written. Answer it and
        every write encoded after it with the error, take their seqnos back, and go on:
        reads, and writes once there is room again, are served as before."""
        first = self.writer.take_back_unwritten()
        self.unsent = []  # this round's records: their requests are refused below
        refused = 0
        for it in self.queue:
            if it.kind == "write" and it.seqno >= first:
                self.pending_footprint -= it.footprint
                if it.words:
                    self.pending_puts -= len(it.ops or ())
                    self.pending_words -= it.words
                it.kind, it.result = "error", err
                refused += 1
        self.log_full_refusals += refused
        self._warn_log_full(str(err), refused)
        self._complete_ready()

    def _fail(self, err: BaseException, what: str = "log write") -> None:
        """Answer everything not yet answered with the failure, apply nothing more, stop.

        Used when the log fails (never retried: the pages may be gone) and when a
        logged batch cannot be applied; the next start recovers from the log.
        """
        # The client is told the outcome is unknown: a record whose write went
        # through but whose fdatasync failed, or one that failed to apply, is in
        # the log and comes back when the next start replays it.
        failure = LogFailed(
            f"{what} failed ({type(err).__name__}: {err}); the daemon stops: this write "
            "may or may not be applied after the restart"
        )
        log.critical(
            "%s failed: %s; no more writes are acknowledged, exiting so the next start "
            "recovers from the log",
            what,
            failure,
        )
        self.fatal = failure
        self.exit_code = 1
        queue, self.queue = self.queue, deque()
        self.unsent = []
        for it in queue:
            it.conn.inflight -= 1
            if it.conn.sock.fileno() >= 0:
                it.conn.out += ServerProtocol.error(it.req_id, failure)
                self._flush_out(it.conn)
        if not self.stopping:
            self._begin_stop()

    # --------------------------------------------------------------- writing

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out += data
        self._flush_out(conn)

    def _flush_out(self, conn: _Conn) -> None:
        if conn.out:
            try:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(conn)
                return
        if conn.closing and not conn.out and conn.inflight == 0:
            self._close(conn)
            return
        self._update_interest(conn)

    def _write(self, conn: _Conn) -> None:
        self._flush_out(conn)

    def _update_interest(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        # Backpressure: stop reading a connection whose unparsed input plus
        # unsent replies exceed max_pending_bytes; resume once it drains.
        backlog = len(conn.out) + conn.proto.buffered
        want_read = not conn.closing and not conn.parked and backlog <= self.cfg.max_pending_bytes
        events = (selectors.EVENT_READ if want_read else 0) | (
            selectors.EVENT_WRITE if conn.out else 0
        )
        if not events:
            events = selectors.EVENT_READ  # still notice a peer that hangs up
        if events != conn.events:  # an epoll_ctl only when the interest changes
            conn.events = events
            try:
                self.sel.modify(conn.sock, events, conn)
            except (KeyError, ValueError):
                pass

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(fd, None)
        conn.sock.close()

    # ---------------------------------------------------------- read requests

    def _hello(self, version: int) -> dict[str, Any]:
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"client speaks protocol {version}, daemon speaks {PROTOCOL_VERSION}: "
                "upgrade the older side"
            )
        return {
            "version": PROTOCOL_VERSION,
            "daemon": __version__,
            "namespace": self.namespace,
            "pid": os.getpid(),
            "max_key_bytes": self.cfg.max_key_bytes,
            "max_value_bytes": self.cfg.max_value_bytes,
            "max_frame_bytes": self.cfg.max_frame_bytes,
        }

    def _get(self, key: bytes) -> list[Any] | None:
        found = self.table.lookup(key)
        if found is None:
            return None
        vflag, value, _seqno, expiry = found
        if expiry and expiry <= _now_ms():
            return None
        return [vflag, value]

    # ------------------------------------------------------------- compaction

    def _compact(self) -> dict[str, Any]:
        """The ``compact`` op pipelined behind writes: start one (or say one runs), do not wait."""
        if self.fatal is not None or self.stopping:
            raise ServerError("the daemon is stopping: no compaction")
        if self.compaction is not None:
            return self._compaction_status("already running")
        self._start_compaction("manual")
        return self._compaction_status("started")

    def _compact_request(self, conn: _Conn, req_id: int) -> None:
        """The ``compact`` op: start a compaction and answer once it is done (or after a while).

        The connection is parked meanwhile (its later requests wait unparsed), so
        replies stay in request order. After COMPACT_REPLY_WAIT_S the answer says it
        is still running: a client's default timeout is 5 s.
        """
        if self.fatal is not None or self.stopping:
            self._send(conn, ServerProtocol.error(req_id, ServerError("the daemon is stopping: no compaction")))
            return
        if self.compaction is not None:
            self._send(conn, ServerProtocol.reply(req_id, self._compaction_status("already running")))
            return
        self._start_compaction("manual")
        c = self.compaction
        assert c is not None
        conn.inflight += 1
        conn.parked = True
        c.waiters.append((conn, req_id))
        c.reply_deadline = min(c.reply_deadline, time.monotonic() + COMPACT_REPLY_WAIT_S)
        self._update_interest(conn)

    def _start_compaction(self, trigger: str) -> None:
        """Step 1: hand the flusher a seal job; the rest follows in _compaction_step."""
        assert self.compaction is None
        self.compaction = _Compaction(trigger, time.time(), time.monotonic(), _log_bytes(self.data_dir))
        self.flusher.submit(_SEAL)
        log.info("compaction (%s) starting: sealing the log at the next batch boundary", trigger)

    def _compaction_deadline(self) -> float:
        """When the loop must look at the compaction again without an event (monotonic)."""
        c = self.compaction
        if c is None:
            return float("inf")
        if c.phase == "exiting":
            return time.monotonic() + 0.01
        return c.reply_deadline

    def _compaction_step(self) -> None:
        """Advance the compaction that runs, or start one when the log calls for it."""
        c = self.compaction
        if c is None:
            if self._auto_compaction_due():
                self._start_compaction("auto")
            return
        if self.fatal is not None:
            return
        if c.phase == "sealing" and self.flusher.seals:
            sealed = self.flusher.seals.popleft()
            if isinstance(sealed, BaseException):
                cause = sealed if isinstance(sealed, WalcacheError) else None
                self._finish_compaction("failed", error=f"sealing the log failed: {sealed}", cause=cause)
                if not isinstance(sealed, LogFull):  # no room for the next segment: retried later
                    self._fail(sealed, what="sealing the log for compaction")
                return
            k, s = sealed
            c.seal_seqno, c.next_segno = s, k + 1
            if s <= self.snapshot_seqno:
                self._finish_compaction("nothing to compact")
                return
            c.phase = "applying"
        if c.phase == "applying":
            # The flusher sealed after the batch holding S was written; the loop applies
            # that batch when it hears of it. The compactor reads the table: wait for it.
            if int(self.table.stats()["applied_seqno"]) < c.seal_seqno:
                return
            self._spawn_compactor(c)
        if c.phase == "exiting":
            self._reap_compactor(c)
            return
        if c.phase == "running" and not c.promoted and time.monotonic() - c.t0 > COMPACT_IDLE_GRACE_S:
            self._promote_compactor(c)
        if c.waiters and time.monotonic() >= c.reply_deadline:
            waiters, c.waiters = c.waiters, []
            c.reply_deadline = float("inf")
            self._answer_waiters(waiters, ServerProtocol.reply, self._compaction_status("running"))

    def _promote_compactor(self, c: _Compaction) -> None:
        """Give a starved compactor a (small) share of CPU: nice 19 instead of SCHED_IDLE.

        SCHED_IDLE keeps compaction off the put latency, but on a machine that other
        work keeps 100 % busy it would never run, and the log would grow without bound.
        """
        c.promoted = True
        if c.proc is None or not hasattr(os, "sched_setscheduler"):
            return
        try:
            os.sched_setscheduler(c.proc.pid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:
            log.warning("compaction: could not lift compactor pid %d out of SCHED_IDLE: %s", c.proc.pid, exc)
            return
        log.info(
            "compaction: still running after %.0f s on idle CPU only; compactor pid %d now runs at nice 19",
            COMPACT_IDLE_GRACE_S, c.proc.pid,
        )  # fmt: skip

    def _spawn_compactor(self, c: _Compaction) -> None:
        cmd = compactor_command(self.data_dir, self.namespace, c.seal_seqno, c.next_segno)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            self._finish_compaction("failed", error=f"could not start the compactor: {exc}")
            return
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.sel.register(proc.stdout, selectors.EVENT_READ, "compactor")
        c.proc = proc
        c.phase = "running"
        log.info(
            "compaction: sealed at seqno %d (segments below %d); compactor pid %d started",
            c.seal_seqno, c.next_segno, proc.pid,
        )  # fmt: skip

    def _on_compactor_output(self) -> None:
        c = self.compaction
        assert c is not None and c.proc is not None and c.proc.stdout is not None
        fd = c.proc.stdout.fileno()
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            c.out += data
            while b"\n" in c.out:
                line, _, rest = bytes(c.out).partition(b"\n")
                c.out = bytearray(rest)
                self._on_compactor_line(c, line)
            return
        # EOF: it exited (or was killed); reap it without blocking the loop for long.
        self.sel.unregister(c.proc.stdout)
        c.proc.stdout.close()
        c.phase = "exiting"
        self._reap_compactor(c)

    def _on_compactor_line(self, c: _Compaction, line: bytes) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            log.warning("compactor pid %d wrote %r, not a JSON line", c.proc.pid if c.proc else 0, line[:200])
            return
        if not isinstance(doc, dict):
            return
        if doc.get("status") == "locked":
            # The handshake (compaction.py): we are alive and own the data dir, so it may go on.
            assert c.proc is not None and c.proc.stdin is not None
            try:
                c.proc.stdin.write(b"go\n")
                c.proc.stdin.flush()
            except OSError:
                pass  # it died: EOF on its stdout follows
            return
        c.result = doc

    def _reap_compactor(self, c: _Compaction) -> None:
        assert c.proc is not None
        code = c.proc.poll()
        if code is None:
            if not c.exit_wait_until:
                c.exit_wait_until = time.monotonic() + 5.0
            if time.monotonic() < c.exit_wait_until:
                return  # it closed its stdout and exits in a moment: look again shortly
            c.proc.kill()
            code = c.proc.wait()
        if c.proc.stdin is not None:
            try:
                c.proc.stdin.close()
            except OSError:
                pass
        doc = c.result or {}
        status = doc.get("status")
        if status == "done":
            # It reports "done" after its last step: whatever ended it afterwards changed nothing.
            self._finish_compaction("done", doc=doc)
        elif code == 0 and status == "nothing to compact":
            self._finish_compaction("nothing to compact")
        elif code == EXIT_BUSY:
            self._finish_compaction("failed", error=f"another compactor (pid {doc.get('pid')}) holds the lock")
        else:
            why = doc.get("error") or (
                f"killed by signal {-code}" if code < 0 else
                "it lost the daemon" if code == EXIT_ORPHANED else f"exit code {code}"
            )  # fmt: skip
            self._finish_compaction("failed", error=f"compactor pid {c.proc.pid}: {why}")

    def _finish_compaction(
        self, status: str, *, doc: dict[str, Any] | None = None, error: str = "", cause: WalcacheError | None = None
    ) -> None:
        c = self.compaction
        assert c is not None
        self.compaction = None
        waiters, c.waiters = c.waiters, []
        self._acct_segno = -1  # files changed: measure again
        seconds = round(time.monotonic() - c.t0, 3)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(c.started))
        if status == "done":
            assert doc is not None
            self.compactions += 1
            self.snapshot_seqno = c.seal_seqno
            self._backoff_s = 0.0
            self._backoff_until = 0.0
            after = _log_bytes(self.data_dir)
            self.last_compaction = {
                "status": "done",
                "when": when,
                "trigger": c.trigger,
                "seconds": seconds,
                "seal_seqno": c.seal_seqno,
                "entries": doc.get("entries"),
                "entries_newer": doc.get("newer"),  # changed after the seal: left to the tail
                "entries_expired": doc.get("expired"),
                "snapshot_bytes": doc.get("snapshot_bytes"),
                "bytes_reclaimed": doc.get("reclaimed_bytes"),
                "log_bytes_before": c.bytes_before,
                "log_bytes_after": after,
                "scan_seconds": round(float(doc.get("scan_seconds", 0.0)), 3),
            }
            log.info(
                "compaction (%s) done in %.3f s: state at seqno %d in %d entries; sealed segments of "
                "%s bytes replaced by a %s-byte snapshot; log %d -> %d bytes (with the writes meanwhile)",
                c.trigger, seconds, c.seal_seqno, doc.get("entries", 0), doc.get("removed_bytes"),
                doc.get("snapshot_bytes"), c.bytes_before, after,
            )  # fmt: skip
            self._answer_waiters(waiters, ServerProtocol.reply, dict(self.last_compaction))
        elif status == "nothing to compact":
            log.info("compaction (%s): nothing to compact (no record since the snapshot at seqno %d)",
                     c.trigger, self.snapshot_seqno)
            self._answer_waiters(waiters, ServerProtocol.reply, {"status": status, "snapshot_seqno": self.snapshot_seqno})
        elif status == "aborted":
            log.info("compaction (%s) up to seqno %d abandoned: %s; the log is consistent as it is",
                     c.trigger, c.seal_seqno, error)
            self._answer_waiters(waiters, ServerProtocol.error, ServerError(f"compaction abandoned: {error}"))
        else:
            self.compaction_failures += 1
            self._backoff_s = min(COMPACT_BACKOFF_MAX_S, self._backoff_s * 2 or COMPACT_BACKOFF_FIRST_S)
            self._backoff_until = time.monotonic() + self._backoff_s
            self.last_compaction_error = {"when": when, "trigger": c.trigger, "seal_seqno": c.seal_seqno,
                                          "error": error, "seconds": seconds}
            log.error(
                "compaction (%s) up to seqno %d failed after %.3f s: %s; the log is unchanged and consistent; "
                "the next automatic attempt waits %.0f s",
                c.trigger, c.seal_seqno, seconds, error, self._backoff_s,
            )  # fmt: skip
            # A cause the client can act on (LogFull: free space) keeps its class.
            answer = cause if isinstance(cause, LogFull) else ServerError(f"compaction failed: {error}")
            self._answer_waiters(waiters, ServerProtocol.error, answer)

    def _answer_waiters(self, waiters: list[tuple[_Conn, int]], make: Callable[[int, Any], bytes], value: Any) -> None:
        for conn, req_id in waiters:
            conn.inflight -= 1
            conn.parked = False
            if conn.sock.fileno() < 0:
                continue
            conn.out += make(req_id, value)
            self._flush_out(conn)
            if conn.sock.fileno() >= 0 and not self.stopping:
                self._parse_requests(conn)  # what it sent meanwhile

    def _compaction_status(self, status: str) -> dict[str, Any]:
        c = self.compaction
        out: dict[str, Any] = {"status": status, "snapshot_seqno": self.snapshot_seqno}
        if c is not None:
            out.update(
                trigger=c.trigger,
                phase=c.phase,
                seal_seqno=c.seal_seqno,
                running_s=round(time.monotonic() - c.t0, 3),
                pid=c.proc.pid if c.proc is not None else None,
            )
        if status == "running":
            out["detail"] = "it goes on in the background; stats()['last_compaction'] shows the result"
        return out

    def _log_record_bytes(self) -> int:
        """Bytes of the snapshot, the sealed segments and the active one's records (no preallocation)."""
        writer = self.writer
        segno = writer.segno
        if segno != self._acct_segno:
            total = 0
            try:
                entries = list(os.scandir(self.data_dir))
            except OSError:
                entries = []
            for entry in entries:
                n = parse_segment_name(entry.name)
                if (n is not None and n != segno) or parse_snapshot_name(entry.name) is not None:
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass  # deleted by the compactor meanwhile
            self._acct_sealed, self._acct_segno = total, segno
        return self._acct_sealed + writer.offset

    def _auto_compaction_due(self) -> bool:
        if self.stopping or self.fatal is not None or time.monotonic() < self._backoff_until:
            return False
        if self.writer.written_seqno <= self.snapshot_seqno:
            return False  # nothing new since the snapshot
        size = self._log_record_bytes()
        if size < max(1, self.cfg.compact_min_bytes):
            return False
        dead = size - self.table.used_bytes
        return dead >= self.cfg.compact_dead_ratio * size

    def _compaction_stats(self) -> dict[str, Any]:
        size = self._log_record_bytes()
        live = self.table.used_bytes
        return {
            "log_record_bytes": size,
            "dead_ratio": round(max(0, size - live) / size, 4) if size else 0.0,
            "snapshot_seqno": self.snapshot_seqno,
            "compactions": self.compactions,
            "compaction_failures": self.compaction_failures,
            "compaction": self._compaction_status("running") if self.compaction is not None else None,
            "last_compaction": self.last_compaction,
            "last_compaction_error": self.last_compaction_error,
            "compaction_backoff_s": round(max(0.0, self._backoff_until - time.monotonic()), 1),
        }

    def _stop_compactor(self) -> None:
        """At shutdown: a compactor stops at once when its stdin closes (any step is safe)."""
        c = self.compaction
        if c is None:
            return
        if c.proc is not None:
            if c.proc.stdin is not None:
                try:
                    c.proc.stdin.close()
                except OSError:
                    pass
            try:
                c.proc.wait(10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            if c.proc.stdout is not None and not c.proc.stdout.closed:
                try:
                    self.sel.unregister(c.proc.stdout)
                except (KeyError, ValueError):
                    pass
                c.proc.stdout.close()
        self._finish_compaction("aborted", error="the daemon is stopping")


    def stats(self) -> dict[str, Any]:
        commits = sorted(self.flusher.latencies)
        syncs = sorted(self.writer.sync_latencies)
        table = self.table.stats()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "data_dir": str(self.data_dir),
            "socket": str(self.socket_path),
            "namespace": self.namespace,
            "fsync": self.cfg.fsync,
            "keys": len(self.table),
            "connections": len(self.conns),
            "last_seqno": self.logged_seqno,
            "batches": self.batches,
            "records": self.batched_records,
            "avg_batch": round(self.batched_records / self.batches, 3) if self.batches else 0.0,
            "commit_p50_us": _percentile_us(commits, 0.50),
            "commit_p99_us": _percentile_us(commits, 0.99),
            "fsyncs": self.writer.syncs,
            "fsync_p50_us": _percentile_us(syncs, 0.50),
            "fsync_p99_us": _percentile_us(syncs, 0.99),
            # Writes refused with LogFull (no disk space for the log) since start.
            "log_full_refusals": self.log_full_refusals,
            "busy_polls": self.polls,
            "busy_poll_hits": self.poll_hits,
            "log_bytes": _log_bytes(self.data_dir),
            "live_bytes": self.table.used_bytes,
            **self._compaction_stats(),
            # Memory the table holds: committed pages, not the segment's size, which with a
            # memory limit includes a sparse reserve for the data to grow in place.
            "shm_bytes": table["committed_bytes"],
            # Writes waited while the table grew (counted since this daemon started).
            "table_rebuilds": table["rebuilds"],
            "last_table_rebuild": table["last_rebuild"],
            # Index growths that moved the index instead (O(slots), the records stay).
            "table_index_moves": table["index_moves"],
            "last_table_index_move": table["last_index_move"],
            "max_memory": self.cfg.max_memory,
            "table": table,
        }

    def _status_line(self) -> str:
        return f"serving {len(self.table)} keys, log {_log_bytes(self.data_dir)} bytes"

    def _reload(self) -> None:
        """SIGHUP: re-read flags, environment and file; apply what may change at run time."""
        notify.reloading()
        try:
            new = load_serve_config(self.args, os.environ)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the old one: %s", exc)
            notify.ready(self._status_line())
            return
        changed = diff(self.cfg, new)
        fixed = {k: v for k, v in changed.items() if k not in ServeConfig.RELOADABLE}
        for name, (old, value) in fixed.items():
            log.warning(
                "SIGHUP: %s changed to %s but only takes effect at restart",
                name,
                format_value(name, value),
            )
        live = {k: v for k, v in changed.items() if k in ServeConfig.RELOADABLE}
        if live:
            # Apply only the reloadable options; the others stay as started.
            import dataclasses

            self.cfg = dataclasses.replace(
                self.cfg, **{k: v for k, (_, v) in live.items()}, sources=new.sources
            )
            if "log_level" in live:
                logging.getLogger().setLevel(self.cfg.log_level.upper())
            for name, (old, value) in live.items():
                log.info(
                    "SIGHUP: %s %s -> %s",
                    name,
                    format_value(name, old),
                    format_value(name, value),
                )
            if self.cfg.max_memory != self.table.max_memory:
                self.table.max_memory = self.cfg.max_memory
            self.table.data_reserve = self.cfg.shm_reserve  # for the next segment it makes
            if "max_connections" in live:
                self._fit_fd_limit()
        else:
            log.info("SIGHUP: configuration re-read, nothing reloadable changed")
        notify.ready(self._status_line())

    # ---------------------------------------------------------------- stop

    def _shutdown(self) -> int:
        self._stop_compactor()
        deadline = time.monotonic() + 5.0
        while any(c.out for c in self.conns.values()) and time.monotonic() < deadline:
            for key, mask in self.sel.select(0.05):
                if isinstance(key.data, _Conn) and mask & selectors.EVENT_WRITE:
                    self._write(key.data)
        self.flusher.submit(None)
        self.flusher.join(timeout=30)
        if self.fatal is None:
            try:
                self.writer.sync()
            except WalcacheError as exc:
                log.error("final sync failed: %s", exc)
                self.exit_code = 1
        for conn in list(self.conns.values()):
            self._close(conn)
        self.table.mark_closed()
        self.table.close(unlink=False)
        self.writer.close()
        signal.set_wakeup_fd(-1)
        self.socket_lock.release()  # the socket was removed when the stop began
        self.lock.release()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code


class _HeldWarning:
    """A warning that comes per connection or per write: logged at most once per
    WARN_EVERY_S, with how many occurrences (``what``) it held back since the last."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.warned_at = -math.inf
        self.held = 0

    def __call__(self, message: str, count: int = 1) -> None:
        self.held += count
        now = time.monotonic()
        if now - self.warned_at >= WARN_EVERY_S:
            log.warning("%s (%d %s since the last warning)", message, self.held, self.what)
            self.warned_at, self.held = now, 0


def _refuse(sock: socket.socket, why: WalcacheError) -> None:
    """Tell a just-accepted connection why it is refused, and close it."""
    try:
        # Request id 0: about the connection, not a request (ids start at 1).
        sock.setblocking(False)
        sock.send(ServerProtocol.error(0, why))
    except OSError:
        pass
    sock.close()


def _percentile_us(sorted_seconds: list[float], p: float) -> float:
    if not sorted_seconds:
        return 0.0
    i = min(len(sorted_seconds) - 1, int(p * len(sorted_seconds)))
    return round(sorted_seconds[i] * 1e6, 1)


def _log_bytes(data_dir: Path) -> int:
    """Bytes of log files (segments and snapshots) in the data dir.

    Only names the log owns: ``walcache.log`` (the text log of a daemon that
    ``walcache.connect`` started) is no part of it.
    """
    total = 0
    for entry in os.scandir(data_dir):
        if parse_segment_name(entry.name) is not None or parse_snapshot_name(entry.name) is not None:
            try:
                if entry.is_file():
                    total += entry.stat().st_size
            except FileNotFoundError:
                pass  # the compactor deleted it meanwhile
    return total


def _group_id(name: str | None) -> int | None:
    return None if name is None else group_id(name)


def run(
    config: ServeConfig,
    *,
    args: Any = None,
    fileops: FileOps | None = None,
    shmops: ShmOps | None = None,
) -> int:
    """Run a daemon until SIGTERM; ``args`` (the parsed flags) are re-read on SIGHUP."""
    daemon = Daemon(config, args=args, fileops=fileops, shmops=shmops)
    try:
        daemon.start()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"permission denied: {exc}") from None
        raise
    return daemon.serve_forever()
