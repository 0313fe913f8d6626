"""The compactor against real shared memory and as a real process: scan, handshake, lock, orphans.

A ShmTable in this process plays the daemon's table (the same writer code the
daemon runs); the compactor scans it through the client-side readers, and in
the process tests runs as ``python -m walcache.daemon.compaction``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from walcache import DataDirLocked
from walcache.daemon.compaction import (
    COMPACT_LOCK_NAME,
    EXIT_BUSY,
    EXIT_OK,
    EXIT_ORPHANED,
    CompactLock,
    compact,
    compactor_command,
    wait_for_compactor,
)
from walcache.daemon.walformat import MANIFEST_NAME
from walcache.shm.creader import PyReader, extension
from walcache.shm.reader import ShmReader
from walcache.shm.writer import ShmTable
from walcache_testing import unlink_segments

from .bytesurgery import dir_fingerprint
from .logmodel import NOW_MS
from .test_compaction import Entry, Log, recovered_state

SEED = int(os.environ.get("WALCACHE_TEST_SEED", "20261126"))


@pytest.fixture
def shm_table() -> Iterator[ShmTable]:
    ns = f"wctc{os.getpid()}x{random.randrange(1 << 30):x}"
    table = ShmTable.create(ns, capacity=64)  # small: a few hundred puts rebuild it
    table.publish()
    try:
        yield table
    finally:
        table.close(unlink=True)
        unlink_segments(ns)


def _readers() -> list[Callable[[str], Any]]:
    out: list[Callable[[str], Any]] = [ShmReader, PyReader]
    if extension is not None:
        from walcache.shm.creader import CReader

        out.append(CReader)
    return out


@pytest.mark.parametrize("make_reader", _readers(), ids=lambda r: r.__name__)
def test_the_scan_is_complete_when_the_table_is_rebuilt_during_it(
    tmp_path: Path, shm_table: ShmTable, make_reader: Callable[[str], Any]
) -> None:
    rng = random.Random(SEED)
    log = Log(tmp_path, also=[shm_table])
    for i in range(300):
        log.put(b"bk%d" % i, b"v1-%d-" % i + rng.randbytes(rng.randrange(40)))
    k, s = log.writer.seal()
    at_seal = dict(log.table.entries)
    generations = [shm_table.generation]

    def race() -> None:
        for i in range(40):
            log.put(b"bk%d" % rng.randrange(300), b"v2-after-seal")
            log.delete(b"bk%d" % rng.randrange(300))
        for i in range(2000):  # growth: the table is rebuilt (new generation) under the scan
            log.put(b"bnew%d" % i, b"n" * 20)
        generations.append(shm_table.generation)

    reader = make_reader(shm_table.namespace)
    try:
        def scan() -> Iterator[Entry]:
            for n, e in enumerate(reader.iter_entries()):
                if n == 100:
                    race()
                yield e

        seen: list[Entry] = []

        def recorded() -> Iterator[Entry]:
            for e in scan():
                seen.append(e)
                yield e

        res = compact(tmp_path, recorded(), seal_seqno=s, next_segno=k + 1, now_ms=NOW_MS)
    finally:
        reader.close()
    assert generations[-1] > generations[0], "the race did not rebuild the table: the test proves nothing"
    # Every key unchanged since the seal was found; whatever was kept is its state at the seal
    # (keys changed after the seal may or may not have been kept: the tail decides them).
    unchanged = {key for key, e in log.table.entries.items() if e[2] <= s}
    found = {e[0]: e for e in seen if e[3] <= s}
    assert unchanged <= set(found)
    assert len(found) > len(unchanged)  # the race did change keys the scan had already kept
    for key, e in found.items():
        assert e[1:] == at_seal[key], key
    assert res.entries == len(found)
    assert recovered_state(tmp_path) == log.model()
    log.writer.close()


# --------------------------------------------------------------------- the process


def _start(tmp_path: Path, ns: str, seal: int, next_segno: int) -> subprocess.Popen[bytes]:
    cmd = compactor_command(tmp_path, ns, seal, next_segno, nice=0)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read().decode() if proc.stderr else ""
    doc: dict[str, Any] = json.loads(line)
    return doc


def _finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_compactor_process_shakes_hands_compacts_and_reports(tmp_path: Path, shm_table: ShmTable) -> None:
    log = Log(tmp_path, also=[shm_table])
    for i in range(500):
        log.put(b"bk%d" % (i % 120), b"v%d" % i)
    for i in range(0, 120, 9):
        log.delete(b"bk%d" % i)
    k, s = log.writer.seal()
    proc = _start(tmp_path, shm_table.namespace, s, k + 1)
    try:
        assert _line(proc) == {"status": "locked", "pid": proc.pid}
        assert not (tmp_path / MANIFEST_NAME).exists()  # nothing happens before "go"
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        doc = _line(proc)
        assert doc["status"] == "done" and doc["seal_seqno"] == s and doc["entries"] == len(log.model())
        assert doc["reclaimed_bytes"] > 0
        proc.stdin.close()
    finally:
        code = _finish(proc)
    assert code == EXIT_OK
    assert recovered_state(tmp_path) == log.model()
    log.writer.close()


def test_a_compactor_whose_daemon_is_gone_before_go_changes_nothing(tmp_path: Path, shm_table: ShmTable) -> None:
    log = Log(tmp_path, also=[shm_table])
    for i in range(50):
        log.put(b"bk%d" % i, b"v")
    k, s = log.writer.seal()
    before = dir_fingerprint(tmp_path)
    proc = _start(tmp_path, shm_table.namespace, s, k + 1)
    try:
        assert _line(proc)["status"] == "locked"
        assert proc.stdin is not None
        proc.stdin.close()  # the daemon died before it said go
    finally:
        code = _finish(proc)
    assert code == EXIT_ORPHANED
    after = dir_fingerprint(tmp_path)
    after.pop(COMPACT_LOCK_NAME)
    assert after == before
    log.writer.close()


def test_a_second_compactor_refuses_while_one_holds_the_lock(tmp_path: Path, shm_table: ShmTable) -> None:
    log = Log(tmp_path, also=[shm_table])
    log.put(b"bk", b"v")
    k, s = log.writer.seal()
    held = CompactLock(tmp_path)
    assert held.try_acquire()
    try:
        assert not CompactLock(tmp_path).try_acquire()
        proc = _start(tmp_path, shm_table.namespace, s, k + 1)
        try:
            doc = _line(proc)
        finally:
            code = _finish(proc)
        assert code == EXIT_BUSY and doc == {"status": "already running", "pid": os.getpid()}
    finally:
        held.release()
    assert not (tmp_path / MANIFEST_NAME).exists()
    log.writer.close()


_HOLDER = """
import sys
from pathlib import Path
from walcache.daemon.compaction import CompactLock
lock = CompactLock(Path(sys.argv[1]))
assert lock.try_acquire()
print("held", flush=True)
sys.stdin.read()  # hold it until the test closes our stdin
"""


def test_a_starting_daemon_waits_for_a_compactor_left_by_the_previous_one(tmp_path: Path) -> None:
    wait_for_compactor(tmp_path, timeout=0.1)  # no COMPACT.lock: nothing to wait for, nothing created
    assert not (tmp_path / COMPACT_LOCK_NAME).exists()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(DataDirLocked) as ei:
            wait_for_compactor(tmp_path, timeout=0.2)
        assert ei.value.pid == holder.pid
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits; the wait ends with it (20 s: a hang guard)
        wait_for_compactor(tmp_path, timeout=20)
        assert holder.wait(10) == 0
        again = CompactLock(tmp_path)  # the lock is free now
        assert again.try_acquire()
        again.release()
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGKILL)
        holder.wait()


def _compact_in_process(
    log: Log, ns: str, *, kill_after: float | None, during: Callable[[], None]
) -> tuple[str, float]:
    """One compaction by a real compactor process; SIGKILLed ``kill_after`` s after "go" unless None.

    Returns ("done" or "killed": no result when the signal came, seconds from "go" to its end).
    """
    k, s = log.writer.seal()
    proc = _start(log.data_dir, ns, s, k + 1)
    try:
        assert _line(proc)["status"] == "locked"
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t_go = time.monotonic()
        end = t_go + (kill_after if kill_after is not None else 60.0)
        while time.monotonic() < end and proc.poll() is None:
            during()  # the daemon goes on writing while the compactor works
        if kill_after is not None:
            proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()
    finally:
        _finish(proc)
    return ("done" if b'"done"' in out else "killed"), time.monotonic() - t_go


def test_sigkill_of_the_compactor_at_seeded_moments_leaves_a_log_that_recovers(
    tmp_path: Path, shm_table: ShmTable
) -> None:
    rng = random.Random(SEED)  # the workload: how many draws it makes depends on the machine
    kills = random.Random(SEED + 1)  # the kill moments, as fractions of the fastest run
    log = Log(tmp_path / "d", also=[shm_table], policy="never")
    for r in range(300):  # 30,000 keys in batches: a compaction takes a while to scan them
        log.write([(1, b"bk%d" % (r * 100 + j), 1, rng.randbytes(rng.randrange(20, 120)), 0) for j in range(100)])

    def during() -> None:
        log.put(b"bk%d" % rng.randrange(30_000), b"during")
        if rng.random() < 0.2:
            log.delete(b"bk%d" % rng.randrange(30_000))

    outcome, fastest = _compact_in_process(log, shm_table.namespace, kill_after=None, during=during)
    assert outcome == "done"
    outcomes = []
    for i in range(6):
        # A seeded moment within the shortest whole run seen so far (the machine is shared:
        # runs vary, and a moment past the end proves less).
        delay = kills.uniform(0.0, 1.1) * fastest
        during()
        outcome, took = _compact_in_process(log, shm_table.namespace, kill_after=delay, during=during)
        outcomes.append(outcome)
        if outcome == "done":
            fastest = min(fastest, took)
        copy = tmp_path / f"copy{i}"
        shutil.copytree(log.data_dir, copy)
        assert recovered_state(copy) == log.model(), f"seed {SEED}, kill {i} after {delay:.3f} s"
    assert "killed" in outcomes, f"no kill landed before the end (seed {SEED}): the test proved nothing"
    log.writer.close()
