"""Choosing the read path: the compiled reader, the pure-Python one, or the daemon.

:func:`open_reader` is what a client calls. It returns, in order of preference:

``kind == "c"``
    :class:`CReader`: the extension ``walcache.shm._creader`` (built from
    ``_creader.c`` by ``pip install``; optional). Its ``lookup``, ``get``, ``get_many``
    and ``contains`` are C methods that follow the reader steps R1-R7 of
    :mod:`walcache.shm.layout` with C11 atomics (an acquire load of the seq, relaxed
    loads of every other word, an acquire fence before the seq is re-read). ``lookup``
    is one C call: the client binds it as its ``get``. Used on x86-64 only: the
    daemon's writer is Python and orders its stores only under x86-64's rules.
``kind == "python"``
    :class:`PyReader`, the pure-Python :class:`~walcache.shm.reader.ShmReader` (the
    reference), when ``WALCACHE_PURE_PYTHON=1`` is set, or the extension is missing
    (installed without a compiler) or built for another layout version.
``kind == "daemon"``
    The PyReader where x86-64 ordering is not available (``layout.LOCK_FREE_OK``),
    built extension or not: its ``lock_free_ok`` is False and the client reads through
    the daemon (correct before fast).

The compiled reader composes a ShmReader rather than repeating it: the ShmReader
reads the control segment, finds and validates the current data segment, remaps when
the table moves and decides what a read that keeps colliding with the writer means (a
newer table, a dead writer, or contention). The C side maps the segment the ShmReader
names with a mapping of its own (so neither unmaps under the other) and calls back
(:meth:`CReader._remap`, :meth:`CReader._contended`) only on those rare paths. The
hooks run under one lock: threads sharing a reader remap one at a time, and the others
go on reading the old mapping until the new one is installed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Union

from ..errors import TableUnavailable
from . import layout
from .reader import ShmReader

__all__ = ["open_reader", "extension", "extension_error", "CReader", "PyReader", "Reader", "SCAN_BATCH"]

log = logging.getLogger("walcache.shm")

# Slots copied per C call while iterating: bounds how long one call holds the GIL.
SCAN_BATCH = 4096
_SCAN_MOVED = 1
_SCAN_CONTENDED = 2
_SCAN_BAD_SLOT = 3
_SCAN_BAD_RECORD = 4
_MAX_REMAPS = 16


def _load_extension() -> tuple[ModuleType | None, str]:
    try:
        from . import _creader
    except ImportError as exc:
        return None, f"not built ({exc})"
    if _creader.LAYOUT_VERSION != layout.LAYOUT_VERSION:
        return None, (
            f"built for layout version {_creader.LAYOUT_VERSION}, this walcache uses "
            f"{layout.LAYOUT_VERSION}: rebuild it with `pip install -e .`"
        )
    return _creader, ""


extension, extension_error = _load_extension()
"""The compiled module, or None; ``extension_error`` then says why."""


class PyReader(ShmReader):
    """The pure-Python reader, with the ``kind`` a client reports."""

    __slots__ = ()

    @property
    def kind(self) -> str:
        return "python" if self.lock_free_ok else "daemon"


if TYPE_CHECKING:
    from ._creader import Reader as _Base
elif extension is not None:
    _Base = extension.Reader
else:
    _Base = object


class CReader(_Base):
    """The compiled reader over the table of one namespace (see the module docstring).

    The hot methods (``lookup``, ``get``, ``get_many``, ``contains``) are inherited
    from ``walcache.shm._creader.Reader``. ``unsafe_no_seqlock`` is for tests only: the
    C reader then skips the seq validation (R5, R6), the control that proves the
    torn-read test can fail.
    """

    kind = "c"
    # C11 acquire loads and fences: correct under any memory model, x86-64 or not.
    lock_free_ok = True

    def __init__(self, namespace: str, *, unsafe_no_seqlock: bool = False) -> None:
        if extension is None:
            raise RuntimeError(f"the compiled reader is unavailable: {extension_error}")
        self.namespace = namespace
        self._lock = threading.RLock()
        self._mapped = ""
        self._py: ShmReader | None = ShmReader(namespace)
        try:
            self._follow()
        except BaseException:
            self._py.close()
            self._py = None
            raise
        if unsafe_no_seqlock:
            self._no_seqlock = 1
        _READERS.add(self)

    # -- hooks the C code calls (and the others, all under self._lock) --------------------------

    def _live(self) -> ShmReader:
        py = self._py
        if py is None:
            raise TableUnavailable("this reader is closed")
        return py

    def _follow(self) -> None:
        """Map the segment the ShmReader has mapped, unless we already follow it and its
        index (an index move keeps the segment: its header names the new index)."""
        py = self._live()
        for _ in range(_MAX_REMAPS):
            name = py._name
            # The same segment: keep it unless its index moved past the one we follow
            # (the header's word, not the ShmReader's, which may lag behind ours).
            current_slot0 = py._q[layout.H_INDEX] & layout.LOC_MASK
            if name == self._mapped and self._attached and self._slot0 == current_slot0:
                return
            try:
                self._map(name)
            except FileNotFoundError:
                py._remap()  # unlinked since the ShmReader opened it: a newer one is current
                continue
            self._mapped = name
            return
        raise TableUnavailable(f"the shared table of {self.namespace} keeps being replaced; try again")

    def _remap(self) -> bool:
        """A MOVED slot: let the ShmReader find the current table, then follow it."""
        with self._lock:
            self._live()._remap()
            self._follow()
        return True

    def _contended(self, key: bytes) -> bool:
        """Retries exhausted: remap to a newer table (True) or raise the right error."""
        with self._lock:
            py = self._live()
            if py._name != self._mapped:
                self._follow()  # another thread moved the ShmReader on: try the new table first
                return True
            py._give_up(key)
            self._follow()
        return True

    # -- the rest of the reader interface ---------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            n = len(self._live())  # follows a stale table first: counts of a retired one are frozen
            self._follow()
        return n

    def iter_entries(self) -> Iterator[tuple[bytes, int, bytes, int, int]]:
        """(key, vflag, value, seqno, expiry_ms) of every live, unexpired entry.

        Each entry is copied under its seqlock by the C scan. If the table moves during
        the scan, the scan goes on over the new table, skipping keys already yielded
        (best effort, as ShmReader.iter_entries).
        """
        seen: set[bytes] = set()
        remaps = 0
        start = 0
        # Any attach (a new table, or the same one after its index moved: the slots are
        # laid out anew) between two batches restarts the scan: a slot number of one
        # index means nothing in another.
        epoch = self._epoch
        while True:
            if not self._attached:
                self._closed_error()
            if self._epoch != epoch:
                start = 0  # another thread, or a get between two yields, attached us anew
                epoch = self._epoch
            entries, nxt, status = self._scan(start, SCAN_BATCH)
            now = time.time() * 1000.0
            for entry in entries:
                if entry[0] not in seen and (not entry[4] or entry[4] > now):
                    seen.add(entry[0])
                    yield entry
            if status == 0:
                if nxt < (self._capacity or 0):
                    start = nxt
                    continue
                if not self._stale:
                    return
                status = _SCAN_MOVED  # it moved while we yielded: go on over the new table
            if status == _SCAN_BAD_SLOT:
                raise TableUnavailable(f"shared table {self._table_name()} has a slot pointing outside its data area")
            if status == _SCAN_BAD_RECORD:
                raise TableUnavailable(f"shared table {self._table_name()} holds a corrupt record (slot {nxt})")
            remaps += 1
            if remaps > _MAX_REMAPS:
                raise TableUnavailable(f"the shared table of {self.namespace} keeps moving during a scan")
            if status == _SCAN_MOVED:
                self._remap()
            else:
                self._contended(b"<scan>")
            start = 0
            epoch = self._epoch

    def _closed_error(self) -> None:
        raise TableUnavailable("this reader is closed")

    def _table_name(self) -> str:
        return self._mapped or "(closed)"

    def header(self) -> dict[str, int | str]:
        """The header of the segment this reader follows (ShmReader.header's fields)."""
        with self._lock:
            py = self._live()
            self._follow()
            h = py.header()
        h["reader"] = self.kind
        return h

    def refresh(self) -> None:
        """Remap now if the control segment names a newer table."""
        with self._lock:
            self._live().refresh()
            self._follow()

    def close(self) -> None:
        with self._lock:
            self._detach()
            py, self._py = self._py, None
            if py is not None:
                py.close()

    def __enter__(self) -> CReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<walcache CReader /{self.namespace} generation={self._generation}>"


Reader = Union[CReader, PyReader]

# A child forked while another thread held a reader's lock would inherit it locked.
_READERS: weakref.WeakSet[CReader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for r in list(_READERS):
        r._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def open_reader(namespace: str) -> Reader:
    """The best reader available here for the table of ``namespace``.

    The compiled reader unless ``WALCACHE_PURE_PYTHON=1`` or it is not built; else the
    pure-Python one, whose ``kind`` is "daemon" (``lock_free_ok`` False) where x86-64
    ordering cannot be assumed: the writer's stores are only ordered there, so not even
    the compiled reader may read lock-free elsewhere. Raises TableUnavailable as
    ShmReader does.
    """
    if not layout.LOCK_FREE_OK:
        log.debug("no x86-64 store ordering from the writer here: reads go through the daemon")
        return PyReader(namespace)
    if os.environ.get("WALCACHE_PURE_PYTHON", "") not in ("", "0"):
        log.debug("WALCACHE_PURE_PYTHON is set: using the pure-Python reader")
        return PyReader(namespace)
    if extension is None:
        log.debug("compiled reader %s: using the pure-Python reader", extension_error)
        return PyReader(namespace)
    return CReader(namespace)
