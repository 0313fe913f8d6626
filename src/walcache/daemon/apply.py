"""The one apply path: live writes and log replay change the state through apply_ops.

Recovery is not a second implementation: open_log replays each record
through the same ``apply_ops`` the daemon calls after a batch is durable, so
a state rebuilt from the log equals the state the writes built (invariant 3:
any prefix of a valid log yields exactly the state after its last record).

Rules, in log order:

* PUT stores (vflag, value, expiry) under the key, replacing what was there;
* PUT whose expiry has already passed (0 < expiry_ms <= now_ms) deletes the key
  instead: it replaced the older value, and an expired value never comes back;
* DELETE removes the key; the table keeps a tombstone where it needs one.

Records are after-images (a PUT carries the whole value), so applying is
blind and order is the only thing that matters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from .walformat import OP_DELETE, OP_PUT, Op

__all__ = ["Op", "OP_PUT", "OP_DELETE", "Table", "apply_ops", "Applier", "DictTable"]


class Table(Protocol):
    """What apply_ops writes to: the shared-memory table, or :class:`DictTable`."""

    def put(self, key: bytes, vflag: int, value: bytes, seqno: int, expiry_ms: int) -> None: ...

    def delete(self, key: bytes, seqno: int) -> bool: ...


def apply_ops(table: Table, seqno: int, ops: Sequence[Op], now_ms: int) -> int:
    """Apply one record's ops in order; returns how many DELETE ops removed an existing key.

    (The count is what the daemon answers for delete / delete_many.) The rules
    live in :class:`Applier`'s put and delete, the one place they are written.
    """
    return Applier(table, now_ms)(seqno, ops)


class Applier:
    """``apply_ops`` bound to one table and one clock, with a fast path for one-op records.

    Calling it is ``apply_ops(table, seqno, ops, now_ms)``, so it is an ApplyFn
    for open_log and read_log. The reader's replay loop sees an Applier and
    calls :meth:`put` / :meth:`delete` for records of a single PUT / DELETE:
    the same rule as ``apply_ops`` on that one op, without the op tuples, the
    wrapping lambda and the loop over ops (replaying 10-byte keys, those were
    about a fifth of the CPU time per record, measured). ``apply_ops`` itself
    goes through these two methods, so live writes and replay share them.
    """

    __slots__ = ("_delete", "_put", "now_ms", "table")

    def __init__(self, table: Table, now_ms: int) -> None:
        self.table = table
        self.now_ms = now_ms
        # Bound once: a per-record attribute lookup on the table is measurable in replay.
        self._put = table.put
        self._delete = table.delete

    def __call__(self, seqno: int, ops: Sequence[Op]) -> int:
        """Apply one record's ops in order; how many DELETE ops removed an existing key."""
        existed = 0
        for optype, key, vflag, value, expiry_ms in ops:
            if optype == OP_PUT:
                self.put(seqno, key, vflag, value, expiry_ms)
            elif optype == OP_DELETE:
                existed += self.delete(seqno, key)
            else:
                raise ValueError(f"unknown optype {optype!r}")
        return existed

    def put(self, seqno: int, key: bytes, vflag: int, value: bytes, expiry_ms: int) -> None:
        """``apply_ops`` for the record ``seqno`` = ((OP_PUT, key, vflag, value, expiry_ms),)."""
        if 0 < expiry_ms <= self.now_ms:
            self._delete(key, seqno)
        else:
            self._put(key, vflag, value, seqno, expiry_ms)

    def delete(self, seqno: int, key: bytes) -> int:
        """``apply_ops`` for the record ``seqno`` = ((OP_DELETE, key, 0, b"", 0),)."""
        return 1 if self._delete(key, seqno) else 0


class DictTable:
    """A dict-backed Table: the model for tests, check-log and the replay benchmark.

    Holds ``key -> (vflag, value, seqno, expiry_ms)``; a delete removes the
    entry (a dict needs no tombstone: nothing probes past it).
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[int, bytes, int, int]] = {}

    def put(self, key: bytes, vflag: int, value: bytes, seqno: int, expiry_ms: int) -> None:
        self.entries[key] = (vflag, value, seqno, expiry_ms)

    def delete(self, key: bytes, seqno: int) -> bool:
        return self.entries.pop(key, None) is not None

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(vflag, value) or None; ignores expiry (the model compares what is stored)."""
        e = self.entries.get(key)
        return None if e is None else (e[0], e[1])

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.entries)

    def snapshot(self) -> dict[bytes, tuple[int, bytes, int]]:
        """key -> (vflag, value, expiry_ms): what tests compare against a model."""
        return {k: (e[0], e[1], e[3]) for k, e in self.entries.items()}
