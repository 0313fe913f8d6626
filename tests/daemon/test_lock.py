"""One writer per data dir: real processes contend for DATA_DIR/LOCK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from walcache import ConfigError, DataDirLocked
from walcache.daemon.lock import DataDirLock, SocketLock

HOLDER = """
import sys
from walcache.daemon.lock import DataDirLock
lock = DataDirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold until the parent closes our stdin
lock.release()
"""

TRY = """
import sys
from walcache import DataDirLocked
from walcache.daemon.lock import DataDirLock
try:
    DataDirLock(sys.argv[1]).acquire()
    print("acquired")
except DataDirLocked as exc:
    print("locked-by", exc.pid, "|", exc)
"""


def _start_holder(d: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


def test_a_second_opener_in_another_process_is_told_the_holders_pid(tmp_path: Path) -> None:
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(DataDirLocked) as ei:
            DataDirLock(tmp_path).acquire()
        assert ei.value.pid == proc.pid
        assert f"pid {proc.pid}" in str(ei.value) and str(tmp_path) in str(ei.value)
        assert proc.stdin is not None
        proc.stdin.close()  # the holder releases and exits
        assert proc.wait(timeout=10) == 0
        with DataDirLock(tmp_path) as lock:
            assert lock.held
    finally:
        _stop(proc)


def test_the_other_process_is_refused_while_we_hold_it(tmp_path: Path) -> None:
    with DataDirLock(tmp_path):
        out = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True,
                             timeout=30).stdout
        assert out.startswith(f"locked-by {os.getpid()} |"), out
    out = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True,
                         timeout=30).stdout
    assert out.strip() == "acquired"


def test_a_killed_holder_leaves_the_lock_free(tmp_path: Path) -> None:
    proc = _start_holder(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        lock = DataDirLock(tmp_path)
        lock.acquire()  # the kernel dropped the flock with the process; the stale pid file does not matter
        assert (tmp_path / "LOCK").read_text().strip() == str(os.getpid())
        lock.release()
        assert (tmp_path / "LOCK").read_text() == ""
    finally:
        _stop(proc)


def test_a_second_lock_object_in_the_same_process_is_refused(tmp_path: Path) -> None:
    a = DataDirLock(tmp_path)
    a.acquire()
    try:
        with pytest.raises(DataDirLocked) as ei:
            DataDirLock(tmp_path).acquire()
        assert ei.value.pid == os.getpid()
        a.acquire()  # re-acquiring what we hold is a no-op
    finally:
        a.release()
    a.release()  # idempotent


def test_a_symlink_at_the_socket_lock_is_refused_with_a_config_error(tmp_path: Path) -> None:
    """O_NOFOLLOW: a planted symlink is never opened, let alone truncated; the daemon is
    refused with the path (a ConfigError: exit 2, which systemd does not restart)."""
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "walcache.sock.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="walcache.sock.lock"):
        SocketLock(tmp_path / "walcache.sock").acquire()
    assert target.read_text() == "keep me"
