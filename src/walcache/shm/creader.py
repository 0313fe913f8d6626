"""Choosing the read path: the compiled reader, the pure-Python one, or the daemon.

:func:`open_reader` is what a client calls. It returns, in order of preference:

``kind == "c"``
    :class:`CReader`: the extension ``walcache.shm._creader`` (built from
    ``_creader.c`` by ``pip install``; optional). Its ``lookup``, ``get``, ``get_many``
    and ``contains`` are C methods that follow the reader steps R1-R7 of
    :mod:`walcache.shm.layout` with C11 atomics (an acquire load of the seq, relaxed
    loads of every other word, an acquire fence before the seq is re-read), so they are
    correct on any architecture, not only under x86-64 ordering. ``lookup`` is one C
    call: the client binds it as its ``get``.
``kind == "python"``
    :class:`PyReader`, the pure-Python :class:`~walcache.shm.reader.ShmReader` (the
    reference), when ``WALCACHE_PURE_PYTHON=1`` is set, or the extension is missing
    (installed without a compiler) or built for another layout version.
``kind == "daemon"``
    The same PyReader where neither the extension nor x86-64 ordering is available:
    its ``lock_free_ok`` is False and the client reads through the daemon (correct
    before fast).

The compiled reader composes a ShmReader rather than repeating it: the ShmReader
opens the control segment, maps the current data segment (read-only), validates its
header, remaps when the table moves and decides what a read that keeps colliding with
the writer means (a newer table, a dead writer, or contention). The C side borrows its
mapping as a read-only buffer and calls back (:meth:`CReader._remap`,
:meth:`CReader._contended`) only on those rare paths; it lets go of the buffer before
the ShmReader unmaps anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Union

from ..errors import TableUnavailable
from . import layout
from .layout import H_STALE
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
        self._py: ShmReader | None = ShmReader(namespace)
        try:
            self._attach_current()
        except BaseException:
            self._py.close()
            self._py = None
            raise
        if unsafe_no_seqlock:
            self._no_seqlock = 1

    # -- hooks the C code calls ---------------------------------------------------------------

    def _attach_current(self) -> None:
        py = self._py
        if py is not None and py._mm is not None:
            self._attach(py._mm)

    def _remap(self) -> bool:
        """A MOVED slot: let the ShmReader map the current table, then follow it."""
        assert self._py is not None
        self._detach()  # the ShmReader closes the old mmap: no export may remain
        try:
            self._py._remap()
        finally:
            self._attach_current()
        return True

    def _contended(self, key: bytes) -> bool:
        """Retries exhausted: remap to a newer table (True) or raise the right error."""
        assert self._py is not None
        self._detach()
        try:
            self._py._give_up(key)
        finally:
            self._attach_current()
        return True

    # -- the rest of the reader interface ---------------------------------------------------

    def __len__(self) -> int:
        py = self._py
        if py is None:
            return 0
        # The ShmReader follows a stale table first (its counts are frozen), which
        # unmaps the old segment: our export must be gone by then.
        self._detach()
        try:
            return len(py)
        finally:
            self._attach_current()

    def iter_entries(self) -> Iterator[tuple[bytes, int, bytes, int, int]]:
        """(key, vflag, value, seqno, expiry_ms) of every live, unexpired entry.

        Each entry is copied under its seqlock by the C scan. If the table moves during
        the scan, the scan goes on over the new table, skipping keys already yielded
        (best effort, as ShmReader.iter_entries).
        """
        seen: set[bytes] = set()
        remaps = 0
        start = 0
        while True:
            if not self._attached:
                self._closed_error()
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
                py = self._py
                if py is None or not py._q[H_STALE]:
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

    def _closed_error(self) -> None:
        raise TableUnavailable("this reader is closed")

    def _table_name(self) -> str:
        return str(self._py.header()["name"]) if self._py is not None else "(closed)"

    def header(self) -> dict[str, int | str]:
        assert self._py is not None, "reader is closed"
        h = self._py.header()
        h["reader"] = self.kind
        return h

    def refresh(self) -> None:
        """Remap now if the control segment names a newer table."""
        assert self._py is not None, "reader is closed"
        self._detach()
        try:
            self._py.refresh()
        finally:
            self._attach_current()

    def close(self) -> None:
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


def open_reader(namespace: str) -> Reader:
    """The best reader available here for the table of ``namespace``.

    The compiled reader unless ``WALCACHE_PURE_PYTHON=1`` or it is not built; else the
    pure-Python one, whose ``kind`` is "daemon" (``lock_free_ok`` False) where x86-64
    ordering cannot be assumed. Raises TableUnavailable as ShmReader does.
    """
    if os.environ.get("WALCACHE_PURE_PYTHON", "") not in ("", "0"):
        log.debug("WALCACHE_PURE_PYTHON is set: using the pure-Python reader")
        return PyReader(namespace)
    if extension is None:
        log.debug("compiled reader %s: using the pure-Python reader", extension_error)
        return PyReader(namespace)
    return CReader(namespace)
