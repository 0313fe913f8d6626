"""Garbage on the socket never stops the daemon nor touches other clients' data."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

import walcache
from walcache.protocol import ClientProtocol
from walcache_testing import Workspace

SEED = 7


def raw_conn(path: str, hello: bool = True) -> tuple[socket.socket, ClientProtocol]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    proto = ClientProtocol()
    if hello:
        s.sendall(proto.hello()[1])
        assert read_reply(s, proto).ok
    return s, proto


def read_reply(s: socket.socket, proto: ClientProtocol):  # type: ignore[no-untyped-def]
    while True:
        r = proto.next_reply()
        if r is not None:
            return r
        data = s.recv(65536)
        assert data, "connection closed"
        proto.receive_data(data)


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


def test_garbage_on_the_socket_leaves_daemon_and_other_clients_alone(ws: Workspace) -> None:
    d = ws.daemon().start()
    good = d.client()
    good.put("keep", "safe")
    rng = random.Random(SEED)
    path = str(d.socket_path)
    attacks = [
        struct.pack("<I", 2**31) + b"x" * 16,  # huge length prefix
        struct.pack("<I", 0),
        frame([1, "put", ["not bytes", 0, b"v", None]]),  # wrong types before hello
        frame("just a string"),
        struct.pack("<I", 100) + b"half a frame",  # then close
    ] + [bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) for _ in range(30)]
    for i, payload in enumerate(attacks):
        s, _ = raw_conn(path, hello=bool(i % 2))
        try:
            s.sendall(payload)
        except OSError:
            pass
        s.close()
    # Wrong types after a proper hello get an error reply and the connection lives on.
    s, proto = raw_conn(path)
    s.sendall(frame([50, "put", ["k", 0, b"v", None]]))
    r = read_reply(s, proto)
    assert r.req_id == 50 and not r.ok
    s.sendall(frame([51, "put", [b"sk", 0, b"\xc1", None]]))  # not msgpack
    r = read_reply(s, proto)
    assert r.req_id == 51 and not r.ok and "malformed" in str(r.value)
    s.sendall(proto.request("ping")[1])
    assert read_reply(s, proto).value == "pong"
    s.close()
    assert d.proc is not None and d.proc.poll() is None
    assert good.get("keep") == "safe"
    good.put("after", 1)
    assert good.get("after") == 1 and good.stats()["keys"] == 2
    good.close()


def test_pipelined_requests_keep_their_order_per_connection(ws: Workspace) -> None:
    d = ws.daemon().start()
    s, proto = raw_conn(str(d.socket_path))
    rng = random.Random(SEED)
    sent: list[tuple[int, str]] = []
    stream = b""
    for i in range(300):
        op = rng.choice(["put", "get", "ping", "delete"])
        key = b"s" + str(rng.randrange(5)).encode()
        if op == "put":
            req_id, data = proto.request("put", key, 2, str(i).encode(), None)
        elif op == "get":
            req_id, data = proto.request("get", key)
        elif op == "delete":
            req_id, data = proto.request("delete", key)
        else:
            req_id, data = proto.request("ping")
        sent.append((req_id, op))
        stream += data
    s.sendall(stream)  # all of it before reading any reply
    model: dict[bytes, bytes] = {}
    rng = random.Random(SEED)
    for i, (req_id, op) in enumerate(sent):
        r = read_reply(s, proto)
        assert r.req_id == req_id and r.ok
    s.close()
    # Replaying the same choices against a dict: the final state must match.
    for i in range(300):
        op = rng.choice(["put", "get", "ping", "delete"])
        key = b"s" + str(rng.randrange(5)).encode()
        if op == "put":
            model[key] = str(i).encode()
        elif op == "delete":
            model.pop(key, None)
    with d.client() as c:
        for k in range(5):
            expected = model.get(b"s" + str(k).encode())
            assert c.get(str(k)) == (expected.decode() if expected is not None else None)


def test_reads_in_a_pipeline_see_the_writes_before_them(ws: Workspace) -> None:
    d = ws.daemon().start()
    s, proto = raw_conn(str(d.socket_path))
    stream = b""
    for i in range(50):
        stream += proto.request("put", b"sk", 2, str(i).encode(), None)[1]
        stream += proto.request("get", b"sk")[1]
    s.sendall(stream)
    for i in range(50):
        assert read_reply(s, proto).ok
        r = read_reply(s, proto)
        assert r.value == [2, str(i).encode()]
    s.close()


def wait_for_socket(path: Path) -> None:
    """For a daemon whose readiness check cannot connect (it refuses our uid)."""
    for _ in range(500):
        if path.exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"no socket at {path} after 10 s")


def test_allowlist_refuses_other_uids(ws: Workspace) -> None:
    d = ws.daemon().start("--allow-uids", "4000000", wait=False)
    wait_for_socket(d.socket_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.socket_path))
    proto = ClientProtocol()
    data = s.recv(65536)
    proto.receive_data(data)
    r = proto.next_reply()
    assert r is not None and not r.ok and "allow_uids" in str(r.value)
    s.close()


def test_a_refused_client_is_told_why(ws: Workspace) -> None:
    """--max-connections: a Client past the limit gets the daemon's reason as DaemonUnavailable,
    whichever comes first, the daemon's close or the client's hello (a broken pipe or a reply
    with id 0 before the fix); once a connection is free, the same Client connects."""
    d = ws.daemon().start("--max-connections", "1")
    with d.client() as first:
        first.put("k", b"v")
        for _ in range(20):
            with pytest.raises(walcache.DaemonUnavailable, match=r"refused the connection: it has 1 already \(--max-connections\)"):
                d.client()
        late = walcache.Client(d.socket_path, data_dir=d.data_dir)  # reads work without a socket
        assert late.get("k") == b"v"
        with pytest.raises(walcache.DaemonUnavailable, match="--max-connections"):
            late.put("k2", b"w")
    for _ in range(100):  # the daemon drops the closed connection in its next round
        try:
            late.put("k2", b"w")
            break
        except walcache.DaemonUnavailable:
            time.sleep(0.05)
    assert late.get("k2") == b"w"
    late.close()


def test_a_uid_outside_the_allowlist_is_told_why(ws: Workspace) -> None:
    d = ws.daemon().start("--allow-uids", "4000000", wait=False)
    wait_for_socket(d.socket_path)
    for _ in range(5):
        with pytest.raises(walcache.DaemonUnavailable, match="not in allow_uids"):
            d.client()


FAULTY_SERVE = Path(__file__).resolve().parents[1] / "faulty_serve.py"


def test_a_full_dev_shm_refuses_a_put_many_whole_and_the_daemon_lives_on(ws: Workspace) -> None:
    """/dev/shm fills up (through the table's seam, 4 MiB): a put_many that does not fit is refused
    whole with CacheFull before it is logged; none of it is visible, the daemon keeps serving,
    and a restart finds every acknowledged write and nothing of the refused batch."""
    d = ws.daemon()
    d.launcher = [sys.executable, str(FAULTY_SERVE), "--shm-limit", str(4 << 20)]
    d.start()
    acked = {f"k{i}": b"v" * 1000 for i in range(20)}
    big = {f"big{i}": bytes([i]) * 30_000 for i in range(150)}  # 4.5 MB: more than is left
    with d.client() as c:
        for k, v in acked.items():
            c.put(k, v)
        with pytest.raises(walcache.CacheFull, match="/dev/shm is full"):
            c.put_many(big)
        assert c.get_many(list(big)) == {}  # none of it, not a part
        assert c.get_many(list(acked)) == acked
        c.put("after", b"x")
        acked["after"] = b"x"
        small = {f"s{i}": b"y" * 30_000 for i in range(10)}
        c.put_many(small)
        acked.update(small)
        assert c.get_many(list(acked)) == acked
        assert c.stats()["pid"] == d.pid
    assert d.terminate() == 0
    d.launcher = [sys.executable, "-m", "walcache"]  # the next start has all of /dev/shm
    d.start()
    with d.client() as c:
        assert c.get_many([*acked, *big]) == acked
        assert len(c) == len(acked)


@pytest.mark.parametrize("connections", [1, 2], ids=["loop-thread-sync", "flusher-sync"])
def test_a_failed_fdatasync_is_never_acked_nor_applied_and_stops_the_daemon(ws: Workspace, connections: int) -> None:
    """The log's fdatasyncs fail with EIO from the 4th on (through FaultyFileOps): the put whose
    sync failed gets LogFailed and is not published, the daemon exits 1, and the next start finds
    every put acknowledged before. One connection syncs on the loop thread; with a second one
    open the flusher thread does."""
    d = ws.daemon()
    d.launcher = [sys.executable, str(FAULTY_SERVE), "--fail-fsync-from", "4"]
    d.start()
    idle = [d.client() for _ in range(connections - 1)]
    for c in idle:
        c.ping()
    acked: dict[str, bytes] = {}
    failed = None
    with d.client() as c:
        for i in range(10):
            try:
                c.put(f"k{i}", b"v%d" % i)
            except walcache.LogFailed:
                failed = f"k{i}"
                break
            acked[f"k{i}"] = b"v%d" % i
        assert failed is not None and acked, "the 4th fdatasync should fail a put"
        assert c.get(failed) is None  # never published
        assert c.get_many(list(acked)) == acked
    assert d.proc is not None and d.proc.wait(30) == 1
    assert "fdatasync" in d.log()
    for c in idle:
        c.close()
    d.launcher = [sys.executable, "-m", "walcache"]
    d.start()
    with d.client() as c:
        assert c.get_many(list(acked)) == acked


def _fill_the_disk(sock: str, wid: int, go: Any, freed: Any, out: Any) -> None:
    """A writer process: 1 KiB puts until the log is full (LogFull seen 5 times), then, once
    the test freed space, 20 more. Reports the keys acknowledged and the keys refused."""
    acked, refused = [], []
    try:
        with walcache.Client(sock, timeout=30) as c:
            go.wait(30)
            i = 0
            while len(refused) < 5 and i < 5000:
                key = f"w{wid}-{i}"
                i += 1
                try:
                    c.put(key, b"%d" % i + b"v" * 1020)
                    acked.append(key)
                except walcache.LogFull:
                    refused.append(key)
            out.put(("full", wid, len(refused)))
            freed.wait(60)
            for j in range(20):
                key = f"w{wid}-after{j}"
                c.put(key, b"after")
                acked.append(key)
        out.put(("done", wid, acked, refused))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", wid, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("writers", [1, 3], ids=["loop-thread", "flusher-and-groups-in-flight"])
def test_a_full_disk_refuses_writes_with_log_full_and_the_daemon_lives_on(ws: Workspace, writers: int) -> None:
    """The log's file system has room for its first extent and 100 KiB (through FaultyFileOps):
    when the next extent does not fit, writes are refused with LogFull, unlogged and unapplied,
    the daemon serves on, and once space is freed (SIGUSR1 to the seam) writes succeed again.
    With several writer processes, groups encoded behind the refused one are refused too (their
    seqnos are taken back). Every acknowledged write survives a restart; no refused one appears."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    limit = 1 << 20
    d = ws.daemon("--max-memory", str(limit), "--max-value-bytes", "64K")
    d.launcher = [sys.executable, str(FAULTY_SERVE), "--disk-free", str((256 << 10) + 64 + (100 << 10))]
    d.start()
    go, freed, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_fill_the_disk, args=(str(d.socket_path), w, go, freed, out)) for w in range(writers)]
    for p in procs:
        p.start()
    try:
        go.set()
        reports = [out.get(timeout=120) for _ in procs]
        assert all(r[0] == "full" and r[2] == 5 for r in reports), reports
        with d.client() as c:
            assert c.stats()["log_full_refusals"] >= 5 * writers
            assert c.get("absent") is None  # reads go on
            # Compaction needs the next segment: it fails with the LogFull, the daemon does not.
            with pytest.raises(walcache.LogFull, match="no disk space to start segment"):
                c.compact()
        os.kill(d.pid, signal.SIGUSR1)  # space freed
        freed.set()
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(r[0] == "done" for r in results), results
    acked = {k for r in results for k in r[2]}
    refused = {k for r in results for k in r[3]}
    assert acked and refused and not acked & refused
    with d.client() as c:
        assert c.compact()["status"] == "done"
        # The refused writes no longer count against --max-memory: the table fills up to it.
        i = 0
        with pytest.raises(walcache.CacheFull):
            while True:
                c.put(f"fill{i}", b"f" * 1020)
                acked.add(f"fill{i}")
                i += 1
        assert c.stats()["live_bytes"] > limit - 2 * 1100, c.stats()["live_bytes"]
    log = d.log()
    assert "no disk space to extend" in log and "LogFailed" not in log
    for restarted in (False, True):
        if restarted:  # what a restart recovers from the log
            assert d.terminate() == 0
            d.launcher = [sys.executable, "-m", "walcache"]
            d.start()
        with d.client() as c:
            got = c.get_many([*acked, *refused])
            assert set(got) == acked, (sorted(refused & set(got))[:5], sorted(acked - set(got))[:5])


