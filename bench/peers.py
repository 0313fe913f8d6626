"""The stores the benchmark compares, each behind the same small interface.

A ``Peer`` lives in the runner process: it checks that it can run, starts its
server (if it has one) in a fresh directory, and stops it by pid. A ``Store`` is
one client handle: every client process opens its own with ``Peer.connect()``
after the fork, so no socket, SQLite connection or LMDB environment crosses a
fork.

The "acked write survives power loss" column is stated here, per peer and
setting, next to the code that picks the setting.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence, cast

__all__ = [
    "Store",
    "Peer",
    "PeerUnavailable",
    "ServerProcess",
    "WalcachePeer",
    "RedisPeer",
    "MemcachedPeer",
    "DiskcachePeer",
    "LmdbPeer",
    "SqlitePeer",
    "all_peers",
    "pip_version",
]

log = logging.getLogger("walcache.bench.peers")

Pair = tuple[bytes, bytes]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class PeerUnavailable(Exception):
    """The peer cannot run here; the message is the reason shown in the results."""


def pip_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(module: str) -> Any:
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"python module {module!r} not importable: {exc}") from exc


def _poll_until_idle(idle: Callable[[], bool], close: Callable[[], None], timeout_s: float, peer: "Peer") -> float:
    """Poll ``idle`` every 50 ms for up to ``timeout_s``; the seconds waited (a note if it never was)."""
    t0 = time.perf_counter()
    try:
        while not idle():
            if time.perf_counter() - t0 >= timeout_s:
                peer.notes.append(f"{peer.id}: background work still running after {timeout_s:.0f} s; measured anyway")
                break
            time.sleep(0.05)
    finally:
        close()
    return time.perf_counter() - t0


def _wait_until(probe: Callable[[], bool], timeout_s: float, what: str, proc: "ServerProcess | None") -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise PeerUnavailable(
                f"{what} exited with code {proc.popen.returncode} before it was ready: {proc.tail_log()}"
            )
        try:
            if probe():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
        time.sleep(0.002)
    raise PeerUnavailable(f"{what} not ready after {timeout_s:.0f} s (last error: {last!r})")


class ServerProcess:
    """One server we started: spawned in its own session, stopped by its pid."""

    #: every pid spawned in this run, so the report can show they are all gone
    spawned_pids: list[int] = []

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as logf:
            # A new session keeps the terminal's Ctrl-C away from the servers: the
            # runner stops them itself, in order, from its finally block.
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        ServerProcess.spawned_pids.append(self.popen.pid)
        log.debug("started pid %d: %s", self.popen.pid, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def kill(self) -> None:
        """SIGKILL (the crash in the restart test) and reap."""
        if self.popen is None or self.popen.poll() is not None:
            return
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout; always reaps."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", self.popen.pid, STOP_TIMEOUT_S)
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.popen = None

    def tail_log(self, limit: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:].strip().replace("\n", " | ")


class Store:
    """One client handle, opened in the process that uses it.

    ``get`` and ``put`` are attributes so an adapter can bind the client library's
    own method: the timed loop then measures the library, not a wrapper frame.
    """

    get: Callable[[bytes], bytes | None]
    put: Callable[[bytes, bytes], None]

    def load(self, items: Sequence[Pair]) -> None:
        """Bulk load (the YCSB load phase): the fastest correct way each peer offers."""
        for k, v in items:
            self.put(k, v)

    def close(self) -> None:
        return None


class Peer(ABC):
    """A store and setting under test."""

    #: stable id used by --peers and in the JSON
    id: str = ""
    #: what a user would call it
    name: str = ""
    #: the setting measured
    setting: str = ""
    #: "yes" or "no": an acknowledged write survives power loss
    survives_power_loss: str = "no"
    #: why, in one line
    durability: str = ""
    #: PyPI distributions and Debian packages this peer needs (the runner installs them)
    pip_requires: tuple[str, ...] = ()
    apt_requires: tuple[str, ...] = ()
    #: can run the SIGKILL-and-restart test
    supports_restart: bool = False

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.expected_keys = 0
        self.server: ServerProcess | None = None
        self.notes: list[str] = []

    def check(self) -> None:
        """Raise PeerUnavailable with the reason if this peer cannot run here."""

    def versions(self) -> dict[str, str]:
        return {}

    def runtime_info(self) -> dict[str, str]:
        """Facts only a running instance can tell (asked once it is loaded)."""
        return {}

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        """Start a fresh, empty instance in ``workdir`` (servers: spawn and wait ready).

        ``expected_keys`` lets a store that is sized up front be sized as its user would.
        """
        self.workdir = workdir
        self.expected_keys = expected_keys

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @abstractmethod
    def connect(self) -> Store: ...

    def settle(self, timeout_s: float) -> float:
        """Wait until background work the store started itself is done; return the seconds waited.

        The runner calls it before every cell, so that a cell measures its own workload
        and not, say, a log compaction the previous cell's updates set off. Stores with
        no background work return at once.
        """
        return 0.0

    def restart_after_kill(self) -> float:
        """SIGKILL the server, start it again on the same data, return seconds until it answers."""
        raise PeerUnavailable(f"{self.id} has no restart test")

    def server_pids(self) -> list[int]:
        return [] if self.server is None or self.server.pid is None else [self.server.pid]

    def data_bytes(self) -> int:
        if self.workdir is None:
            return 0
        total = 0
        for root, _dirs, files in os.walk(self.workdir):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total


# --------------------------------------------------------------------------- walcache


class _WalcacheStore(Store):
    def __init__(self, socket_path: str) -> None:
        import walcache

        self._c: Any = getattr(walcache, "Client")(socket_path=socket_path)
        self.get = self._c.get
        self.put = self._c.put

    def load(self, items: Sequence[Pair]) -> None:
        for i in range(0, len(items), 1000):
            self._c.put_many(dict(items[i : i + 1000]))

    def close(self) -> None:
        self._c.close()


class WalcachePeer(Peer):
    pip_requires = ()
    supports_restart = True

    def __init__(self, fsync: str) -> None:
        super().__init__()
        self.fsync = fsync
        self.id = f"walcache-{fsync}"
        self.name = "walcache"
        self.setting = f"--fsync {fsync}"
        if fsync == "always":
            self.survives_power_loss = "yes"
            self.durability = "yes: WAL fdatasync (group commit) before the ack"
        elif fsync == "interval":
            self.survives_power_loss = "no"
            self.durability = "no: acked after write(), synced every interval (survives a process crash)"
        else:
            self.survives_power_loss = "no"
            self.durability = "no: syncing left to the OS (survives a process crash)"
        self.socket_path: str | None = None

    def check(self) -> None:
        try:
            walcache = _import("walcache")
        except PeerUnavailable as exc:
            raise PeerUnavailable(f"walcache not importable: {exc}") from exc
        try:
            getattr(walcache, "Client")
        except Exception as exc:  # noqa: BLE001 - a half-built package fails in many ways
            raise PeerUnavailable(f"walcache.Client is not usable in this checkout: {type(exc).__name__}: {exc}") from exc
        if importlib.util.find_spec("walcache.__main__") is None:
            raise PeerUnavailable("'python -m walcache' is not available in this checkout")

    def versions(self) -> dict[str, str]:
        import walcache

        return {"walcache": str(getattr(walcache, "__version__", "?"))}

    def runtime_info(self) -> dict[str, str]:
        # The client reads shared memory only when its reader can run lock-free here;
        # otherwise get() goes to the daemon. Which one ran belongs next to the numbers.
        store = self.connect()
        try:
            stats: dict[str, Any] = getattr(store, "_c").stats()
        finally:
            store.close()
        return {"walcache client reader": str(stats.get("reader", "?"))}

    def _spawn(self) -> None:
        assert self.workdir is not None and self.socket_path is not None
        self.server = ServerProcess(
            [
                sys.executable,
                "-m",
                "walcache",
                "serve",
                "--data-dir",
                str(self.workdir / "data"),
                "--socket",
                self.socket_path,
                "--fsync",
                self.fsync,
                # Sized as a user would for this data set: index pre-sized for the keys,
                # and a memory cap that 100,000 x 4 KiB plus workload D's inserts stay under
                # (memcached gets the same room with -m).
                "--initial-capacity",
                str(max(self.expected_keys, 1024)),
                "--max-memory",
                "4G",
            ],
            self.workdir / "daemon.log",
        )
        self.server.spawn()

    def _wait_ready(self) -> None:
        import walcache

        assert self.socket_path is not None
        client_cls: Any = getattr(walcache, "Client")

        def probe() -> bool:
            c = client_cls(socket_path=self.socket_path)
            try:
                c.stats()
            finally:
                c.close()
            return True

        _wait_until(probe, START_TIMEOUT_S, "walcache daemon", self.server)

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        super().start(workdir, expected_keys)
        (workdir / "data").mkdir()
        self.socket_path = str(workdir / "walcache.sock")
        self._spawn()
        self._wait_ready()

    def connect(self) -> Store:
        assert self.socket_path is not None
        return _WalcacheStore(self.socket_path)

    def settle(self, timeout_s: float) -> float:
        # The daemon compacts its log on its own once enough of it is dead: a compactor
        # process runs beside the daemon until the snapshot is written.
        assert self.socket_path is not None
        import walcache

        client = getattr(walcache, "Client")(socket_path=self.socket_path)
        return _poll_until_idle(lambda: client.stats().get("compaction") is None, client.close, timeout_s, self)

    def restart_after_kill(self) -> float:
        assert self.server is not None
        self.server.kill()
        t0 = time.perf_counter()
        self._spawn()
        self._wait_ready()
        return time.perf_counter() - t0

    def stop(self) -> None:
        super().stop()
        if self.workdir is not None:
            self._unlink_leftover_shm()

    def _unlink_leftover_shm(self) -> None:
        # The daemon leaves its published table in place when it stops, on purpose:
        # readers keep serving the last state while it is down. The runner deletes the
        # data dir after each peer, so it also unlinks that data dir's segments.
        assert self.workdir is not None
        try:
            from walcache.paths import shm_namespace
        except ImportError:
            return
        prefix = shm_namespace(self.workdir / "data")
        shm_dir = Path("/dev/shm")
        if not shm_dir.is_dir():
            return
        for p in shm_dir.iterdir():
            if p.name.startswith(prefix):
                try:
                    p.unlink()
                    log.debug("unlinked shared memory %s", p.name)
                except OSError as exc:
                    self.notes.append(f"{self.id}: could not unlink shared memory {p.name}: {exc}")


# --------------------------------------------------------------------------- Redis


class _RedisStore(Store):
    def __init__(self, socket_path: str) -> None:
        import redis

        self._r = redis.Redis(unix_socket_path=socket_path)
        self.get = cast("Callable[[bytes], bytes | None]", self._r.get)
        self.put = cast("Callable[[bytes, bytes], None]", self._r.set)

    def load(self, items: Sequence[Pair]) -> None:
        # One pipeline of 1000 SETs is one AOF write and (for "always") one fsync.
        for i in range(0, len(items), 1000):
            pipe = self._r.pipeline(transaction=False)
            for k, v in items[i : i + 1000]:
                pipe.set(k, v)
            pipe.execute()

    def close(self) -> None:
        self._r.close()


class RedisPeer(Peer):
    pip_requires = ("redis[hiredis]",)
    apt_requires = ("redis-server",)
    supports_restart = True

    def __init__(self, appendfsync: str) -> None:
        super().__init__()
        self.appendfsync = appendfsync
        self.id = f"redis-{appendfsync}"
        self.name = "Redis"
        self.setting = f"appendonly yes, appendfsync {appendfsync} (redis-py, Unix socket)"
        if appendfsync == "always":
            self.survives_power_loss = "yes"
            self.durability = "yes: AOF fsync before the reply (group commit across clients)"
        else:
            self.survives_power_loss = "no"
            self.durability = "no: AOF fsync about once a second (loses up to ~1-2 s)"
        self.socket_path: str | None = None

    def check(self) -> None:
        if shutil.which("redis-server") is None:
            raise PeerUnavailable("redis-server binary not found (Debian package redis-server)")
        redis = _import("redis")
        self._hiredis = bool(getattr(getattr(redis, "utils", None), "HIREDIS_AVAILABLE", False))

    def versions(self) -> dict[str, str]:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
        v = {"redis-server": out.strip(), "redis-py": pip_version("redis") or "?"}
        hv = pip_version("hiredis")
        v["hiredis"] = f"{hv} (used by redis-py: {self._hiredis})" if hv else "not installed"
        return v

    def _spawn(self) -> None:
        assert self.workdir is not None and self.socket_path is not None
        self.server = ServerProcess(
            [
                "redis-server",
                "--port", "0",
                "--unixsocket", self.socket_path,
                "--unixsocketperm", "700",
                "--dir", str(self.workdir),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--daemonize", "no",
                "--logfile", "",
            ],
            self.workdir / "redis.log",
        )  # fmt: skip
        self.server.spawn()

    def _wait_ready(self) -> None:
        import redis

        assert self.socket_path is not None

        def probe() -> bool:
            r = redis.Redis(unix_socket_path=self.socket_path)
            try:
                # While the AOF loads, PING gets -LOADING (BusyLoadingError): not ready.
                return bool(r.ping())
            finally:
                r.close()

        _wait_until(probe, START_TIMEOUT_S, "redis-server", self.server)

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        super().start(workdir, expected_keys)
        self.socket_path = str(workdir / "redis.sock")
        self._spawn()
        self._wait_ready()

    def connect(self) -> Store:
        assert self.socket_path is not None
        return _RedisStore(self.socket_path)

    def settle(self, timeout_s: float) -> float:
        # Redis rewrites its AOF in a forked child once it has doubled (auto-aof-rewrite-*).
        import redis

        assert self.socket_path is not None
        r = redis.Redis(unix_socket_path=self.socket_path)

        def idle() -> bool:
            info = r.info("persistence")
            return not any(info.get(k) for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress"))

        return _poll_until_idle(idle, r.close, timeout_s, self)

    def restart_after_kill(self) -> float:
        assert self.server is not None
        self.server.kill()
        t0 = time.perf_counter()
        self._spawn()
        self._wait_ready()
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- memcached


class _MemcachedStore(Store):
    def __init__(self, socket_path: str) -> None:
        from pymemcache.client.base import Client  # type: ignore[import-untyped]

        # default_noreply=False: a set returns only after memcached said STORED.
        self._c: Any = Client(socket_path, default_noreply=False)
        self.get = self._c.get
        self.put = self._put

    def _put(self, key: bytes, value: bytes) -> None:
        if not self._c.set(key, value):
            raise RuntimeError("memcached did not store the value")

    def load(self, items: Sequence[Pair]) -> None:
        for i in range(0, len(items), 500):
            failed = self._c.set_many(dict(items[i : i + 500]))
            if failed:
                raise RuntimeError(f"memcached refused {len(failed)} keys during load")

    def close(self) -> None:
        self._c.close()


class MemcachedPeer(Peer):
    id = "memcached"
    name = "memcached"
    setting = "pymemcache, noreply=False, Unix socket, -m 4096"
    survives_power_loss = "no"
    durability = "no: memory only (lost on any restart)"
    pip_requires = ("pymemcache",)
    apt_requires = ("memcached",)

    def __init__(self) -> None:
        super().__init__()
        self.socket_path: str | None = None

    def check(self) -> None:
        if shutil.which("memcached") is None:
            raise PeerUnavailable("memcached binary not found (Debian package memcached)")
        _import("pymemcache.client.base")

    def versions(self) -> dict[str, str]:
        out = subprocess.run(["memcached", "-V"], capture_output=True, text=True, timeout=10).stdout
        return {"memcached": out.strip(), "pymemcache": pip_version("pymemcache") or "?"}

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        super().start(workdir, expected_keys)
        self.socket_path = str(workdir / "memcached.sock")
        # -s serves the Unix socket only (no TCP); memory sized so 100,000 x 4 KiB plus
        # inserts never evict (an eviction would show up as read misses).
        argv = ["memcached", "-s", self.socket_path, "-a", "0700", "-m", "4096", "-c", "1024"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without it
        self.server = ServerProcess(argv, workdir / "memcached.log")
        self.server.spawn()
        from pymemcache.client.base import Client

        def probe() -> bool:
            c = Client(self.socket_path, connect_timeout=1, timeout=1)
            try:
                c.version()
            finally:
                c.close()
            return True

        _wait_until(probe, START_TIMEOUT_S, "memcached", self.server)

    def connect(self) -> Store:
        assert self.socket_path is not None
        return _MemcachedStore(self.socket_path)


# --------------------------------------------------------------------------- diskcache


class _DiskcacheStore(Store):
    def __init__(self, directory: str) -> None:
        import diskcache  # type: ignore[import-untyped]

        self._c: Any = diskcache.Cache(directory)
        self.get = self._c.get
        self.put = self._c.set

    def load(self, items: Sequence[Pair]) -> None:
        for i in range(0, len(items), 1000):
            with self._c.transact():
                for k, v in items[i : i + 1000]:
                    self._c.set(k, v)

    def close(self) -> None:
        self._c.close()


class DiskcachePeer(Peer):
    id = "diskcache"
    name = "python-diskcache"
    setting = "diskcache.Cache defaults (SQLite WAL, synchronous=NORMAL)"
    survives_power_loss = "no"
    durability = "no: SQLite synchronous=NORMAL in WAL mode, commits not synced one by one"
    pip_requires = ("diskcache",)

    def check(self) -> None:
        _import("diskcache")

    def versions(self) -> dict[str, str]:
        return {"diskcache": pip_version("diskcache") or "?", "sqlite (diskcache)": sqlite3.sqlite_version}

    def connect(self) -> Store:
        assert self.workdir is not None
        return _DiskcacheStore(str(self.workdir / "diskcache"))


# --------------------------------------------------------------------------- LMDB

_LMDB_MAP_SIZE = 8 << 30  # address space only: the file grows as pages are used


class _LmdbStore(Store):
    def __init__(self, path: str) -> None:
        import lmdb

        self._env = lmdb.open(path, map_size=_LMDB_MAP_SIZE, sync=True, max_readers=256)
        self.get = self._get
        self.put = self._put

    def _get(self, key: bytes) -> bytes | None:
        # A new read txn per get: the reader sees the latest commit, as a cache user needs.
        with self._env.begin() as txn:
            value: bytes | None = txn.get(key)
            return value

    def _put(self, key: bytes, value: bytes) -> None:
        # One write txn per put: with sync=True the commit is durable when it returns.
        with self._env.begin(write=True) as txn:
            txn.put(key, value)

    def load(self, items: Sequence[Pair]) -> None:
        for i in range(0, len(items), 10000):
            with self._env.begin(write=True) as txn:
                for k, v in items[i : i + 10000]:
                    txn.put(k, v)

    def close(self) -> None:
        self._env.close()


class LmdbPeer(Peer):
    id = "lmdb"
    name = "LMDB"
    setting = "py-lmdb sync=True, 1 write txn per put, new read txn per get"
    survives_power_loss = "yes"
    durability = "yes: fdatasync (+ O_DSYNC meta page) per write txn"
    pip_requires = ("lmdb",)

    def check(self) -> None:
        _import("lmdb")

    def versions(self) -> dict[str, str]:
        import lmdb

        return {"py-lmdb": pip_version("lmdb") or "?", "LMDB C": ".".join(map(str, lmdb.version()))}

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        super().start(workdir, expected_keys)
        (workdir / "lmdb").mkdir()

    def connect(self) -> Store:
        assert self.workdir is not None
        return _LmdbStore(str(self.workdir / "lmdb"))


# --------------------------------------------------------------------------- sqlite3

_SQL_GET = "SELECT v FROM kv WHERE k = ?"
_SQL_PUT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"


class _SqliteStore(Store):
    def __init__(self, path: str) -> None:
        # Autocommit: every put is its own transaction, synced (FULL) before it returns.
        self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        self._execute = self._db.execute
        self.get = self._get
        self.put = self._put

    def _get(self, key: bytes) -> bytes | None:
        row = self._execute(_SQL_GET, (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def _put(self, key: bytes, value: bytes) -> None:
        self._execute(_SQL_PUT, (key, value))

    def load(self, items: Sequence[Pair]) -> None:
        for i in range(0, len(items), 10000):
            self._db.execute("BEGIN")
            self._db.executemany(_SQL_PUT, items[i : i + 10000])
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class SqlitePeer(Peer):
    id = "sqlite-full"
    name = "sqlite3"
    setting = "WAL, synchronous=FULL, autocommit upsert"
    survives_power_loss = "yes"
    durability = "yes: WAL synced on every commit"

    def versions(self) -> dict[str, str]:
        return {"sqlite3": sqlite3.sqlite_version}

    def start(self, workdir: Path, expected_keys: int = 0) -> None:
        super().start(workdir, expected_keys)
        self.connect().close()  # create the table once, before clients race to

    def connect(self) -> Store:
        assert self.workdir is not None
        return _SqliteStore(str(self.workdir / "kv.sqlite3"))


def all_peers() -> list[Peer]:
    """Every peer in table order: walcache first, then what a user would pick instead."""
    return [
        WalcachePeer("always"),
        WalcachePeer("interval"),
        RedisPeer("always"),
        RedisPeer("everysec"),
        MemcachedPeer(),
        DiskcachePeer(),
        LmdbPeer(),
        SqlitePeer(),
    ]

