"""walcache.daemon.notify against a real bound AF_UNIX datagram socket (what systemd listens on)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from walcache.daemon import notify

# struct ucred from SCM_CREDENTIALS: pid, uid, gid as native 32-bit ints.
UCRED = struct.Struct("=iII")


@dataclass
class Receiver:
    sock: socket.socket
    env_value: str  # what NOTIFY_SOCKET holds: a path or "@abstract"

    def recv(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def recv_with_creds(self, timeout: float = 5.0) -> tuple[bytes, tuple[int, int, int]]:
        self.sock.settimeout(timeout)
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = UCRED.unpack(payload[: UCRED.size])
                return data, (pid, uid, gid)
        raise AssertionError(f"no SCM_CREDENTIALS with datagram {data!r}")

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        raise AssertionError(f"unexpected datagram {data!r}")

    @property
    def environ(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value}


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # A short private dir: sun_path holds 107 bytes and pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="wcn-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        yield Receiver(s, path)
    finally:
        s.close()
        shutil.rmtree(d)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"walcache-test-{os.getpid()}-{secrets.token_hex(6)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind("\0" + name)
        yield Receiver(s, "@" + name)
    finally:
        s.close()


def test_ready_with_status_is_one_datagram_to_a_path_socket(path_receiver: Receiver) -> None:
    assert notify.ready("recovered 3 keys", environ=path_receiver.environ) is True
    assert path_receiver.recv() == b"READY=1\nSTATUS=recovered 3 keys"
    path_receiver.assert_empty()


def test_abstract_socket_address(abstract_receiver: Receiver) -> None:
    assert notify.stopping(environ=abstract_receiver.environ) is True
    assert abstract_receiver.recv() == b"STOPPING=1"


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda env: notify.watchdog(environ=env), b"WATCHDOG=1"),
        (lambda env: notify.status("42 keys, log 1.2 MiB", environ=env), b"STATUS=42 keys, log 1.2 MiB"),
        (lambda env: notify.ready(environ=env), b"READY=1"),
        (lambda env: notify.notify("A=1", "B=two words", environ=env), b"A=1\nB=two words"),
    ],
)
def test_each_helper_sends_its_fields(
    path_receiver: Receiver, call: Callable[[dict[str, str]], bool], expected: bytes
) -> None:
    assert call(path_receiver.environ) is True
    assert path_receiver.recv() == expected


def test_reloading_carries_the_monotonic_clock(path_receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading(environ=path_receiver.environ)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_receiver.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= after


def test_status_text_cannot_inject_another_assignment(path_receiver: Receiver) -> None:
    assert notify.status("line one\nREADY=1", environ=path_receiver.environ)
    assert path_receiver.recv() == b"STATUS=line one READY=1"


@pytest.mark.parametrize("bad", ["READY", "READY=1\nSTOPPING=1"])
def test_malformed_fields_are_refused_even_without_systemd(bad: str) -> None:
    with pytest.raises(ValueError):
        notify.notify(bad, environ={})


def test_no_op_without_notify_socket(path_receiver: Receiver) -> None:
    assert notify.ready("x", environ={}) is False
    assert notify.watchdog(environ={"NOTIFY_SOCKET": ""}) is False
    assert notify.stopping(environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    path_receiver.assert_empty()


def test_unreachable_socket_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    d = tempfile.mkdtemp(prefix="wcn-")
    try:
        with caplog.at_level(logging.WARNING, logger="walcache.daemon.notify"):
            assert notify.ready(environ={"NOTIFY_SOCKET": os.path.join(d, "gone")}) is False
        assert any("READY" in r.getMessage() for r in caplog.records)
    finally:
        shutil.rmtree(d)


def test_a_child_process_notifies_through_its_environment_with_its_own_pid(path_receiver: Receiver) -> None:
    # The kernel stamps SCM_CREDENTIALS with the sender's pid: that is how
    # systemd tells the main pid (NotifyAccess=main) from anyone else.
    code = (
        "from walcache.daemon import notify\n"
        "import sys\n"
        "ok = [notify.ready('up'), notify.watchdog(), notify.stopping()]\n"
        "sys.exit(0 if all(ok) else 1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = path_receiver.env_value
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        assert proc.wait(timeout=30) == 0
        got = [path_receiver.recv_with_creds() for _ in range(3)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [data for data, _ in got] == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STOPPING=1"]
    assert {creds for _, creds in got} == {(proc.pid, os.getuid(), os.getgid())}


# ------------------------------------------------------------ watchdog interval


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),  # our pid below is 4242
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ: dict[str, str], expected: float | None) -> None:
    assert notify.watchdog_interval(environ=environ, pid=4242) == expected


def test_watchdog_interval_checks_our_own_pid_by_default() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert notify.watchdog_interval(environ=env) == 1.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert notify.watchdog_interval(environ=env) is None
