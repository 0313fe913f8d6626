"""Get latency of the shared table's pure-Python reader, against dict.get and LMDB.

    python bench/bench_get.py            # 100,000 keys, the 1M-key overwrite check too
    python bench/bench_get.py --quick    # smaller, for a smoke run

One process builds the table (10-byte keys, 100-byte values) and later rewrites random
keys at full speed; a second process measures ShmReader.lookup (user key -> value) and
ShmReader.get (encoded key -> (vflag, bytes)) over uniformly random keys, quiet and with
that writer running, and in the same run an in-process dict.get over the same keys and
LMDB's get (a new read transaction per get). Per-get latencies are timed one by one
(perf_counter_ns around each call; the timer's own cost is printed), rounds of the
variants are interleaved (order rotated, caches evicted before every pass) so that
machine noise and cache warmth hit them alike. Also printed: memory
per entry beyond key and value, the cost of each step of one lookup, and whether
overwriting N keys ten times grows the segment. Results go to
bench/results/get-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import lmdb

from walcache import ReadContention
from walcache.codec import encode_key
from walcache.shm import ShmReader, ShmTable, layout

import common
from common import KEY_BYTES, VALUE_BYTES


# -- the writer process ---------------------------------------------------------------------

def _writer(namespace: str, n: int, seed: int, conn: Connection, stop: Any, pin: bool) -> None:
    keys, values = common.dataset(n, seed)
    t = ShmTable.create(namespace, capacity=n)
    seqno = 0
    t0 = time.perf_counter()
    for k, v in zip(keys, values):
        seqno += 1
        t.put(encode_key(k), 1, v, seqno, 0)
    build_s = time.perf_counter() - t0
    t.publish()
    st = t.stats()
    kv = sum(len(encode_key(k)) + len(v) for k, v in zip(keys, values))
    conn.send({"build_s": build_s, "stats": st, "key_value_bytes": kv})
    ekeys = [encode_key(k) for k in keys]
    rng = random.Random(seed + 1)
    try:
        while True:
            cmd = conn.recv()
            if cmd == "write":
                if pin:
                    common.pin_cpu(1)
                writes = 0
                t0 = time.perf_counter()
                while not stop.is_set():
                    for _ in range(256):
                        seqno += 1
                        t.put(ekeys[rng.randrange(n)], 1, rng.randbytes(VALUE_BYTES), seqno, 0)
                    writes += 256
                conn.send({"writes": writes, "seconds": time.perf_counter() - t0, "segment": t.name})
            elif cmd == "exit":
                return
    finally:
        t.close(unlink=True)


# -- the measuring process ------------------------------------------------------------------

_contention = [0]


def _per_get(fn: Callable[[Any], Any], keys: list[Any]) -> list[int]:
    # A get that runs out of bounded retries raises ReadContention (the client would ask
    # the daemon): counted, and its time kept in the sample.
    clock = time.perf_counter_ns
    out = [0] * len(keys)
    i = 0
    for k in keys:
        t0 = clock()
        try:
            fn(k)
        except ReadContention:
            _contention[0] += 1
        out[i] = clock() - t0
        i += 1
    return out


def _batch_ns(fn: Callable[[Any], Any], keys: list[Any]) -> float:
    t0 = time.perf_counter_ns()
    for k in keys:
        try:
            fn(k)
        except ReadContention:
            _contention[0] += 1
    return (time.perf_counter_ns() - t0) / len(keys)


def _summary(samples: list[int], batches: list[float]) -> dict[str, float]:
    samples.sort()
    return {
        "median_ns": samples[len(samples) // 2],
        "p99_ns": samples[int(len(samples) * 0.99)],
        "p999_ns": samples[int(len(samples) * 0.999)],
        "batch_mean_ns": statistics.median(batches),
        "batch_min_ns": min(batches),
        "gets": len(samples),
    }


_SCRATCH = bytearray(64 << 20)  # twice the L3 of the machines we develop on


def _evict_caches() -> None:
    # Read 64 MiB so that no variant starts with the previous one's data still cached
    # (each pass reads the same keys: the one after would otherwise run warm).
    _SCRATCH.find(b"\x01")


def _measure(variants: dict[str, tuple[Callable[[Any], Any], list[Any]]], rounds: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[int]] = {name: [] for name in variants}
    batches: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    gc.disable()
    try:
        for rnd in range(rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:  # rotate the order
                fn, keys = variants[name]
                _evict_caches()
                samples[name] += _per_get(fn, keys)
                _evict_caches()
                batches[name].append(_batch_ns(fn, keys))
    finally:
        gc.enable()
    return {name: _summary(samples[name], batches[name]) for name in variants}


def _timer_overhead() -> int:
    clock = time.perf_counter_ns
    d = []
    for _ in range(100_000):
        t0 = clock()
        d.append(clock() - t0)
    d.sort()
    return d[len(d) // 2]


def _steps(r: ShmReader, sample: list[bytes]) -> list[tuple[str, float]]:
    """ns per get of lookup's steps, cumulatively (each function adds one step)."""
    hash_key = layout.hash_key
    FP = layout.FP_MASK

    def s0(key: bytes) -> object:
        return None

    def s1(key: bytes) -> object:
        t = type(key)
        if t is str:  # type: ignore[comparison-overlap]
            return None
        return b"b" + key

    def s2(key: bytes) -> object:
        kb = b"b" + key
        h = hash_key(kb)
        return h & FP, h & r._mask

    def s3(key: bytes) -> object:
        kb = b"b" + key
        h = hash_key(kb)
        f = h & FP
        x = r._slots[h & r._mask]
        w = x - f
        return r._lo <= w < r._hi

    def s4(key: bytes) -> object:
        kb = b"b" + key
        h = hash_key(kb)
        w = r._slots[h & r._mask] - (h & FP)
        if r._lo <= w < r._hi:
            Q = r._q
            s = r._sv[w]
            m = Q[w + 1]
            a = 8 * w + 32
            b = a + (m >> 32)
            e = b + (m & 0xFFFFFFFF)
            return s, e <= r._end
        return None

    def s5(key: bytes) -> object:
        kb = b"b" + key
        h = hash_key(kb)
        w = r._slots[h & r._mask] - (h & FP)
        if r._lo <= w < r._hi:
            Q = r._q
            s = r._sv[w]
            m = Q[w + 1]
            a = 8 * w + 32
            b = a + (m >> 32)
            e = b + (m & 0xFFFFFFFF)
            M = r._mm
            assert M is not None
            if e <= r._end and M[a:b] == kb:
                return s, M[b:e]
        return None

    def s6(key: bytes) -> object:
        kb = b"b" + key
        h = hash_key(kb)
        w = r._slots[h & r._mask] - (h & FP)
        if r._lo <= w < r._hi:
            Q = r._q
            s = r._sv[w]
            m = Q[w + 1]
            a = 8 * w + 32
            b = a + (m >> 32)
            e = b + (m & 0xFFFFFFFF)
            M = r._mm
            assert M is not None
            if e <= r._end and M[a:b] == kb:
                v = M[b:e]
                xv = Q[w + 2]
                if r._sv[w] == s and not s & 1:
                    return v, xv
        return None

    names = [
        ("loop + call", s0),
        ("type check + encode key", s1),
        ("xxh64 + fingerprint/index masks", s2),
        ("slot load + candidate range test", s3),
        ("record: seq + lens loads, bounds", s4),
        ("key slice + compare, value slice (copy)", s5),
        ("expiry word + seq re-read (validate)", s6),
        ("ShmReader.lookup (all + decode + expiry test)", r.lookup),
    ]
    totals: dict[str, list[float]] = {name: [] for name, _ in names}
    gc.disable()
    try:
        for _ in range(5):
            for name, fn in names:
                _evict_caches()
                totals[name].append(_batch_ns(fn, sample))
    finally:
        gc.enable()
    out = []
    prev = 0.0
    for name, _ in names:
        cum = statistics.median(totals[name])
        out.append((name, round(cum - prev, 1)))
        prev = cum
    return out


