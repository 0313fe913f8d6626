"""Helpers for the compiled-reader tests: the skip mark, and a reader over plain bytes."""

from __future__ import annotations

import pytest

from walcache import ReadContention, TableUnavailable
from walcache.shm.creader import extension, extension_error

requires_c = pytest.mark.skipif(extension is None, reason=f"compiled reader not built: {extension_error}")

if extension is not None:

    class BytesReader(extension.Reader):  # type: ignore[misc,name-defined]
        """The C reader attached to an in-process buffer instead of a shared segment.

        A ``bytes`` object of more than 512 bytes comes from malloc, so under the
        AddressSanitizer build (scripts/asan_fuzz.sh, PYTHONMALLOC=malloc) a read one
        byte past the segment lands in a redzone and aborts the run; over a real
        mapping it would land in the rest of the page and go unseen. The remap and
        contention hooks raise: there is no control segment to consult.
        """

        def __init__(self, data: bytes) -> None:
            self.data = data
            self._attach(data)

        def _remap(self) -> bool:
            raise TableUnavailable("bytes table: MOVED")

        def _contended(self, key: bytes) -> bool:
            raise ReadContention(f"bytes table: contended on {key[:20]!r}")
