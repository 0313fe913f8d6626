#!/usr/bin/env python3
"""walcache beside the stores a user would pick instead, in one run on this machine.

    python bench/run.py                 # full run (about 10 minutes on 2 cores)
    python bench/run.py --quick         # smoke run, under 2 minutes, same outputs

What it does, in order:

1. Installs what is missing: Debian packages redis-server and memcached with
   ``apt-get install -y`` (only as root; ``apt-get update`` and one retry if the
   install fails), and the PyPI packages redis[hiredis], pymemcache, diskcache,
   lmdb and matplotlib with ``python -m pip install``. A peer whose part cannot
   be installed is reported as skipped, with the reason.
2. For every peer and value size: starts a fresh instance in a temp dir (servers
   on a Unix socket, stopped by pid at the end, also on Ctrl-C), loads the keys
   (YCSB load phase), then for 1, 4 and 16 client processes forks the clients
   (each opens its own connection or handle) and runs each YCSB workload for a
   fixed time. Before each run it waits until the store's own background work
   (walcache's log compaction, Redis's AOF rewrite) is done, so that a run does
   not pay for the updates of the one before it; the wait is in ``settle_s``.
   Latency is perf_counter_ns around each operation, with gc disabled in the
   timed loop.
3. Restart time: loads the restart key set into walcache (fsync always) and
   Redis (appendfsync always), SIGKILLs the server, restarts it on the same data
   and times until it answers (walcache: ``stats()``; Redis: PING -> PONG).
4. Prints a Markdown table, and writes ``bench-<date>-<time>.json``, ``.md`` and
   ``.png`` under ``--out``.

Timings on a shared 2-core machine are noisy: clients and servers share the two
cores with each other (and with anything else running). Compare peers within one
run, not across runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import importlib.util
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import peers as peers_mod  # noqa: E402
import ycsb  # noqa: E402
from peers import Peer, PeerUnavailable, Store  # noqa: E402

log = logging.getLogger("walcache.bench")

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PIP_PACKAGES: dict[str, str] = {
    # import name -> pip requirement
    "redis": "redis[hiredis]",
    "hiredis": "redis[hiredis]",
    "pymemcache": "pymemcache",
    "diskcache": "diskcache",
    "lmdb": "lmdb",
    "matplotlib": "matplotlib",
}
APT_PACKAGES: dict[str, str] = {"redis-server": "redis-server", "memcached": "memcached"}
# Restart test: the durable setting of each peer that has a server to restart.
RESTART_PEERS = ("walcache-always", "redis-always")
RESTART_VALUE_SIZE = 100
VALUE_POOL = 16
LATENCY_OPS = ("read", "update", "insert", "rmw")
SETTLE_TIMEOUT_S = 120.0  # the longest wait for a store's own background work before a cell


@dataclass
class Params:
    quick: bool
    record_count: int
    value_sizes: list[int]
    clients: list[int]
    workloads: list[str]
    duration_s: float
    ring_length: int
    restart_keys: int
    seed: int
    peers: list[str]


@dataclass
class RunState:
    """What the finally block must clean up, and what the report is made of."""

    started: list[Peer] = field(default_factory=list)
    workers: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    workdirs: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- install


def install_missing(log_lines: list[str]) -> None:
    """Install missing Debian and PyPI packages; record what was done or why not."""
    missing_bins = [b for b in APT_PACKAGES if shutil.which(b) is None]
    if missing_bins:
        pkgs = sorted({APT_PACKAGES[b] for b in missing_bins})
        if os.geteuid() != 0:
            log_lines.append(f"apt: not root, not installing {' '.join(pkgs)}")
        elif shutil.which("apt-get") is None:
            log_lines.append(f"apt: no apt-get on this system, not installing {' '.join(pkgs)}")
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]
            print(f"installing Debian packages: {' '.join(pkgs)}", file=sys.stderr)
            rc = _run_quiet(cmd, env, 900)
            if rc != 0:
                print("apt-get install failed: apt-get update, then retry", file=sys.stderr)
                _run_quiet(["apt-get", "update"], env, 900)
                rc = _run_quiet(cmd, env, 900)
            log_lines.append(f"apt: {' '.join(cmd)} -> exit {rc}")
    missing_reqs = sorted({req for mod, req in PIP_PACKAGES.items() if importlib.util.find_spec(mod) is None})
    if missing_reqs:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *missing_reqs]
        print(f"installing PyPI packages: {' '.join(missing_reqs)}", file=sys.stderr)
        rc = _run_quiet(cmd, None, 900)
        if rc != 0 and len(missing_reqs) > 1:
            # One package that cannot be installed must not take the others with it.
            for req in missing_reqs:
                _run_quiet([*cmd[:-len(missing_reqs)], req], None, 900)
        log_lines.append(f"pip: install {' '.join(missing_reqs)} -> exit {rc}")
        importlib.invalidate_caches()


def _run_quiet(cmd: list[str], env: dict[str, str] | None, timeout_s: float) -> int:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"{cmd[0]}: {exc}", file=sys.stderr)
        return -1
    if proc.returncode != 0:
        print(proc.stdout[-1500:] + proc.stderr[-1500:], file=sys.stderr)
    return proc.returncode


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = common.cpu_model("?")
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "loadavg_at_start": list(os.getloadavg()),
        "temp_dir": tempfile.gettempdir(),
        "temp_dir_filesystem": common.filesystem_of(tempfile.gettempdir()),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cpu_percent(seconds: float) -> float | None:
    """How busy the machine's CPUs are over ``seconds`` while this run starts nothing:
    before the first server and after the last one, that is other people's work."""
    try:
        b0, t0 = _cpu_jiffies()
        time.sleep(seconds)
        b1, t1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * (b1 - b0) / max(t1 - t0, 1), 1)


