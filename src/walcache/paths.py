"""Default locations: data dir, socket, shared-memory names.

Defaults work for a user without root (README.md, "Running the daemon"):

- data dir: ``$STATE_DIRECTORY`` under systemd, else ``$XDG_STATE_HOME/walcache``,
  else ``~/.local/state/walcache``;
- socket: ``$WALCACHE_SOCKET``, else ``$RUNTIME_DIRECTORY/walcache.sock`` under
  systemd, else ``$XDG_RUNTIME_DIR/walcache/walcache.sock``, else
  ``/tmp/walcache-$UID/walcache.sock`` (directory created 0700);
- shared memory: a name derived from the data dir's real path, so two daemons
  with two data dirs never collide.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

__all__ = [
    "default_data_dir",
    "default_socket_path",
    "shm_namespace",
    "ensure_private_dir",
]


def _first_of(env_value: str | None) -> str | None:
    # systemd passes several directories colon-separated when the unit lists several.
    if not env_value:
        return None
    return env_value.split(":")[0] or None


def default_data_dir() -> Path:
    state = _first_of(os.environ.get("STATE_DIRECTORY"))
    if state:
        return Path(state)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "walcache"
    return Path.home() / ".local" / "state" / "walcache"


def default_socket_path() -> Path:
    explicit = os.environ.get("WALCACHE_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = _first_of(os.environ.get("RUNTIME_DIRECTORY"))
    if runtime:
        return Path(runtime) / "walcache.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "walcache" / "walcache.sock"
    return Path(f"/tmp/walcache-{os.getuid()}") / "walcache.sock"


def ensure_private_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) if missing; refuse a shared /tmp dir we do not own."""
    if path.exists() and not path.is_dir():
        from .errors import ConfigError

        raise ConfigError(f"{path} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.stat()
    if str(path).startswith("/tmp/") and st.st_uid != os.getuid():
        from .errors import ConfigError

        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not to you: pass --socket or set WALCACHE_SOCKET"
        )


def shm_namespace(data_dir: str | os.PathLike[str]) -> str:
    """A short stable name for a data dir: ``walcache-<16 hex>`` of its real path."""
    real = os.path.realpath(os.fspath(data_dir))
    return "walcache-%016x" % xxhash.xxh64_intdigest(real.encode())
