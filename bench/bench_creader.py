"""The compiled reader against dict.get, the pure-Python reader and LMDB, in one run.

    python bench/bench_creader.py            # 100,000 keys, about 2 minutes
    python bench/bench_creader.py --quick    # smaller, for a smoke run

One process builds the shared table (10-byte keys, 100-byte values, as bench_get.py) and
can rewrite random keys at full speed (in place: same size). A second process measures,
over the same key sequence, interleaved round by round (in a new seeded order each
round) so that machine noise and the state one row leaves behind hit all rows alike:

- ``dict.get``: an in-process dict of the same keys and values (the floor);
- ``ShmReader.lookup``: the pure-Python reader (the reference);
- ``CReader.lookup``: the compiled reader's get, the client's hot path;
- ``CReader.get_many``: batches of 100 keys, reported per key;
- the same two with the compiled reader's result cache switched off (``_use_cache = 0``),
  to show what the cache does (the client runs with it on);
- ``lmdb get``: LMDB with a new read transaction per get (a separate writer process
  rewrites LMDB in the writer rows, as the table's writer does for the others).

Two key distributions: uniform over all keys, and uniform over 1,000 hot keys; each
quiet and with the writer running. Key objects are fresh copies (as a caller passes
them), so dict.get hashes them too. A figure is the median over rounds of the mean ns
per get of one pass over the sequence (a pass is timed as a whole: timing each get
would cost more than a get). Ratios are medians of per-round ratios to dict.get.
Results go to bench/results/creader-<date>-<time>.json (one file per run).
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
from walcache.shm import ShmReader, ShmTable
from walcache.shm.creader import CReader, extension, extension_error

import common
from common import KEY_BYTES, VALUE_BYTES
BATCH = 100
ROWS = ["dict.get", "python lookup", "C lookup", "C get_many /key", "C lookup, no cache", "C get_many /key, no cache",
        "lmdb get"]


# -- writer processes ----------------------------------------------------------------------------


def _table_writer(namespace: str, n: int, seed: int, conn: Connection, go: Any, stop: Any, pin: bool) -> None:
    keys, values = common.dataset(n, seed)
    t = ShmTable.create(namespace, capacity=n)
    try:
        for seqno, (k, v) in enumerate(zip(keys, values), 1):
            t.put(encode_key(k), 1, v, seqno, 0)
        t.publish()
        conn.send({"stats": t.stats()})
        if pin:
            common.pin_cpu(1)
        ekeys = [encode_key(k) for k in keys]
        rng = random.Random(seed + 1)
        seqno = n
        while True:
            go.wait()
            if stop.is_set():
                return
            writes = 0
            t0 = time.perf_counter()
            while go.is_set():
                for _ in range(256):
                    seqno += 1
                    t.put(ekeys[rng.randrange(n)], 1, rng.randbytes(VALUE_BYTES), seqno, 0)
                writes += 256
            conn.send({"writes": writes, "seconds": time.perf_counter() - t0})
    finally:
        t.close(unlink=True)


def _lmdb_writer(path: str, n: int, seed: int, conn: Connection, go: Any, stop: Any, pin: bool) -> None:
    keys, _ = common.dataset(n, seed)
    env = lmdb.open(path, map_size=1 << 30, sync=False, metasync=False)
    if pin:
        common.pin_cpu(1)
    rng = random.Random(seed + 3)
    try:
        while True:
            go.wait()
            if stop.is_set():
                return
            writes = 0
            t0 = time.perf_counter()
            while go.is_set():
                with env.begin(write=True) as txn:  # small transactions, like a busy service
                    for _ in range(16):
                        txn.put(keys[rng.randrange(n)], rng.randbytes(VALUE_BYTES))
                writes += 16
            conn.send({"writes": writes, "seconds": time.perf_counter() - t0})
    finally:
        env.close()


# -- the measuring process -------------------------------------------------------------------------


def _pass_ns(fn: Callable[[Any], Any], keys: list[Any]) -> float:
    t0 = time.perf_counter_ns()
    for k in keys:
        fn(k)
    return (time.perf_counter_ns() - t0) / len(keys)


def _batched_pass_ns(fn: Callable[[Any], Any], batches: list[list[Any]], n: int) -> float:
    t0 = time.perf_counter_ns()
    for b in batches:
        fn(b)
    return (time.perf_counter_ns() - t0) / n


def _measure(
    variants: dict[str, Callable[[], float]], rounds: int, seed: int
) -> tuple[dict[str, dict[str, float]], int]:
    per: dict[str, list[float]] = {name: [] for name in variants}
    contended = 0
    names = list(variants)
    rng = random.Random(seed)
    gc.disable()
    try:
        for rnd in range(rounds):
            # A new order every round: a row that always ran after the same other row
            # would inherit its caches and TLB state (the pure-Python reader maps the
            # segment at other addresses than the C reader: a C row right after it paid
            # for that, by as much as 80 ns a get, before the order was shuffled).
            order = names[:]
            rng.shuffle(order)
            for name in order:
                for _ in range(3):
                    try:
                        per[name].append(variants[name]())
                        break
                    except ReadContention:
                        contended += 1  # a pass that hit the retry bound is timed again
    finally:
        gc.enable()
    out: dict[str, dict[str, float]] = {}
    base = per["dict.get"]
    for name, xs in per.items():
        ratios = [x / d for x, d in zip(xs, base)]
        out[name] = {
            "median_ns": round(statistics.median(xs), 1),
            "min_ns": round(min(xs), 1),
            "x_dict_median": round(statistics.median(ratios), 3),
            "rounds": len(xs),
        }
    return out, contended


def _reader_proc(
    namespace: str, lmdb_path: str, n: int, hot: int, seed: int, gets: int, rounds: int, conn: Connection, pin: bool
) -> None:
    try:
        _reader(namespace, lmdb_path, n, hot, seed, gets, rounds, conn, pin)
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


def _reader(
    namespace: str, lmdb_path: str, n: int, hot: int, seed: int, gets: int, rounds: int, conn: Connection, pin: bool
) -> None:
    if pin:
        common.pin_cpu(0)
    keys, values = common.dataset(n, seed)
    d = dict(zip(keys, values))
    rng = random.Random(seed + 2)
    seqs = {
        "uniform": [bytes(bytearray(keys[rng.randrange(n)])) for _ in range(gets)],
        "hot": [bytes(bytearray(keys[rng.randrange(hot)])) for _ in range(gets)],
    }
    del keys, values
    py = ShmReader(namespace)
    c = CReader(namespace)
    env = lmdb.open(lmdb_path, readonly=True, lock=True, max_readers=16, map_size=1 << 30)
    begin = env.begin

    def lmdb_get(k: bytes) -> Any:
        with begin() as txn:
            return txn.get(k)

    for k in seqs["uniform"][:2000]:  # all readers agree before anything is timed
        assert c.lookup(k) == py.lookup(k) == d[k] == lmdb_get(k)
    assert c.get_many(seqs["uniform"][:BATCH]) == {k: d[k] for k in seqs["uniform"][:BATCH]}

    def variants(seq: list[bytes]) -> dict[str, Callable[[], float]]:
        batches = [seq[i : i + BATCH] for i in range(0, len(seq), BATCH)]
        def cache(on: int, fn: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                c._use_cache = on
                try:
                    return fn()
                finally:
                    c._use_cache = 1

            return run

        return {
            "dict.get": lambda: _pass_ns(d.get, seq),
            "python lookup": lambda: _pass_ns(py.lookup, seq),
            "C lookup": lambda: _pass_ns(c.lookup, seq),
            "C get_many /key": lambda: _batched_pass_ns(c.get_many, batches, len(seq)),
            "C lookup, no cache": cache(0, lambda: _pass_ns(c.lookup, seq)),
            "C get_many /key, no cache": cache(0, lambda: _batched_pass_ns(c.get_many, batches, len(seq))),
            "lmdb get": lambda: _pass_ns(lmdb_get, seq),
        }

    results: dict[str, Any] = {}
    for writer in (False, True):
        if writer:
            assert conn.recv() == "writer on"
        for dist, seq in seqs.items():
            figures, contended = _measure(variants(seq), rounds, seed + len(results))
            results[f"{dist}, {'writer' if writer else 'quiet'}"] = {"rows": figures, "contended_passes": contended}
        conn.send("done")
    results["c_reader_counters"] = {"retries": c.retries, "remaps": c.remaps, "contended": c.contended,
                                    "cache_hits": c.cache_hits}  # fmt: skip
    conn.send(results)
    c.close()
    py.close()
    env.close()


def _recv(conn: Connection, proc: multiprocessing.process.BaseProcess, what: str) -> Any:
    """The next message from ``proc``; fails loudly if it died or reported an error."""
    deadline = time.monotonic() + 1800
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise SystemExit(f"bench: the {what} process died (exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: no word from the {what} process in 30 minutes")
    msg = conn.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise SystemExit(f"bench: the {what} process failed:\n{msg['error']}")
    return msg


def _unlink_namespace(namespace: str) -> None:
    import posix_ipc

    for name in os.listdir("/dev/shm"):
        if name == namespace or name.startswith(namespace + "."):
            try:
                posix_ipc.unlink_shared_memory("/" + name)
            except posix_ipc.ExistentialError:
                pass


# -- main --------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    return {
        "cpu": common.cpu_model(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "lmdb": lmdb.version(),
        "loadavg_before": os.getloadavg(),
        "note": "2 vCPUs shared with other work while measuring: absolute ns are noisy, compare within the run",
    }


def _table(results: dict[str, Any]) -> str:
    scenarios = [k for k in results if "," in k]
    lines = ["| reader | " + " | ".join(scenarios) + " |", "|---" * (len(scenarios) + 1) + "|"]
    for row in ROWS:
        cells = []
        for sc in scenarios:
            f = results[sc]["rows"][row]
            cells.append(f"{f['median_ns']:,.0f} ns ({f['x_dict_median']:.2f}x)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for sc in (k for k in results if "," in k):
        rows = results[sc]["rows"]
        lm = rows["lmdb get"]["median_ns"] / rows["C lookup"]["median_ns"]
        out[sc] = {
            "C get <= 1.25x dict.get": [rows["C lookup"]["x_dict_median"], rows["C lookup"]["x_dict_median"] <= 1.25],
            "C get_many per key <= dict.get": [
                rows["C get_many /key"]["x_dict_median"], rows["C get_many /key"]["x_dict_median"] <= 1.0,
            ],
            "C get >= 2x faster than LMDB get": [round(lm, 2), lm >= 2.0],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer keys, gets and rounds (smoke run)")
    ap.add_argument("--keys", type=int, default=None)
    ap.add_argument("--hot", type=int, default=1000)
    ap.add_argument("--gets", type=int, default=None, help="gets per pass")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-pin", action="store_true", help="do not pin reader/writers to CPUs 0/1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if extension is None:
        print(f"the compiled reader is not built ({extension_error}): run `pip install -e .` with a C compiler")
        return 2
    n = args.keys or (10_000 if args.quick else 100_000)
    gets = args.gets or (10_000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 9)
    hot = min(args.hot, n)
    pin = not args.no_pin
    ctx = multiprocessing.get_context("fork")
    namespace = f"walcache-bench-c-{os.getpid()}"
    go, stop = ctx.Event(), ctx.Event()
    procs: list[multiprocessing.process.BaseProcess] = []
    results: dict[str, Any] = {
        "machine": _machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": {"keys": n, "hot_keys": hot, "key_bytes": KEY_BYTES, "value_bytes": VALUE_BYTES, "gets_per_pass": gets,
                   "rounds": rounds, "get_many_batch": BATCH, "seed": args.seed, "pinned": pin},  # fmt: skip
    }
    with tempfile.TemporaryDirectory(prefix="walcache-bench-lmdb-") as lmdb_dir:
        common.build_lmdb(lmdb_dir, n, args.seed)
        tconn, tchild = ctx.Pipe()
        lconn, lchild = ctx.Pipe()
        rconn, rchild = ctx.Pipe()
        try:
            tw = ctx.Process(target=_table_writer, args=(namespace, n, args.seed, tchild, go, stop, pin))
            tw.start()
            procs.append(tw)
            results["table"] = _recv(tconn, tw, "table writer")["stats"]
            lw = ctx.Process(target=_lmdb_writer, args=(lmdb_dir, n, args.seed, lchild, go, stop, pin))
            lw.start()
            procs.append(lw)
            rp = ctx.Process(target=_reader_proc, args=(namespace, lmdb_dir, n, hot, args.seed, gets, rounds, rchild, pin))
            rp.start()
            procs.append(rp)
            assert _recv(rconn, rp, "reader") == "done"  # quiet rows
            go.set()
            rconn.send("writer on")
            assert _recv(rconn, rp, "reader") == "done"  # writer rows
            go.clear()
            writes = {"table": _recv(tconn, tw, "table writer"), "lmdb": _recv(lconn, lw, "LMDB writer")}
            results.update(_recv(rconn, rp, "reader"))
            results["writers"] = {
                name: {"writes_per_s": round(w["writes"] / w["seconds"]), "seconds": round(w["seconds"], 1)}
                for name, w in writes.items()
            }
        finally:
            stop.set()
            go.set()
            for p in procs:
                p.join(30)
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, 9)
                    p.join(5)
            _unlink_namespace(namespace)  # a writer killed above could not unlink its segments
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["targets"] = _targets(results)
    print(f"walcache compiled reader, {n:,} keys ({KEY_BYTES}-byte keys, {VALUE_BYTES}-byte values), "
          f"{gets:,} gets per pass, median of {rounds} rounds; ns per get (x dict.get, median of per-round ratios)")  # fmt: skip
    print(_table(results))
    print(f"writers (writer rows): table {results['writers']['table']['writes_per_s']:,} writes/s, "
          f"LMDB {results['writers']['lmdb']['writes_per_s']:,} writes/s; C reader {results['c_reader_counters']}")  # fmt: skip
    for sc, checks in results["targets"].items():
        print(f"targets, {sc}: " + "; ".join(f"{k}: {v[0]} {'met' if v[1] else 'MISSED'}" for k, v in checks.items()))
    print(f"load average before/after: {results['machine']['loadavg_before']} / {results['machine']['loadavg_after']}"
          " (2 shared vCPUs: the figures are noisy)")  # fmt: skip
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"creader-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