def _reader_proc(namespace: str, n: int, seed: int, gets: int, rounds: int, lmdb_path: str, conn: Connection, pin: bool) -> None:
    try:
        _reader_phases(namespace, n, seed, gets, rounds, lmdb_path, conn, pin)
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def _reader_phases(namespace: str, n: int, seed: int, gets: int, rounds: int, lmdb_path: str, conn: Connection, pin: bool) -> None:
    if pin:
        common.pin_cpu(0)
    keys, values = common.dataset(n, seed)
    rng = random.Random(seed + 2)
    # Fresh key objects, as a caller would pass them (not the dict's own key objects).
    sample = [bytes(bytearray(keys[rng.randrange(n)])) for _ in range(gets)]
    esample = [encode_key(k) for k in sample]
    d = dict(zip(keys, values))
    del keys, values
    r = ShmReader(namespace)
    env = lmdb.open(lmdb_path, readonly=True, lock=True, max_readers=16)

    def lmdb_get(k: bytes) -> Any:
        with env.begin() as txn:
            return txn.get(k)

    for k in sample[:1000]:  # the three agree before anything is timed
        assert r.lookup(k) == d[k] == lmdb_get(k) == r.get(encode_key(k))[1]  # type: ignore[index]
    quiet = _measure(
        {
            "dict.get": (d.get, sample),
            "ShmReader.lookup": (r.lookup, sample),
            "ShmReader.get": (r.get, esample),
            "lmdb get (new txn)": (lmdb_get, sample),
        },
        rounds,
    )
    steps = _steps(r, sample[: min(gets, 40_000)])
    conn.send({"quiet": quiet, "steps": steps, "timer_ns": _timer_overhead(), "contention": _contention[0]})
    assert conn.recv() == "measure"
    _contention[0] = 0
    busy = _measure(
        {
            "dict.get": (d.get, sample),
            "ShmReader.lookup": (r.lookup, sample),
            "ShmReader.get": (r.get, esample),
        },
        rounds,
    )
    conn.send({"writer": busy, "header": r.header(), "contention": _contention[0]})
    r.close()
    env.close()


