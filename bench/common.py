"""Pieces the bench scripts share, so a fix to one reaches all of them.

Scripts run as ``python bench/<script>.py``, which puts this folder first on
``sys.path``; they ``import common`` from there. Nothing here measures anything.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
KEY_BYTES = 10
VALUE_BYTES = 100


# --------------------------------------------------------------------------- machine


def cpu_model(default: str = "") -> str:
    """The first ``model name`` in /proc/cpuinfo; ``default`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def psi_cpu() -> str | None:
    """The ``some`` line of the CPU pressure (PSI): how much other work wanted the CPUs."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def filesystem_of(path: str | Path) -> str:
    """The filesystem ``path`` is on ("ext4 on /dev/vda mounted at /"): what a disk figure
    depends on, rather than the path itself."""
    best = ("", "?")
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                if len(parts[1]) >= len(best[0]):
                    best = (parts[1], f"{parts[2]} on {parts[0]} mounted at {parts[1]}")
    except OSError:
        pass
    return best[1]



def disk_machine(base: Path) -> dict[str, Any]:
    """The ``machine`` record of the disk benchmarks (wal, compaction, restart);
    the caller adds ``psi_cpu_after`` when it is done."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "filesystem": filesystem_of(base),
        "psi_cpu_before": psi_cpu(),
    }


def pin_cpu(cpu: int) -> None:
    """Keep this process on one CPU where there are several (best effort), so a
    reader and a writer process do not trade places mid-measurement."""
    try:
        if len(os.sched_getaffinity(0)) > 1 and cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})
    except OSError:
        pass


# --------------------------------------------------------------------------- numbers


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..1) of unsorted samples; 0.0 for none."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else 0.0


def dataset(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """``n`` distinct random keys of KEY_BYTES and their VALUE_BYTES values; the
    same for the same seed, so separate processes rebuild it instead of sending it."""
    rng = random.Random(seed)
    keys = list({rng.randbytes(KEY_BYTES) for _ in range(n + n // 10)})[:n]
    rng.shuffle(keys)
    return keys, [rng.randbytes(VALUE_BYTES) for _ in range(n)]


def build_lmdb(path: str, n: int, seed: int) -> None:
    """An LMDB environment at ``path`` holding ``dataset(n, seed)``, synced once."""
    import lmdb

    keys, values = dataset(n, seed)
    env = lmdb.open(path, map_size=1 << 30, sync=False)
    with env.begin(write=True) as txn:
        for k, v in zip(keys, values):
            txn.put(k, v)
    env.sync(True)
    env.close()


# --------------------------------------------------------------------------- files


def unlink_shm(namespace: str) -> None:
    """Remove the shared-memory segments of a walcache namespace (the table and its
    staging copies) that a killed daemon left behind."""
    for name in os.listdir("/dev/shm"):
        if name == namespace or name.startswith(namespace + "."):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


class WorkDir:
    """A fresh temp dir under ``base`` (default ./data-bench) for one run; ``remove()``
    deletes it, and ``base`` too when this run created it."""

    def __init__(self, base: Path | None, prefix: str) -> None:
        self.base = base or Path.cwd() / "data-bench"
        self._made = not self.base.exists()
        self.base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.base))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._made:
            shutil.rmtree(self.base, ignore_errors=True)


def write_dated_json(doc: dict[str, Any], stem: str) -> Path:
    """Write ``doc`` to bench/results/<stem>-<date>.json (atomically: tmp, rename)."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{stem}-{_dt.date.today().isoformat()}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return out


def print_measure_table(rows: Sequence[tuple[str, str]]) -> None:
    """A two-column Markdown table, ``| measure | result |``."""
    w = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(w)} | result |")
    print(f"|{'-' * (w + 2)}|--------|")
    for a, b in rows:
        print(f"| {a.ljust(w)} | {b} |")


# --------------------------------------------------------------------------- a real daemon


NEVER_COMPACT = str(10**15)  # --compact-min-bytes: no automatic compaction during a run


class Daemon:
    """One ``walcache serve`` process at a time on a data dir; its log goes to a file."""

    def __init__(self, data_dir: Path, sock: Path, *args: str) -> None:
        self.data_dir, self.sock, self.args = data_dir, sock, list(args)
        self.log_path = data_dir.parent / f"{data_dir.name}.daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; seconds from spawn until it answers stats with its own pid."""
        from walcache.client import Client
        from walcache.errors import WalcacheError

        cmd = [sys.executable, "-m", "walcache", "serve", "--data-dir", str(self.data_dir),
               "--socket", str(self.sock), *self.args]  # fmt: skip
        with open(self.log_path, "ab") as logf:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with Client(self.sock, timeout=5) as c:
                    if c.stats()["pid"] == self.proc.pid:
                        return time.perf_counter() - t0
            except WalcacheError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon not ready after 600 s: {self.log_tail()}")
            time.sleep(0.002)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self, timeout: float = 60) -> Any:
        from walcache.client import Client

        return Client(self.sock, timeout=timeout)