def test_max_memory_holds_for_a_pipelined_burst(ws: Workspace) -> None:
    """600 puts of 900 B pipelined in one send, three times --max-memory: the writes logged but not
    yet applied count against the limit too, so the table never grows past it."""
    limit = 200 << 10
    d = ws.daemon().start("--max-key-bytes", "64", "--max-value-bytes", "1000", "--max-memory", str(limit))
    s, proto = raw_conn(str(d.socket_path))
    s.sendall(b"".join(proto.request("put", b"sfill%d" % i, 1, b"v" * 900, None)[1] for i in range(600)))
    replies = [read_reply(s, proto) for _ in range(600)]
    s.close()
    assert any(not r.ok and isinstance(r.value, walcache.CacheFull) for r in replies)
    with d.client() as c:
        assert c.stats()["live_bytes"] <= limit


def test_a_socket_path_that_is_not_a_socket_is_refused_and_left_alone(ws: Workspace) -> None:
    """A wrong --socket must never delete what is there: a file of the log, say."""
    d = ws.daemon().start()
    with d.client() as c:
        for i in range(20):
            c.put(f"k{i}", i)
    d.stop()
    (seg,) = sorted(d.data_dir.glob("wal-*.log"))
    other = ws.root / "notes.txt"
    other.write_text("precious")
    (ws.root / "adir").mkdir()
    before = seg.read_bytes()
    for wrong, what in ((seg, "a file"), (other, "a file"), (ws.root / "adir", "a directory")):
        r = subprocess.run(
            [sys.executable, "-m", "walcache", "serve", "--data-dir", str(d.data_dir), "--socket", str(wrong)],
            capture_output=True, timeout=60,
        )
        assert r.returncode == 2, r
        assert f"--socket {wrong} is {what}, not a socket".encode() in r.stderr, r.stderr
    assert seg.read_bytes() == before and other.read_text() == "precious" and (ws.root / "adir").is_dir()
    d.start()
    with d.client() as c:
        assert c.get_many([f"k{i}" for i in range(20)]) == {f"k{i}": i for i in range(20)}


