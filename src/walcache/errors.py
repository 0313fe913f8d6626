"""The walcache exception tree.

Every error walcache raises derives from :class:`WalcacheError`; each message
says what went wrong and what to do about it::

    WalcacheError
    ├── ConfigError                     (also ValueError) bad option, with its source
    ├── InvalidKey                      (also TypeError)  key is not str, bytes or int
    ├── InvalidValue                    (also TypeError)  value msgpack cannot pack
    ├── KeyTooLarge                     (also ValueError)
    ├── ValueTooLarge                   (also ValueError)
    ├── CacheFull                       the table reached --max-memory; nothing was logged
    ├── ProtocolError                   malformed frame or message on the socket
    ├── DaemonUnavailable               (also ConnectionError) no daemon answers the socket
    ├── WalcacheTimeout                 (also TimeoutError) the daemon did not answer in time
    ├── ReadContention                  a shared-memory read kept racing the writer
    ├── TableUnavailable                the shared table is gone or the writer died mid-write
    ├── ServerError                     the daemon failed a request for an internal reason
    └── StorageError                    the log or data dir (carries path, offset, errno)
        ├── DataDirLocked               another daemon owns the data dir (carries its pid)
        ├── LogCorrupt                  a bad record with valid data after it (path, offset)
        ├── LogFailed                   an fsync/write failed: no more appends are accepted
        └── LogFull                     no disk space for the log: this write was not logged

Errors that cross the socket travel as a short code; :data:`WIRE_CODES` is the
one table that maps codes to classes, used by both the daemon and the client.
"""

from __future__ import annotations

__all__ = [
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
    "WIRE_CODES",
    "wire_code",
    "error_from_wire",
]


class WalcacheError(Exception):
    """Root of every error walcache raises."""


class ConfigError(WalcacheError, ValueError):
    """An option has an invalid value; the message names the option and its source."""


class InvalidKey(WalcacheError, TypeError):
    """A key that is not str, bytes or int (bool is refused: True == 1 in a dict)."""


class InvalidValue(WalcacheError, TypeError):
    """A value msgpack cannot pack (only None, bool, int, float, str, bytes, list, dict)."""


class KeyTooLarge(WalcacheError, ValueError):
    """The encoded key is longer than the daemon's --max-key-bytes."""


class ValueTooLarge(WalcacheError, ValueError):
    """The encoded value is longer than the daemon's --max-value-bytes."""


class CacheFull(WalcacheError):
    """The shared table reached --max-memory; the write was refused and nothing was logged."""


class ProtocolError(WalcacheError):
    """A frame or message on the socket is malformed (the connection is then closed)."""


class DaemonUnavailable(WalcacheError, ConnectionError):
    """No daemon answers on the socket (start one with `walcache serve` or use
    walcache.connect()), the daemon went away, or it refused the connection (the
    message says which)."""


class WalcacheTimeout(WalcacheError, TimeoutError):
    """The daemon did not answer within the client's timeout."""


class ReadContention(WalcacheError):
    """A lock-free read kept colliding with writes to the same slot; retry or read via the daemon."""


class TableUnavailable(WalcacheError):
    """The shared table cannot be read: it is missing, of another layout, or its writer died mid-write."""


class ServerError(WalcacheError):
    """The daemon failed the request for an internal reason; its log says why."""


class StorageError(WalcacheError):
    """A problem with the data dir or the log.

    ``path``, ``offset`` and ``errno`` are set where they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.errno = errno


class DataDirLocked(StorageError):
    """Another process holds the data dir's lock file; ``pid`` names it when known."""

    def __init__(self, message: str, *, path: str | None = None, pid: int | None = None) -> None:
        super().__init__(message, path=path)
        self.pid = pid


class LogCorrupt(StorageError):
    """A bad record with valid data after it: refuse to start; `walcache check-log --repair` truncates."""


class LogFailed(StorageError):
    """A write or fsync of the log failed; the log accepts no more appends until the daemon restarts."""


class LogFull(StorageError):
    """The log's file system had no room for this write (ENOSPC or EDQUOT while the log grew).

    Nothing of the write was logged or applied. The daemon stays up: reads and the
    writes that fit go on, and writes succeed again once space is freed.
    """


# One table: wire code <-> class. Codes are part of the protocol: never reuse one.
WIRE_CODES: dict[str, type[WalcacheError]] = {
    "config": ConfigError,
    "invalid_key": InvalidKey,
    "invalid_value": InvalidValue,
    "key_too_large": KeyTooLarge,
    "value_too_large": ValueTooLarge,
    "cache_full": CacheFull,
    "protocol": ProtocolError,
    "unavailable": DaemonUnavailable,
    "timeout": WalcacheTimeout,
    "contention": ReadContention,
    "table": TableUnavailable,
    "server": ServerError,
    "storage": StorageError,
    "log_failed": LogFailed,
    "log_full": LogFull,
}
_CODE_OF: dict[type[WalcacheError], str] = {cls: code for code, cls in WIRE_CODES.items()}


def wire_code(exc: BaseException) -> str:
    """The wire code for ``exc`` (its nearest listed class; ``server`` otherwise)."""
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code
    return "server"


def error_from_wire(code: str, message: str) -> WalcacheError:
    """Rebuild the exception a daemon sent (unknown codes become ServerError)."""
    return WIRE_CODES.get(code, ServerError)(message)