# -- overwrite: does rewriting every key ten times grow the segment? -------------------------

def _overwrite(n: int, seed: int) -> dict[str, Any]:
    keys, values = common.dataset(n, seed)
    ekeys = [encode_key(k) for k in keys]
    ns = f"walcache-bench-ow-{os.getpid()}"
    t = ShmTable.create(ns, capacity=n)
    try:
        seqno = 0
        t0 = time.perf_counter()
        for k, v in zip(ekeys, values):
            seqno += 1
            t.put(k, 1, v, seqno, 0)
        insert_s = time.perf_counter() - t0
        before = t.stats()
        rng = random.Random(seed)
        fresh = rng.randbytes(VALUE_BYTES)
        t0 = time.perf_counter()
        for rnd in range(10):
            for k in ekeys:
                seqno += 1
                t.put(k, 1, fresh, seqno, 0)
        overwrite_s = time.perf_counter() - t0
        after = t.stats()
        return {
            "keys": n,
            "insert_per_s": round(n / insert_s),
            "overwrite_per_s": round(10 * n / overwrite_s),
            "segment_bytes_before": before["segment_bytes"],
            "segment_bytes_after": after["segment_bytes"],
            "unallocated_before": before["unallocated_bytes"],
            "unallocated_after": after["unallocated_bytes"],
            "segment_name_unchanged": before["name"] == after["name"],
            "grew": after["segment_bytes"] != before["segment_bytes"] or before["name"] != after["name"],
        }
    finally:
        t.close(unlink=True)


# -- main -------------------------------------------------------------------------------------

