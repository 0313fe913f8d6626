#!/usr/bin/env python3
"""How long a growing shared table stops the daemon's writes: rebuild copy and index move.

    python bench/bench_rebuild.py            # 100,000 x 100 B and 150,000 x 4 KiB
    python bench/bench_rebuild.py --quick    # 20,000 keys of each size

When a put finds the table's index or data area full, the daemon builds a larger
segment, copies every live record into it, publishes it and retires the old one
(ShmTable._rebuild). Readers go on reading the old segment meanwhile; every write
waits. For each run this builds a fresh table of N keys in bulk and times one
whole rebuild that doubles its index (and sizes the data area for the live
records), with the compiled copy (_creader.copy_live) and with the pure-Python
loop it must match byte for byte, alternating which goes first; the median of
``--runs`` each.

With a reserve (the daemon's default: --max-memory reserves room in the segment)
the index grows by moving instead (ShmTable._move_index): only its slots are
rewritten, the records stay. The same tables time one such move, compiled and
pure-Python fill, the same way.

Then growth through puts: N puts of 4 KiB one by one into a table sized for its keys
(the index never grows), without a memory limit (the data area doubles by rebuilds)
and with one (the data then grows in place), and into a table of the daemon's
default 1,024 keys with a memory limit (the index moves as well); the slowest put,
the rebuilds and the index moves are reported.

Prints a table and writes bench/results/rebuild-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from walcache.shm import ShmTable  # noqa: E402
from walcache.shm.creader import extension  # noqa: E402


def _timed_rebuild(keys: int, value: bytes, compiled: bool) -> tuple[float, int, int]:
    """Build a fresh table of ``keys`` keys, publish it, time one rebuild that doubles its
    index; (seconds, capacity before, capacity after)."""
    ns = f"wcbench-rb-{uuid.uuid4().hex[:10]}"
    try:
        table = ShmTable.build(ns, [(b"k%011d" % i, 1, value, i + 1, 0) for i in range(keys)], capacity=keys)
        try:
            table.publish()
            before = table.stats()["capacity"]
            # Room for as many keys again: the index doubles, as a growing table's does.
            t0 = time.perf_counter()
            table._rebuild(extra_words=0, extra_keys=len(table), compiled=compiled)
            seconds = time.perf_counter() - t0
            return seconds, before, table.stats()["capacity"]
        finally:
            table.close(unlink=True)
    finally:
        common.unlink_shm(ns)


def _timed_move(keys: int, value: bytes, compiled: bool) -> tuple[float, int, int]:
    """As _timed_rebuild, with a reserve: time one index move that doubles the index."""
    ns = f"wcbench-mv-{uuid.uuid4().hex[:10]}"
    try:
        entries = [(b"k%011d" % i, 1, value, i + 1, 0) for i in range(keys)]
        table = ShmTable.build(ns, entries, capacity=keys, max_memory=4 * keys * (len(value) + 64))
        try:
            table.publish()
            before = table.stats()["capacity"]
            t0 = time.perf_counter()
            moved = table._move_index(extra_keys=len(table), compiled=compiled)
            seconds = time.perf_counter() - t0
            assert moved and table.stats()["rebuilds"] == 0, "the index did not move"
            return seconds, before, table.stats()["capacity"]
        finally:
            table.close(unlink=True)
    finally:
        common.unlink_shm(ns)


def one_size(keys: int, value_bytes: int, runs: int, timed: Any = _timed_rebuild) -> dict[str, Any]:
    value = os.urandom(value_bytes)
    times: dict[str, list[float]] = {"compiled": [], "pure Python": []}
    capacities = set()
    for r in range(runs):
        order = (("compiled", True), ("pure Python", False))
        for name, compiled in order if r % 2 == 0 else order[::-1]:  # alternate which goes first
            seconds, before, after = timed(keys, value, compiled)
            times[name].append(seconds)
            capacities.add((before, after))
    row: dict[str, Any] = {"keys": keys, "value_bytes": value_bytes, "runs": runs,
                           "capacity_before_after": sorted(capacities)}  # fmt: skip
    for name, ts in times.items():
        row[name] = {"median_s": statistics.median(ts), "all_s": ts}
    row["speedup"] = row["pure Python"]["median_s"] / row["compiled"]["median_s"]
    return row


def data_growth(keys: int, value_bytes: int, max_memory: int | None, capacity: int | None = None) -> dict[str, Any]:
    """Insert ``keys`` keys into a table sized for ``capacity`` keys (default: all of
    them, so the index never grows): the slowest put."""
    ns = f"wcbench-dg-{uuid.uuid4().hex[:10]}"
    value = os.urandom(value_bytes)
    worst = 0.0
    try:
        table = ShmTable.create(ns, capacity=capacity or keys, data_bytes=1 << 20, max_memory=max_memory)
        try:
            table.publish()
            t_all = time.perf_counter()
            for i in range(keys):
                t0 = time.perf_counter()
                table.put(b"k%011d" % i, 1, value, i + 1, 0)
                worst = max(worst, time.perf_counter() - t0)
            total = time.perf_counter() - t_all
            st = table.stats()
        finally:
            table.close(unlink=True)
    finally:
        common.unlink_shm(ns)
    return {"keys": keys, "value_bytes": value_bytes, "max_memory": max_memory, "capacity": capacity or keys,
            "worst_put_s": worst, "total_s": total, "rebuilds": st["rebuilds"], "index_moves": st["index_moves"],
            "data_bytes": st["data_bytes"]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 keys of each size, one run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if extension is None:
        print("the compiled extension is not built: nothing to compare", file=sys.stderr)
        return 1
    sizes = [(20_000, 100), (20_000, 4096)] if args.quick else [(100_000, 100), (150_000, 4096)]
    runs = 1 if args.quick else args.runs
    doc: dict[str, Any] = {
        "bench": "rebuild",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": common.cpu_model(), "psi_cpu_before": common.psi_cpu()},
        "results": [],
    }
    doc["index_moves"] = []
    for keys, vb in sizes:
        print(f"... {keys:,} keys x {vb} B", file=sys.stderr, flush=True)
        doc["results"].append(one_size(keys, vb, runs))
        doc["index_moves"].append(one_size(keys, vb, runs, _timed_move))
    growth_keys = 20_000 if args.quick else 150_000
    doc["data_growth"] = []
    for limit, capacity in ((None, None), (4 << 30, None), (4 << 30, 1024)):
        print(f"... growth, {growth_keys:,} keys x 4096 B, max_memory {limit}, capacity {capacity}", file=sys.stderr,
              flush=True)  # fmt: skip
        doc["data_growth"].append(data_growth(growth_keys, 4096, limit, capacity))
    doc["machine"]["psi_cpu_after"] = common.psi_cpu()
    out = common.write_dated_json(doc, "rebuild")
    print(f"\nrebuild that doubles the index (writes wait this long); median of {runs} run(s)\n")
    print("| keys | value | compiled copy | pure-Python copy | speedup |")
    print("|---:|---:|---:|---:|---:|")
    for r in doc["results"]:
        print(f"| {r['keys']:,} | {r['value_bytes']} B | {r['compiled']['median_s'] * 1e3:.0f} ms | "
              f"{r['pure Python']['median_s'] * 1e3:.0f} ms | {r['speedup']:.1f}x |")
    print(f"\nindex move that doubles the index, with a reserve (writes wait this long); median of {runs} run(s)\n")
    print("| keys | value | compiled fill | pure-Python fill | speedup |")
    print("|---:|---:|---:|---:|---:|")
    for r in doc["index_moves"]:
        print(f"| {r['keys']:,} | {r['value_bytes']} B | {r['compiled']['median_s'] * 1e3:.1f} ms | "
              f"{r['pure Python']['median_s'] * 1e3:.1f} ms | {r['speedup']:.1f}x |")
    print(f"\ngrowth through puts: {growth_keys:,} puts of 4 KiB, one by one\n")
    print("| memory limit | sized for | rebuilds | index moves | slowest put | all puts | data area at the end |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for g in doc["data_growth"]:
        limit = "none" if g["max_memory"] is None else f"{g['max_memory'] >> 30} GiB"
        print(f"| {limit} | {g['capacity']:,} keys | {g['rebuilds']} | {g['index_moves']} | "
              f"{g['worst_put_s'] * 1e3:.1f} ms | {g['total_s']:.2f} s | {g['data_bytes'] >> 20} MiB |")
    print(f"\nCPU PSI before: {doc['machine']['psi_cpu_before']}; after: {doc['machine']['psi_cpu_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
