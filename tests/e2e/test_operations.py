"""Operations: sd_notify from a real daemon, SIGHUP reload, the CLI, status."""

from __future__ import annotations

import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import walcache
from walcache.codec import encode_key
from walcache.daemon.apply import Applier, DictTable
from walcache.daemon.lock import SocketLock
from walcache.daemon.recovery import open_log
from walcache.daemon.walformat import SEGMENT_HEADER_SIZE, record_length_at
from walcache.daemon.walreader import iter_records, list_segments, nonzero_end
from walcache.shm.reader import ShmReader
from walcache_testing import Workspace


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "walcache", *args], input=stdin, capture_output=True, timeout=60
    )


def recv_until(sock: socket.socket, want: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if want in msg.split("\n"):
            return got
    raise AssertionError(f"{want} not received; got {got}")


def test_notify_ready_after_publish_watchdog_and_stopping(ws: Workspace) -> None:
    d = ws.daemon()
    d.start()
    with d.client() as c:
        c.put_many({f"k{i}": i for i in range(500)})
    assert d.terminate() == 0
    notify_path = ws.root / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify_path))
    try:
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
        d.start(wait=False, env=env)
        msgs = recv_until(ns, "READY=1", 30)
        # At READY=1 the recovered table is already published by this daemon.
        reader = ShmReader(d.namespace)
        try:
            assert reader.header()["writer_pid"] == d.pid
            assert len(reader) == 500 and reader.get(b"sk499") is not None
        finally:
            reader.close()
        assert not any("WATCHDOG=1" in m for m in msgs)  # nothing before READY
        pings = 0
        while pings < 4:
            pings += sum("WATCHDOG=1" in m for m in recv_until(ns, "WATCHDOG=1", 10))
        # At half the 200 ms interval, not at the 1 s tick it pings on by default.
        assert "watchdog ping every 0.1 s" in d.log()
        d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        recv_until(ns, "STOPPING=1", 10)
        assert d.proc.wait(10) == 0  # type: ignore[union-attr]
    finally:
        ns.close()


def test_sighup_reload_changes_a_limit_without_dropping_connections(ws: Workspace) -> None:
    conf = ws.root / "walcache.toml"
    conf.write_text("max_value_bytes = 100\n")
    d = ws.daemon("--config", str(conf)).start()
    c = d.client()
    c.put("small", b"x" * 100)
    with pytest.raises(walcache.ValueTooLarge):
        c.put("big", b"x" * 500)
    conf.write_text("max_value_bytes = 1000\nlog_level = \"DEBUG\"\n")
    os.kill(d.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        try:
            c.put("big", b"x" * 500)  # same connection as before the reload
            break
        except walcache.ValueTooLarge:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.02)
    assert c.stats()["connections"] == 1
    assert "max_value_bytes 100 -> 1000" in d.log().replace("B", "")
    c.close()


