"""Helpers for tests that run a real daemon: start it, kill it, clean up after it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import posix_ipc
import psutil

import walcache
from walcache.paths import shm_namespace


def unlink_segments(namespace: str) -> list[str]:
    """Unlink every shared-memory segment of a namespace (control and data)."""
    removed = []
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:  # pragma: no cover - Linux always has it
        return removed
    for name in names:
        if name.startswith(namespace):
            try:
                posix_ipc.unlink_shared_memory("/" + name)
                removed.append(name)
            except posix_ipc.ExistentialError:
                pass
    return removed


class DaemonProcess:
    """One `walcache serve` process on its own data dir and socket."""

    def __init__(self, data_dir: Path, socket_path: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.args = list(args)
        self.namespace = shm_namespace(data_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        # What runs `walcache serve` (a test may put a wrapper with a fault seam here).
        self.launcher = [sys.executable, "-m", "walcache"]
        self.log_path = data_dir.parent / f"{data_dir.name}.daemon.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *extra: str, wait: bool = True, env: dict[str, str] | None = None) -> DaemonProcess:
        cmd = [
            *self.launcher, "serve",
            "--data-dir", str(self.data_dir), "--socket", str(self.socket_path),
            *self.args, *extra,
        ]
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                env=env if env is not None else os.environ.copy(),
            )
        finally:
            logf.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(f"daemon exited with {code}:\n{self.log()}")
            try:
                with walcache.Client(self.socket_path, timeout=2) as c:
                    if c.stats()["pid"] == self.proc.pid:
                        return
            except walcache.WalcacheError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, the crash every acknowledged write must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def compactors(self) -> list[psutil.Process]:
        """The compactor processes this daemon runs now (its children)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        out = []
        for p in kids:
            try:
                if "walcache.daemon.compaction" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def client(self, **kw: Any) -> walcache.Client:
        return walcache.Client(self.socket_path, **kw)


class Workspace:
    """A short temp dir (socket paths are limited to 107 bytes) removed at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wct-"))
        self.daemons: list[DaemonProcess] = []

    def daemon(self, *args: str, name: str = "d") -> DaemonProcess:
        d = DaemonProcess(self.root / name, self.root / f"{name}.sock", *args)
        self.daemons.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.daemons:
            compactors = d.compactors()  # a daemon killed below would leave them running
            d.stop()
            d.kill()
            for p in compactors:
                try:
                    p.kill()  # psutil checks it is still the same process
                except psutil.Error:
                    pass
            unlink_segments(d.namespace)
        shutil.rmtree(self.root, ignore_errors=True)
