"""walcache: a durable shared-memory cache for the worker processes of one host.

Reads come straight from a hash table in POSIX shared memory (no lock, no
round trip); writes go to a daemon that logs them (fsync, group commit),
publishes them, then acknowledges.
"""

from __future__ import annotations

from .errors import (
    CacheFull,
    ConfigError,
    DaemonUnavailable,
    DataDirLocked,
    InvalidKey,
    InvalidValue,
    KeyTooLarge,
    LogCorrupt,
    LogFailed,
    LogFull,
    ProtocolError,
    ReadContention,
    ServerError,
    StorageError,
    TableUnavailable,
    ValueTooLarge,
    WalcacheError,
    WalcacheTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Client",
    "connect",
    "WalcacheError",
    "ConfigError",
    "InvalidKey",
    "InvalidValue",
    "KeyTooLarge",
    "ValueTooLarge",
    "CacheFull",
    "ProtocolError",
    "DaemonUnavailable",
    "WalcacheTimeout",
    "ReadContention",
    "TableUnavailable",
    "ServerError",
    "StorageError",
    "DataDirLocked",
    "LogCorrupt",
    "LogFailed",
    "LogFull",
]


def __getattr__(name: str) -> object:
    # Client and connect load the shared-memory reader and msgpack; importing
    # them lazily keeps `import walcache.errors` (used by the daemon's tools) light.
    if name in ("Client", "connect"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'walcache' has no attribute {name!r}")
