#!/usr/bin/env python3
"""The write-ahead log on this machine's disk: fsync cost, append rates, replay speed.

    python bench/bench_wal.py                  # data in ./data-bench (removed afterwards)
    python bench/bench_wal.py --dir DIR     # measure the disk DIR is on
    python bench/bench_wal.py --quick          # smaller counts, same outputs

Measures, in order:

1. fdatasync latency (p50/p99) on the data dir's disk: a 128-byte pwrite then
   fdatasync, into a zero-preallocated file (what the WAL does) and into a
   growing file (what an append-only log without preallocation does).
2. appends/s with ``--fsync never``: one record per append() (encode + write).
3. group commit with ``--fsync always``: one append() of 1, 8 or 64 records,
   each followed by its fdatasync; records/s and per-append latency.
4. replay: 1,000,000 records of 10-byte keys and 100-byte values written with
   ``never``, then open_log() into a DictTable through an Applier (the daemon's
   apply path), in a fresh process per run so each replay pays for its own
   memory; also the log part alone (apply_fn that does nothing). Median and
   best of ``--replays`` runs.

Prints a table and writes bench/results/wal-<date>.json. The machine may be
shared: the JSON records the CPU pressure (PSI) before and after; quote medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from walcache.daemon.recovery import open_log
from walcache.daemon.walformat import OP_PUT

import common


REPLAY_CHILD = r"""
import gc, json, sys, time
from pathlib import Path
from walcache.daemon.apply import Applier, DictTable
from walcache.daemon.recovery import open_log
d, mode = Path(sys.argv[1]), sys.argv[2]
table = DictTable()
now = int(time.time() * 1000)
fn = Applier(table, now) if mode == "dict" else (lambda s, ops: None)
t0 = time.perf_counter()
writer, report = open_log(d, fn, policy="never")
dt = time.perf_counter() - t0
writer.close()
print(json.dumps({"records": report.records, "seconds": dt, "keys": len(table), "bytes": report.bytes_read}))
"""


def bench_fdatasync(d: Path, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rec = b"r" * 128
    for name, prealloc in (("preallocated", True), ("growing", False)):
        path = d / f"fsync-{name}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if prealloc:
                zeros = bytes(1 << 20)
                for i in range(4):
                    os.pwrite(fd, zeros, i << 20)
                os.fdatasync(fd)
            times = []
            for i in range(n):
                os.pwrite(fd, rec, i * len(rec))
                t0 = time.perf_counter()
                os.fdatasync(fd)
                times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            path.unlink()
        out[name] = {"p50_us": common.pct(times, 0.5) * 1e6, "p99_us": common.pct(times, 0.99) * 1e6, "n": n}
    return out


def _ops(i: int, value: bytes) -> tuple[tuple[int, bytes, int, bytes, int]]:
    return ((OP_PUT, b"b%09d" % i, 1, value, 0),)


def bench_never(d: Path, n: int) -> dict[str, Any]:
    shutil.rmtree(d, ignore_errors=True)
    writer, _ = open_log(d, lambda s, o: None, policy="never")
    value = os.urandom(100)
    t0 = time.perf_counter()
    for i in range(n):
        writer.append(writer.encode(_ops(i, value))[1])
    dt = time.perf_counter() - t0
    writer.close()
    return {"records": n, "appends_per_s": n / dt}


def bench_group_commit(d: Path, batch: int, seconds: float) -> dict[str, Any]:
    shutil.rmtree(d, ignore_errors=True)
    writer, _ = open_log(d, lambda s, o: None, policy="always")
    value = os.urandom(100)
    lat = []
    i = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        group = b"".join(writer.encode(_ops(i + j, value))[1] for j in range(batch))
        t1 = time.perf_counter()
        writer.append(group)
        lat.append(time.perf_counter() - t1)
        i += batch
    dt = time.perf_counter() - t0
    writer.close()
    return {
        "batch": batch,
        "appends": len(lat),
        "records_per_s": i / dt,
        "appends_per_s": len(lat) / dt,
        "append_p50_us": common.pct(lat, 0.5) * 1e6,
        "append_p99_us": common.pct(lat, 0.99) * 1e6,
    }


def write_replay_log(d: Path, n: int) -> dict[str, Any]:
    shutil.rmtree(d, ignore_errors=True)
    writer, _ = open_log(d, lambda s, o: None, policy="never")
    value = os.urandom(100)
    t0 = time.perf_counter()
    group: list[bytes] = []
    for i in range(n):
        group.append(writer.encode(_ops(i, value))[1])
        if len(group) == 1000:
            writer.append(b"".join(group))
            group = []
    if group:
        writer.append(b"".join(group))
    writer.close()
    size = sum(p.stat().st_size for p in d.glob("wal-*.log"))
    return {"records": n, "write_seconds": time.perf_counter() - t0, "log_bytes": size}


def bench_replay(d: Path, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("dict", "log-only"):
        rates = []
        for _ in range(runs):
            res = subprocess.run(
                [sys.executable, "-c", REPLAY_CHILD, str(d), "dict" if mode == "dict" else "none"],
                capture_output=True, text=True, check=True, timeout=600,
            )
            r = json.loads(res.stdout)
            rates.append(r["records"] / r["seconds"])
        out[mode] = {
            "records": r["records"],
            "runs": runs,
            "median_records_per_s": statistics.median(rates),
            "best_records_per_s": max(rates),
            "median_seconds": r["records"] / statistics.median(rates),
            "all_records_per_s": rates,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: ./data-bench)")
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    ap.add_argument("--records", type=int, default=1_000_000, help="records for the replay test")
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    args = ap.parse_args()
    wd = common.WorkDir(args.dir, prefix="wal-")
    work = wd.path
    quick = args.quick
    records = 100_000 if quick and args.records == 1_000_000 else args.records
    doc: dict[str, Any] = {
        "bench": "wal",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": common.disk_machine(wd.base),
    }
    try:
        doc["fdatasync"] = bench_fdatasync(work, 100 if quick else 500)
        doc["never"] = bench_never(work / "never", 20_000 if quick else 200_000)
        doc["group_commit_always"] = [
            bench_group_commit(work / f"gc{b}", b, 1.5 if quick else 5.0) for b in (1, 8, 64)
        ]
        doc["replay_log"] = write_replay_log(work / "replay", records)
        doc["replay"] = bench_replay(work / "replay", 1 if quick else args.replays)
    finally:
        doc["machine"]["psi_cpu_after"] = common.psi_cpu()
        if not args.keep:
            wd.remove()

    out = common.write_dated_json(doc, "wal")

    f = doc["fdatasync"]
    rows = [
        ("fdatasync, preallocated file (p50 / p99)", f"{f['preallocated']['p50_us']:.0f} / {f['preallocated']['p99_us']:.0f} us"),
        ("fdatasync, growing file (p50 / p99)", f"{f['growing']['p50_us']:.0f} / {f['growing']['p99_us']:.0f} us"),
        ("appends/s, fsync=never, 1 record/append", f"{doc['never']['appends_per_s']:,.0f}"),
    ]
    for g in doc["group_commit_always"]:
        rows.append((
            f"fsync=always, {g['batch']} records/append: records/s (append p50 / p99)",
            f"{g['records_per_s']:,.0f} ({g['append_p50_us']:.0f} / {g['append_p99_us']:.0f} us)",
        ))
    rp = doc["replay"]
    n = doc["replay_log"]["records"]
    rows.append((f"replay {n:,} records into DictTable: records/s median (best)",
                 f"{rp['dict']['median_records_per_s']:,.0f} ({rp['dict']['best_records_per_s']:,.0f});"
                 f" {rp['dict']['median_seconds']:.2f} s"))
    rows.append((f"replay {n:,} records, log only: records/s median (best)",
                 f"{rp['log-only']['median_records_per_s']:,.0f} ({rp['log-only']['best_records_per_s']:,.0f})"))
    common.print_measure_table(rows)
    print(f"\nlog: {doc['replay_log']['log_bytes']:,} bytes for {n:,} records; "
          f"CPU PSI before: {doc['machine']['psi_cpu_before']}; after: {doc['machine']['psi_cpu_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