def test_the_daemon_raises_its_soft_fd_limit_to_fit_max_connections(ws: Workspace) -> None:
    d = ws.daemon("--max-connections", "1000")
    d.launcher = ["prlimit", "--nofile=32:4096", sys.executable, "-m", "walcache"]
    d.start()
    limits = Path(f"/proc/{d.pid}/limits").read_text()
    (line,) = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
    assert line.split()[3:5] == ["1064", "4096"], line  # 1000 connections + 64 besides
    assert "RLIMIT_NOFILE is" not in d.log()  # it fits: no warning


def test_out_of_file_descriptors_refuses_connections_with_a_reason(ws: Workspace) -> None:
    """Under a hard RLIMIT_NOFILE below --max-connections the daemon warns at start, refuses
    what does not fit with a message (not a silent backlog, not a log line per attempt
    of a busy accept loop), and serves again once connections close."""
    d = ws.daemon()
    d.launcher = ["prlimit", "--nofile=48:48", sys.executable, "-m", "walcache"]
    d.start()
    assert "RLIMIT_NOFILE is 48" in d.log()
    socks, refused = [], []
    try:
        for _ in range(80):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket_path))
            socks.append(s)
        # A refused connection gets its reply at once; an accepted one waits for our hello.
        waiting = list(socks)
        while True:
            ready = select.select(waiting, [], [], 1.0)[0]
            if not ready:
                break
            for s in ready:
                waiting.remove(s)
                data = s.recv(4096)
                if data:
                    refused.append(msgpack.unpackb(data[4:]))
    finally:
        for s in socks:
            s.close()
    assert refused, "no connection was refused although the descriptors ran out"
    assert all(r[0] == 0 and "out of file descriptors" in r[2][1] for r in refused), refused[:3]
    # The ones that fitted were accepted; every one past the 48 descriptors was refused (none
    # left in the backlog: the spare descriptor is back after each refusal).
    assert 80 - 48 <= len(refused) < 80, len(refused)
    log = d.log()
    assert log.count("out of file descriptors") <= 2, log[-2000:]  # held back, not one per attempt
    deadline = time.monotonic() + 30  # a hang guard: the daemon closes the dropped connections
    while True:
        try:
            with d.client() as c:
                c.put("after", 1)
                assert c.get("after") == 1
            break
        except walcache.DaemonUnavailable:
            assert time.monotonic() < deadline, "the daemon did not take connections again"
            time.sleep(0.05)


