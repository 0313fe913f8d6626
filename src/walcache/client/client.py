"""The walcache client: reads from shared memory, mutations over the socket.

``Client.get`` reads the shared table directly (walcache.shm.reader); it asks
the daemon only where lock-free reads are not safe (no x86-64 ordering and no
compiled reader), after a key's seqlock stayed contended through every retry, or
when the table cannot be read. ``put``/``delete`` and the batch calls send one request
each and return once the daemon has logged (and, under ``--fsync always``,
synced) the mutation and published it, so the next ``get`` of the same process
sees it.

Fork safety: the mapping is shared memory and survives ``fork`` unchanged; the
socket is not, so a child that inherits a Client drops the parent's socket on
its first request and opens its own. A fork is noticed through a counter that an
``os.register_at_fork`` hook bumps in the child (every fork through ``os.fork``,
multiprocessing included), not by calling ``getpid()`` on every request: that is
a system call per put.

The round trip costs the client three system calls: ``send``, ``poll`` for the
reply (see ``_roundtrip`` for why it waits there and not in recv) and
``recv_into`` a buffer the Client keeps. The socket is blocking with
SO_SNDTIMEO / SO_RCVTIMEO: a Python socket timeout would add a ``poll`` before
every send too, and ``recv(n)`` with a large ``n`` allocates (and, past glibc's
mmap threshold, maps and unmaps) a fresh buffer each call.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ..codec import Key, decode_key, decode_value, encode_key, encode_value
from ..errors import (
    ConfigError,
    DaemonUnavailable,
    InvalidValue,
    ProtocolError,
    ReadContention,
    TableUnavailable,
    ValueTooLarge,
    WalcacheError,
    WalcacheTimeout,
)
from ..paths import default_socket_path, shm_namespace
from ..protocol import FRAME_HEADER, MAX_TTL_MS, ClientProtocol
from ..shm.creader import Reader, open_reader

__all__ = ["Client", "connect"]

_MISSING = object()

# Bumped in every child right after a fork; a Client compares it with the value it
# saw when it connected (cheaper than os.getpid(), a system call, per request).
_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO
# Replies to puts are a few bytes; a larger reply (stats, a big get) takes several reads.
RECV_BUFFER_BYTES = 64 * 1024


def _ttl_ms(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidValue(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    if ttl * 1000 > MAX_TTL_MS:
        raise InvalidValue(f"ttl must be at most {MAX_TTL_MS // 1000} seconds (1000 years), not {ttl!r}")
    return max(1, int(math.ceil(ttl * 1000)))


class Client(MutableMapping[Key, Any]):
    """A handle on one walcache daemon and its shared table.

    ``socket_path`` defaults to ``$WALCACHE_SOCKET`` or the default path.
    ``timeout`` bounds every round trip to the daemon (seconds).
    ``data_dir`` lets reads work even when the daemon is down at creation
    (the table's name derives from the data dir).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 5.0,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._open(socket_path, timeout, data_dir, None)

    def _open(
        self,
        socket_path: str | os.PathLike[str] | None,
        timeout: float,
        data_dir: str | os.PathLike[str] | None,
        namespace: str | None,
    ) -> None:
        """__init__, and unpickling with the table's name already known (``namespace``)."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proto = ClientProtocol()
        self._forks = _forks
        self._rbuf = bytearray(RECV_BUFFER_BYTES)
        self._rview = memoryview(self._rbuf)
        self._reader: Reader | None = None
        self._closed = False
        self._data_dir = data_dir  # kept for pickling (see __reduce__)
        self.namespace: str | None = shm_namespace(data_dir) if data_dir is not None else namespace
        self.daemon_info: dict[str, Any] = {}
        self._max_request = 1 << 62  # set from the daemon's limits by _connect
        try:
            self._connect()
        except DaemonUnavailable:
            if self.namespace is None:
                raise
        try:
            self._open_reader()
        except BaseException:
            self._drop_socket()
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a multiprocessing pool's argument, say) as how to open it again: the
        worker gets its own Client on the same socket and table, not this one's socket."""
        return (_reopen, (str(self.socket_path), self.timeout, self._data_dir, self.namespace))

    # ------------------------------------------------------------ plumbing

    def _open_reader(self) -> None:
        assert self.namespace is not None
        self._reader = open_reader(self.namespace)
        # The hot path: the reader's lookup bound directly, no extra Python frame.
        # Where lock-free reads are not safe (no x86-64 ordering and no compiled
        # reader), get() asks the daemon: correct before fast.
        self._fast_get = self._reader.lookup if self._reader.lock_free_ok else self._get_via_daemon

    def _connect(self) -> None:
        path = str(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)  # for connect (a full backlog blocks it)
        try:
            sock.connect(path)
            _set_kernel_timeout(sock, self.timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnavailable(
                f"no walcache daemon on {path} ({exc.strerror}): start one with "
                f"`walcache serve --socket {path}` or use walcache.connect(data_dir)"
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot connect to {path}: {exc}") from None
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._poll_ms = max(1, math.ceil(self.timeout * 1000))
        self._proto = ClientProtocol()
        self._forks = _forks
        try:
            info = self._roundtrip(*self._proto.hello())
        except BaseException:
            self._drop_socket()
            raise
        if self.namespace is not None and info["namespace"] != self.namespace:
            self._drop_socket()
            # Not "no daemon" (which the constructor forgives when given a data dir):
            # the socket and the data dir disagree, and reads and writes would too.
            raise ConfigError(
                f"the daemon on {path} serves another data dir (table /{info['namespace']}, "
                f"not /{self.namespace}): pass the socket of this data dir's daemon"
            )
        self.namespace = info["namespace"]
        self.daemon_info = info
        # The longest request frame the daemon takes whole (it closes the connection past it).
        self._max_request = FRAME_HEADER.size + info.get("max_frame_bytes", 1 << 62)

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _roundtrip(self, req_id: int, frame: bytes, op: str = "hello") -> Any:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendall(frame)
        except OSError as exc:
            # Nothing reached a live daemon (a dead one processes nothing): safe to resend.
            # A daemon that closed this connection (it refused it: --max-connections,
            # --allow-uids; or it could not parse a frame) said why first, in a reply
            # with id 0: that reason beats a broken pipe.
            refusal = self._refusal(sock)
            self._drop_socket()
            if refusal is not None:
                raise refusal from None
            raise _NotSent(f"lost the daemon on {self.socket_path}: {exc}") from None
        proto = self._proto
        try:
            reply = proto.next_reply()
            while reply is None:
                # Wait in poll(POLLIN), not in recv: a task asleep in a unix-socket
                # recv is woken (for nothing) each time the daemon reads this
                # socket's request, since the freed send buffer wakes the socket's
                # wait queue with EPOLLOUT and recv's waiter does not filter by
                # event; poll's does. Measured: 15 us less per one-client put,
                # 3-4 us less CPU per put (daemon + client) with 16 clients.
                if not self._poller.poll(self._poll_ms):
                    raise TimeoutError
                n = sock.recv_into(self._rbuf)
                if not n:
                    raise ConnectionResetError("daemon closed the connection")
                proto.receive_data(self._rview[:n])
                reply = proto.next_reply()
        except (BlockingIOError, TimeoutError):
            # poll timed out (or, as a safety net, SO_RCVTIMEO made recv fail with EAGAIN).
            self._drop_socket()
            raise WalcacheTimeout(
                f"the daemon on {self.socket_path} did not answer within {self.timeout} s"
                + ("; the write may or may not be applied" if op in _WRITES else "")
            ) from None
        except OSError as exc:
            # (A reason the daemon sent before closing was parsed above: a reply with id 0.)
            self._drop_socket()
            raise DaemonUnavailable(
                f"lost the daemon on {self.socket_path} after sending the request ({exc}): "
                "a write may or may not have been applied"
            ) from None
        if reply.req_id != req_id:
            self._drop_socket()
            if reply.req_id == 0 and not reply.ok:
                raise reply.value  # about the connection (refused, or a bad frame)
            raise ProtocolError(f"reply for request {reply.req_id}, expected {req_id}")
        if not reply.ok:
            raise reply.value
        return reply.value

    def _refusal(self, sock: socket.socket) -> WalcacheError | None:
        """The daemon's reason for closing this connection (a reply with id 0), if it sent one."""
        try:
            sock.setblocking(False)
            n = sock.recv_into(self._rbuf)
            self._proto.receive_data(self._rview[:n])
            reply = self._proto.next_reply()
        except (OSError, WalcacheError):
            return None
        if reply is not None and reply.req_id == 0 and not reply.ok and isinstance(reply.value, WalcacheError):
            return reply.value
        return None

    def _call(self, op: str, *args: Any) -> Any:
        """One request; reconnects once if the daemon restarted since the last call."""
        if self._closed:
            raise WalcacheError("this Client is closed")
        if self._forks != _forks:
            # Forked: the parent's socket must not be used (its replies would
            # interleave) and its lock may have been held by a parent thread at the
            # fork; the mapping is fine to share.
            self._lock = threading.Lock()
            self._sock = None
            self._forks = _forks
        with self._lock:
            fresh = False
            if self._sock is None:
                self._connect()
                fresh = True
            try:
                return self._roundtrip(*self._request(op, args), op)
            except _NotSent:
                if fresh:
                    raise
            except DaemonUnavailable:
                # The request went out: a mutation may have been applied, so only
                # reads are resent (resending a put could undo another client's).
                if fresh or op not in _READS:
                    raise
            # The connection was dead (the daemon restarted since the last call):
            # a restarted daemon may be there now.
            self._connect()
            return self._roundtrip(*self._request(op, args), op)

    def _request(self, op: str, args: tuple[Any, ...]) -> tuple[int, bytes]:
        """(req_id, frame), or ValueTooLarge for a frame the daemon would refuse whole
        (it closes the connection on one past --max-frame-bytes)."""
        req_id, frame = self._proto.request(op, *args)
        if len(frame) > self._max_request:
            raise ValueTooLarge(
                f"this {op} request is {len(frame) - FRAME_HEADER.size} bytes, over the daemon's "
                f"--max-frame-bytes {self._max_request - FRAME_HEADER.size}: store a smaller value or split the batch"
            )
        return req_id, frame

    # --------------------------------------------------------------- reads

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key`` from shared memory, or ``default``."""
        try:
            return self._fast_get(key, default)
        except ReadContention:
            try:
                return self._get_via_daemon(key, default)
            except DaemonUnavailable:
                # The daemon went away while we asked it (killed, or stopping): the
                # write that held the record is over or never will be, so read the table
                # again; a record left half-written says so itself (TableUnavailable).
                return self._fast_get(key, default)
        except TableUnavailable as exc:
            # E.g. the daemon was killed in the middle of writing this key's record:
            # a restarted daemon may already answer (and has published a new table).
            try:
                return self._get_via_daemon(key, default)
            except DaemonUnavailable:
                raise exc from None

    def _get_via_daemon(self, key: Key, default: Any) -> Any:
        found = self._call("get", encode_key(key))
        if found is None:
            return default
        return decode_value(found[0], found[1])

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The found keys and their values (missing keys are left out)."""
        given: list[Any] = list(keys)
        try:
            return self._get_many(given)
        except TypeError:
            # The result is keyed by the keys given: a bytearray or memoryview key is
            # unhashable, its bytes are not (checked only here, off the common path).
            if not any(type(k) in _BUFFERS for k in given):
                raise
            return self._get_many([bytes(k) if type(k) in _BUFFERS else k for k in given])

    def _get_many(self, keys: list[Any]) -> dict[Key, Any]:
        reader = self._reader
        if reader is not None and reader.lock_free_ok:
            try:
                # One batched read: the compiled reader overlaps the keys' cache misses.
                found: dict[Key, Any] = reader.get_many(keys)  # type: ignore[assignment]
                return found
            except ReadContention:
                pass  # some key kept racing the writer: take them one by one
        out: dict[Key, Any] = {}
        for key in keys:
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                out[key] = value
        return out

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]

    def _open_reader_or_raise(self) -> Reader:
        reader = self._reader
        if reader is None:  # only close() sets it back to None
            raise WalcacheError("this Client is closed")
        return reader

    def __len__(self) -> int:
        return len(self._open_reader_or_raise())

    def __iter__(self) -> Iterator[Key]:
        """The keys present now (a best-effort snapshot of a table that may change)."""
        reader = self._open_reader_or_raise()
        now = time.time_ns() // 1_000_000
        for kb, _vflag, _value, _seqno, expiry in reader.iter_entries():
            if not expiry or expiry > now:
                yield decode_key(kb)

    def keys_with_prefix(self, prefix: Key) -> Iterator[Key]:
        """Keys of the same type as ``prefix`` that start with it."""
        pb = encode_key(prefix)
        for key in self:
            if encode_key(key).startswith(pb):
                yield key

    # -------------------------------------------------------------- writes

    def put(self, key: Key, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; returns once durable (per the fsync policy)."""
        vflag, vb = encode_value(value)
        self._call("put", encode_key(key), vflag, vb, _ttl_ms(ttl))

    def delete(self, key: Key) -> bool:
        """Remove ``key``; True if it existed."""
        return bool(self._call("delete", encode_key(key)))

    def put_many(
        self, mapping: Mapping[Key, Any] | Iterable[tuple[Key, Any]], ttl: float | None = None
    ) -> None:
        """Store every item as one atomic log record (all or nothing after a crash).

        ``mapping`` is a mapping or, as for ``dict.update``, an iterable of (key, value) pairs.
        """
        items = mapping.items() if hasattr(mapping, "items") else mapping
        entries = []
        for pair in items:
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise InvalidValue(
                    f"put_many takes a mapping or (key, value) pairs, not an item {pair!r:.60}"
                ) from None
            vflag, vb = encode_value(value)
            entries.append([encode_key(key), vflag, vb])
        if entries:
            self._call("put_many", entries, _ttl_ms(ttl))

    def delete_many(self, keys: Iterable[Key]) -> int:
        """Remove every key atomically; returns how many existed."""
        encoded = [encode_key(k) for k in keys]
        if not encoded:
            return 0
        return int(self._call("delete_many", encoded))

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    # ---------------------------------------------------------- operations

    def ping(self) -> bool:
        return bool(self._call("ping") == "pong")

    def stats(self) -> dict[str, Any]:
        """The daemon's figures, plus this client's reader: ``reader`` says which one runs
        ("c", "python" or "daemon"); with the compiled reader, ``reader_counters`` are this
        client's own: failed seqlock validations (``retries``), table moves followed
        (``remaps``), reads handed to the daemon after the retry bounds (``contended``) and
        gets answered by its result cache (``cache_hits``)."""
        stats: dict[str, Any] = self._call("stats")
        reader = self._reader
        if reader is not None:
            stats["reader"] = self._reader_kind()
            if stats["reader"] == "c":
                stats["reader_counters"] = {
                    name: getattr(reader, name) for name in ("retries", "remaps", "contended", "cache_hits")
                }
        return stats

    def _reader_kind(self) -> str:
        assert self._reader is not None
        return self._reader.kind

    def compact(self) -> dict[str, Any]:
        """Ask the daemon to compact its log now."""
        result: dict[str, Any] = self._call("compact")
        return result

    def close(self) -> None:
        """Close the socket and unmap the table (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._forks != _forks:
            # Forked since the socket was opened: the socket and the lock are the
            # parent's (a parent thread may have held the lock at the fork).
            self._sock = None
        else:
            with self._lock:
                self._drop_socket()
        self._fast_get = _closed_get
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<walcache.Client socket={str(self.socket_path)!r} table=/{self.namespace}>"


def _set_kernel_timeout(sock: socket.socket, timeout: float) -> None:
    """Make ``sock`` blocking with a per-call timeout enforced by the kernel.

    Same meaning as ``settimeout`` (each send or recv waits at most ``timeout``),
    without the ``poll`` CPython issues before every call on a timeout socket.
    """
    sock.settimeout(None)
    # A zero timeval means "wait forever" to the kernel: the shortest timeout is 1 us.
    usec = max(1, round(max(0.0, timeout) * 1_000_000))
    tv = _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _closed_get(key: Key, default: Any) -> Any:
    raise WalcacheError("this Client is closed")


# Requests that change nothing: resending one after a lost reply is harmless.
_READS = frozenset(("get", "stats", "ping"))
_WRITES = frozenset(("put", "delete", "put_many", "delete_many"))
_BUFFERS = (bytearray, memoryview)


class _NotSent(DaemonUnavailable):
    """The request could not be sent: the daemon cannot have acted on it."""


def _embedded_socket_path(data_dir: Path) -> Path:
    return default_socket_path().parent / f"{shm_namespace(data_dir)}.sock"


def connect(
    data_dir: str | os.PathLike[str],
    *,
    socket_path: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
    start_timeout: float = 60.0,
    serve_args: Iterable[str] = (),
) -> Client:
    """A Client for ``data_dir``, starting a daemon for it if none runs.

    The daemon is started in the background (its own session, logging to
    ``DATA_DIR/walcache.log``) and keeps running after this process exits, like
    a service; stop it with SIGTERM to the pid in ``stats()["pid"]``.
    """
    ddir = Path(data_dir).resolve()
    sock_path = Path(socket_path) if socket_path is not None else _embedded_socket_path(ddir)
    try:
        return _connected(sock_path, timeout, ddir)
    except (DaemonUnavailable, TableUnavailable):
        pass
    ddir.mkdir(parents=True, exist_ok=True, mode=0o700)
    logf = open(ddir / "walcache.log", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "walcache", "serve", "--data-dir", str(ddir), "--socket", str(sock_path), *serve_args],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        logf.close()
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            client = _connected(sock_path, timeout, ddir)
        except (DaemonUnavailable, TableUnavailable) as exc:
            last: WalcacheError = exc
        else:
            _reap_in_background(proc)  # only now: poll() below would contend with its wait()
            return client
        code = proc.poll()
        if code is not None and code != 0:
            # Another process may have won the race to start the daemon (ours then
            # exits on the data-dir lock): keep waiting for that one to answer.
            if not _lock_held(ddir):
                raise DaemonUnavailable(
                    f"the daemon for {ddir} exited with status {code}; see {ddir / 'walcache.log'}"
                ) from None
        if time.monotonic() > deadline:
            if proc.poll() is None:  # still starting (or stuck): reaped whenever it exits
                _reap_in_background(proc)
            raise DaemonUnavailable(
                f"no daemon answered on {sock_path} within {start_timeout} s "
                f"(last error: {last}); see {ddir / 'walcache.log'}"
            )
        time.sleep(0.02)


def _reap_in_background(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the daemon ``connect()`` started (a child of this process) in a thread,
    so that it leaves no zombie when it exits."""
    threading.Thread(target=proc.wait, name="walcache-daemon-reaper", daemon=True).start()


def _reopen(
    socket_path: str, timeout: float, data_dir: str | os.PathLike[str] | None, namespace: str | None
) -> Client:
    """Unpickling a Client: a new one on the same socket and table. With the table's name
    known, a daemon that is down does not fail the unpickling (a pool's worker would die
    of it, and the pool wait for its task forever): reads work, writes raise in the task."""
    client = Client.__new__(Client)
    client._open(socket_path, timeout, data_dir, namespace)
    return client


def _connected(sock_path: Path, timeout: float, data_dir: Path) -> Client:
    """A Client with a live daemon behind it: one built for a data dir only reads when no
    daemon answers (the last table stays in /dev/shm), which must not pass for "one runs"."""
    client = Client(sock_path, timeout=timeout, data_dir=data_dir)
    if client._sock is None:
        client.close()
        raise DaemonUnavailable(f"no walcache daemon on {sock_path}")
    return client


def _lock_held(data_dir: Path) -> bool:
    """Whether a live process holds the data dir (read from the lock file, never by
    taking the lock: that could make a daemon starting right then fail)."""
    import psutil

    from ..daemon.lock import DataDirLock

    pid = DataDirLock(data_dir).holder()
    return pid is not None and psutil.pid_exists(pid)