def harness_floor_ns() -> dict[str, float]:
    """What the timing harness itself costs: perf_counter_ns around a no-op call."""
    pc = time.perf_counter_ns

    def noop() -> None:
        return None

    lat = array("q")
    gc.disable()
    try:
        for _ in range(20000):
            t0 = pc()
            noop()
            t1 = pc()
            lat.append(t1 - t0)
    finally:
        gc.enable()
    p = percentiles(lat)
    return {"noop_call_p50_ns": p["p50"], "noop_call_p99_ns": p["p99"]}


# --------------------------------------------------------------------------- statistics


def percentiles(samples: "array[int] | Sequence[int]") -> dict[str, float]:
    """p50/p99/mean in ns (nearest-rank on the sorted samples)."""
    n = len(samples)
    if n == 0:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    try:
        import numpy as np

        a = np.frombuffer(samples, dtype=np.int64) if isinstance(samples, array) else np.asarray(samples)
        p50, p99 = np.percentile(a, [50, 99], method="inverted_cdf")
        return {"p50": float(p50), "p99": float(p99), "mean": float(a.mean())}
    except ImportError:
        s = sorted(samples)
        return {
            "p50": float(s[max(0, -(-n * 50 // 100) - 1)]),
            "p99": float(s[max(0, -(-n * 99 // 100) - 1)]),
            "mean": sum(s) / n,
        }


# --------------------------------------------------------------------------- client processes

# Inherited by the forked clients (never pickled): the rings and their keys.
_RINGS: dict[str, ycsb.OpRing] = {}
_RING_KEYS: dict[str, list[bytes]] = {}
CLIENT_PIDS: list[int] = []
RUNTIME_INFO: dict[str, str] = {}


def value_pool(value_size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(value_size) for _ in range(VALUE_POOL)]


def _client_main(
    peer: Peer,
    conn: multiprocessing.connection.Connection,
    client_id: int,
    nclients: int,
    record_count: int,
    value_size: int,
    seed: int,
) -> None:
    # The runner stops clients itself; Ctrl-C in the terminal must not kill them mid-op.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    store: Store | None = None
    try:
        store = peer.connect()
        values = value_pool(value_size, seed * 7919 + client_id)
        warm = random.Random(seed + client_id)
        for _ in range(200):
            store.get(ycsb.key_for(warm.randrange(record_count)))
        # Touch what the fork shared now, not inside the first timed window.
        gc.collect()
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, wname, run_tag = msg
            gc.collect()
            conn.send(("armed", None))
            _, start_ns, deadline_ns = conn.recv()
            cpu0 = os.times()
            result = _timed_run(store, wname, start_ns, deadline_ns, run_tag, client_id, nclients, record_count, values)
            cpu1 = os.times()
            result["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            conn.send(("result", result))
    except BaseException:  # noqa: BLE001 - every failure goes back to the runner as text
        try:
            conn.send(("error", traceback.format_exc(limit=8)))
        except OSError:
            pass
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass


def _timed_run(
    store: Store,
    wname: str,
    start_ns: int,
    deadline_ns: int,
    run_tag: int,
    client_id: int,
    nclients: int,
    record_count: int,
    values: list[bytes],
) -> dict[str, Any]:
    ring = _RINGS[wname]
    ops = ring.ops
    items = ring.items
    keys = _RING_KEYS.get(wname)
    latest = ring.workload.latest
    n = len(ops)
    i = (client_id * n) // nclients  # each client walks the ring from its own offset
    get = store.get
    put = store.put
    pc = time.perf_counter_ns
    lat = {op: array("q") for op in ycsb.OP_NAMES}
    rd, up, ins, rmw = (lat[ycsb.READ].append, lat[ycsb.UPDATE].append, lat[ycsb.INSERT].append, lat[ycsb.RMW].append)
    READ, UPDATE, INSERT = ycsb.READ, ycsb.UPDATE, ycsb.INSERT
    inserted: list[bytes] = []
    misses = 0
    done = 0
    key_for = ycsb.key_for
    insert_prefix = b"ins%d-%d-" % (run_tag, client_id)
    nvals = len(values)
    now = pc()
    if start_ns - now > 2_000_000:
        time.sleep((start_ns - now - 1_000_000) / 1e9)
    while pc() < start_ns:
        pass
    gc.disable()
    t1 = first = pc()
    try:
        while True:
            op = ops[i]
            if latest:
                off = items[i]
                nins = len(inserted)
                if off < nins:
                    key = inserted[nins - 1 - off]
                else:
                    key = key_for(max(record_count - 1 - (off - nins), 0))
            else:
                key = keys[i]  # type: ignore[index]
            if op == READ:
                t0 = pc()
                v = get(key)
                t1 = pc()
                rd(t1 - t0)
                if v is None:
                    misses += 1
            elif op == UPDATE:
                val = values[done % nvals]
                t0 = pc()
                put(key, val)
                t1 = pc()
                up(t1 - t0)
            elif op == INSERT:
                key = insert_prefix + b"%d" % len(inserted)
                val = values[done % nvals]
                t0 = pc()
                put(key, val)
                t1 = pc()
                ins(t1 - t0)
                inserted.append(key)
            else:
                val = values[done % nvals]
                t0 = pc()
                v = get(key)
                put(key, val)
                t1 = pc()
                rmw(t1 - t0)
                if v is None:
                    misses += 1
            done += 1
            i += 1
            if i == n:
                i = 0
            if t1 >= deadline_ns:
                break
    finally:
        gc.enable()
    return {
        "first_ns": first,
        "last_ns": t1,
        "late_ns": first - start_ns,
        "done": done,
        "misses": misses,
        "lat": {ycsb.OP_NAMES[op]: a.tobytes() for op, a in lat.items() if len(a)},
    }


class CpuAccount:
    """CPU used by other work during a cell: all CPUs' busy time minus ours.

    Ours is the clients (they report their own CPU time), the server under test
    (/proc/<pid>/stat) and this runner. Kernel threads that serve our own fsyncs
    count as "other", so durable-write cells carry a few percent of their own.
    """

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.t0 = time.perf_counter()
        self.busy0 = self._busy_s()
        self.server0 = self._servers_s()
        self.self0 = self._self_s()

    def _busy_s(self) -> float:
        try:
            return _cpu_jiffies()[0] / self._TICK
        except (OSError, ValueError, IndexError):
            return float("nan")

    def _servers_s(self) -> float:
        total = 0.0
        for pid in self.server_pids:
            try:
                # Fields after the ")" of comm: utime and stime are the 12th and 13th.
                rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(rest[11]) + int(rest[12])) / self._TICK
            except (OSError, ValueError, IndexError):
                pass
        return total

    @staticmethod
    def _self_s() -> float:
        t = os.times()
        return t.user + t.system

    def other_percent(self, clients_cpu_s: float) -> float | None:
        wall = time.perf_counter() - self.t0
        busy = self._busy_s() - self.busy0
        ours = clients_cpu_s + (self._servers_s() - self.server0) + (self._self_s() - self.self0)
        if busy != busy or wall <= 0:  # NaN: no /proc/stat
            return None
        ncpu = os.cpu_count() or 1
        # Clamped: the samples of /proc/stat and of the processes are not taken at
        # the same instant, so the difference can overshoot 0..100 by a little.
        return round(min(max(busy - ours, 0.0) / (wall * ncpu) * 100.0, 100.0), 1)


class ClientGroup:
    """``nclients`` forked client processes, each with its own handle, driven over pipes."""

    def __init__(self, peer: Peer, nclients: int, params: Params, value_size: int, state: RunState) -> None:
        self.peer = peer
        self.nclients = nclients
        self.params = params
        self.state = state
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[multiprocessing.connection.Connection] = []
        # fork: the clients inherit the rings and the peer object instead of pickling them,
        # and start in milliseconds (16 spawned interpreters would take seconds each time).
        ctx = multiprocessing.get_context("fork")
        # Objects inherited from the runner stay out of the clients' collections, so a
        # collection does not copy every shared page (copy-on-write) mid-measurement.
        gc.freeze()
        for cid in range(nclients):
            parent_conn, child_conn = ctx.Pipe()
            p = ctx.Process(
                target=_client_main,
                args=(peer, child_conn, cid, nclients, params.record_count, value_size, params.seed),
                name=f"bench-client-{peer.id}-{cid}",
                daemon=True,
            )
            p.start()
            child_conn.close()
            self.procs.append(p)
            self.conns.append(parent_conn)
            if p.pid is not None:
                CLIENT_PIDS.append(p.pid)
            state.workers.append(p)
        gc.unfreeze()
        for cid, msg in enumerate(self._gather(60.0)):
            if msg[0] != "ready":
                raise RuntimeError(f"client {cid} failed to start: {msg[1]}")

    def _gather(self, timeout_s: float) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout_s
        out: list[tuple[str, Any]] = []
        for cid, c in enumerate(self.conns):
            left = deadline - time.monotonic()
            if left <= 0 or not c.poll(left):
                raise RuntimeError(f"client {cid} did not answer within {timeout_s:.0f} s")
            try:
                out.append(c.recv())
            except EOFError:
                raise RuntimeError(f"client {cid} (pid {self.procs[cid].pid}) died") from None
        return out

    def run(self, wname: str, run_tag: int) -> dict[str, Any]:
        dur_ns = int(self.params.duration_s * 1e9)
        settle_s = self.peer.settle(SETTLE_TIMEOUT_S)
        for c in self.conns:
            c.send(("prepare", wname, run_tag))
        for cid, msg in enumerate(self._gather(60.0)):
            if msg[0] != "armed":
                raise RuntimeError(f"client {cid}: {msg[1]}")
        # Every client is armed and waiting on its pipe: start together, a little in the
        # future so the last one has read its message (16 clients share 2 cores).
        cpu0 = CpuAccount(self.peer.server_pids())
        start_ns = time.perf_counter_ns() + 20_000_000 + 2_000_000 * self.nclients
        for c in self.conns:
            c.send(("go", start_ns, start_ns + dur_ns))
        msgs = self._gather(self.params.duration_s + 120.0)
        errors = [m[1] for m in msgs if m[0] == "error"]
        if errors:
            raise RuntimeError(errors[0])
        parts = [m[1] for m in msgs]
        agg = aggregate(parts)
        agg["other_cpu_percent"] = cpu0.other_percent(sum(p["cpu_s"] for p in parts))
        agg["settle_s"] = round(settle_s, 3)
        return agg

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            stop_process(p)
            if p in self.state.workers:
                self.state.workers.remove(p)
        for c in self.conns:
            c.close()


def stop_process(p: multiprocessing.process.BaseProcess) -> None:
    """Join a client; SIGTERM then SIGKILL it by pid if it does not leave."""
    p.join(5.0)
    if p.is_alive() and p.pid is not None:
        os.kill(p.pid, signal.SIGTERM)
        p.join(3.0)
    if p.is_alive() and p.pid is not None:
        os.kill(p.pid, signal.SIGKILL)
        p.join(3.0)


def aggregate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    first = min(p["first_ns"] for p in parts)
    last = max(p["last_ns"] for p in parts)
    wall_s = max(last - first, 1) / 1e9
    done = sum(p["done"] for p in parts)
    ops: dict[str, Any] = {}
    for name in LATENCY_OPS:
        merged = array("q")
        for p in parts:
            if name in p["lat"]:
                merged.frombytes(p["lat"][name])
        if len(merged):
            pc = percentiles(merged)
            ops[name] = {
                "count": len(merged),
                "p50_us": round(pc["p50"] / 1000, 2),
                "p99_us": round(pc["p99"] / 1000, 2),
                "mean_us": round(pc["mean"] / 1000, 2),
            }
    return {
        "ops_per_s": round(done / wall_s, 1),
        "ops_per_s_per_client": round(done / wall_s / len(parts), 1),
        "total_ops": done,
        "wall_s": round(wall_s, 3),
        "max_start_lateness_ms": round(max(p["late_ns"] for p in parts) / 1e6, 1),
        "misses": sum(p["misses"] for p in parts),
        "ops": ops,
    }


# --------------------------------------------------------------------------- phases


def load_records(peer: Peer, record_count: int, value_size: int, seed: int) -> float:
    pool = value_pool(value_size, seed)
    items = [(ycsb.key_for(i), pool[i % VALUE_POOL]) for i in range(record_count)]
    store = peer.connect()
    try:
        t0 = time.perf_counter()
        store.load(items)
        elapsed = time.perf_counter() - t0
        # A broken adapter must fail here, not show up as fast misses later.
        for i in (0, record_count // 2, record_count - 1):
            got = store.get(ycsb.key_for(i))
            if got != pool[i % VALUE_POOL]:
                raise RuntimeError(f"after load, key {ycsb.key_for(i)!r} reads back {got!r:.60}")
    finally:
        store.close()
    return elapsed


def new_workdir(state: RunState, tag: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"walcache-bench-{tag}-"))
    state.workdirs.append(d)
    return d


def bench_peer(peer: Peer, params: Params, state: RunState, results: list[dict[str, Any]], run_tag: list[int]) -> None:
    for value_size in params.value_sizes:
        workdir = new_workdir(state, peer.id)
        state.started.append(peer)
        try:
            try:
                peer.start(workdir, params.record_count)
                load_s = load_records(peer, params.record_count, value_size, params.seed)
            except Exception as exc:  # noqa: BLE001 - every cell of this size gets the reason
                reason = f"start or load failed: {type(exc).__name__}: {exc}"
                for nclients in params.clients:
                    for w in params.workloads:
                        results.append(_error_row(peer, w, value_size, nclients, reason))
                continue
            print(
                f"  {peer.id}: {value_size} B values, loaded {params.record_count:,} keys in {load_s:.2f} s",
                file=sys.stderr,
            )
            try:
                RUNTIME_INFO.update(peer.runtime_info())
            except Exception as exc:  # noqa: BLE001 - informational only
                RUNTIME_INFO[f"{peer.id} runtime info"] = f"unavailable: {exc}"
            for nclients in params.clients:
                bench_clients(peer, params, state, results, run_tag, value_size, nclients, load_s)
        finally:
            peer.stop()
            state.started.remove(peer)
            shutil.rmtree(workdir, ignore_errors=True)
            state.workdirs.remove(workdir)


def bench_clients(
    peer: Peer,
    params: Params,
    state: RunState,
    results: list[dict[str, Any]],
    run_tag: list[int],
    value_size: int,
    nclients: int,
    load_s: float,
) -> None:
    group: ClientGroup | None = None
    try:
        for w in params.workloads:
            run_tag[0] += 1
            try:
                if group is None:
                    group = ClientGroup(peer, nclients, params, value_size, state)
                agg = group.run(w, run_tag[0])
            except Exception as exc:  # noqa: BLE001 - recorded; fresh clients for the next workload
                results.append(_error_row(peer, w, value_size, nclients, f"{type(exc).__name__}: {exc}"))
                if group is not None:
                    group.close()
                    group = None
                continue
            results.append(
                {
                    "peer": peer.id,
                    "workload": w,
                    "value_size": value_size,
                    "clients": nclients,
                    "status": "ok",
                    "load_s": round(load_s, 3),
                    **agg,
                }
            )
            print(
                f"    {w} x{nclients:<2} {agg['ops_per_s']:>12,.0f} ops/s  {_lat_summary(agg['ops'])}",
                file=sys.stderr,
            )
    finally:
        if group is not None:
            group.close()


def _error_row(peer: Peer, w: str, value_size: int, nclients: int, error: str) -> dict[str, Any]:
    print(f"    {w} x{nclients}: ERROR {error.strip().splitlines()[-1] if error.strip() else error}", file=sys.stderr)
    return {"peer": peer.id, "workload": w, "value_size": value_size, "clients": nclients, "status": "error", "error": error}


def _lat_summary(ops: dict[str, Any]) -> str:
    return "  ".join(f"{k} p50 {v['p50_us']:.1f} p99 {v['p99_us']:.1f} us" for k, v in ops.items())


def restart_test(peer: Peer, params: Params, state: RunState) -> dict[str, Any]:
    workdir = new_workdir(state, peer.id + "-restart")
    state.started.append(peer)
    row: dict[str, Any] = {"peer": peer.id, "keys": params.restart_keys, "value_size": RESTART_VALUE_SIZE}
    try:
        peer.start(workdir, params.restart_keys)
        load_s = load_records(peer, params.restart_keys, RESTART_VALUE_SIZE, params.seed)
        row["load_s"] = round(load_s, 3)
        row["data_bytes_before_kill"] = peer.data_bytes()
        row["restart_s"] = round(peer.restart_after_kill(), 3)
        # The restart only counts if the data came back: check a seeded sample.
        rng = random.Random(params.seed)
        pool = value_pool(RESTART_VALUE_SIZE, params.seed)
        store = peer.connect()
        try:
            sample = [rng.randrange(params.restart_keys) for _ in range(200)]
            bad = [i for i in sample if store.get(ycsb.key_for(i)) != pool[i % VALUE_POOL]]
        finally:
            store.close()
        row["verified_sample"] = len(sample)
        row["lost_in_sample"] = len(bad)
        row["status"] = "ok" if not bad else "error"
        if bad:
            row["error"] = f"{len(bad)} of {len(sample)} sampled keys missing or wrong after restart"
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        peer.stop()
        state.started.remove(peer)
        shutil.rmtree(workdir, ignore_errors=True)
        state.workdirs.remove(workdir)
    return row


# --------------------------------------------------------------------------- report


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_us(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, computed from this run: reported, never asserted."""
    rows = {(r["peer"], r["workload"], r["value_size"], r["clients"]): r for r in doc["results"] if r["status"] == "ok"}
    out: list[dict[str, Any]] = []
    specs = [
        ("C", "walcache-always", "redis-always", 50.0, "Workload C: walcache >= 50x Redis (redis-py), per client process"),
        ("C", "walcache-always", "lmdb", 1.5, "Workload C: walcache >= 1.5x LMDB, per client process"),
    ]
    for vs in doc["parameters"]["value_sizes"]:
        for wl, ours, theirs, factor, text in specs:
            for nc in doc["parameters"]["clients"]:
                a, b = rows.get((ours, wl, vs, nc)), rows.get((theirs, wl, vs, nc))
                out.append(_target_row(text, vs, nc, a, b, factor, "ops_per_s_per_client"))
        nc16 = max(doc["parameters"]["clients"])
        a, b = rows.get(("walcache-always", "A", vs, nc16)), rows.get(("redis-always", "A", vs, nc16))
        out.append(
            _target_row(
                f"Workload A with {nc16} clients: walcache durable >= 3x Redis appendfsync always",
                vs, nc16, a, b, 3.0, "ops_per_s",
            )
        )  # fmt: skip
    return out


def _target_row(
    text: str, vs: int, nc: int, a: dict[str, Any] | None, b: dict[str, Any] | None, factor: float, key: str
) -> dict[str, Any]:
    row: dict[str, Any] = {"target": text, "value_size": vs, "clients": nc, "factor_wanted": factor}
    if a is None or b is None:
        row["status"] = "not measured"
        return row
    ratio = a[key] / b[key] if b[key] else float("inf")
    row.update(ratio=round(ratio, 2), status="met" if ratio >= factor else "not met")
    return row


def _cell(text: object) -> str:
    """Text safe inside one Markdown table cell (server logs carry pipes and newlines)."""
    return " ".join(str(text).replace("|", "/").split())


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    p = doc["parameters"]
    lines: list[str] = []
    lines.append(f"# walcache peer benchmark, {doc['date']}{' (--quick)' if p['quick'] else ''}")
    lines.append("")
    lines.append(
        f"Machine: {m['cpu_model']}, nproc={m['nproc']}, kernel {m['kernel']}, {m['os']}, Python {m['python']}. "
        f"Data in {m['temp_dir']} ({m['temp_dir_filesystem']})."
    )
    lines.append(
        f"Parameters: {p['record_count']:,} keys, values {', '.join(str(v) + ' B' for v in p['value_sizes'])}, "
        f"YCSB {','.join(p['workloads'])} with scrambled zipfian {p['zipfian_constant']} (seed {p['seed']}), "
        f"{'/'.join(map(str, p['clients']))} client processes, {p['duration_s']} s per cell; "
        f"restart test with {p['restart_keys']:,} keys."
    )
    lines.append("Versions: " + "; ".join(f"{k} {_cell(v)}" for k, v in doc["versions"].items()) + ".")
    lines.append("")
    for note in doc["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    lines.append("## Peers")
    lines.append("")
    lines.append("| peer | setting | acked write survives power loss | status |")
    lines.append("|---|---|---|---|")
    for pe in doc["peers"]:
        status = "measured" if pe["status"] == "measured" else f"skipped: {_cell(pe['reason'])}"
        lines.append(f"| {pe['id']} | {pe['setting']} | {pe['durability']} | {status} |")
    peer_order = [pe["id"] for pe in doc["peers"] if pe["status"] == "measured"]
    power = {pe["id"]: pe["survives_power_loss"] for pe in doc["peers"]}
    by_key = {(r["peer"], r["workload"], r["value_size"], r["clients"]): r for r in doc["results"]}
    for vs in p["value_sizes"]:
        lines.append("")
        lines.append(f"## Throughput, {vs} B values (ops/s, all client processes together)")
        lines.append("")
        lines.append("| peer | survives power loss | clients | " + " | ".join(p["workloads"]) + " |")
        lines.append("|---|---|---:|" + "---:|" * len(p["workloads"]))
        for pid in peer_order:
            for nc in p["clients"]:
                cells = []
                for w in p["workloads"]:
                    r = by_key.get((pid, w, vs, nc))
                    if r is None:
                        cells.append("-")
                    elif r["status"] != "ok":
                        cells.append("error")
                    else:
                        cells.append(fmt_rate(r["ops_per_s"]))
                lines.append(f"| {pid} | {power[pid]} | {nc} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Latency (µs, p50 / p99 per operation type)")
    lines.append("")
    lines.append(
        "| peer | workload | value | clients | ops/s | read | update | insert | read-modify-write | misses | other CPU % |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pid in peer_order:
        for vs in p["value_sizes"]:
            for nc in p["clients"]:
                for w in p["workloads"]:
                    r = by_key.get((pid, w, vs, nc))
                    if r is None:
                        continue
                    if r["status"] != "ok":
                        err = _cell(r["error"].strip().splitlines()[-1][:100] if r["error"].strip() else "?")
                        lines.append(f"| {pid} | {w} | {vs} | {nc} | error: {err} | | | | | | |")
                        continue
                    cells = []
                    for op in LATENCY_OPS:
                        o = r["ops"].get(op)
                        cells.append("-" if o is None else f"{fmt_us(o['p50_us'])} / {fmt_us(o['p99_us'])}")
                    other = r.get("other_cpu_percent")
                    lines.append(
                        f"| {pid} | {w} | {vs} | {nc} | {fmt_rate(r['ops_per_s'])} | "
                        + " | ".join(cells)
                        + f" | {r['misses']} | {'-' if other is None else other} |"
                    )
    lines.append("")
    lines.append(f"## Restart after SIGKILL ({p['restart_keys']:,} keys of {RESTART_VALUE_SIZE} B)")
    lines.append("")
    lines.append("| peer | load s | data on disk MB | restart until it answers, s | sampled keys intact |")
    lines.append("|---|---:|---:|---:|---|")
    for r in doc["restart"]:
        if r.get("status") == "skipped":
            lines.append(f"| {r['peer']} | skipped: {_cell(r['reason'])} | | | |")
        elif r.get("status") == "error" and "restart_s" not in r:
            lines.append(f"| {r['peer']} | error: {_cell(r.get('error', '?'))[:200]} | | | |")
        else:
            intact = f"{r['verified_sample'] - r['lost_in_sample']}/{r['verified_sample']}"
            lines.append(
                f"| {r['peer']} | {r['load_s']:.2f} | {r['data_bytes_before_kill'] / 1e6:.1f} | {r['restart_s']:.3f} | {intact} |"
            )
    lines.append("")
    lines.append("## Targets from the issue (reported, not asserted)")
    lines.append("")
    lines.append("| target | value | clients | ratio | status |")
    lines.append("|---|---:|---:|---:|---|")
    for t in doc["targets"]:
        ratio = f"{t['ratio']:.2f}x" if "ratio" in t else "-"
        lines.append(f"| {t['target']} | {t['value_size']} | {t['clients']} | {ratio} | {t['status']} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer keys, shorter runs, same outputs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON, Markdown and PNG (default bench/results)")
    ap.add_argument("--clients", default="1,4,16", help="client process counts (default 1,4,16)")
    ap.add_argument("--workloads", default="A,B,C,D,F", help="YCSB workloads (default A,B,C,D,F)")
    ap.add_argument(
        "--peers",
        default="all",
        help="peer ids or names, comma separated: " + ",".join(p.id for p in peers_mod.all_peers()) + " (or walcache, redis)",
    )
    ap.add_argument("--value-sizes", default="100,4096", help="value sizes in bytes (default 100,4096)")
    ap.add_argument("--keys", type=int, help="records loaded (default 100,000; --quick 2,000)")
    ap.add_argument("--duration", type=float, help="seconds per workload run (default 1.5; --quick 0.1)")
    ap.add_argument("--restart-keys", type=int, help="keys for the restart test (default 1,000,000; --quick 20,000)")
    ap.add_argument("--seed", type=int, default=20240611, help="seed of the key choice and values")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get/pip install missing peers (they are skipped)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def make_params(a: argparse.Namespace) -> Params:
    all_ids = [p.id for p in peers_mod.all_peers()]
    if a.peers == "all":
        chosen = all_ids
    else:
        chosen = []
        for tok in (t.strip() for t in a.peers.split(",") if t.strip()):
            matches = [pid for pid in all_ids if pid == tok or pid.split("-")[0] == tok]
            if not matches:
                raise SystemExit(f"unknown peer {tok!r}; known: {', '.join(all_ids)}")
            chosen += [m for m in matches if m not in chosen]
    workloads = [w.strip().upper() for w in a.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in ycsb.WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(ycsb.WORKLOADS)}")
    clients = [int(c) for c in a.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1:
        raise SystemExit("--clients needs positive counts")
    return Params(
        quick=a.quick,
        record_count=a.keys or (2_000 if a.quick else 100_000),
        value_sizes=[int(v) for v in a.value_sizes.split(",") if v.strip()],
        clients=clients,
        workloads=workloads,
        duration_s=a.duration or (0.1 if a.quick else 1.5),
        ring_length=8192 if a.quick else 131072,
        restart_keys=a.restart_keys or (20_000 if a.quick else 1_000_000),
        seed=a.seed,
        peers=chosen,
    )


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cleanup(state: RunState) -> None:
    """Stop every client and server we started, by pid, and remove temp dirs."""
    for p in list(state.workers):
        stop_process(p)
    state.workers.clear()
    for peer in list(state.started):
        try:
            peer.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"stopping {peer.id}: {exc}", file=sys.stderr)
    state.started.clear()
    for d in state.workdirs:
        shutil.rmtree(d, ignore_errors=True)
    state.workdirs.clear()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    params = make_params(a)
    wall0 = time.perf_counter()
    # Both end the run through the finally block that stops every server by pid (SIGINT
    # explicitly: a shell that starts us in the background leaves it ignored).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    now = _dt.datetime.now().astimezone()
    install_log: list[str] = []
    if not a.no_install:
        install_missing(install_log)

    machine = machine_info()
    machine["other_cpu_busy_percent_before"] = busy_cpu_percent(0.5 if params.quick else 2.0)
    state = RunState()
    all_by_id = {p.id: p for p in peers_mod.all_peers()}
    peer_rows: list[dict[str, Any]] = []
    runnable: list[Peer] = []
    versions: dict[str, str] = {"python": platform.python_version(), "sqlite3 (stdlib)": __import__("sqlite3").sqlite_version}
    for pid in params.peers:
        peer = all_by_id[pid]
        row: dict[str, Any] = {
            "id": peer.id,
            "name": peer.name,
            "setting": peer.setting,
            "survives_power_loss": peer.survives_power_loss,
            "durability": peer.durability,
        }
        try:
            peer.check()
            versions.update(peer.versions())
            row["status"] = "measured"
            runnable.append(peer)
        except Exception as exc:  # noqa: BLE001 - any reason a peer cannot run is reported
            row["status"] = "skipped"
            row["reason"] = str(exc) if isinstance(exc, PeerUnavailable) else f"{type(exc).__name__}: {exc}"
            print(f"skipping {peer.id}: {exc}", file=sys.stderr)
        peer_rows.append(row)
    for dist in ("numpy", "matplotlib", "msgpack", "posix_ipc", "psutil", "xxhash"):
        v = peers_mod.pip_version(dist)
        if v:
            versions[dist] = v

    # Rings are drawn once, before any fork, and shared by every peer: same keys, same ops.
    for w in params.workloads:
        ring = ycsb.build_ring(ycsb.WORKLOADS[w], params.record_count, params.ring_length, params.seed + ord(w))
        _RINGS[w] = ring
        if not ring.workload.latest:
            _RING_KEYS[w] = [ycsb.key_for(k) for k in ring.items]

    results: list[dict[str, Any]] = []
    restart_rows: list[dict[str, Any]] = []
    run_tag = [0]
    interrupted = False
    try:
        for peer in runnable:
            print(f"{peer.id} ({peer.setting})", file=sys.stderr)
            bench_peer(peer, params, state, results, run_tag)
            mine = [r for r in results if r["peer"] == peer.id]
            if mine and all(r["status"] != "ok" for r in mine):
                # Nothing measured at all: the peer is skipped, with the first reason.
                _mark_failed(peer, peer_rows, mine[0]["error"])
        for pid in RESTART_PEERS:
            if pid not in params.peers:
                continue
            peer = all_by_id[pid]
            prow = next(r for r in peer_rows if r["id"] == pid)
            if prow["status"] != "measured":
                restart_rows.append({"peer": pid, "status": "skipped", "reason": prow.get("reason", "?")})
                continue
            print(f"restart test: {pid}, {params.restart_keys:,} keys", file=sys.stderr)
            r = restart_test(peer, params, state)
            restart_rows.append(r)
            if r["status"] == "ok":
                print(f"  restart {r['restart_s']:.3f} s after loading in {r['load_s']:.2f} s", file=sys.stderr)
            else:
                print(f"  restart test failed: {r.get('error')}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping clients and servers", file=sys.stderr)
    finally:
        cleanup(state)
    if interrupted:
        return 130

    notes = [
        f"Shared {os.cpu_count()}-core machine: client processes and servers run on the same cores (16 clients "
        "oversubscribe them), and other work may have been running; compare peers within this run. "
        f"CPU busy with other work just before the run: {machine['other_cpu_busy_percent_before']}%; "
        f"load average at start {machine['loadavg_at_start'][0]:.2f}.",
        "Latency is perf_counter_ns around each call with gc disabled in the timed loop; ops/s is all clients' "
        "operations over the wall time of the window, including the harness's own per-op cost (see harness).",
        "diskcache runs with its defaults, which do not fsync each commit: fast writes, not durable ones.",
        "Keys are pre-drawn (a ring per workload, each client starting at its own offset); in workload D each "
        "client reads 'latest' relative to its own inserts (see bench/ycsb.py).",
    ]
    late = [
        r for r in results if r["status"] == "ok" and r["max_start_lateness_ms"] > params.duration_s * 100
    ]
    busy = [r for r in results if r["status"] == "ok" and (r.get("other_cpu_percent") or 0) > 15]
    if busy:
        notes.append(
            f"{len(busy)} of {len(results)} cells ran while other work used more than 15% of the CPUs "
            "(column 'other CPU %'): treat those rows as contaminated."
        )
    settled = [r for r in results if r["status"] == "ok" and r.get("settle_s", 0) >= 0.1]
    notes.append(
        "Before each cell the runner waits until the store's own background work is done (walcache's log "
        "compaction, Redis's AOF rewrite), so that a cell does not pay for the one before it"
        + (
            f": {len(settled)} cells waited, longest {max(r['settle_s'] for r in settled):.1f} s "
            f"({', '.join(sorted({r['peer'] for r in settled}))})."
            if settled
            else "; no cell had to wait."
        )
    )
    if late:
        notes.append(
            f"{len(late)} of {len(results)} cells had a client start more than 10% of the window late "
            "(cores oversubscribed): their throughput counts fewer clients for part of the window."
        )
    for pe in runnable:
        notes += pe.notes
    notes += install_log
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            **machine,
            "other_cpu_busy_percent_after": busy_cpu_percent(0.5 if params.quick else 2.0),
            "loadavg_at_end": list(os.getloadavg()),
        },
        "versions": {**versions, **RUNTIME_INFO},
        "parameters": {
            "quick": params.quick,
            "record_count": params.record_count,
            "value_sizes": params.value_sizes,
            "clients": params.clients,
            "workloads": params.workloads,
            "duration_s": params.duration_s,
            "ring_length": params.ring_length,
            "restart_keys": params.restart_keys,
            "seed": params.seed,
            "zipfian_constant": ycsb.ZIPFIAN_CONSTANT,
            "key_generator": "YCSB scrambled zipfian (workload D: latest)",
        },
        "harness": harness_floor_ns(),
        "notes": notes,
        "peers": peer_rows,
        "results": results,
        "restart": restart_rows,
        # Every process the run started, all stopped by pid before this was written.
        "processes": {
            "server_pids": list(peers_mod.ServerProcess.spawned_pids),
            "client_pids": list(CLIENT_PIDS),
            "still_running": [pid for pid in peers_mod.ServerProcess.spawned_pids + CLIENT_PIDS if _alive(pid)],
        },
    }
    doc["targets"] = targets(doc)
    md = render_markdown(doc)

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + now.strftime("%Y%m%d-%H%M%S")
    json_path, md_path, png_path = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    doc["files"] = {"json": json_path.name, "markdown": md_path.name, "png": png_path.name}
    try:
        import plot

        plot.write_plot(doc, png_path)
    except Exception as exc:  # noqa: BLE001 - the numbers still count without the picture
        doc["files"]["png"] = None
        doc["notes"].append(f"plot not written: {type(exc).__name__}: {exc}")
        md = render_markdown(doc)
    doc["wall_s"] = round(time.perf_counter() - wall0, 1)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, json_path)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path}, {md_path.name}, {png_path.name if doc['files']['png'] else 'no plot'} "
          f"({doc['wall_s']:.0f} s)", file=sys.stderr)  # fmt: skip
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_failed(peer: Peer, peer_rows: list[dict[str, Any]], reason: str) -> None:
    for r in peer_rows:
        if r["id"] == peer.id:
            r["status"] = "skipped"
            r["reason"] = f"failed during the run: {reason}"


if __name__ == "__main__":
    sys.exit(main())
