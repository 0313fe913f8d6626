#!/usr/bin/env python3
"""Restart: from a log on disk to a published shared table, for 1,000,000 keys.

    python bench/bench_restart.py                 # data in ./data-bench (removed afterwards)
    python bench/bench_restart.py --dir DIR       # measure the disk DIR is on
    python bench/bench_restart.py --quick         # 100,000 keys, one run of each

Keys are 10 bytes (11 encoded), values 100 bytes, one PUT record per key, written
with the WAL writer directly (``--fsync never``). Two sources: that log as written
("log"), and a copy of it compacted by a real daemon (``walcache compact``), i.e. a
snapshot plus an empty segment ("compacted"). For each source, median of ``--runs``
runs, each in a fresh process (imports excluded; every run pays for its own memory):

- bulk (C): open_log replays into a DictTable through apply_ops (a), then
  ShmTable.build makes the table from ``DictTable.entries`` with the compiled builder
  (b), then publish. This is how ``Daemon.start`` builds the table; the script calls
  the same functions the daemon does.
- bulk (pure Python): the same with the pure-Python builder (an install without a
  C compiler).
- put per key (old): what ``Daemon.start`` did before the bulk build, kept for
  comparison: ShmTable.create (sized from the snapshot hint), then open_log replays
  through apply_ops straight into it (ShmTable.put per key), then publish.
- walcache serve (c): a real daemon on the data dir is SIGKILLed, a new one is started
  and timed until ``Client.stats()`` answers with its pid (interpreter start and
  imports included). It runs whatever start path the daemon has; the row says which
  (from its log). The same on an empty data dir gives the fixed part of a daemon
  start (interpreter, imports, lock, socket) to add to a script's "ready".

"ready" is start of replay to table published; "publish" includes retiring the table
the previous run left published (as a daemon SIGKILLed with 1M keys leaves it). "free staging" is the time to drop the
DictTable afterwards (1M tuples), which a daemon can do after it publishes. Peak RSS is
the process's ru_maxrss. Target (issue 5): <= 1.5 s for 1M keys (Redis: 1.1-1.5 s
after its AOF rewrite, 2.6-5.0 s before, on this kind of machine).

Prints a table and writes bench/results/restart-<date>.json. The machine may be shared
with other work: the JSON records the CPU pressure (PSI) before and after; quote medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
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


CHILD = r"""
import gc, json, os, resource, sys, time
from pathlib import Path
from walcache.daemon.apply import DictTable, apply_ops
from walcache.daemon.recovery import open_log
from walcache.shm import ShmReader, ShmTable
d, mode, ns = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
now = int(time.time() * 1000)
out = {"mode": mode}
t0 = time.perf_counter()
if mode in ("bulk-c", "bulk-py"):
    staging = DictTable()
    writer, report = open_log(d, lambda s, ops: apply_ops(staging, s, ops, now), policy="never")
    t1 = time.perf_counter()
    table = ShmTable.build(ns, staging.entries, applied_seqno=writer.next_seqno - 1,
                           compiled=(mode == "bulk-c"))
    t2 = time.perf_counter()
    table.publish()
    t3 = time.perf_counter()
    del staging
    t4 = time.perf_counter()
    out.update(replay=t1 - t0, build=t2 - t1, publish=t3 - t2, ready=t3 - t0, free_staging=t4 - t3)
