"""Compaction against real daemons: rotation, the compact op, bounded disk use, crashes, races.

Every test runs `walcache serve` processes (and the compactor processes they
start). Crash tests SIGKILL the daemon or the compactor at seeded random
moments while writer processes keep writing, then check that every
acknowledged write is there (a key's value must be its last acknowledged one,
or one whose request was in flight when the daemon died). Set
WALCACHE_TEST_SEED to replay a run; the seed is printed on failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import walcache
from walcache.codec import encode_key, encode_value
from walcache.daemon.walformat import record_size
from walcache_testing import DaemonProcess, Workspace

SEED = int(os.environ.get("WALCACHE_TEST_SEED", "5150"))
STRESS_SECONDS = float(os.environ.get("WALCACHE_STRESS_SECONDS", "20"))
ctx = mp.get_context("fork")


# --------------------------------------------------------------------- helpers


def data_files(d: Path) -> dict[str, int]:
    out = {}
    for entry in os.scandir(d):
        try:
            out[entry.name] = entry.stat().st_size
        except FileNotFoundError:
            pass
    return out


def log_disk_bytes(d: Path) -> int:
    """Disk used by the log: segments, snapshots, MANIFEST and any temporary file; not the lock files."""
    return sum(n for name, n in data_files(d).items() if name not in ("LOCK", "COMPACT.lock"))


def live_log_bytes(model: dict[Any, Any]) -> int:
    """What the live data takes as log records: one PUT record per live key."""
    return sum(record_size(len(encode_key(k)), len(encode_value(v)[1])) for k, v in model.items())


def compactor_pids(daemon: DaemonProcess) -> list[int]:
    return [p.pid for p in daemon.compactors()]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def fill(c: walcache.Client, n: int, prefix: str, size: int = 100) -> dict[str, str]:
    model = {}
    for start in range(0, n, 500):
        batch = {f"{prefix}{i}": f"{i:08d}" + "v" * (size - 8) for i in range(start, min(n, start + 500))}
        c.put_many(batch)
        model.update(batch)
    return model


@pytest.fixture
def tracked() -> Iterator[list[int]]:
    """Pids of compactors a test saw; killed at the end whatever happened (orphans included)."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        kill_pids(pids)


# --------------------------------------------------------------------- rotation and the op


def test_the_log_rotates_at_the_configured_segment_size(ws: Workspace) -> None:
    d = ws.daemon("--segment-bytes", "16384", "--fsync", "never").start()
    model = {f"k{i}": "v" * 100 for i in range(1500)}
    with d.client() as c:
        for k, v in model.items():
            c[k] = v
    d.terminate()
    segs = sorted(n for n in os.listdir(d.data_dir) if n.startswith("wal-"))
    assert len(segs) >= 5
    sizes = data_files(d.data_dir)
    assert all(sizes[n] <= 16384 for n in segs[:-1])  # sealed segments are trimmed to their records
    d.start()
    with d.client() as c:
        assert c.get_many(list(model)) == model


def test_compact_answers_with_what_it_did_and_never_runs_twice(ws: Workspace, tracked: list[int]) -> None:
    d = ws.daemon("--segment-bytes", "65536", "--fsync", "never").start()
    with d.client(timeout=30) as c:
        model = fill(c, 20_000, "k")
        for i in range(0, 20_000, 3):
            c[f"k{i}"] = "again"
            model[f"k{i}"] = "again"
        before = c.stats()
        answers: list[dict[str, Any]] = []
        t = threading.Thread(target=lambda: answers.append(d.client(timeout=30).compact()))
        t.start()
        with d.client() as other:
            wait_for(lambda: other.stats()["compaction"] is not None, 10, "the compaction to start")
            second = other.compact()
            tracked += compactor_pids(d)
        t.join(30)
        assert second["status"] == "already running" and second["trigger"] == "manual"
        (first,) = answers
        assert first["status"] in ("done", "running")
        wait_for(lambda: c.stats()["compaction"] is None, 30, "the compaction to end")
        st = c.stats()
        last = st["last_compaction"]
        assert st["compactions"] == 1 and last["status"] == "done" and last["trigger"] == "manual"
        assert last["entries"] == 20_000 and last["seconds"] > 0 and last["when"]
        assert last["bytes_reclaimed"] > 0 and last["log_bytes_before"] == before["log_bytes"]
        assert st["log_bytes"] < before["log_bytes"] and st["dead_ratio"] < 0.1
        assert c.compact()["status"] == "nothing to compact"
        # The CLI speaks the same op and prints the answer.
        c["one more"] = 1
        out = subprocess.run([sys.executable, "-m", "walcache", "compact", "--socket", str(d.socket_path),
                              "--timeout", "30"], capture_output=True, timeout=60)
        assert out.returncode == 0 and b'"status": "done"' in out.stdout, out
        model["one more"] = 1
        status = subprocess.run([sys.executable, "-m", "walcache", "status", "--socket", str(d.socket_path)],
                                capture_output=True, timeout=60)
        assert b"last_compaction" in status.stdout and b"bytes_reclaimed" in status.stdout
    d.terminate()
    d.start()
    with d.client() as c:
        assert c.get_many(list(model)) == model and len(c) == len(model)


