"""sd_notify(3) without libsystemd: tell systemd the daemon's state.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
Linux abstract namespace). The kernel attaches our pid as SCM_CREDENTIALS
because systemd's socket has SO_PASSCRED, so nothing else is needed; with
the default ``NotifyAccess=main`` only the main pid (the daemon itself, never
a helper thread's child) may send.

What walcache sends and when (the daemon decides the moments):

- ``READY=1`` (+ ``STATUS=``) after recovery, publication of the shared table
  and listen(): a client started ``After=`` the unit can read and write.
- ``WATCHDOG=1`` from the event loop, not a thread: a hung loop must stop the
  pings so that systemd kills and restarts it (``WatchdogSec=``). systemd arms
  the watchdog only once start-up completes, so recovery needs no pings.
- ``RELOADING=1`` then ``READY=1`` around a SIGHUP reload.
- ``STOPPING=1`` when SIGTERM starts the drain.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op
returning False. A failed send is logged and returns False: systemd's own
timeouts handle a daemon that cannot report, and a cache must not die
because its supervisor is busy.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = [
    "notify",
    "ready",
    "status",
    "stopping",
    "reloading",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger("walcache.daemon.notify")

# The datagram is sent from the event loop: a blocked send (systemd's receive
# queue full) must not stall every client for long, and the watchdog catches
# a loop that stops anyway.
_SEND_TIMEOUT_S = 1.0


def _address(environ: Mapping[str, str]) -> str | None:
    addr = environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    # "vsock:..." (systemd >= 254 in VMs) and anything else: not for us.
    log.debug("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying", addr)
    return None


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` fields in one datagram; True if it was sent.

    A field holding a newline would smuggle in another assignment (a STATUS
    text saying ``READY=1``), so it is refused with ValueError, like a field
    without ``=``.
    """
    # Checked before the no-op return so that a bad field fails in tests, not
    # first under systemd.
    for f in fields:
        if "=" not in f or "\n" in f:
            raise ValueError(f"sd_notify field must be one KEY=VALUE line, got {f!r}")
    addr = _address(os.environ if environ is None else environ)
    if addr is None or not fields:
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(_SEND_TIMEOUT_S)
            s.sendto(payload, addr)
    except OSError as exc:
        log.warning("sd_notify %s to %r failed: %s", ",".join(f.split("=", 1)[0] for f in fields), addr, exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def ready(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (with ``STATUS=`` when given): start-up or a reload has finished."""
    fields = ["READY=1"]
    if status_text is not None:
        fields.append("STATUS=" + _one_line(status_text))
    return notify(*fields, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """``STATUS=text``: the line ``systemctl status`` shows (newlines become spaces)."""
    return notify("STATUS=" + _one_line(text), environ=environ)


def stopping(*, environ: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun."""
    return notify("STOPPING=1", environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd >= 253 checks it); send ready() after."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """``WATCHDOG=1``: the event loop is alive. Call at least every watchdog_interval()."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(
    *, environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None if not asked.

    Like sd_watchdog_enabled(3): ``WATCHDOG_PID``, when set, must be our pid
    (a child that inherited the variables must not ping for its parent).
    Malformed values are logged and treated as "no watchdog".
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            watched = int(pid_text)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid_text)
            return None
        if watched != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r (not positive)", usec_text)
        return None
    return usec / 2 / 1_000_000
