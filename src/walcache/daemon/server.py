"""The walcache daemon: socket server, group commit, publish, acknowledge.

One process, two threads:

- the **loop thread** (``selectors``) accepts connections, parses requests
  (walcache.protocol), validates them, assigns sequence numbers and encodes log
  records, applies durable batches to the shared table and writes replies;
- the **flusher thread** owns the log file: it writes one batch of records and
  fdatasyncs it (``WalWriter.append``) while the loop goes on reading the next
  requests. ``os.pwrite`` and ``os.fdatasync`` release the GIL.

Group commit needs no timer: while one batch is being synced, every request that
arrives (from any connection) queues in ``pending``; when the sync returns, the
whole queue becomes the next batch. One fdatasync acknowledges all of it.

The write path, in this order (ARCHITECTURE.md, "The write path"):

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
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import selectors
import signal
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..codec import check_encoded_key, check_encoded_value
from ..config import ServeConfig, diff, format_value, group_id, load_serve_config
from ..errors import (
    CacheFull,
    ConfigError,
    InvalidValue,
    KeyTooLarge,
    LogFailed,
    ProtocolError,
    ServerError,
    ValueTooLarge,
    WalcacheError,
)
from ..paths import ensure_private_dir, shm_namespace
from ..protocol import PROTOCOL_VERSION, BadRequest, Request, ServerProtocol
from ..shm.writer import ShmTable
from . import notify
from .apply import OP_DELETE, OP_PUT, apply_ops
from .fileops import FileOps
from .lock import DataDirLock
from .recovery import open_log

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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Conn:
    __slots__ = ("sock", "proto", "out", "inflight", "events", "closing", "uid", "pid", "name")

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


class _Item:
    """One request waiting for its batch: the reply is computed at completion."""

    __slots__ = ("conn", "req_id", "kind", "op", "ops", "seqno", "record", "footprint", "result")

    def __init__(self, conn: _Conn, req_id: int, kind: str, op: str = "") -> None:
        self.conn = conn
        self.req_id = req_id
        self.kind = kind  # "write", "read" or "error"
        self.op = op
        self.ops: list[tuple[int, bytes, int, bytes, int]] | None = None
        self.seqno = 0
        self.record = b""
        self.footprint = 0
        self.result: Any = None  # read: a callable; error: the exception


class _Flusher(threading.Thread):
    """Writes and syncs one batch at a time; tells the loop through a pipe."""

    def __init__(self, writer: Any, wake_fd: int, interval_s: float | None) -> None:
        super().__init__(name="walcache-flusher", daemon=True)
        self.writer = writer
        self.wake_fd = wake_fd
        self.interval_s = interval_s
        self.jobs: queue.Queue[bytes | None] = queue.Queue()
        self.done: deque[tuple[BaseException | None, float]] = deque()
        # Recent figures for stats: whole appends (write + sync) and the syncs alone.
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.sync_latencies: deque[float] = deque(maxlen=100_000)

    def run(self) -> None:
        while True:
            try:
                data = self.jobs.get(timeout=self.interval_s)
            except queue.Empty:
                # --fsync interval: no batch for a while, sync what was written.
                try:
                    self.writer.sync_if_due()
                except BaseException as exc:  # noqa: BLE001 - reported to the loop
                    self.done.append((exc, 0.0))
                    os.write(self.wake_fd, b"f")
                    return
                continue
            if data is None:
                return
            t0 = time.perf_counter()
            syncs = self.writer.syncs
            err: BaseException | None = None
            try:
                self.writer.append(data)
            except BaseException as exc:  # noqa: BLE001 - any failure stops acks
                err = exc
            dt = time.perf_counter() - t0
            if err is None:
                self.latencies.append(dt)
                if self.writer.syncs != syncs:
                    self.sync_latencies.append(self.writer.last_sync_seconds)
            self.done.append((err, dt))
            os.write(self.wake_fd, b"d")


class Daemon:
    """``walcache serve``: owns the data dir, the log, the shared table and the socket."""

    def __init__(
        self, config: ServeConfig, *, args: Any = None, fileops: FileOps | None = None
    ) -> None:
        self.cfg = config
        self.args = args
        self.fileops = fileops
        self.data_dir = Path(config.data_dir)
        self.socket_path = Path(config.socket)
        self.namespace = shm_namespace(self.data_dir)
        self.started = time.time()
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.pending: list[_Item] = []
        self.pending_footprint = 0
        self.inflight: list[_Item] | None = None
        self.stopping = False
        self.exit_code = 0
        self.fatal: BaseException | None = None
        self.logged_seqno = 0  # highest seqno whose batch the flusher completed
        self.batches = 0
        self.batched_records = 0
        self.reload_requested = False
        self.listener: socket.socket | None = None
        self._socket_ino: tuple[int, int] | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Lock, recover, publish, listen (in that order; READY=1 comes after)."""
        cfg = self.cfg
        ensure_private_dir(self.data_dir)
        self.lock = DataDirLock(self.data_dir)
        self.lock.acquire()
        gid = _group_id(cfg.shm_group)
        t0 = time.perf_counter()
        self.table = ShmTable.create(
            self.namespace,
            capacity=max(16, cfg.initial_capacity),
            max_memory=cfg.max_memory,
            mode=0o640 if gid is not None else 0o600,
            gid=gid,
        )
        now = _now_ms()
        self.writer, report = open_log(
            self.data_dir,
            lambda seqno, ops: apply_ops(self.table, seqno, ops, now),
            fileops=self.fileops,
            policy=cfg.fsync,
            interval_ms=cfg.fsync_interval_ms,
            segment_bytes=cfg.segment_bytes,
        )
        self.logged_seqno = self.writer.next_seqno - 1
        self.table.publish()
        log.info(
            "recovered %d records (last seqno %d) into %d keys in %.3f s; published /%s",
            report.records,
            report.last_seqno,
            len(self.table),
            time.perf_counter() - t0,
            self.namespace,
        )
        self._listen()
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.wake_r, self.wake_w = rfd, wfd
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self.sel.register(rfd, selectors.EVENT_READ, "wake")
        interval = cfg.fsync_interval_ms / 1000.0 if cfg.fsync == "interval" else None
        self.flusher = _Flusher(self.writer, wfd, interval)
        self.flusher.start()

    def _listen(self) -> None:
        path = self.socket_path
        ensure_private_dir(path.parent)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a dead daemon's socket: safe to replace
            else:
                raise ConfigError(
                    f"another daemon already listens on {path}: stop it or pass another --socket"
                )
            finally:
                probe.close()
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
        log.info("ready: pid %d, fsync %s, %d keys", os.getpid(), self.cfg.fsync, len(self.table))
        next_tick = time.monotonic() + tick
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, mask in self.sel.select(timeout):
                tag = key.data
                if tag == "accept":
                    self._accept()
                elif tag == "wake":
                    self._drain_wake()
                else:
                    conn: _Conn = tag
                    if mask & selectors.EVENT_READ:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                        self._write(conn)
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick
                self.table.heartbeat()
                # Expired entries read as missing already; this frees their space.
                self.table.purge_expired()
                if wd:
                    notify.watchdog()
            if self.stopping and self._drained():
                break
        return self._shutdown()

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.info("received %s: finishing in-flight writes", signal.Signals(signum).name)
            self._begin_stop()

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

    def _drained(self) -> bool:
        return self.inflight is None and not self.pending

    def _remove_socket(self) -> None:
        try:
            st = self.socket_path.stat()
            if (st.st_dev, st.st_ino) == self._socket_ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    # -------------------------------------------------------------- accepting

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            refuse = None
            if self.cfg.allow_uids is not None and uid not in self.cfg.allow_uids:
                refuse = ProtocolError(f"uid {uid} is not in the daemon's allow_uids")
            elif len(self.conns) >= self.cfg.max_connections:
                refuse = ProtocolError(
                    f"too many connections ({self.cfg.max_connections}, --max-connections)"
                )
            if refuse is not None:
                log.warning("refused connection from pid %d uid %d: %s", pid, uid, refuse)
                try:
                    sock.setblocking(False)
                    sock.send(ServerProtocol.error(0, refuse))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, self.cfg.max_frame_bytes, uid, pid, f"pid {pid} uid {uid}")
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    # ---------------------------------------------------------------- reading

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.closing or self.stopping:
            return  # after an error or during shutdown, input is ignored
        conn.proto.receive_data(data)
        while True:
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
        self._dispatch()
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
        self.pending.append(item)

    def _handle(self, conn: _Conn, req: Request) -> None:
        op, args, req_id = req.op, req.args, req.req_id
        if op in WRITE_OPS:
            try:
                ops, footprint = self._validate_write(op, args)
            except WalcacheError as exc:
                self._answer_now_or_queue(conn, req_id, exc)
                return
            item = _Item(conn, req_id, "write", op)
            item.ops = ops
            item.footprint = footprint
            item.seqno, item.record = self.writer.encode(ops)
            self.pending_footprint += footprint
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
            reader = self._compact
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
    ) -> tuple[list[tuple[int, bytes, int, bytes, int]], int]:
        cfg = self.cfg
        if op == "put" or op == "put_many":
            if op == "put":
                entries = [(args[0], args[1], args[2])]
                ttl_ms = args[3]
            else:
                entries = [tuple(e) for e in args[0]]
                ttl_ms = args[1]
            if ttl_ms is not None and ttl_ms <= 0:
                raise InvalidValue("ttl must be a positive number of seconds")
            expiry = _now_ms() + ttl_ms if ttl_ms else 0
            ops = []
            need = 0
            for key, vflag, value in entries:
                self._check_key(key)
                if len(value) > cfg.max_value_bytes:
                    raise ValueTooLarge(
                        f"value of {len(value)} bytes exceeds max_value_bytes={cfg.max_value_bytes}"
                    )
                check_encoded_value(vflag, value)
                need += self.table.footprint(len(key), len(value))
                ops.append((OP_PUT, key, vflag, value, expiry))
            if not ops:
                raise ProtocolError("put_many needs at least one entry")
            limit = cfg.max_memory
            if limit and self.table.used_bytes + self.pending_footprint + need > limit:
                # Near the limit, count what the overwritten values give back.
                need -= self._overwritten_footprint(entries)
            if limit and self.table.used_bytes + self.pending_footprint + need > limit:
                raise CacheFull(
                    f"the shared table would exceed max_memory={limit} bytes "
                    f"({self.table.used_bytes} used): delete keys or raise --max-memory"
                )
            return ops, need
        keys = [args[0]] if op == "delete" else list(args[0])
        for key in keys:
            self._check_key(key)
        if not keys:
            raise ProtocolError("delete_many needs at least one key")
        return [(OP_DELETE, key, 0, b"", 0) for key in keys], 0

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
        """Hand the pending queue to the flusher when it is idle."""
        if self.inflight is not None or not self.pending:
            return
        batch, self.pending = self.pending, []
        data = b"".join([it.record for it in batch if it.kind == "write"])
        if data:
            self.inflight = batch
            self.flusher.jobs.put(data)
        else:
            self._complete(batch, None)

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.flusher.done:
            err, _dt = self.flusher.done.popleft()
            if self.fatal is not None:
                continue  # after a failure nothing more is applied or acked
            batch, self.inflight = self.inflight, None
            if err is not None:
                self._fail(err, batch or [])
                return
            assert batch is not None
            writes = [it for it in batch if it.kind == "write"]
            if writes:
                self.logged_seqno = writes[-1].seqno
                self.batches += 1
                self.batched_records += len(writes)
            # Overlap: the next batch goes to disk while this one is applied.
            if self.pending and any(it.kind == "write" for it in self.pending):
                nxt, self.pending = self.pending, []
                self.inflight = nxt
                self.flusher.jobs.put(b"".join([it.record for it in nxt if it.kind == "write"]))
            self._complete(batch, None)
            self._dispatch()

    def _complete(self, batch: list[_Item], _err: None) -> None:
        now = _now_ms()
        touched: set[_Conn] = set()
        for k, it in enumerate(batch):
            conn = it.conn
            if it.kind == "write":
                assert it.ops is not None
                # Ack invariant: the flusher returned from the write (and, under
                # --fsync always, the fdatasync) of the batch holding this record
                # before this line runs; only now may it become visible and be acked.
                assert it.seqno <= self.logged_seqno, (it.seqno, self.logged_seqno)
                self.pending_footprint -= it.footprint
                try:
                    existed = apply_ops(self.table, it.seqno, it.ops, now)
                except Exception as exc:  # noqa: BLE001 - e.g. /dev/shm full while growing
                    # The record is in the log but not in the table: acking anything
                    # after it would break "a client reads its own writes". Stop; the
                    # next start rebuilds the table from the log.
                    for done in touched:
                        self._flush_out(done)
                    self._fail(exc, batch[k:], what="applying a logged batch to the shared table")
                    return
                result: Any = _WRITE_RESULT[it.op](existed)
                reply = ServerProtocol.reply(it.req_id, result)
            elif it.kind == "read":
                reply = self._evaluate(it.req_id, it.result)
            else:
                reply = ServerProtocol.error(it.req_id, it.result)
            conn.inflight -= 1
            if conn.sock.fileno() >= 0:
                conn.out += reply
                touched.add(conn)
        for conn in touched:
            self._flush_out(conn)

    def _fail(self, err: BaseException, batch: list[_Item], what: str = "log write") -> None:
        """Answer everything not yet answered with the failure, apply nothing more, stop.

        Used when the log fails (never retried: the pages may be gone) and when a
        logged batch cannot be applied; the next start recovers from the log.
        """
        if isinstance(err, WalcacheError):
            failure: WalcacheError = err
        else:
            failure = LogFailed(f"{what} failed: {type(err).__name__}: {err}")
        log.critical(
            "%s failed: %s; no more writes are acknowledged, exiting so the next start "
            "recovers from the log",
            what,
            failure,
        )
        self.fatal = failure
        self.exit_code = 1
        inflight = self.inflight if self.inflight is not None and self.inflight is not batch else []
        for it in batch + inflight + self.pending:
            it.conn.inflight -= 1
            if it.conn.sock.fileno() >= 0:
                it.conn.out += ServerProtocol.error(it.req_id, failure)
                self._flush_out(it.conn)
        self.pending = []
        self.inflight = None
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
        want_read = not conn.closing and backlog <= self.cfg.max_pending_bytes
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

    def _compact(self) -> dict[str, Any]:
        raise ServerError("compaction is not available in this version of the daemon")

    def stats(self) -> dict[str, Any]:
        commits = sorted(self.flusher.latencies)
        syncs = sorted(self.flusher.sync_latencies)
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
            "log_bytes": _log_bytes(self.data_dir),
            "live_bytes": self.table.used_bytes,
            "shm_bytes": table["segment_bytes"],
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
        else:
            log.info("SIGHUP: configuration re-read, nothing reloadable changed")
        notify.ready(self._status_line())

    # ---------------------------------------------------------------- stop

    def _shutdown(self) -> int:
        deadline = time.monotonic() + 5.0
        while any(c.out for c in self.conns.values()) and time.monotonic() < deadline:
            for key, mask in self.sel.select(0.05):
                if isinstance(key.data, _Conn) and mask & selectors.EVENT_WRITE:
                    self._write(key.data)
        self.flusher.jobs.put(None)
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
        self.lock.release()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code


def _percentile_us(sorted_seconds: list[float], p: float) -> float:
    if not sorted_seconds:
        return 0.0
    i = min(len(sorted_seconds) - 1, int(p * len(sorted_seconds)))
    return round(sorted_seconds[i] * 1e6, 1)


def _log_bytes(data_dir: Path) -> int:
    """Bytes of log files (segments and snapshots) in the data dir."""
    total = 0
    for entry in os.scandir(data_dir):
        if entry.name.endswith((".log", ".snap")) and entry.is_file():
            total += entry.stat().st_size
    return total


def _group_id(name: str | None) -> int | None:
    return None if name is None else group_id(name)


def run(
    config: ServeConfig, *, args: Any = None, fileops: FileOps | None = None
) -> int:
    """Run a daemon until SIGTERM; ``args`` (the parsed flags) are re-read on SIGHUP."""
    daemon = Daemon(config, args=args, fileops=fileops)
    try:
        daemon.start()
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"permission denied: {exc}") from None
        raise
    return daemon.serve_forever()