def test_keys_values_and_ttls_that_cannot_be_stored_are_named_errors(ws: Workspace) -> None:
    """Not UnicodeEncodeError, OverflowError or int-to-str ValueError from deep inside."""
    from walcache.shm.reader import ShmReader

    d = ws.daemon().start()
    surrogate, huge = "\ud800", 10**5000
    with d.client() as c:
        cases = {
            "put surrogate key": (lambda: c.put(surrogate, 1), walcache.InvalidKey),
            "get surrogate key": (lambda: c.get(surrogate), walcache.InvalidKey),
            "put huge int key": (lambda: c.put(huge, 1), walcache.InvalidKey),
            "get huge int key": (lambda: c.get(huge), walcache.InvalidKey),
            "surrogate value": (lambda: c.put("k", surrogate), walcache.InvalidValue),
            "surrogate in a list": (lambda: c.put("k", [surrogate]), walcache.InvalidValue),
            "ttl 1e300": (lambda: c.put("k", 1, ttl=1e300), walcache.InvalidValue),
            "ttl 2**70": (lambda: c.put("k", 1, ttl=2**70), walcache.InvalidValue),
        }
        for name, (call, error) in cases.items():
            try:
                call()
            except error:
                continue
            raise AssertionError(f"{name}: no {error.__name__}")
        with ShmReader(d.namespace) as r:  # the pure-Python reader too
            for key in (surrogate, huge):
                with pytest.raises(walcache.InvalidKey):
                    r.lookup(key)
        c.put("k", 1, ttl=3600)
        assert c.get("k") == 1 and c.stats()["keys"] == 1  # nothing else was stored


