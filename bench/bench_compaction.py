#!/usr/bin/env python3
"""Compaction: put latency while it runs, and restart time from a compacted log.

    python bench/bench_compaction.py               # data in ./data-bench (removed afterwards)
    python bench/bench_compaction.py --dir DIR     # measure the disk DIR is on
    python bench/bench_compaction.py --quick       # smaller counts, same outputs

Measures, against real `walcache serve` processes:

1. Put latency during a compaction vs without one, in the same run: a daemon
   (``--fsync always``) holds ``--latency-keys`` keys (10-byte keys, 100-byte
   values); ``--clients`` processes put random keys in a closed loop and time
   each put; every round has a quiet stretch, then a manual compaction, then
   another quiet stretch. Each put is classed by whether it ended while a
   compaction was running (the daemon's stats say when one runs). Target:
   p99 during <= 2x p99 without.
2. Restart time for ``--keys`` keys (10-byte keys, 100-byte values): from a
   log holding 3 versions of every key (3 x keys single-put records, written
   with the WAL writer directly), and from the same log after the daemon
   compacted it. Restart = from starting the process until it answers stats.
   Median of ``--restarts`` runs each. Where the time goes comes from the
   daemon's own log lines (snapshot read and checksum, snapshot load into the
   shared table, segment replay) plus two calibrations: the start of a daemon
   on an empty data dir (interpreter and imports), and the snapshot parse
   alone in a fresh process (every entry decoded, nothing built). Target:
   <= 1.5 s from the compacted log.

Prints a table and writes bench/results/compaction-<date>.json. The machine may
be shared with other work: the JSON records the CPU pressure (PSI) before and
after; quote medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from walcache.client import Client
from walcache.codec import encode_key
from walcache.daemon.recovery import open_log
from walcache.daemon.walformat import OP_PUT
from walcache.paths import shm_namespace

import common


PARSE_CHILD = r"""
import json, sys, time
from pathlib import Path
from walcache.daemon.compaction import read_manifest
from walcache.daemon.recovery import load_snapshot
d = Path(sys.argv[1])
t0 = time.perf_counter()
load, problem = load_snapshot(d, read_manifest(d), lambda s, ops: None)
assert problem is None, problem
print(json.dumps({"seconds": time.perf_counter() - t0, "check_seconds": load.check_seconds,
                  "entries": load.entries}))