def test_sighup_with_an_invalid_file_keeps_the_old_config(ws: Workspace) -> None:
    conf = ws.root / "walcache.toml"
    conf.write_text("max_value_bytes = 100\n")
    d = ws.daemon("--config", str(conf)).start()
    conf.write_text("max_value_bytes = 'lots'\n")
    os.kill(d.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not reloaded" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    with d.client() as c:
        with pytest.raises(walcache.ValueTooLarge):
            c.put("big", b"x" * 500)
    assert d.proc is not None and d.proc.poll() is None


def test_cli_put_get_delete_keys_stats_status(ws: Workspace) -> None:
    d = ws.daemon().start()
    sock = ["--socket", str(d.socket_path)]
    assert cli("put", "greeting", "hello", *sock).returncode == 0
    assert cli("put", "n", "42", "--json", *sock).returncode == 0
    assert cli("put", "7", "seven", "--key-type", "int", *sock).returncode == 0
    assert cli("put", "blob", "-", *sock, stdin=b"\x00\x01").returncode == 0
    assert cli("get", "greeting", *sock).stdout == b"hello\n"
    assert cli("get", "n", *sock).stdout == b"42\n"
    assert cli("get", "7", "--key-type", "int", *sock).stdout == b"seven\n"
    assert cli("get", "blob", *sock).stdout == b"\x00\x01"
    assert cli("put", "doc", "-", "--json", *sock, stdin=b'{"a": [1, 2]}\n').returncode == 0
    assert cli("get", "doc", "--json", *sock).stdout == b'{"a": [1, 2]}\n'
    bad = cli("put", "doc", "-", "--json", *sock, stdin=b"{not json")
    assert bad.returncode == 2 and b"stdin is not JSON" in bad.stderr
    assert cli("delete", "doc", *sock).returncode == 0
    missing = cli("get", "nope", *sock)
    assert missing.returncode == 1 and b"not found" in missing.stderr
    keys = cli("keys", "--prefix", "gr", *sock).stdout.decode().split()
    assert keys == ["greeting"]
    assert cli("delete", "greeting", *sock).returncode == 0
    assert cli("delete", "greeting", *sock).returncode == 1
    stats = json.loads(cli("stats", *sock).stdout)
    assert stats["keys"] == 3 and stats["pid"] == d.pid
    status = json.loads(cli("status", "--json", *sock).stdout)
    assert status["pid"] == d.pid and status["keys"] == 3
    assert status["rss_bytes"] > 0 and status["fsync_p50_us"] > 0
    # A daemon that started with room for its keys has not rebuilt its table.
    assert status["table_rebuilds"] == 0 and status["last_table_rebuild"] is None
    human = cli("status", *sock)
    assert human.returncode == 0 and b"rss_bytes" in human.stdout


def test_cli_reports_a_missing_daemon_with_exit_3(ws: Workspace) -> None:
    r = cli("put", "k", "v", "--socket", str(ws.root / "nobody.sock"))
    assert r.returncode == 3 and b"walcache serve" in r.stderr


@pytest.mark.parametrize("reserve", ["default", "0"])
def test_status_reports_how_the_table_grew_and_what_writes_waited_for(ws: Workspace, reserve: str) -> None:
    """The index outgrows --initial-capacity: by default it moves (O(slots), no record
    copied); without a reserve the table rebuilds. Either way status says how often, and
    how long the last one made writes wait."""
    extra = [] if reserve == "default" else ["--shm-reserve", reserve]
    d = ws.daemon("--initial-capacity", "16", *extra).start()
    with d.client() as c:
        for i in range(10):
            c.put_many({f"k{i}-{j}": "v" * 50 for j in range(40)})  # 400 keys: the index grows
        assert all(c.get(f"k{i}-{j}") == "v" * 50 for i in range(10) for j in range(40))
    status = json.loads(cli("status", "--json", "--socket", str(d.socket_path)).stdout)
    moves, rebuilds = ("table_index_moves", "last_table_index_move"), ("table_rebuilds", "last_table_rebuild")
    (grew, last_name), (idle, idle_last) = (moves, rebuilds) if reserve == "default" else (rebuilds, moves)
    last = status[last_name]
    assert status[grew] >= 1 and status[idle] == 0 and status[idle_last] is None
    assert isinstance(last["ms"], float) and last["ms"] >= 0  # rounded to 0.1 ms: may read 0.0
    assert last["when"] and 0 < last["live_keys"] < 400 and last["slots"] >= 64
    human = cli("status", "--socket", str(d.socket_path)).stdout
    assert last_name.encode() in human


_UNDER_AS_LIMIT = """
import json, resource, sys
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), vm + (768 << 20)))
import walcache
try:
    c = walcache.Client(socket_path=sys.argv[1])
    print(json.dumps({"value": c.get("k")}))
except walcache.WalcacheError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


def test_a_reader_under_an_address_space_limit_is_told_about_the_reserve(ws: Workspace) -> None:
    """Readers map the whole segment, reserve included (by default room for twice
    --max-memory of data): a worker under ulimit -v gets TableUnavailable naming the
    remedy, not a bare MemoryError, and --shm-reserve 0 lets it read."""
    for reserve, readable in ((None, False), ("0", True)):
        d = ws.daemon("--max-memory", "2G", *(("--shm-reserve", reserve) if reserve else ()), name=f"as{reserve}")
        d.start()
        try:
            with d.client() as c:
                c.put("k", "v")
                assert (c.stats()["table"]["segment_bytes"] > 4 << 30) == (reserve is None)
            r = subprocess.run([sys.executable, "-c", _UNDER_AS_LIMIT, str(d.socket_path)],
                               capture_output=True, timeout=60)  # fmt: skip
            out = json.loads(r.stdout)
            if readable:
                assert out == {"value": "v"}, r.stderr
            else:
                assert out["error"] == "TableUnavailable" and "--shm-reserve" in out["message"], out
        finally:
            d.terminate()


def test_cli_serve_refuses_bad_config_naming_the_source(ws: Workspace) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "walcache", "serve", "--data-dir", str(ws.root / "d")],
        env=dict(os.environ, WALCACHE_MAX_MEMORY="12Q"), capture_output=True, timeout=60,
    )
    assert r.returncode == 2 and b"WALCACHE_MAX_MEMORY" in r.stderr


def test_cli_serve_reports_an_unusable_data_dir_with_exit_4(ws: Workspace) -> None:
    blocker = ws.root / "a-file"
    blocker.write_text("not a directory")
    r = subprocess.run(
        [sys.executable, "-m", "walcache", "serve", "--data-dir", str(blocker / "d"),
         "--socket", str(ws.root / "s.sock")],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert b"Not a directory" in r.stderr and b"Traceback" not in r.stderr


def test_a_second_daemon_on_a_taken_socket_leaves_no_table_behind(ws: Workspace) -> None:
    """Another data dir, the same socket: refused (exit 2) before recovery, so it publishes no
    shared table for its data dir; the first daemon keeps its socket and serves on."""
    a = ws.daemon(name="a").start()
    b = ws.daemon(name="b")
    b.socket_path = a.socket_path
    b.start(wait=False)
    assert b.proc is not None and b.proc.wait(30) == 2
    assert f"is in use by pid {a.pid}" in b.log()
    assert not list(Path("/dev/shm").glob(f"{b.namespace}*"))
    with a.client() as c:
        c.put("still", b"here")
        assert c.get("still") == b"here"


@pytest.mark.parametrize("window", ["recovering", "bound, not listening"])
def test_a_socket_claimed_by_a_daemon_without_a_listener_yet_is_not_taken(ws: Workspace, window: str) -> None:
    """The two windows a probe of the socket path cannot see: a daemon still recovering has
    no socket yet, and one between bind and listen refuses connections like a dead daemon's
    socket. This process plays that daemon: it holds ``<socket>.lock`` (a real flock) and, in
    the second case, a bound socket that does not listen. The new daemon must be refused
    (exit 2, naming our pid) before it publishes a table, and leave the bound socket alone."""
    b = ws.daemon(name="b")
    b.socket_path.parent.mkdir(parents=True, exist_ok=True)
    claim = SocketLock(b.socket_path)
    assert claim.try_acquire()
    bound = None
    try:
        if window == "bound, not listening":
            bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bound.bind(str(b.socket_path))
            ino = b.socket_path.stat().st_ino
        b.start(wait=False)
        assert b.proc is not None and b.proc.wait(30) == 2, b.log()
        assert f"is in use by pid {os.getpid()}" in b.log()
        assert not list(Path("/dev/shm").glob(f"{b.namespace}*"))
        if bound is not None:
            assert b.socket_path.stat().st_ino == ino
    finally:
        if bound is not None:
            bound.close()
        claim.release()
    b.start()  # once the claim is gone (its lock file stays), the same daemon starts
    with b.client() as c:
        c.put("k", 1)
        assert c.get("k") == 1


def test_check_log_reports_and_repair_truncates(ws: Workspace) -> None:
    d = ws.daemon().start()
    with d.client() as c:
        for i in range(50):
            c.put(i, "v" * 50)
    assert d.terminate() == 0
    ok = cli("check-log", str(d.data_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    seg = sorted(d.data_dir.glob("wal-*.log"))[0]
    data = bytearray(seg.read_bytes())
    data[64 + 20] ^= 0xFF  # inside the first record, with valid records after it
    seg.write_bytes(bytes(data))
    bad = cli("check-log", str(d.data_dir))
    assert bad.returncode == 4 and str(seg.name).encode() in bad.stdout + bad.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "walcache", "serve", "--data-dir", str(d.data_dir),
         "--socket", str(d.socket_path)], capture_output=True, timeout=60,
    )
    assert refused.returncode != 0 and seg.name.encode() in refused.stderr
    fixed = cli("check-log", "--repair", str(d.data_dir))
    assert fixed.returncode == 0 and b"dropped" in fixed.stdout
    d.start()
    with d.client() as c:
        assert len(c) == 0  # the first record was bad: every record after it was dropped


def test_put_many_is_one_record_and_all_or_nothing_at_any_cut(ws: Workspace) -> None:
    """The daemon logs a put_many as one record (one seqno), so a crash that cuts the log
    anywhere in it keeps all of the batch or none of it."""
    d = ws.daemon().start()
    batch = {f"m{i}": "v" * 700 for i in range(4)}  # spans several 512-byte sectors
    with d.client() as c:
        c.put("before", 1)
        c.put_many(batch)
    d.stop()
    recs = list(iter_records(d.data_dir))
    assert [len(ops) for _, ops in recs] == [1, 4]  # one request, one record, one seqno
    # A crash may cut the last group anywhere: every cut keeps all of the put_many or none of it.
    (_, seg), = list_segments(d.data_dir)
    buf = seg.read_bytes()
    end = nonzero_end(buf, SEGMENT_HEADER_SIZE)
    first_end = SEGMENT_HEADER_SIZE + record_length_at(buf, SEGMENT_HEADER_SIZE, end)
    assert SEGMENT_HEADER_SIZE < first_end < end
    keys = [encode_key(k) for k in batch]
    # Cuts inside both records, at both record ends, and none (the whole log).
    cuts = sorted({*range(SEGMENT_HEADER_SIZE, end, 97), first_end - 1, first_end, end - 1, end, len(buf)})
    outcomes = set()
    for cut in cuts:
        work = ws.root / f"cut{cut}"
        shutil.copytree(d.data_dir, work, ignore=shutil.ignore_patterns("*.lock", "LOCK"))
        p = work / seg.name
        p.write_bytes(buf[:cut] + bytes(len(buf) - cut))
        table = DictTable()
        writer, _ = open_log(work, Applier(table, 0))
        writer.close()
        present = [k in table.entries for k in keys]
        # All of the batch exactly when its whole record survived, else none of it; the
        # record before it survives every cut past its own end.
        assert present == [cut >= end] * len(keys), (cut, present)
        assert (encode_key("before") in table.entries) == (cut >= first_end), cut
        outcomes.add(all(present))
        shutil.rmtree(work)
    assert outcomes == {True, False}


def test_a_data_dir_that_is_a_file_is_refused_by_name(ws: Workspace) -> None:
    f = ws.root / "not-a-dir"
    f.write_text("x")
    r = cli("serve", "--data-dir", str(f), "--socket", str(ws.root / "s.sock"))
    assert r.returncode == 2 and f"{f} is a file, not a directory".encode() in r.stderr, r
    assert f.read_text() == "x"


def test_drop_shm_removes_a_stopped_daemons_table_and_nothing_else(ws: Workspace) -> None:
    d = ws.daemon().start()
    attached = d.client(data_dir=d.data_dir)  # stays attached through the drop and a restart
    with d.client() as c:
        c.put("k", "v")
    running = cli("drop-shm", str(d.data_dir))
    assert running.returncode == 4 and f"pid {d.pid}".encode() in running.stderr, running
    d.stop()
    left = sorted(n for n in os.listdir("/dev/shm") if n.startswith(d.namespace))
    assert left, "a stopped daemon leaves its table for readers"
    out = cli("drop-shm", str(d.data_dir))
    assert out.returncode == 0, out
    assert all(f"removed /{n}".encode() in out.stdout for n in left), out.stdout
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(d.namespace)]
    assert cli("drop-shm", str(d.data_dir)).stdout.startswith(b"no shared table")
    d.start()  # the log is untouched: the table comes back from it
    with d.client() as c:
        assert c.get("k") == "v"
    with attached:  # it was told its table was retired: it reads its own writes again
        attached.put("k", "new")
        assert attached.get("k") == "new"