def test_a_request_past_the_frame_limit_is_value_too_large_and_the_connection_lives(ws: Workspace) -> None:
    d = ws.daemon("--max-frame-bytes", "8K", "--max-value-bytes", "1K", "--max-key-bytes", "64").start()
    with d.client() as c:
        c.put("before", 1)
        with pytest.raises(walcache.ValueTooLarge, match="--max-frame-bytes 8192"):
            c.put("big", b"x" * 20_000)
        with pytest.raises(walcache.ValueTooLarge, match="split the batch"):
            c.put_many({f"k{i}": b"x" * 1000 for i in range(10)})
        c.put("after", 2)  # the same connection, never closed by the daemon
        assert c.get_many(["before", "big", "k0", "after"]) == {"before": 1, "after": 2}
        assert c.stats()["connections"] == 1


@pytest.mark.parametrize("timeout", [None, "5", 0, -1, float("nan"), float("inf"), True])
def test_a_client_timeout_that_is_not_a_positive_number_is_a_config_error(ws: Workspace, timeout: object) -> None:
    with pytest.raises(walcache.ConfigError, match="timeout must be a positive number of seconds"):
        walcache.Client(ws.root / "none.sock", timeout=timeout)  # type: ignore[arg-type]


def test_batches_take_pairs_and_buffers_and_name_what_they_cannot_take(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        c.put_many([("a", 1), (b"b", 2)])  # pairs, as dict.update takes them
        c.put_many((k, v) for k, v in {"g": 3}.items())
        assert c.get_many(["a", b"b", "g"]) == {"a": 1, b"b": 2, "g": 3}
        # bytearray / memoryview keys read as bytes (the result is keyed by their bytes)
        assert c.get_many([bytearray(b"b"), memoryview(b"b"), b"nope"]) == {b"b": 2}
        with pytest.raises(walcache.InvalidValue, match="mapping or \\(key, value\\) pairs"):
            c.put_many(["abc"])
        with pytest.raises(walcache.InvalidValue, match="tuple keys"):
            c.put("dk", {(1, 2): 3})
        assert c.get("dk") is None and len(c) == 3


def test_wrong_arguments_say_which_one(ws: Workspace) -> None:
    d = ws.daemon().start()
    s, proto = raw_conn(str(d.socket_path))
    s.sendall(proto.request("put", b"sk", "1", b"v", None)[1])
    r = read_reply(s, proto)
    assert not r.ok and "wrong arguments for put: argument 1 (str)" in str(r.value), r.value
    s.sendall(proto.request("delete")[1])
    r = read_reply(s, proto)
    assert not r.ok and "wrong arguments for delete: 0 arguments, not 1" in str(r.value), r.value
    s.close()


def test_table_files_removed_under_a_running_daemon_come_back(ws: Workspace) -> None:
    """RemoveIPC at a user's logout (or an rm in /dev/shm) removes the table's files: within a
    tick the daemon puts them back; new clients attach and old ones read new writes."""
    d = ws.daemon().start()
    with d.client(data_dir=d.data_dir) as old:
        old.put("k", 1)
        for n in os.listdir("/dev/shm"):
            if n.startswith(d.namespace):
                os.unlink("/dev/shm/" + n)
        deadline = time.monotonic() + 30  # a hang guard: the daemon's tick is 1 s
        while True:
            try:
                new = walcache.Client(d.socket_path, data_dir=d.data_dir)
                break
            except walcache.TableUnavailable:
                assert time.monotonic() < deadline, "the table's names did not come back"
                time.sleep(0.05)
        with new:
            new.put("k", 2)
            assert new.get("k") == 2 and old.get("k") == 2
            old.put("k2", 3)
            assert new.get("k2") == 3 and old.get("k2") == 3
    assert "had been removed from /dev/shm: restored" in d.log()


def test_a_data_dir_moved_under_the_daemon_stops_it_within_a_tick(ws: Workspace) -> None:
    """mv data moved && mkdir data: the log goes on in the moved directory, but a second
    daemon could take the old path (and the table's namespace). The daemon stops (exit 1)
    at its next tick; the moved directory holds every acknowledged write."""
    d = ws.daemon()
    d.start()
    with d.client() as c:
        for i in range(50):
            c.put(f"k{i}", i)
    moved = ws.root / "moved"
    d.data_dir.rename(moved)
    d.data_dir.mkdir()
    assert d.proc is not None and d.proc.wait(30) == 1  # 30 s: a hang guard; the tick is 1 s
    assert "is no longer the directory this log was opened in" in d.log()
    again = ws.daemon(name="moved").start()
    with again.client() as c:
        assert c.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    assert list(d.data_dir.iterdir()) == []