# --------------------------------------------------------------------- disk use


def test_an_overwrite_heavy_workload_keeps_disk_use_within_twice_the_live_data_plus_a_segment(ws: Workspace) -> None:
    seg = 65536
    d = ws.daemon("--segment-bytes", str(seg), "--fsync", "never", "--compact-min-bytes", "262144",
                  "--compact-dead-ratio", "0.5").start()
    rng = random.Random(SEED)
    nkeys = 1500
    model: dict[str, str] = {}
    at_rest = during = 0
    peak_ratio = 0.0
    with d.client(timeout=30) as c:
        for rnd in range(25):
            for i in rng.sample(range(nkeys), nkeys // 2):
                key = f"k{i}"
                if rng.random() < 0.08:
                    c.delete(key)
                    model.pop(key, None)
                else:
                    model[key] = f"{rnd}:" + "x" * rng.randrange(100, 200)
                    c[key] = model[key]
                if i % 25 == 0:
                    st = c.stats()
                    disk = log_disk_bytes(d.data_dir)
                    live = live_log_bytes(model)
                    assert st["live_bytes"] == live  # the daemon counts live data as the test does
                    if st["compaction"] is None:
                        at_rest += 1
                        assert disk <= 2 * live + seg, (
                            f"seed {SEED}: {disk} bytes on disk for {live} live bytes at rest; {st}"
                        )
                    else:
                        during += 1
                        peak_ratio = max(peak_ratio, (disk - seg) / live)
        def settled() -> bool:
            # At rest: no compaction running and none due by the automatic trigger
            # (the last writes may have made one due just as the previous one ended).
            st = c.stats()
            due = st["log_record_bytes"] >= 262144 and st["dead_ratio"] >= 0.5
            return st["compaction"] is None and not due

        wait_for(settled, 60, "compaction to settle (none running, none due)")
        st = c.stats()
        assert log_disk_bytes(d.data_dir) <= 2 * live_log_bytes(model) + seg
    assert st["compactions"] >= 5 and at_rest > 100, (st["compactions"], at_rest)
    print(f"{st['compactions']} compactions; {at_rest} samples at rest, {during} during a compaction "
          f"(peak (disk - segment) / live there: {peak_ratio:.2f})")
    d.terminate()
    d.start()
    with d.client() as c:
        assert len(c) == len(model) and c.get_many(list(model)) == model


def test_deleted_keys_stay_deleted_and_expired_keys_do_not_come_back(ws: Workspace) -> None:
    d = ws.daemon("--segment-bytes", "16384").start()
    with d.client() as c:
        model = fill(c, 300, "k")
        for i in range(0, 300, 4):
            del c[f"k{i}"]
            del model[f"k{i}"]
        c.put_many({f"t{i}": "brief" for i in range(50)}, ttl=1)
        c.put("marker-deleted", "this value must never come back")
        c.delete("marker-deleted")
        assert c.compact()["status"] == "done"  # the brief keys are still live here
        time.sleep(1.2)
        c["k1"] = "after"
        model["k1"] = "after"
        res = c.compact()
        assert res["status"] == "done" and res["entries"] == len(model) and res["entries_expired"] == 0
    # The table purges expired entries; either way none of them is in the new snapshot.
    snaps = [p for p in d.data_dir.iterdir() if p.name.startswith("snap-")]
    assert len(snaps) == 1
    data = snaps[0].read_bytes()
    assert b"brief" not in data and b"never come back" not in data
    for restart in ("terminate", "kill"):
        getattr(d, restart)()
        d.start()
        with d.client() as c:
            assert dict(c.items()) == model
            assert c.get_many([f"t{i}" for i in range(50)] + [f"k{i}" for i in range(0, 300, 4)]) == {}
            assert "marker-deleted" not in c
            assert c.get_many(list(model)) == model


# --------------------------------------------------------------------- crashes


def _writer(wid: int, sock: str, seed: int, pause: Any, stop: Any, out: Any) -> None:
    """Writes until stop; at each pause (a new value of ``pause``), reports what each key may hold."""
    rng = random.Random(seed)
    keys = [f"w{wid}:{i}" for i in range(300)]
    allowed: dict[str, list[str | None]] = {}
    c = walcache.Client(sock, timeout=3)
    n = 0
    reported = 0
    while not stop.is_set():
        gen = pause.value
        if gen > 0:  # paused; report once per pause, even if the last one ended unseen
            if reported != gen:
                out.put((wid, allowed))
                reported = gen
            time.sleep(0.002)
            continue
        n += 1
        key = rng.choice(keys)
        value: str | None = None if rng.random() < 0.15 else f"{wid}-{n}-" + "p" * rng.randrange(50, 150)
        try:
            if value is None:
                c.delete(key)
            else:
                c.put(key, value)
        except walcache.WalcacheError as exc:
            # The daemon was killed (or is starting): the write may or may not have landed.
            # Anything else (a ServerError is the daemon's catch-all for its own bugs) fails.
            if not isinstance(exc, (walcache.DaemonUnavailable, walcache.WalcacheTimeout)):
                out.put((wid, f"unexpected {type(exc).__name__}: {exc}"))
                raise
            allowed[key] = allowed.get(key, [None]) + [value]  # in flight: either outcome
            time.sleep(0.005)
            continue
        allowed[key] = [value]
    c.close()


class Writers:
    def __init__(self, sock: Path, n: int, seed: int) -> None:
        # pause: 0 = write; k > 0 = the k-th pause, report once and wait.
        self.pause, self.stop, self.out = ctx.Value("i", 0), ctx.Event(), ctx.Queue()
        self.pauses = 0
        self.procs = [ctx.Process(target=_writer, args=(w, str(sock), seed * 100 + w, self.pause, self.stop,
                                                        self.out), daemon=True) for w in range(n)]
        for p in self.procs:
            p.start()

    def models(self) -> dict[str, list[str | None]]:
        """Pause everyone and merge their reports (then resume())."""
        self.pauses += 1
        self.pause.value = self.pauses
        merged: dict[str, list[str | None]] = {}
        for _ in self.procs:
            try:
                wid, allowed = self.out.get(timeout=30)
            except queue.Empty:
                codes = [p.exitcode for p in self.procs]
                raise AssertionError(f"a writer did not report (exit codes {codes})") from None
            if isinstance(allowed, str):
                raise AssertionError(f"writer {wid}: {allowed}")
            merged.update(allowed)
        return merged

    def resume(self) -> None:
        self.pause.value = 0

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def check_against(c: walcache.Client, allowed: dict[str, list[str | None]], context: str) -> None:
    got = c.get_many(list(allowed))
    for key, ok in allowed.items():
        assert got.get(key) in ok, f"{context}: {key} = {got.get(key)!r}, allowed {ok}"


def _start_compaction_soon(d: DaemonProcess) -> threading.Thread:
    def run() -> None:
        try:
            with d.client(timeout=30) as c:
                c.compact()
        except walcache.WalcacheError:
            pass  # the daemon died under it: that is the test

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigkill_of_the_daemon_at_seeded_moments_during_compaction_loses_no_acknowledged_write(
    ws: Workspace, tracked: list[int]
) -> None:
    run_sigkill_daemon_cycles(ws, tracked, cycles=6, seed=SEED)


@pytest.mark.stress
def test_stress_sigkill_of_the_daemon_during_compaction(ws: Workspace, tracked: list[int]) -> None:
    end = time.monotonic() + STRESS_SECONDS
    seed = SEED
    while time.monotonic() < end:
        run_sigkill_daemon_cycles(ws, tracked, cycles=6, seed=seed, name=f"s{seed}")
        seed += 1


def run_sigkill_daemon_cycles(ws: Workspace, tracked: list[int], *, cycles: int, seed: int, name: str = "d") -> None:
    rng = random.Random(seed)
    d = ws.daemon("--segment-bytes", "65536", "--fsync", "always", name=name).start()
    with d.client(timeout=30) as c:
        fill(c, 40_000, "bulk")  # a table big enough that a compaction takes a while
    writers = Writers(d.socket_path, 3, seed)
    mid_compaction = 0
    try:
        for cycle in range(cycles):
            time.sleep(rng.uniform(0.05, 0.2))
            t = _start_compaction_soon(d)
            if cycle % 2:
                # A seeded moment early on: sealing, waiting for the apply, starting the compactor.
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                # A seeded moment once the compactor runs: handshake, scan, switch, or just after.
                wait_for(lambda: compactor_pids(d), 10, "the compactor to start")
                time.sleep(rng.uniform(0.0, 0.15))
            running = compactor_pids(d)
            tracked += running
            mid_compaction += bool(running)
            d.kill()
            t.join(30)
            d.start()  # waits for an orphaned compactor through COMPACT.lock
            allowed = writers.models()
            with d.client(timeout=30) as c:
                check_against(c, allowed, f"seed {seed}, cycle {cycle}")
                assert sum(1 for k in c if str(k).startswith("bulk")) == 40_000
            writers.resume()
        # And after all that, a compaction runs to the end and a clean restart agrees.
        allowed = writers.models()
        with d.client(timeout=30) as c:
            assert c.compact()["status"] in ("done", "running")
            wait_for(lambda: c.stats()["compaction"] is None, 30, "the final compaction")
        d.terminate()
        d.start()
        with d.client(timeout=30) as c:
            check_against(c, allowed, f"seed {seed}, after the final compaction")
        writers.resume()
    finally:
        writers.close()
    print(f"{mid_compaction} of {cycles} SIGKILLs landed while a compactor ran")
    assert mid_compaction >= 1, f"seed {seed}: no SIGKILL landed while a compactor ran"
    for pid in tracked:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, (
            f"compactor {pid} outlived its daemon"
        )


def test_sigkill_of_the_compactor_at_seeded_moments_loses_nothing(ws: Workspace, tracked: list[int]) -> None:
    rng = random.Random(SEED + 1)
    d = ws.daemon("--segment-bytes", "65536", "--fsync", "always").start()
    with d.client(timeout=30) as c:
        fill(c, 40_000, "bulk")
    writers = Writers(d.socket_path, 3, SEED + 1)
    killed = 0
    backoffs = []
    try:
        with d.client(timeout=30) as c:
            # Kill moments are drawn from a window that halves whenever the compactor
            # finished before its moment came (a faster machine or compactor must not
            # turn this into a run that never kills one): 5 kills or 15 cycles.
            window = 0.12
            for cycle in range(15):
                if killed >= 5:
                    break
                failures = c.stats()["compaction_failures"]
                t = _start_compaction_soon(d)
                wait_for(lambda: compactor_pids(d) or c.stats()["compaction"] is None, 10, "a compactor")
                pids = compactor_pids(d)
                tracked += pids
                time.sleep(rng.uniform(0.0, window))
                if pids and _running(pids[0]):
                    kill_pids(pids)
                    killed += 1
                else:
                    window /= 2
                t.join(30)
                wait_for(lambda: c.stats()["compaction"] is None, 30, "the daemon to reap it")
                st = c.stats()
                if st["compaction_failures"] > failures:
                    backoffs.append(st["compaction_backoff_s"])
            st = c.stats()
            assert st["compaction_failures"] >= 1 and "compactor pid" in st["last_compaction_error"]["error"], st
            # Each failure pushes automatic attempts back (manual ones, like these, are not held).
            assert backoffs and all(b > 0 for b in backoffs), backoffs
            allowed = writers.models()
            check_against(c, allowed, f"seed {SEED + 1}, compactor killed {killed} times")
            res = c.compact()
            assert res["status"] in ("done", "running")
            wait_for(lambda: c.stats()["compaction"] is None, 30, "a clean compaction")
        assert killed >= 1
        d.terminate()
        d.start()
        with d.client(timeout=30) as c:
            check_against(c, allowed, f"seed {SEED + 1}, after restart")
        writers.resume()
    finally:
        writers.close()


def test_writes_racing_the_compaction_end_with_the_newest_value_after_restart(ws: Workspace) -> None:
    """Keys overwritten or deleted after the compactor judged them live: the tail decides them."""
    d = ws.daemon("--segment-bytes", "65536", "--fsync", "always").start()
    with d.client(timeout=30) as c:
        model: dict[str, Any] = fill(c, 30_000, "k")
    newer = 0
    for attempt in range(5):
        rng = random.Random(SEED + attempt)
        t = _start_compaction_soon(d)
        with d.client(timeout=30) as c:
            wait_for(lambda: (c.stats()["compaction"] or {}).get("phase") == "running", 10, "the scan")
            while c.stats()["compaction"] is not None:
                for _ in range(20):
                    key = f"k{rng.randrange(30_000)}"
                    if rng.random() < 0.3:
                        c.delete(key)
                        model.pop(key, None)
                    else:
                        model[key] = f"newest-{attempt}-{rng.random()}"
                        c[key] = model[key]
            t.join(30)
            last = c.stats()["last_compaction"]
        newer += last["entries_newer"] or 0
        if newer:
            break
    assert newer > 0, f"seed {SEED}: no write landed during a scan in 5 tries; nothing was raced"
    d.kill()
    d.start()
    with d.client(timeout=30) as c:
        assert len(c) == len(model)
        assert c.get_many(list(model)) == model