def _recv(conn: Connection, proc: Any, what: str) -> Any:
    """The next message from ``proc``; never waits on a process that is gone."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"the {what} process exited (code {proc.exitcode}) without reporting")
    msg = conn.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise RuntimeError(f"the {what} process failed:\n{msg['error']}")
    return msg


def _machine() -> dict[str, Any]:
    return {
        "cpu": common.cpu_model(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "lmdb": lmdb.version(),
        "note": "2 vCPUs shared with other work while measuring: treat absolute ns as noisy, compare within the run",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer keys and gets (smoke run)")
    ap.add_argument("--keys", type=int, default=None)
    ap.add_argument("--gets", type=int, default=None, help="gets per round and variant")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--overwrite-keys", type=int, default=None, help="0 skips the overwrite check")
    ap.add_argument("--writer-seconds", type=float, default=None)
    ap.add_argument("--no-pin", action="store_true", help="do not pin reader/writer to CPUs 0/1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    n = args.keys or (10_000 if args.quick else 100_000)
    gets = args.gets or (5_000 if args.quick else 40_000)
    rounds = args.rounds or (2 if args.quick else 5)
    ow = args.overwrite_keys if args.overwrite_keys is not None else (20_000 if args.quick else 1_000_000)
    pin = not args.no_pin
    ctx = multiprocessing.get_context("fork")
    namespace = f"walcache-bench-{os.getpid()}"
    stop = ctx.Event()
    wconn, wchild = ctx.Pipe()
    rconn, rchild = ctx.Pipe()
    procs = []
    results: dict[str, Any] = {
        "machine": _machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": {"keys": n, "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES, "gets_per_round": gets,
                   "rounds": rounds, "distribution": "uniform", "seed": args.seed, "pinned": pin},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="walcache-bench-lmdb-") as lmdb_dir:
        try:
            w = ctx.Process(target=_writer, args=(namespace, n, args.seed, wchild, stop, pin), daemon=True)
            procs.append(w)
            w.start()
            built = _recv(wconn, w, "writer")
            common.build_lmdb(lmdb_dir, n, args.seed)
            r = ctx.Process(
                target=_reader_proc, args=(namespace, n, args.seed, gets, rounds, lmdb_dir, rchild, pin), daemon=True
            )
            procs.append(r)
            r.start()
            quiet = _recv(rconn, r, "reader")
            wconn.send("write")
            time.sleep(0.2)
            rconn.send("measure")
            busy = _recv(rconn, r, "reader")
            stop.set()
            wres = _recv(wconn, w, "writer")
            wconn.send("exit")
            for p in procs:
                p.join(60)
        finally:
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, 9)
                    p.join(10)
    st = built["stats"]
    results["quiet"] = quiet["quiet"]
    results["with_writer"] = busy["writer"]
    results["writer"] = {"writes_per_s": round(wres["writes"] / wres["seconds"]), "build_s": round(built["build_s"], 2)}
    results["timer_overhead_ns"] = quiet["timer_ns"]
    results["read_contention"] = {"quiet": quiet["contention"], "with_writer": busy["contention"]}
    results["steps_ns"] = quiet["steps"]
    results["memory"] = {
        "entries": st["live"],
        "segment_bytes": st["segment_bytes"],
        "capacity": st["capacity"],
        "key_value_bytes": built["key_value_bytes"],
        "committed_bytes": st["committed_bytes"],
        "overhead_per_entry_committed": round((st["committed_bytes"] - built["key_value_bytes"]) / st["live"], 1),
        "overhead_per_entry_reserved": round((st["segment_bytes"] - built["key_value_bytes"]) / st["live"], 1),
        "overhead_per_entry_entries_only": round((st["used_bytes"] - built["key_value_bytes"]) / st["live"], 1),
    }
    if ow:
        results["overwrite"] = _overwrite(ow, args.seed)
    _print(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"get-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return 0


def _print(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"# shm get latency: {res['params']['keys']:,} keys ({KEY_BYTES} B keys, {VALUE_BYTES} B values), uniform random")
    print(f"# {m['cpu']}, {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}, lmdb {m['lmdb']}; {m['note']}")
    print(f"# per-get timing includes the timer itself (~{res['timer_overhead_ns']} ns)\n")
    dict_q = res["quiet"]["dict.get"]["median_ns"]
    lmdb_q = res["quiet"]["lmdb get (new txn)"]["median_ns"]
    print(f"| {'variant':<22} | {'writer':<7} | {'median ns':>9} | {'p99 ns':>7} | {'p99.9 ns':>8} | {'mean ns (loop)':>14} | {'x dict.get':>10} | {'x lmdb':>6} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 16}|{'-' * 12}|{'-' * 8}|")
    for phase, label in (("quiet", "no"), ("with_writer", "yes")):
        for name, s in res[phase].items():
            print(
                f"| {name:<22} | {label:<7} | {s['median_ns']:>9} | {s['p99_ns']:>7} | {s['p999_ns']:>8} | "
                f"{s['batch_mean_ns']:>14.0f} | {s['median_ns'] / dict_q:>10.2f} | {s['median_ns'] / lmdb_q:>6.2f} |"
            )
    print(
        f"\nconcurrent writer: {res['writer']['writes_per_s']:,} puts/s (random keys, same-size values); "
        f"gets that ran out of retries (ReadContention): {res['read_contention']}"
    )
    mem = res["memory"]
    print(
        f"\nmemory beyond key+value per entry: {mem['overhead_per_entry_committed']} B of committed shared memory "
        f"({mem['overhead_per_entry_entries_only']} B is each live entry's record header, padding and slot; the "
        f"rest is empty index slots and the last commit step); {mem['capacity']:,} slots, "
        f"{mem['committed_bytes']:,} bytes committed of a {mem['segment_bytes']:,}-byte sparse reservation "
        f"({mem['overhead_per_entry_reserved']} B/entry if the reservation counted)"
    )
    print("\none ShmReader.lookup, step by step (ns per get, loop means over the same keys):")
    for name, ns in res["steps_ns"]:
        print(f"  {ns:>7.1f}  {name}")
    ow = res.get("overwrite")
    if ow:
        print(
            f"\noverwrite {ow['keys']:,} keys ten times: segment {ow['segment_bytes_before']:,} -> "
            f"{ow['segment_bytes_after']:,} bytes, unallocated {ow['unallocated_before']:,} -> "
            f"{ow['unallocated_after']:,}, grew: {ow['grew']}; {ow['insert_per_s']:,} inserts/s, "
            f"{ow['overwrite_per_s']:,} overwrites/s"
        )


if __name__ == "__main__":
    sys.exit(main())
