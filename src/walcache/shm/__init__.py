"""The shared-memory table: one writer (the daemon), lock-free readers (clients).

The byte layout and the seqlock protocol are specified once, in :mod:`.layout`.
"""

from __future__ import annotations

from .layout import LAYOUT_VERSION, LOCK_FREE_OK
from .reader import ShmReader
from .writer import ShmTable

__all__ = ["ShmTable", "ShmReader", "LAYOUT_VERSION", "LOCK_FREE_OK"]
