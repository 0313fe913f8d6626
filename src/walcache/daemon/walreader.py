"""Reading the log: replay records in order and report the first problem. No policy here.

The reader never truncates, repairs or decides whether damage is a torn tail
or corruption: it applies every good record, in seqno order, through the
caller's ``apply_fn(seqno, ops)``, stops at the first thing that is not a good
record in sequence, and reports it (a :class:`Problem`) to ``on_problem`` and in
its result. Recovery (recovery.py) owns the policy; check-log uses this same
reader.

Reading a segment, in steps:

1. Read the whole file (one read). Check the 64-byte header: magic, version,
   checksum, the segment number of the file name, and that its first seqno is
   the previous segment's last seqno + 1.
2. Fast path: find the end of the non-zero bytes E; if one CRC call over
   ``[64, E)`` gives the chain value V (see walformat: a run of valid records
   checks as a whole), replay that run with no per-record CRC call.
3. If that check fails (damage, or a torn tail after a crash), walk the chain
   of length fields to where it breaks (L) and try the same check over
   ``[64, L)``: a crash damages only the end, so the rest still replays fast.
4. Slow path for whatever is left: check each record on its own; stop at a
   zero length field (end of records: everything after must be zero bytes,
   else "trailing" data is reported) or at the first bad record.

Performance: the fast-path loop creates only what apply_fn receives (a key,
a value and two small tuples per record) and calls nothing per record but
``struct.unpack_from`` and ``apply_fn``. When ``apply_fn`` is an
:class:`~walcache.daemon.apply.Applier` (apply_ops bound to a table), a record
of one PUT or DELETE goes to its ``put`` / ``delete`` instead: the same rule,
without the op tuples and two of the three Python calls per record.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .apply import Applier
from .fileops import FileOps
from .walformat import (
    CRC_TRAILER,
    MIN_RECORD_BYTES,
    OP_DELETE,
    OP_PUT,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    REC_BATCH,
    REC_DELETE,
    REC_PUT,
    SEGMENT_HEADER_SIZE,
    Op,
    RecordError,
    chain_value,
    decode_batch,
    decode_record,
    decode_segment_header,
    parse_segment_name,
    record_length_at,
)

__all__ = [
    "ApplyFn",
    "Problem",
    "SegmentScan",
    "LogScan",
    "IntactRecord",
    "list_segments",
    "scan_segment",
    "read_log",
    "iter_records",
    "find_intact_records",
    "nonzero_end",
]

log = logging.getLogger("walcache.wal")

ApplyFn = Callable[[int, Sequence[Op]], object]

_NONZERO = re.compile(rb"[^\x00]")
_ZERO_CHUNK = 1 << 16


@dataclass(frozen=True)
class Problem:
    """The first thing in the log that is not a good record in sequence.

    ``offset`` is where the next good record should have started (for a bad
    header: 0). ``kind``: header, segment-number, seqno-gap, missing-segment
    (structure); zero, truncated, length, checksum, malformed, seqno, trailing
    (records). ``final`` says whether it lies in the newest segment.
    """

    path: Path
    segno: int
    offset: int
    kind: str
    detail: str
    last_good_seqno: int
    final: bool

    def describe(self) -> str:
        return f"{self.path} offset {self.offset}: {self.kind}: {self.detail} (last good seqno {self.last_good_seqno})"


@dataclass
class SegmentScan:
    """What reading one segment found."""

    path: Path
    segno: int
    first_seqno: int  # from the header; 0 if the header is bad
    salt: int
    size: int  # file size
    records: int = 0
    last_seqno: int = 0  # of the last good record (first_seqno - 1 if none)
    end: int = SEGMENT_HEADER_SIZE  # offset just past the last good record
    problem: Problem | None = None


@dataclass
class LogScan:
    """What reading the whole log found."""

    segments: list[SegmentScan] = field(default_factory=list)
    records: int = 0
    first_seqno: int = 0  # of the first segment read (0: no segment)
    last_seqno: int = 0  # last good seqno (first_seqno - 1 if no record)
    bytes_read: int = 0
    problem: Problem | None = None


@dataclass(frozen=True)
class IntactRecord:
    """A record that checks on its own, found by scanning past damage."""

    offset: int
    length: int
    seqno: int
    durable_seqno: int


def list_segments(data_dir: Path, fileops: FileOps | None = None) -> list[tuple[int, Path]]:
    """(segno, path) of every segment file in ``data_dir``, in segment order."""
    fo = fileops or FileOps()
    out = []
    for name in fo.listdir(data_dir):
        segno = parse_segment_name(name)
        if segno is not None:
            out.append((segno, data_dir / name))
    out.sort()
    return out


def nonzero_end(buf: bytes, start: int) -> int:
    """Offset just past the last non-zero byte at or after ``start`` (``start`` if none)."""
    end = len(buf)
    while end > start:
        lo = max(start, end - _ZERO_CHUNK)
        stripped = buf[lo:end].rstrip(b"\0")
        if stripped:
            return lo + len(stripped)
        end = lo
    return start


def _chain_end(buf: bytes, off: int, end: int) -> int:
    """Follow length fields from ``off`` while they are plausible; where the chain breaks."""
    while True:
        length = record_length_at(buf, off, end)
        if not length:
            return off
        off += length


def _replay_fast(buf: bytes, off: int, end: int, expect: int, apply_fn: ApplyFn) -> tuple[int, int]:
    """Replay ``buf[off:end]``, already CRC-checked as a whole; stop at anything odd.

    Returns (offset reached, next expected seqno). Every check that a valid
    CRC makes redundant is skipped; the few kept here keep a CRC collision or
    a writer bug from indexing out of the record: the slow path re-examines
    whatever made this loop stop.
    """
    unpack = RECORD_HEADER.unpack_from
    hsize = RECORD_HEADER_SIZE
    # The Applier's one-op entry points, else None: one test per record is cheaper than a
    # wrapper call, and keeps a single copy of this loop for both kinds of apply_fn.
    put = apply_fn.put if isinstance(apply_fn, Applier) else None
    delete = apply_fn.delete if isinstance(apply_fn, Applier) else None
    while off < end:
        length, rtype, vflag, klen, seqno, _durable, expiry, vlen = unpack(buf, off)
        nxt = off + length
        # Kept checks: these stop the loop from running past the checked run or in place.
        if seqno != expect or nxt > end or length < MIN_RECORD_BYTES:
            break
        if rtype == REC_PUT:
            k = off + hsize
            kv = k + klen
            if put is None:
                apply_fn(seqno, ((OP_PUT, buf[k:kv], vflag, buf[kv : kv + vlen], expiry),))
            else:
                put(seqno, buf[k:kv], vflag, buf[kv : kv + vlen], expiry)
        elif rtype == REC_DELETE:
            k = off + hsize
            if delete is None:
                apply_fn(seqno, ((OP_DELETE, buf[k : k + klen], 0, b"", 0),))
            else:
                delete(seqno, buf[k : k + klen])
        elif rtype == REC_BATCH:
            try:
                ops = decode_batch(buf, off + hsize, off + hsize + vlen)
            except RecordError:
                break
            apply_fn(seqno, ops)
        else:
            break
        expect += 1
        off = nxt
    return off, expect


def scan_segment(
    buf: bytes,
    path: Path,
    segno: int,
    expect_seqno: int | None,
    apply_fn: ApplyFn,
    *,
    final: bool,
    expect_salt: int | None = None,
) -> SegmentScan:
    """Replay one segment's records through ``apply_fn`` (steps 1-4 of the module doc).

    ``expect_seqno``: the seqno its first record must have (None: take the
    header's, as when starting at this segment). ``expect_salt``: the log's salt
    (None: take the header's); a segment of another log is refused whole. The scan's ``problem`` is the
    first thing that stopped it, None if it read to a clean end.
    """
    size = len(buf)
    try:
        header = decode_segment_header(buf)
    except RecordError as exc:
        scan = SegmentScan(path, segno, 0, 0, size, last_seqno=(expect_seqno or 1) - 1)
        scan.problem = Problem(path, segno, 0, "header", exc.detail, scan.last_seqno, final)
        return scan
    first = header.first_seqno
    scan = SegmentScan(path, segno, first, header.salt, size, last_seqno=first - 1)
    if header.segno != segno:
        scan.problem = Problem(
            path, segno, 0, "segment-number", f"header says segment {header.segno}", first - 1, final
        )
        return scan
    if expect_salt is not None and header.salt != expect_salt:
        scan.last_seqno = (expect_seqno or first) - 1
        scan.problem = Problem(
            path, segno, 0, "salt",
            f"its salt is {header.salt:#010x}, this log's is {expect_salt:#010x}: it belongs to another log",
            scan.last_seqno, final,
        )
        return scan
    if expect_seqno is not None and first != expect_seqno:
        scan.last_seqno = expect_seqno - 1
        scan.problem = Problem(
            path, segno, 0, "seqno-gap",
            f"segment starts at seqno {first} but the previous one ends at {expect_seqno - 1}",
            expect_seqno - 1, final,
        )
        return scan

    salt = header.salt
    v = chain_value(salt)
    start = SEGMENT_HEADER_SIZE
    expect = first
    off = start
    # Step 2: one CRC over everything up to the last non-zero byte (rounded up to a record boundary).
    nz = nonzero_end(buf, start)
    e = min((nz + 7) & ~7, size)
    fast_end = 0
    if e > start and zlib.crc32(memoryview(buf)[start:e], v) == v:
        fast_end = e
    else:
        # Step 3: the prefix whose length chain holds.
        chain = _chain_end(buf, start, e)
        if chain > start and zlib.crc32(memoryview(buf)[start:chain], v) == v:
            fast_end = chain
    if fast_end:
        off, expect = _replay_fast(buf, start, fast_end, expect, apply_fn)

    # Step 4: record by record from wherever the fast path stopped.
    while off < size:
        if off + 4 > size:
            if nonzero_end(buf, off) > off:
                _stop(scan, off, expect, "truncated", f"{size - off} stray bytes at the end", final)
            break
        (length,) = CRC_TRAILER.unpack_from(buf, off)
        if length == 0:
            if nonzero_end(buf, off) > off:
                _stop(scan, off, expect, "trailing",
                      "a zero length field (end of records) but non-zero bytes follow", final)
            break
        try:
            rec = decode_record(buf, off, size, salt=salt)
        except RecordError as exc:
            _stop(scan, off, expect, exc.kind, exc.detail, final)
            break
        if rec.seqno != expect:
            _stop(scan, off, expect, "seqno", f"record has seqno {rec.seqno}, expected {expect}", final)
            break
        apply_fn(rec.seqno, rec.ops)
        expect += 1
        off += rec.length
    scan.last_seqno = expect - 1
    scan.records = expect - first
    scan.end = off
    return scan


def _stop(scan: SegmentScan, off: int, expect: int, kind: str, detail: str, final: bool) -> None:
    scan.problem = Problem(scan.path, scan.segno, off, kind, detail, expect - 1, final)


def read_log(
    data_dir: Path,
    apply_fn: ApplyFn,
    *,
    on_problem: Callable[[Problem], None] | None = None,
    first_segno: int | None = None,
    fileops: FileOps | None = None,
    salt: int | None = None,
) -> LogScan:
    """Replay every good record of the log in ``data_dir``, in order, through ``apply_fn``.

    Starts at segment ``first_segno`` (default: the oldest present) and takes
    that segment's first seqno from its header. Every segment must have the log's
    ``salt`` (the MANIFEST's; default: the first segment's). Stops at the first problem,
    which goes to ``on_problem`` and into the result.
    """
    fo = fileops or FileOps()
    segments = list_segments(data_dir, fo)
    if first_segno is not None:
        segments = [(n, p) for n, p in segments if n >= first_segno]
    result = LogScan()
    expect: int | None = None
    prev_segno: int | None = None
    for i, (segno, path) in enumerate(segments):
        final = i == len(segments) - 1
        if prev_segno is not None and segno != prev_segno + 1:
            result.problem = Problem(
                path, segno, 0, "missing-segment",
                f"segment {prev_segno + 1} is missing before this one", result.last_seqno, final,
            )
            break
        buf = fo.read_file(path)
        result.bytes_read += len(buf)
        scan = scan_segment(buf, path, segno, expect, apply_fn, final=final, expect_salt=salt)
        del buf
        result.segments.append(scan)
        if salt is None and scan.problem is None:
            salt = scan.salt
        if expect is None:
            result.first_seqno = scan.first_seqno
        result.records += scan.records
        result.last_seqno = scan.last_seqno
        if scan.problem is not None:
            result.problem = scan.problem
            break
        expect = scan.last_seqno + 1
        prev_segno = segno
    if result.problem is not None and on_problem is not None:
        on_problem(result.problem)
    return result


def iter_records(
    data_dir: Path,
    *,
    on_problem: Callable[[Problem], None] | None = None,
    first_segno: int | None = None,
    fileops: FileOps | None = None,
) -> Iterator[tuple[int, tuple[Op, ...]]]:
    """Yield ``(seqno, ops)`` for every good record, in order (tools and tests; replay uses read_log).

    Holds one segment's records at a time.
    """
    fo = fileops or FileOps()
    segments = list_segments(data_dir, fo)
    if first_segno is not None:
        segments = [(n, p) for n, p in segments if n >= first_segno]
    expect: int | None = None
    prev_segno: int | None = None
    last = 0
    for i, (segno, path) in enumerate(segments):
        final = i == len(segments) - 1
        if prev_segno is not None and segno != prev_segno + 1:
            if on_problem is not None:
                on_problem(Problem(path, segno, 0, "missing-segment",
                                   f"segment {prev_segno + 1} is missing before this one", last, final))
            return
        batch: list[tuple[int, tuple[Op, ...]]] = []
        scan = scan_segment(fo.read_file(path), path, segno, expect,
                            lambda s, ops: batch.append((s, tuple(ops))), final=final)
        yield from batch
        last = scan.last_seqno
        if scan.problem is not None:
            if on_problem is not None:
                on_problem(scan.problem)
            return
        expect = last + 1
        prev_segno = segno


def find_intact_records(buf: bytes, start: int, end: int, *, salt: int) -> list[IntactRecord]:
    """Every record at an 8-aligned offset in ``buf[start:end]`` that checks on its own.

    Used after damage, where length fields cannot be trusted: tries each
    8-aligned offset (skipping zero runs quickly), and jumps over each record
    it finds. Only the log's salt validates, so values that happen to contain
    record-shaped bytes are never taken for records.
    """
    out: list[IntactRecord] = []
    off = (start + 7) & ~7
    while off + MIN_RECORD_BYTES <= end:
        length = record_length_at(buf, off, end)
        if not length:
            m = _NONZERO.search(buf, off, end)
            if m is None:
                break
            nxt = m.start() & ~7
            off = nxt if nxt > off else off + 8
            continue
        try:
            rec = decode_record(buf, off, end, salt=salt)
        except RecordError:
            off += 8
            continue
        out.append(IntactRecord(off, rec.length, rec.seqno, rec.durable_seqno))
        off += rec.length
    return out