else:
    # The former start: one put per key into a table that grows as it goes.
    table = ShmTable.create(ns, capacity=1024)
    writer, report = open_log(d, lambda s, ops: apply_ops(table, s, ops, now), policy="never")
    t1 = time.perf_counter()
    table.publish()
    t2 = time.perf_counter()
    out.update(replay_and_insert=t1 - t0, publish=t2 - t1, ready=t2 - t0)
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["records"] = report.records
out["keys"] = len(table)
out["applied_seqno"] = table.stats()["applied_seqno"]
out["logged_seqno"] = writer.next_seqno - 1
# Prove the table is right, not just fast: every key reads back through a reader.
r = ShmReader(ns)
n = int(sys.argv[4])
value = bytes.fromhex(sys.argv[5])
bad = sum(1 for i in range(0, n, max(1, n // 20000)) if r.get(b"b%010d" % i) != (1, value))
out["bad_reads"] = bad
r.close()
writer.close()
table.close(unlink=False)  # left published: the next run retires it, as a restart after SIGKILL does
print(json.dumps(out))
"""


def write_log(d: Path, n: int, value: bytes) -> dict[str, Any]:
    """``n`` keys, one PUT record each, as the daemon would have logged them."""
    t0 = time.perf_counter()
    writer, _ = open_log(d, lambda s, ops: None, policy="never")
    group: list[bytes] = []
    for i in range(n):
        group.append(writer.encode(((OP_PUT, encode_key(b"%010d" % i), 1, value, 0),))[1])
        if len(group) == 1000:
            writer.append(b"".join(group))
            group = []
    if group:
        writer.append(b"".join(group))
    writer.close()
    return {"keys": n, "records": n, "log_bytes": _dir_bytes(d), "write_seconds": time.perf_counter() - t0}


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.name.startswith(("wal-", "snap-", "MANIFEST")))


RESTART_ARGS = ("--fsync", "never", "--compact-min-bytes", common.NEVER_COMPACT)
_RECOVERED = re.compile(r"recovered (\d+) records .*? into (\d+) keys in ([\d.]+) s")
_BUILT = re.compile(r"built shm table \S+: (\d+) keys, .*? \((\S+) builder\) in ([\d.]+) s")


def compact_copy(src: Path, dst: Path) -> dict[str, Any]:
    """Copy the log to ``dst`` and have a real daemon compact it there."""
    shutil.copytree(src, dst)
    d = common.Daemon(dst, dst.parent / f"{dst.name}.sock", *RESTART_ARGS)
    try:
        d.start()
        with Client(d.sock, timeout=600) as c:
            t0 = time.perf_counter()
            c.compact()
            deadline = time.monotonic() + 600
            while c.stats()["compaction"] is not None:
                if time.monotonic() > deadline:
                    raise RuntimeError("compaction did not finish in 600 s")
                time.sleep(0.05)
            last = c.stats()["last_compaction"]
            seconds = time.perf_counter() - t0
    finally:
        d.stop()
        common.unlink_shm(shm_namespace(dst))
    if not last or last.get("status") != "done":
        raise RuntimeError(f"compaction failed: {last}")
    return {"log_bytes": _dir_bytes(dst), "compaction_seconds": seconds, "last_compaction": last}


def run_script(d: Path, mode: str, runs: int, n: int, value: bytes) -> dict[str, Any]:
    """``runs`` timed children after an untimed one, all on one namespace: each timed run
    finds the previous run's table published and retires it, as a restart does."""
    results = []
    ns = f"wcbench-restart-{os.getpid()}"
    try:
        for run in range(runs + 1):
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(d), mode, ns, str(n), value.hex()],
                capture_output=True, text=True, timeout=1200, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"{mode} run failed: {res.stderr[-3000:]}")
            r = json.loads(res.stdout)
            if r["keys"] != n or r["bad_reads"] or r["applied_seqno"] != r["logged_seqno"]:
                raise RuntimeError(f"{mode} built a wrong table: {r}")
            if run:
                results.append(r)
    finally:
        common.unlink_shm(ns)
    phases = [k for k, v in results[0].items() if isinstance(v, float)]
    return {
        "runs": runs,
        "all": results,
        "median": {k: statistics.median(r[k] for r in results) for k in phases},
    }


def run_serve(d: Path, runs: int) -> dict[str, Any]:
    daemon = common.Daemon(d, d.parent / f"{d.name}.sock", *RESTART_ARGS)
    times: list[float] = []
    lines: list[str] = []
    try:
        daemon.start()  # the one SIGKILLed before the first timed start
        for _ in range(runs):
            daemon.kill()
            times.append(daemon.start())
            tail = daemon.log_tail(20000)
            built = _BUILT.findall(tail)
            rec = _RECOVERED.findall(tail)
            lines.append(
                f"built by the {built[-1][1]} builder in {built[-1][2]} s" if built
                else f"put per key; recovered into {rec[-1][1]} keys in {rec[-1][2]} s" if rec
                else "unknown"
            )  # fmt: skip
    finally:
        daemon.kill()
        common.unlink_shm(shm_namespace(d))
    return {"runs": runs, "seconds": times, "median": {"ready": statistics.median(times)}, "daemon_says": lines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: ./data-bench)")
    ap.add_argument("--quick", action="store_true", help="100,000 keys, one run of each")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-serve", action="store_true", help="skip the real daemon restarts")
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    args = ap.parse_args()
    keys = 100_000 if args.quick and args.keys == 1_000_000 else args.keys
    runs = 1 if args.quick else args.runs
    wd = common.WorkDir(args.dir, prefix="restart-")
    work = wd.path
    value = os.urandom(100)
    doc: dict[str, Any] = {
        "bench": "restart",
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "keys": keys,
        "machine": common.disk_machine(wd.base),
    }
    try:
        logdir = work / "log"
        doc["log"] = write_log(logdir, keys, value)
        doc["compacted_log"] = compact_copy(logdir, work / "compacted")
        sources = {"log": logdir, "compacted": work / "compacted"}
        doc["results"] = {}
        if not args.no_serve:
            print("... empty data dir: walcache serve", file=sys.stderr, flush=True)
            (work / "empty").mkdir()
            doc["results"]["empty dir"] = {"serve": run_serve(work / "empty", runs)}
        for src, d in sources.items():
            rows: dict[str, Any] = {}
            for mode in ("bulk-c", "bulk-py", "put-per-key"):
                print(f"... {src}: {mode}", file=sys.stderr, flush=True)
                rows[mode] = run_script(d, mode, runs, keys, value)
            if not args.no_serve:
                print(f"... {src}: walcache serve", file=sys.stderr, flush=True)
                rows["serve"] = run_serve(d, runs)
            doc["results"][src] = rows
    finally:
        doc["machine"]["psi_cpu_after"] = common.psi_cpu()
        if not args.keep:
            wd.remove()

    out = common.write_dated_json(doc, "restart")

    def s(m: dict[str, float], k: str) -> str:
        return f"{m[k]:.2f}" if k in m else "-"

    print(f"\nrestart of {keys:,} keys (10-byte keys, 100-byte values); median of {runs} run(s), seconds\n")
    head = ("source", "path", "replay (a)", "build (b)", "publish", "ready", "free staging", "peak RSS MB")
    table = [head]
    names = {"bulk-c": "bulk, compiled builder", "bulk-py": "bulk, pure-Python builder",
             "put-per-key": "put per key (the old start)", "serve": "walcache serve, SIGKILL + start (c)"}  # fmt: skip
    for src, rows in doc["results"].items():
        for mode, r in rows.items():
            m = r["median"]
            replay = s(m, "replay") if "replay" in m else (f"{m['replay_and_insert']:.2f} (with insert)"
                                                          if "replay_and_insert" in m else "-")
            rss = statistics.median(x["maxrss_mb"] for x in r["all"]) if "all" in r else None
            table.append((src, names[mode], replay, s(m, "build"), s(m, "publish"), s(m, "ready"),
                          s(m, "free_staging"), f"{rss:.0f}" if rss is not None else "-"))  # fmt: skip
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for j, row in enumerate(table):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for src, rows in doc["results"].items():
        if "serve" in rows:
            print(f"\n{src}: daemon says: {'; '.join(sorted(set(rows['serve']['daemon_says'])))}")
    print(f"\nlog: {doc['log']['log_bytes']:,} bytes; compacted: {doc['compacted_log']['log_bytes']:,} bytes; "
          f"CPU PSI before: {doc['machine']['psi_cpu_before']}; after: {doc['machine']['psi_cpu_after']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
