"""End to end: a real daemon process, a real socket, real shared memory."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import walcache
from walcache.daemon.lock import DataDirLock
from walcache.daemon.walformat import parse_segment_name, parse_snapshot_name
from walcache.errors import DaemonUnavailable
from walcache.protocol import FRAME_HEADER, ServerProtocol
from walcache_testing import DaemonProcess, Workspace, unlink_segments



class _Forked:
    """A forked child the test waits for; killed and reaped on the way out if it was not."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reaped = False

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        return os.waitstatus_to_exitcode(status)

    def __enter__(self) -> _Forked:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)
            self.wait()


def _outcome_of(outcome: list[BaseException | None], call: Any, *args: Any) -> None:
    """Run ``call(*args)`` and append None, or the exception it raised (for a thread)."""
    try:
        call(*args)
        outcome.append(None)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        outcome.append(exc)

def test_put_get_delete_and_mapping_protocol(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        c.put("a", 1)
        c.put(b"a", b"raw")
        c.put(7, {"nested": [1, 2.5, None, b"x"]})
        c["n"] = None
        assert c.get("a") == 1
        assert c.get(b"a") == b"raw"
        assert c.get(7) == {"nested": [1, 2.5, None, b"x"]}
        assert c["n"] is None and "n" in c and "missing" not in c
        assert c.get("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            c["missing"]
        assert len(c) == 4
        assert set(c) == {"a", b"a", 7, "n"}
        assert c.delete("a") is True
        assert c.delete("a") is False
        del c["n"]
        with pytest.raises(KeyError):
            del c["n"]
        assert c.get_many(["a", b"a", 7]) == {b"a": b"raw", 7: {"nested": [1, 2.5, None, b"x"]}}
        c.put_many({f"k{i}": i for i in range(100)})
        assert c.delete_many([f"k{i}" for i in range(50)] + ["nope"]) == 50
        assert c.get("k49") is None and c.get("k50") == 50


def test_another_process_reads_what_was_acknowledged(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        c.put("shared", "from parent")
    code = (
        "import sys, walcache\n"
        f"c = walcache.Client({str(d.socket_path)!r})\n"
        "assert c.get('shared') == 'from parent', c.get('shared')\n"
        "c.put('reply', 'from child')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    with d.client() as c:
        assert c.get("reply") == "from child"


def test_ttl_expires_and_does_not_come_back_after_restart(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        c.put("short", 1, ttl=0.2)
        c.put("long", 2, ttl=3600)
        assert c.get("short") == 1
        time.sleep(0.35)
        assert c.get("short") is None and "short" not in c
        with pytest.raises(walcache.InvalidValue):
            c.put("bad", 1, ttl=0)
    d.kill()
    d.start()
    with d.client() as c:
        assert c.get("short") is None
        assert c.get("long") == 2


def test_reads_work_while_daemon_is_down_and_writes_fail_fast(ws: Workspace) -> None:
    d = ws.daemon().start()
    c = d.client(timeout=60)
    c.put("k", "v1")
    d.kill()
    assert c.get("k") == "v1"  # last published state, no daemon needed
    # Failing fast: the refused connection is the error, not the 60 s timeout running out.
    outcome: list[BaseException | None] = []
    t = threading.Thread(target=_outcome_of, args=(outcome, c.put, "k", "v2"))
    t.start()
    t.join(30)  # a hang guard only: a client waiting out its timeout is still here
    assert not t.is_alive(), "the put waited for the client's timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], walcache.DaemonUnavailable), outcome
    assert "Connection refused" in str(outcome[0]), outcome
    d.start()
    c.put("k", "v3")  # the same Client reconnects...
    assert c.get("k") == "v3"  # ...and remaps the new table
    c.close()


def test_sigterm_finishes_cleanly_and_removes_the_socket(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        c.put_many({i: str(i) for i in range(1000)})
    assert d.terminate() == 0
    assert not d.socket_path.exists()
    d.start()
    with d.client() as c:
        assert c.get(999) == "999" and len(c) == 1000


def test_socket_and_segment_are_private_by_default(ws: Workspace) -> None:
    d = ws.daemon().start()
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o600
    segs = [n for n in os.listdir("/dev/shm") if n.startswith(d.namespace)]
    assert segs
    for n in segs:
        assert stat.S_IMODE(os.stat("/dev/shm/" + n).st_mode) == 0o600


def test_second_daemon_on_the_same_data_dir_is_refused(ws: Workspace) -> None:
    d = ws.daemon().start()
    other = subprocess.run(
        [sys.executable, "-m", "walcache", "serve", "--data-dir", str(d.data_dir),
         "--socket", str(ws.root / "other.sock")],
        capture_output=True, text=True, timeout=30,
    )
    assert other.returncode != 0
    assert str(d.pid) in other.stderr  # names the pid that holds the lock


def test_limits_answer_with_clear_errors(ws: Workspace) -> None:
    d = ws.daemon().start("--max-key-bytes", "64", "--max-value-bytes", "1000", "--max-memory", "200K")
    with d.client() as c:
        with pytest.raises(walcache.KeyTooLarge, match="max_key_bytes=64"):
            c.put("k" * 100, 1)
        with pytest.raises(walcache.ValueTooLarge, match="max_value_bytes=1000"):
            c.put("k", b"x" * 1001)
        with pytest.raises(walcache.InvalidValue):
            c.put("k", {1, 2})  # type: ignore[arg-type]
        with pytest.raises(walcache.InvalidKey):
            c.put(1.5, 1)  # type: ignore[arg-type]
        stored = 0
        with pytest.raises(walcache.CacheFull, match="max_memory"):
            for i in range(10_000):
                c.put(f"fill{i}", b"v" * 900)
                stored += 1
        assert 0 < stored < 10_000
        assert c.get(f"fill{stored}") is None
        c.put("fill0", b"small")  # the daemon lives on and still takes writes that fit
    d.kill()
    d.start("--max-key-bytes", "64", "--max-value-bytes", "1000", "--max-memory", "200K")
    with d.client() as c:
        # Nothing was logged for the refused put: it does not appear after recovery.
        assert c.get(f"fill{stored}") is None
        assert c.get(f"fill{stored - 1}") == b"v" * 900
    assert "over --max-memory" not in d.log()
    d.stop()
    d.start("--max-key-bytes", "64", "--max-value-bytes", "1000", "--max-memory", "100K")  # lowered
    assert "over --max-memory 102400: puts that need more room are refused" in d.log()
    with d.client() as c:
        with pytest.raises(walcache.CacheFull):
            c.put("one more", b"v" * 900)
        assert c.delete_many([f"fill{i}" for i in range(1, stored)]) == stored - 1
        c.put("one more", b"v" * 900)  # deletes made room


def test_client_survives_fork(ws: Workspace) -> None:
    d = ws.daemon().start()
    c = d.client()
    c.put("before", 1)
    pid = os.fork()
    if pid == 0:  # child: its own socket, the shared mapping
        code = 1
        try:
            c.put("child", os.getpid())
            code = 0 if c.get("before") == 1 else 2
        finally:
            os._exit(code)
    with _Forked(pid) as child:
        c.put("parent", 1)  # the parent's socket is untouched by the child
        assert child.wait() == 0
    assert c.get("child") == pid and c.get("parent") == 1
    c.close()


def test_connect_starts_a_daemon_and_reuses_it(ws: Workspace) -> None:
    data = ws.root / "embedded"
    sock = ws.root / "emb.sock"
    c1 = walcache.connect(data, socket_path=sock)
    pid = DataDirLock(data).holder()  # the daemon connect() started, should stats() fail
    try:
        assert pid is not None and c1.stats()["pid"] == pid
        c1.put("x", 1)
        c2 = walcache.connect(data, socket_path=sock)
        assert c2.stats()["pid"] == pid and c2.get("x") == 1
        c2.close()
        # Its text log is in the data dir too, but is no part of the log's bytes.
        assert (data / "walcache.log").stat().st_size > 0
        owned = sum(p.stat().st_size for p in data.iterdir()
                    if parse_segment_name(p.name) is not None or parse_snapshot_name(p.name) is not None)  # fmt: skip
        assert c1.stats()["log_bytes"] == owned > 0
    finally:
        c1.close()
        assert pid is not None
        daemon = psutil.Process(pid)
        daemon.terminate()
        try:
            daemon.wait(10)  # and reaps it: connect() started it as a child of this process
        except psutil.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        from walcache.paths import shm_namespace

        unlink_segments(shm_namespace(data))


def test_stats_report_group_commit_and_reader(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        for i in range(20):
            c.put(i, i)
        s = c.stats()
    assert s["pid"] == d.pid and s["keys"] == 20 and s["fsync"] == "always"
    assert s["records"] >= 20 and s["batches"] >= 1 and s["commit_p50_us"] > 0
    assert s["reader"] in ("c", "python", "daemon")


def test_a_ttl_the_table_cannot_hold_is_refused_and_the_daemon_lives_on(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        with pytest.raises(walcache.InvalidValue, match="ttl"):
            c.put("k", 1, ttl=1e15)  # ~30 million years
        c.put("k", 2, ttl=3600)
    from tests_raw import raw_put_with_ttl_ms

    assert raw_put_with_ttl_ms(str(d.socket_path), 2**64 - 1) == "invalid_value"
    d.kill()
    d.start()  # nothing unloadable reached the log
    with d.client() as c:
        assert c.get("k") == 2


def test_a_child_forked_while_the_parent_holds_the_client_lock_does_not_deadlock(ws: Workspace) -> None:
    d = ws.daemon().start()
    c = d.client()
    c.put("k", 0)
    with c._lock:  # as if another parent thread were inside a request at fork time
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                c.put("k", os.getpid())
                code = 0
            finally:
                os._exit(code)
        closer = os.fork()  # a child that only closes the Client it inherited
        if closer == 0:
            code = 1
            try:
                c.close()
                code = 0
            finally:
                os._exit(code)
    deadline = time.monotonic() + 20
    for child in (pid, closer):
        while True:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                pytest.fail("the forked child deadlocked on the inherited client lock")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
    assert c.get("k") == pid
    c.put("k", "parent")  # the child's close left the parent's socket alone
    assert c.get("k") == "parent"
    c.close()


def test_a_daemon_that_stops_answering_times_the_request_out(ws: Workspace) -> None:
    # The client's timeout is the kernel's (SO_RCVTIMEO) since it stopped polling
    # before each recv: a stopped daemon must still turn into WalcacheTimeout, and
    # the same Client must work again once the daemon answers.
    d = ws.daemon().start()
    c = d.client(timeout=0.5)
    c.put("k", 1)
    outcome: list[BaseException | None] = []
    t = threading.Thread(target=_outcome_of, args=(outcome, c.put, "k", 2))
    os.kill(d.pid, signal.SIGSTOP)
    try:
        t.start()
        t.join(5)  # bounded: a missing timeout fails here instead of hanging
        assert not t.is_alive(), "the put did not time out"
        assert len(outcome) == 1 and isinstance(outcome[0], walcache.WalcacheTimeout), outcome
        assert "the write may or may not be applied" in str(outcome[0])
    finally:
        os.kill(d.pid, signal.SIGCONT)
        if t.ident is not None:
            t.join(10)
    c.put("k", 3)  # a fresh connection; the timed-out put may or may not have applied
    assert c.get("k") == 3
    c.close()


def test_busy_poll_reads_back_to_back_requests_and_backs_off_when_they_stop(ws: Workspace) -> None:
    """--busy-poll-us: requests that follow their reply closely are found by polling; once
    polls keep finding nothing, the daemon stops polling (one chance in 64) and sleeps.

    The window is 5 ms here so that a loaded machine still lands requests inside it."""
    from walcache.daemon.server import BUSY_POLL_MISSES, BUSY_POLL_REPROBE

    d = ws.daemon("--busy-poll-us", "5000").start()
    with d.client() as c:
        for i in range(200):
            c.put(f"k{i}", i)
        s = c.stats()
        assert s["busy_poll_hits"] >= 100, s  # most puts were read by a poll, not a wake-up
        assert all(c.get(f"k{i}") == i for i in range(200))
        # Far apart: each poll finds nothing, until the daemon stops trying.
        polls = s["busy_polls"]
        hits = s["busy_poll_hits"]
        for i in range(12):
            time.sleep(0.03)
            c.put(f"slow{i}", i)
        s = c.stats()
        # 13 requests (12 puts, then this stats call) each gave a chance to poll; with the
        # back-off only BUSY_POLL_MISSES polls ran, and at most one re-probe (one chance in
        # BUSY_POLL_REPROBE, more than 13), which may have caught the stats request.
        assert BUSY_POLL_REPROBE > 13
        assert s["busy_polls"] - polls <= BUSY_POLL_MISSES + 1, s
        assert s["busy_poll_hits"] - hits <= 1, s
    off = ws.daemon("--busy-poll-us", "0", name="off").start()
    with off.client() as c:
        for i in range(50):
            c.put(f"k{i}", i)
        assert c.stats()["busy_polls"] == 0


def test_parent_and_child_use_the_client_concurrently_after_fork(ws: Workspace) -> None:
    """After a fork both sides send at once and tell their replies apart (a put then a delete
    that finds the key in the child, deletes of absent keys in the parent): a child that kept the
    parent's socket would take some of the parent's replies (a wrong bool, or a request id out of
    order), which identical replies would hide."""
    d = ws.daemon().start()
    c = d.client()
    c.put("before", 1)  # connected before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, b"go")
            for i in range(300):
                c.put(f"c{i}", i)
                if c.delete(f"c{i}") is not True:
                    os._exit(2)
            code = 0
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    with _Forked(pid) as child:
        assert os.read(r, 2) == b"go"
        for i in range(300):
            assert c.delete(f"nope{i}") is False  # replies that are the parent's own
        assert child.wait() == 0
    os.close(r)
    c.close()


def _proxy(listen: socket.socket, target: str, forward: int, farewell: bytes | None, cut: threading.Event) -> None:
    """Forward unix-socket connections to the daemon. On the first one, forward ``forward``
    replies; then, with ``farewell``, send it and close at once; without, lose the next reply
    and close. ``cut`` is set once the first connection is closed."""
    first = True
    while True:
        try:
            cs, _ = listen.accept()
        except OSError:
            return
        ds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ds.connect(target)
        limit = forward if first else None
        first = False

        def up(cs: socket.socket = cs, ds: socket.socket = ds) -> None:
            try:
                while data := cs.recv(65536):
                    ds.sendall(data)
            except OSError:
                pass

        def close(cs: socket.socket, ds: socket.socket) -> None:
            cs.shutdown(socket.SHUT_RDWR)
            cs.close()
            ds.close()
            cut.set()

        def down(cs: socket.socket = cs, ds: socket.socket = ds, limit: int | None = limit) -> None:
            buf, sent = b"", 0
            try:
                while data := ds.recv(65536):
                    if limit is None:
                        cs.sendall(data)
                        continue
                    buf += data
                    while len(buf) >= FRAME_HEADER.size and len(buf) >= FRAME_HEADER.size + FRAME_HEADER.unpack_from(buf)[0]:
                        n = FRAME_HEADER.size + FRAME_HEADER.unpack_from(buf)[0]
                        if sent == limit:  # the daemon answered: lose the answer, cut the connection
                            close(cs, ds)
                            return
                        cs.sendall(buf[:n])
                        buf, sent = buf[n:], sent + 1
                        if sent == limit and farewell is not None:
                            cs.sendall(farewell)
                            close(cs, ds)
                            return
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        threading.Thread(target=down, daemon=True).start()


@contextlib.contextmanager
def proxy_to(d: DaemonProcess, ws: Workspace, forward: int, farewell: bytes | None = None) -> Iterator[tuple[str, threading.Event]]:
    path = str(ws.root / "proxy.sock")
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(path)
    listen.listen(8)
    cut = threading.Event()
    threading.Thread(target=_proxy, args=(listen, str(d.socket_path), forward, farewell, cut), daemon=True).start()
    try:
        yield path, cut
    finally:
        listen.shutdown(socket.SHUT_RDWR)  # wakes the proxy's accept()
        listen.close()


def test_a_write_whose_reply_was_lost_is_not_resent(ws: Workspace) -> None:
    """A proxy forwards the hello's reply, then loses the put's reply and cuts the connection:
    the put was logged and applied, so the client must raise DaemonUnavailable (the outcome is
    unknown to it) rather than send it again; the log holds it once."""
    d = ws.daemon().start()
    with proxy_to(d, ws, forward=1) as (path, _):
        c = walcache.Client(path, timeout=5)  # reply 1 (hello) goes through
        with pytest.raises(walcache.DaemonUnavailable):
            c.put("k", 1)  # applied by the daemon, its reply lost
        with d.client() as direct:
            assert direct.stats()["last_seqno"] == 1  # logged once: the client did not resend it
        assert c.get("k") == 1
        c.close()


def test_a_reason_sent_before_closing_beats_a_broken_pipe(ws: Workspace) -> None:
    """The connection is closed with a reply of id 0 before the client's next request (as a
    daemon that refuses a connection does, if it is faster than the client's hello): the
    client's send fails with a broken pipe, and it raises the reason it was sent instead."""
    d = ws.daemon().start()
    reason = DaemonUnavailable("the daemon refused the connection: test reason")
    with proxy_to(d, ws, forward=1, farewell=ServerProtocol.error(0, reason)) as (path, cut):
        c = walcache.Client(path, timeout=5)
        assert cut.wait(10)
        with pytest.raises(walcache.DaemonUnavailable, match="test reason"):
            c.put("k", 1)
        c.close()
    with d.client() as direct:
        assert direct.stats()["last_seqno"] == 0  # nothing reached the daemon


def test_every_call_on_a_closed_client_raises_walcache_error(ws: Workspace) -> None:
    d = ws.daemon().start()
    c = d.client()
    c.put("k", 1)
    c.close()
    c.close()  # idempotent
    calls = {
        "get": lambda: c.get("k"), "[]": lambda: c["k"], "in": lambda: "k" in c, "len": lambda: len(c),
        "iter": lambda: list(c), "keys_with_prefix": lambda: list(c.keys_with_prefix("k")),
        "get_many": lambda: c.get_many(["k"]), "put": lambda: c.put("k", 2), "delete": lambda: c.delete("k"),
        "put_many": lambda: c.put_many({"k": 2}), "delete_many": lambda: c.delete_many(["k"]),
        "stats": c.stats, "compact": c.compact,
    }  # fmt: skip
    for name, call in calls.items():
        try:
            call()
        except walcache.WalcacheError as exc:
            assert "closed" in str(exc), (name, exc)
        else:
            raise AssertionError(f"{name} on a closed Client did not raise")
    with d.client() as again:
        assert again.get("k") == 1  # closing changed nothing but that Client


def test_a_socket_and_a_data_dir_of_two_daemons_are_refused(ws: Workspace) -> None:
    a, b = ws.daemon(name="a").start(), ws.daemon(name="b").start()
    with b.client() as cb:
        cb.put("only-b", 1)
    for _ in ("b running", "b stopped"):  # stopped, b's last table would still be readable
        with pytest.raises(walcache.ConfigError, match="serves another data dir"):
            walcache.Client(a.socket_path, data_dir=b.data_dir)
        b.stop()
    with walcache.Client(a.socket_path, data_dir=a.data_dir) as ca:
        assert ca.get("only-b") is None


def test_a_socket_that_is_not_walcache_is_named_as_such(ws: Workspace) -> None:
    path = ws.root / "http.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(walcache.ProtocolError, match="is this a walcache daemon's socket"):
            walcache.Client(path, timeout=10)
    finally:
        t.join(10)
        srv.close()


def test_connect_starts_a_daemon_again_after_one_stopped_and_leaves_no_zombie(ws: Workspace) -> None:
    """The stopped daemon's table stays in /dev/shm (readers go on): connect() must still see
    that no daemon runs and start one, and the daemons it starts are reaped when they exit."""
    from walcache.paths import shm_namespace

    data, sock = ws.root / "embedded", ws.root / "emb.sock"
    pids: list[int] = []
    try:
        for round_ in range(2):
            with walcache.connect(data, socket_path=sock) as c:
                pid = c.stats()["pid"]
                pids.append(pid)
                if round_:
                    assert c.get("a") == 1  # the first daemon's write, recovered
                c.put("a", 1)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20  # a hang guard: the reaper thread waits for it
            while psutil.pid_exists(pid):
                assert time.monotonic() < deadline, f"daemon {pid} left a zombie ({psutil.Process(pid).status()})"
                time.sleep(0.02)
        assert pids[0] != pids[1]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unlink_segments(shm_namespace(data))


def _put_and_read_back(arg: tuple[walcache.Client, int]) -> object:
    client, i = arg
    client.put(f"p{i}", i)
    return client.get(f"p{i}")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_client_passed_to_a_pool_reopens_in_the_worker(ws: Workspace, method: str) -> None:
    """A Client pickles as how to open it again (socket, timeout, data dir): each worker gets
    its own connection to the same daemon and table."""
    import multiprocessing as mp

    d = ws.daemon().start()
    with walcache.Client(d.socket_path, data_dir=d.data_dir) as c:
        with mp.get_context(method).Pool(2) as pool:
            got = pool.map(_put_and_read_back, [(c, i) for i in range(6)])
        assert got == list(range(6))
        assert c.get_many([f"p{i}" for i in range(6)]) == {f"p{i}": i for i in range(6)}
        again = pickle.loads(pickle.dumps(c))
        assert again.namespace == c.namespace and again.socket_path == c.socket_path
        again.close()


def test_a_client_unpickled_while_the_daemon_is_down_reads_and_its_writes_fail_fast(ws: Workspace) -> None:
    """Unpickling must not fail for want of a daemon (a pool's worker would die of it and the
    pool wait forever): the pickle carries the table's name, so reads work without one."""
    d = ws.daemon().start()
    with walcache.Client(d.socket_path) as c:  # no data dir: the name comes from the daemon
        c.put("k", 1)
        data = pickle.dumps(c)
    d.stop()
    again = pickle.loads(data)
    try:
        assert again.get("k") == 1
        with pytest.raises(walcache.DaemonUnavailable):
            again.put("k", 2)
    finally:
        again.close()