"""


def _fill(c: Client, n: int) -> None:
    for start in range(0, n, 1000):
        c.put_many({b"%010d" % i: b"v" * 100 for i in range(start, min(n, start + 1000))})


def _wait_compaction(c: Client, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while c.stats()["compaction"] is not None:
        if time.monotonic() > deadline:
            raise RuntimeError("compaction did not finish")
        time.sleep(0.02)
    last: dict[str, Any] = c.stats()["last_compaction"]
    return last


# --------------------------------------------------------------------- 1. latency


def _loader(sock: str, nkeys: int, seed: int, stop: Any, out: Any) -> None:
    import random

    rng = random.Random(seed)
    c = Client(sock, timeout=30)
    samples: list[tuple[float, float]] = []
    value = b"w" * 100
    while not stop.is_set():
        key = b"%010d" % rng.randrange(nkeys)
        t0 = time.monotonic()
        c.put(key, value)
        t1 = time.monotonic()
        samples.append((t1, t1 - t0))
    c.close()
    out.put(samples)


def bench_latency(work: Path, nkeys: int, clients: int, rounds: int, quiet_s: float) -> dict[str, Any]:
    d = common.Daemon(work / "lat", work / "lat.sock", "--fsync", "always", "--compact-min-bytes", common.NEVER_COMPACT)
    d.start()
    windows: list[tuple[float, float]] = []
    compactions: list[dict[str, Any]] = []
    ctx = mp.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    procs = []
    try:
        with d.client() as c:
            _fill(c, nkeys)
            c.compact()  # start from a compacted log, so every round compacts the same amount
            _wait_compaction(c)
            procs = [ctx.Process(target=_loader, args=(str(d.sock), nkeys, 100 + i, stop, out))
                     for i in range(clients)]
            for p in procs:
                p.start()
            time.sleep(quiet_s)
            for _ in range(rounds):
                # The compact op answers when the compaction is over (or after 3 s: then poll,
                # rarely: stats() itself costs the daemon's loop a few ms with 100k latency
                # samples to sort, which would show up as the very latency being measured).
                start = time.monotonic()
                answer = c.compact()
                while answer.get("status") == "running":
                    time.sleep(0.2)
                    answer = c.stats()["last_compaction"] if c.stats()["compaction"] is None else answer
                end = time.monotonic()
                windows.append((start, end))
                compactions.append(answer)
                time.sleep(quiet_s)
    finally:
        stop.set()
        samples: list[tuple[float, float]] = []
        for _ in procs:
            samples += out.get(timeout=60)
        for p in procs:
            p.join(30)
        d.stop()
        common.unlink_shm(shm_namespace(d.data_dir))
    # Pooled: every put during a compaction vs every other put of the run. Paired: each
    # compaction against the quiet stretch just before it (the machine is shared: its load
    # drifts, and a pair sees the same weather), summarised by the median ratio.
    during = [lat for t, lat in samples if any(a <= t <= b for a, b in windows)]
    outside = [lat for t, lat in samples if not any(a <= t <= b for a, b in windows)]

    def summary(xs: list[float]) -> dict[str, Any]:
        return {"n": len(xs), "p50_us": common.pct(xs, 0.5) * 1e6, "p99_us": common.pct(xs, 0.99) * 1e6,
                "max_us": max(xs) * 1e6 if xs else 0.0}

    pairs = []
    for a, b in windows:
        inside = [lat for t, lat in samples if a <= t <= b]
        before = [lat for t, lat in samples if a - quiet_s <= t < a]
        if inside and before:
            pairs.append({"during_p99_us": common.pct(inside, 0.99) * 1e6, "before_p99_us": common.pct(before, 0.99) * 1e6,
                          "ratio": common.pct(inside, 0.99) / common.pct(before, 0.99)})
    d_sum, w_sum = summary(during), summary(outside)
    return {"keys": nkeys, "clients": clients, "rounds": rounds, "during": d_sum, "without": w_sum,
            "p99_ratio": d_sum["p99_us"] / w_sum["p99_us"] if outside and during else None,
            "paired": pairs, "paired_median_ratio": statistics.median(p["ratio"] for p in pairs) if pairs else None,
            "compaction_seconds": [round(b - a, 3) for a, b in windows], "compactions": compactions}


# --------------------------------------------------------------------- 2. restart


def write_three_versions(d: Path, n: int) -> dict[str, Any]:
    """``n`` keys x 3 versions, one PUT record each, in the log the daemon would have written."""
    t0 = time.perf_counter()
    writer, _ = open_log(d, lambda s, ops: None, policy="never")
    keys = [encode_key(b"%010d" % i) for i in range(n)]
    for version in range(3):
        value = bytes([48 + version]) * 100
        group: list[bytes] = []
        for k in keys:
            group.append(writer.encode(((OP_PUT, k, 1, value, 0),))[1])
            if len(group) == 1000:
                writer.append(b"".join(group))
                group = []
        if group:
            writer.append(b"".join(group))
    writer.close()
    size = sum(p.stat().st_size for p in d.iterdir())
    return {"keys": n, "records": 3 * n, "log_bytes": size, "write_seconds": time.perf_counter() - t0}


_SNAP_LINE = re.compile(r"loaded snapshot \S+: (\d+) entries .*?, (\d+) bytes in ([\d.]+) s \(([\d.]+) s reading")
_OPEN_LINE = re.compile(r"log open: (\d+) records .*? in ([\d.]+) s;")
_RECOVERED = re.compile(r"recovered (\d+) records .*? into (\d+) keys in ([\d.]+) s")


def _last_start_breakdown(d: common.Daemon) -> dict[str, Any]:
    text = d.log_tail(20000)
    out: dict[str, Any] = {}
    snaps = _SNAP_LINE.findall(text)
    if snaps:
        e, b, s, chk = snaps[-1]
        out.update(snapshot_entries=int(e), snapshot_bytes=int(b), snapshot_seconds=float(s),
                   snapshot_read_check_seconds=float(chk))
    opens = _OPEN_LINE.findall(text)
    if opens:
        out.update(open_log_records=int(opens[-1][0]), open_log_seconds=float(opens[-1][1]))
    rec = _RECOVERED.findall(text)
    if rec:
        out.update(recovered_keys=int(rec[-1][1]), table_and_log_seconds=float(rec[-1][2]))
    return out


def _restarts(d: common.Daemon, runs: int) -> dict[str, Any]:
    times = []
    breakdowns = []
    for _ in range(runs):
        subprocess.run(["sync"], check=False)
        times.append(d.start())
        breakdowns.append(_last_start_breakdown(d))
        d.stop()
        common.unlink_shm(shm_namespace(d.data_dir))
    mid = sorted(range(runs), key=lambda i: times[i])[runs // 2]
    return {"runs": runs, "seconds": times, "median_seconds": statistics.median(times),
            "breakdown_of_median_run": breakdowns[mid]}


def bench_restart(work: Path, n: int, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    empty = common.Daemon(work / "empty", work / "empty.sock", "--compact-min-bytes", common.NEVER_COMPACT)
    out["empty_dir"] = _restarts(empty, runs)
    d = common.Daemon(work / "big", work / "big.sock", "--fsync", "never", "--compact-min-bytes", common.NEVER_COMPACT)
    out["log"] = write_three_versions(d.data_dir, n)
    out["uncompacted"] = _restarts(d, runs)
    d.start()
    try:
        with d.client(timeout=600) as c:
            c.compact()
            out["compaction"] = _wait_compaction(c)
            assert c.stats()["keys"] == n
    finally:
        d.stop()
        common.unlink_shm(shm_namespace(d.data_dir))
    out["compacted_log_bytes"] = sum(p.stat().st_size for p in d.data_dir.iterdir()
                                     if p.name.startswith(("wal-", "snap-", "MANIFEST")))
    out["compacted"] = _restarts(d, runs)
    parse = subprocess.run([sys.executable, "-c", PARSE_CHILD, str(d.data_dir)], capture_output=True, check=True)
    out["snapshot_parse_only"] = json.loads(parse.stdout)
    return out


# --------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: ./data-bench)")
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys for the restart test")
    ap.add_argument("--latency-keys", type=int, default=300_000, help="keys in the table while measuring latency")
    ap.add_argument("--clients", type=int, default=2, help="processes putting during the latency test")
    ap.add_argument("--rounds", type=int, default=6, help="compactions during the latency test")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    ap.add_argument("--from-json", type=Path, help="print the table of an earlier results file; measure nothing")
    args = ap.parse_args()
    if args.from_json:
        render(json.loads(args.from_json.read_text()))
        return 0
    wd = common.WorkDir(args.dir, prefix="compaction-")
    work = wd.path
    quick = args.quick
    keys = 100_000 if quick and args.keys == 1_000_000 else args.keys
    lat_keys = 50_000 if quick and args.latency_keys == 300_000 else args.latency_keys
    doc: dict[str, Any] = {
        "bench": "compaction",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": common.disk_machine(wd.base),
    }
    try:
        doc["latency"] = bench_latency(work, lat_keys, args.clients, 2 if quick else args.rounds,
                                       1.0 if quick else 2.0)
        doc["restart"] = bench_restart(work, keys, 1 if quick else args.restarts)
    finally:
        doc["machine"]["psi_cpu_after"] = common.psi_cpu()
        if not args.keep:
            wd.remove()

    out = common.write_dated_json(doc, "compaction")
    render(doc)
    print(f"wrote {out}")
    return 0


def render(doc: dict[str, Any]) -> None:
    lat, rs = doc["latency"], doc["restart"]
    per_round = ", ".join(f"{p['ratio']:.1f}" for p in lat["paired"])
    ratio = lat["p99_ratio"]
    comp = rs["compacted"]["breakdown_of_median_run"]
    parse = rs["snapshot_parse_only"]
    snap_s = comp.get("snapshot_seconds", 0.0)
    read_s = comp.get("snapshot_read_check_seconds", 0.0)
    parse_s = parse["seconds"] - parse["check_seconds"]
    open_s = comp.get("open_log_seconds", 0.0)
    recovered_s = comp.get("table_and_log_seconds", 0.0)
    rows = [
        (f"put p50 / p99 without compaction ({lat['clients']} clients, {lat['keys']:,} keys, n={lat['without']['n']})",
         f"{lat['without']['p50_us']:.0f} / {lat['without']['p99_us']:.0f} us"),
        (f"put p50 / p99 during compaction (n={lat['during']['n']}, {len(lat['compaction_seconds'])} compactions "
         f"of {statistics.median(lat['compaction_seconds']):.2f} s)",
         f"{lat['during']['p50_us']:.0f} / {lat['during']['p99_us']:.0f} us"),
        ("p99 during / without, pooled (target <= 2)", f"{ratio:.2f}" if ratio else "-"),
        ("p99 during / the quiet stretch just before, median over compactions (per compaction)",
         f"{lat['paired_median_ratio']:.2f} ({per_round})" if lat["paired_median_ratio"] else "-"),
        (f"restart, {rs['log']['keys']:,} keys, uncompacted ({rs['log']['records']:,} records, "
         f"{rs['log']['log_bytes'] / 1e6:.0f} MB): median", f"{rs['uncompacted']['median_seconds']:.2f} s"),
        (f"restart, same keys, compacted ({rs['compacted_log_bytes'] / 1e6:.0f} MB): median (target <= 1.5 s)",
         f"{rs['compacted']['median_seconds']:.2f} s"),
        ("  of which: snapshot read + checksum", f"{read_s:.2f} s"),
        ("  of which: snapshot entries decoded (parse alone, separate run)", f"{parse_s:.2f} s"),
        ("  of which: entries applied to the recovery table (snapshot load minus read and parse)",
         f"{max(0.0, snap_s - read_s - parse_s):.2f} s"),
        ("  of which: rest of open_log (segments after the snapshot, syncs)", f"{max(0.0, open_s - snap_s):.2f} s"),
        ("  of which: shared table built and published (daemon's 'recovered' minus 'log open')",
         f"{max(0.0, recovered_s - open_s):.2f} s"),
        ("  of which: interpreter, imports, socket, first answer (the rest)",
         f"{max(0.0, rs['compacted']['median_seconds'] - recovered_s):.2f} s"),
        ("for scale: restart on an empty data dir (median)", f"{rs['empty_dir']['median_seconds']:.2f} s"),
        ("compaction of those keys by the daemon (seal to switch)",
         f"{rs['compaction']['seconds']:.2f} s ({rs['compaction']['entries']:,} entries, "
         f"{rs['compaction']['bytes_reclaimed'] / 1e6:.0f} MB reclaimed)"),
    ]
    common.print_measure_table(rows)
    print(f"\nCPU PSI before: {doc['machine']['psi_cpu_before']}; after: {doc['machine']['psi_cpu_after']}")


if __name__ == "__main__":
    sys.exit(main())
