"""Smoke test of the peer benchmark: `python bench/run.py --quick` produces well-formed output.

It runs the real command once (real servers, real client processes) into a temp
dir and checks the shape of what it wrote: every peer measured or skipped with a
reason, every measured cell present with positive numbers, the Markdown naming
every peer, a real PNG, every process it started gone. It never asserts speed.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"
PEER_IDS = [
    "walcache-always",
    "walcache-interval",
    "redis-always",
    "redis-everysec",
    "memcached",
    "diskcache",
    "lmdb",
    "sqlite-full",
]
# Installing missing packages (apt, pip) is part of the command on a new machine.
TIMEOUT_S = 1200
# A third-party peer may be skipped (its package did not install here); ours never:
# a walcache peer whose cells all fail is reported as skipped ("failed during the run").
OURS = ("walcache-always", "walcache-interval")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"bench/run.py --quick failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    files = sorted(p.name for p in out.iterdir())
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    doc = json.loads((out / jsons[0]).read_text())
    return {"out": out, "files": files, "doc": doc, "stdout": proc.stdout, "stderr": proc.stderr}


def test_json_has_machine_versions_parameters_and_date(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    for key in ("schema", "date", "command", "machine", "versions", "parameters", "harness", "notes",
                "peers", "results", "restart", "targets", "files", "processes"):  # fmt: skip
        assert key in doc, key
    for key in ("cpu_model", "nproc", "kernel", "python", "os"):
        assert doc["machine"][key], key
    assert doc["machine"]["nproc"] >= 1
    p = doc["parameters"]
    assert p["quick"] is True
    assert p["clients"] == [1, 4, 16]
    assert p["workloads"] == ["A", "B", "C", "D", "F"]
    assert p["value_sizes"] == [100, 4096]
    assert p["record_count"] > 0 and p["restart_keys"] > 0 and p["duration_s"] > 0
    assert p["zipfian_constant"] == 0.99
    assert doc["versions"]["python"]
    assert any("core" in n for n in doc["notes"]), "the shared-machine note is missing"


def test_every_peer_is_measured_or_skipped_with_a_reason(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    by_id = {pe["id"]: pe for pe in doc["peers"]}
    assert sorted(by_id) == sorted(PEER_IDS)
    for pid, pe in by_id.items():
        assert pe["status"] in ("measured", "skipped"), pe
        assert pe["survives_power_loss"] in ("yes", "no"), pe
        assert pe["durability"].startswith(pe["survives_power_loss"] + ":"), pe
        if pe["status"] == "skipped":
            assert pe.get("reason", "").strip(), f"{pid} skipped without a reason"
    for pid in OURS:
        assert by_id[pid]["status"] == "measured", by_id[pid]
    # What each setting is honestly worth, as the issue states it.
    expect = {"walcache-always": "yes", "redis-always": "yes", "redis-everysec": "no", "memcached": "no",
              "diskcache": "no", "lmdb": "yes", "sqlite-full": "yes", "walcache-interval": "no"}  # fmt: skip
    assert {pid: pe["survives_power_loss"] for pid, pe in by_id.items()} == expect


def test_every_measured_cell_is_present_with_positive_numbers(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    p = doc["parameters"]
    measured = [pe["id"] for pe in doc["peers"] if pe["status"] == "measured"]
    rows = {(r["peer"], r["workload"], r["value_size"], r["clients"]): r for r in doc["results"]}
    expected_ops = {"A": {"read", "update"}, "B": {"read", "update"}, "C": {"read"},
                    "D": {"read", "insert"}, "F": {"read", "rmw"}}  # fmt: skip
    for pid in measured:
        for vs in p["value_sizes"]:
            for nc in p["clients"]:
                for w in p["workloads"]:
                    r = rows.get((pid, w, vs, nc))
                    assert r is not None, (pid, w, vs, nc)
                    assert r["status"] == "ok", (pid, w, vs, nc, r.get("error"))
                    assert r["ops_per_s"] > 0 and r["total_ops"] > 0 and r["wall_s"] > 0
                    assert r["other_cpu_percent"] is None or 0 <= r["other_cpu_percent"] <= 100
                    assert r["ops_per_s_per_client"] == pytest.approx(r["ops_per_s"] / nc, rel=0.01, abs=0.1)
                    # Every read must find its key: a miss means the store lost loaded data.
                    assert r["misses"] == 0, (pid, w, vs, nc)
                    assert r["ops"], (pid, w, vs, nc)
                    assert set(r["ops"]) <= expected_ops[w], (w, set(r["ops"]))
                    assert sum(o["count"] for o in r["ops"].values()) == r["total_ops"]
                    for name, o in r["ops"].items():
                        assert o["count"] > 0, name
                        assert 0 < o["p50_us"] <= o["p99_us"], (pid, w, name, o)
                        assert o["mean_us"] > 0
    # One cell can hold a single slow op when the disk stalls (0.1 s windows), so each
    # operation type of the mix is required over a peer's cells of that workload, not per cell.
    seen: dict[tuple[str, str], set[str]] = {}
    for (pid, w, _vs, _nc), r in rows.items():
        seen.setdefault((pid, w), set()).update(r["ops"])
    for (pid, w), ops in seen.items():
        must = expected_ops[w] if w in ("A", "C", "F") else {"read"}  # B, D: 5% writes may not be drawn
        assert must <= ops, (pid, w, ops)


def test_restart_rows_are_measured_and_lose_nothing_or_skipped(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    rows = {r["peer"]: r for r in doc["restart"]}
    assert sorted(rows) == ["redis-always", "walcache-always"]
    for pid, r in rows.items():
        if r["status"] == "skipped" and pid not in OURS:
            assert r["reason"].strip(), pid
            continue
        assert r["status"] == "ok", (pid, r.get("error"))
        assert r["keys"] == doc["parameters"]["restart_keys"]
        assert r["restart_s"] > 0 and r["load_s"] > 0 and r["data_bytes_before_kill"] > 0
        assert r["verified_sample"] > 0 and r["lost_in_sample"] == 0


def test_targets_are_reported_not_asserted(quick_run: dict[str, Any]) -> None:
    targets = quick_run["doc"]["targets"]
    assert targets
    for t in targets:
        assert t["status"] in ("met", "not met", "not measured"), t
        if t["status"] != "not measured":
            assert t["ratio"] > 0


def test_markdown_on_stdout_and_on_disk_names_every_peer(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    md_name = doc["files"]["markdown"]
    assert md_name in quick_run["files"]
    md = (quick_run["out"] / md_name).read_text()
    assert md.strip() in quick_run["stdout"]
    for header in ("## Peers", "## Throughput, 100 B values", "## Throughput, 4096 B values", "## Latency",
                   "## Restart after SIGKILL", "## Targets"):  # fmt: skip
        assert header in md, header
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    for pe in doc["peers"]:
        mine = [ln for ln in table_lines if ln.startswith(f"| {pe['id']} |")]
        if pe["status"] == "measured":
            # peers table + 3 client counts x 2 sizes throughput + latency rows
            assert len(mine) >= 1 + 6 + 30, (pe["id"], len(mine))
        else:
            assert any("skipped:" in ln for ln in mine), pe["id"]
    # Every table row has as many cells as its header.
    widths: list[int] = []
    for ln in md.splitlines():
        if ln.startswith("|"):
            widths.append(ln.count("|"))
        elif widths:
            assert len(set(widths)) == 1, widths
            widths = []


def test_png_is_a_real_image(quick_run: dict[str, Any]) -> None:
    png_name = quick_run["doc"]["files"]["png"]
    assert png_name, quick_run["doc"]["notes"]
    data = (quick_run["out"] / png_name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300
    assert len(data) > 10_000


def test_every_started_process_is_gone(quick_run: dict[str, Any]) -> None:
    procs = quick_run["doc"]["processes"]
    assert procs["still_running"] == []
    # The walcache peers are always measured (above), each with its daemon.
    assert procs["server_pids"]
    assert procs["client_pids"]
    for pid in procs["server_pids"] + procs["client_pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --------------------------------------------------------------------------- the YCSB generators


def _ycsb() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("ycsb")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_fnvhash64_is_fnv1a_over_eight_little_endian_bytes_as_a_non_negative_long() -> None:
    ycsb = _ycsb()
    for val in (0, 1, 255, 256, 12345, 2**40 + 7, 2**63 - 1):
        h = 0xCBF29CE484222325
        for byte in val.to_bytes(8, "little"):
            h = ((h ^ byte) * 1099511628211) % 2**64
        signed = h - 2**64 if h >= 2**63 else h
        assert ycsb.fnvhash64(val) == abs(signed), val
        assert 0 <= ycsb.fnvhash64(val) < 2**63


def test_zipfian_gives_item_zero_its_share_and_grows_zeta_incrementally() -> None:
    ycsb = _ycsb()
    import random

    seed = 4242
    n = 1000
    gen = ycsb.ZipfianGenerator(n, random.Random(seed))
    draws = [gen.next() for _ in range(200_000)]
    assert min(draws) >= 0 and max(draws) < n, f"seed {seed}"
    share0 = draws.count(0) / len(draws)
    assert share0 == pytest.approx(1 / ycsb.zeta(n, 0.99), rel=0.05), f"seed {seed}"
    share1 = draws.count(1) / len(draws)
    assert share1 == pytest.approx(0.5**0.99 / ycsb.zeta(n, 0.99), rel=0.08), f"seed {seed}"
    gen.next(n + 500)
    assert gen.zetan == pytest.approx(ycsb.zeta(n + 500, 0.99), rel=1e-12)


def test_scrambled_zipfian_spreads_the_hot_keys_and_uses_ycsb_zeta() -> None:
    ycsb = _ycsb()
    import random
    from collections import Counter

    seed = 99
    n = 100_000
    gen = ycsb.ScrambledZipfianGenerator(n, random.Random(seed))
    counts = Counter(gen.next() for _ in range(100_000))
    assert all(0 <= k < n for k in counts)
    (hot, hot_count), *_ = counts.most_common(1)
    # YCSB: the hottest of 10^10 zipfian items has 1/zeta = 1/26.469 of the draws ...
    assert hot_count / 100_000 == pytest.approx(1 / 26.46902820178302, rel=0.1), f"seed {seed}"
    # ... and it is placed by the hash, not at key 0.
    assert hot == ycsb.fnvhash64(0) % n


def test_rings_follow_the_workload_mix_and_are_reproducible() -> None:
    ycsb = _ycsb()
    from collections import Counter

    for name, w in ycsb.WORKLOADS.items():
        ring = ycsb.build_ring(w, 10_000, 20_000, seed=7)
        again = ycsb.build_ring(w, 10_000, 20_000, seed=7)
        assert (ring.ops, ring.items) == (again.ops, again.items), name
        mix = Counter(ring.ops)
        for op, share in ((ycsb.READ, w.read), (ycsb.UPDATE, w.update), (ycsb.INSERT, w.insert), (ycsb.RMW, w.rmw)):
            assert mix[op] / len(ring.ops) == pytest.approx(share, abs=0.015), (name, op)
    d = ycsb.build_ring(ycsb.WORKLOADS["D"], 10_000, 20_000, seed=7)
    reads = [it for op, it in zip(d.ops, d.items) if op == ycsb.READ]
    # "latest": offset 0 (the newest key) is the most read, with the zipfian share of item 0.
    assert Counter(reads).most_common(1)[0][0] == 0
    assert reads.count(0) / len(reads) == pytest.approx(1 / ycsb.zeta(10_000, 0.99), rel=0.15)
