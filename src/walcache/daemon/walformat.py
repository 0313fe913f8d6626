"""The write-ahead log's byte layout: pure functions, bytes in and bytes out.

The log is a directory of numbered segment files ``wal-<segno:016x>.log``
(segment numbers start at 1 and grow by one; a reader may start at any
segment). A segment is a 64-byte header followed by records at 8-aligned
offsets, followed by zero bytes (the writer preallocates zero-filled space)
or the end of the file. All integers are little-endian.

Segment header (64 bytes, :data:`SEGMENT_HEADER`)::

    off  size  type   meaning
    0    8     bytes  magic b"WALCACHE"
    8    4     u32    format version (:data:`FORMAT_VERSION`)
    12   4     u32    header size = 64: the first record starts here
    16   8     u64    segment number (equals the number in the file name)
    24   8     u64    first seqno: the seqno the first record of this segment has
                      (= last seqno of the previous segment + 1)
    32   8     u64    creation time, Unix ns (informational)
    40   4     u32    salt: random per log, copied into each new segment; mixed
                      into every record checksum of this segment
    44   16    -      reserved, zero
    60   4     u32    CRC trailer over bytes 0..59: crc32(bytes 0..59, RESIDUE),
                      no salt (the salt is read from here)

Record (:data:`RECORD_HEADER`, then the payload, then the CRC trailer)::

    off       size  type  meaning
    0         4     u32   length of the whole record in bytes: header, payload,
                          zero padding and trailer; a multiple of 8, >= 48.
                          0 means "no record here" (zero-filled space).
    4         1     u8    record type: 1 PUT, 2 DELETE, 3 BATCH (0 is reserved
                          and never valid, so zeroed space never parses)
    5         1     u8    vflag of the value (PUT); 0 otherwise
    6         2     u16   klen: key length (PUT, DELETE; >= 1); 0 for BATCH
    8         8     u64   seqno: exactly the previous record's seqno + 1,
                          across segments
    16        8     u64   durable seqno: the highest seqno the writer knew to be
                          on disk (fdatasync returned) when it encoded this
                          record; 0 = claims nothing. Recovery's torn-tail rule
                          reads it (see recovery.py).
    24        8     u64   expiry_ms (PUT): absolute Unix time in ms, 0 = never;
                          0 otherwise
    32        4     u32   vlen: value length (PUT), length of the op area
                          (BATCH), 0 (DELETE)
    36        klen  bytes key (PUT, DELETE)
    36+klen   vlen  bytes value (PUT) or op area (BATCH)
    ...       pad   zero  up to length - 4
    length-4  4     u32   CRC trailer: crc32(bytes 0 .. length-5, V) XOR salt,
                          V = chain_value(salt) (see "Checksum")

A BATCH record's op area is a run of ops, each :data:`BATCH_OP` (16 bytes)
followed by its key and value, with no padding; the ops fill the area
exactly, and there is at least one::

    off  size  type  meaning
    0    1     u8    optype: 1 PUT, 2 DELETE
    1    1     u8    vflag (PUT); 0 for DELETE
    2    2     u16   klen (>= 1)
    4    4     u32   vlen (0 for DELETE)
    8    8     u64   expiry_ms (PUT; 0 = never); 0 for DELETE
    16   klen  bytes key, then vlen bytes value

A BATCH is atomic: one seqno, one checksum, so a crash keeps all of it or none.

Alignment. Records start at 8-aligned offsets, so the 4-byte length field of a
record never straddles a 512-byte sector and a power cut cannot tear it (the
argument etcd's WAL makes); offsets 8, 16 and 24 hold the u64 fields aligned.

Checksum: zlib.crc32 (CRC-32/IEEE), not CRC32C. It is in the standard library
(no dependency), computed in C at about 7 GB/s on the target machine (measured:
152 MB in 21 ms), and per-call cost dominates at our record sizes anyway.

The trailer is chosen so that ``crc32(record, V) == V`` for a valid record,
where ``V = chain_value(salt)`` is a constant of the segment (CRC-32 is affine:
appending ``crc32(B, s)`` to B always yields the residue 0x2144DF1C; XOR-ing
the salt into the trailer shifts that fixed point by a constant, which V
absorbs). Two consequences the reader relies on:

* a single record checks with one call: ``crc32(record, V) == V``;
* a run of whole records checks with ONE call over the run,
  ``crc32(rec1 + rec2 + ... + recN, V) == V``, because each record leaves the
  CRC at V, which is the start value of the next. Replay verifies a whole
  segment in one C call and only falls back to record-by-record checks (to
  locate the damage) when that fails. A mismatch is missed with probability
  2**-32 either way.

Why a salt: a record only checks under its log's salt, so bytes a client
stored as a value (which could be a well-formed record of another log, or a
forged one) never validate when recovery scans past damaged bytes looking for
intact records, and a segment copied from another data dir is refused.

Every byte of a record, padding included, is covered by its checksum, so any
single-byte change is detected.

Any change here bumps the version (:data:`FORMAT_VERSION`).

Snapshots and the manifest
==========================

Compaction (compaction.py) replaces every segment up to a seal point S with a
snapshot: the state after record S, one entry per live key, and names it in
the manifest. Both are written once (tmp file, fdatasync, rename, directory
fsync) and never modified; only the snapshot the manifest names counts.

Snapshot file ``snap-<S:016x>.snap``: a 64-byte header
(:data:`SNAPSHOT_HEADER`), the entries back to back, a 32-byte footer
(:data:`SNAPSHOT_FOOTER`). Little-endian::

    header
    off  size  type   meaning
    0    8     bytes  magic b"WALCSNAP"
    8    4     u32    snapshot format version (:data:`SNAPSHOT_VERSION`)
    12   4     u32    header size = 64: the first entry starts here
    16   8     u64    seal seqno S: the entries are the state after every record <= S
    24   8     u64    next segno: the segment whose first record is S+1 (replay goes on there)
    32   8     u64    creation time, Unix ns (informational)
    40   4     u32    salt of the log (its segment headers')
    44   16    -      reserved, zero
    60   4     u32    CRC trailer over bytes 0..59: crc32(bytes 0..59, RESIDUE) == RESIDUE

    entry (:data:`SNAPSHOT_ENTRY`, 24 bytes, then key and value, no padding)
    0    2     u16    klen (>= 1)
    2    1     u8     vflag
    3    1     -      zero
    4    4     u32    vlen
    8    8     u64    seqno of the key's latest record (<= S)
    16   8     u64    expiry_ms, absolute Unix ms, 0 = never
    24   klen  bytes  key, then vlen bytes value

    footer (at file size - 32)
    0    8     bytes  magic b"WALCSEND"
    8    8     u64    entry count
    16   8     u64    live bytes: sum of record_size(klen, vlen) over the entries
    24   4     -      reserved, zero
    28   4     u32    CRC: crc32 of every byte of the file before this field

There are no tombstones: a snapshot replaces the whole log prefix up to S (a
"full prefix" merge, in Bitcask's terms), so no older record of a deleted key
is left to replay. One CRC covers the file: a snapshot is loaded whole or not
at all, so there is no point locating damage inside it; the manifest repeats
the size and CRC, so a different file under the same name is refused too.

Manifest file ``MANIFEST`` (:data:`MANIFEST_RECORD`, 64 bytes)::

    off  size  type   meaning
    0    8     bytes  magic b"WALCMANI"
    8    4     u32    manifest format version (:data:`MANIFEST_VERSION`)
    12   4     u32    size = 64
    16   8     u64    seal seqno S of the snapshot (>= 1)
    24   8     u64    next segno: the first segment replayed after the snapshot;
                      every segment below it is covered by the snapshot
    32   8     u64    snapshot file size
    40   8     u64    snapshot entry count (lets the daemon size its table up front)
    48   4     u32    snapshot CRC (its footer's CRC field)
    52   4     u32    salt of the log
    56   4     -      reserved, zero
    60   4     u32    CRC trailer over bytes 0..59 (as the segment header)

No MANIFEST means no snapshot: the log must then start at segment 1, seqno 1.

Any change to the snapshot layout bumps :data:`SNAPSHOT_VERSION`, to the
manifest's :data:`MANIFEST_VERSION`.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "Op",
    "OP_PUT",
    "OP_DELETE",
    "REC_PUT",
    "REC_DELETE",
    "REC_BATCH",
    "FORMAT_VERSION",
    "SEGMENT_MAGIC",
    "SEGMENT_HEADER",
    "SEGMENT_HEADER_SIZE",
    "RECORD_HEADER",
    "RECORD_HEADER_SIZE",
    "CRC_TRAILER",
    "BATCH_OP",
    "RESIDUE",
    "MIN_RECORD_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_KEY_BYTES",
    "RecordError",
    "SegmentHeader",
    "DecodedRecord",
    "encode_record",
    "decode_record",
    "decode_batch",
    "record_length_at",
    "group_bounds",
    "encode_segment_header",
    "decode_segment_header",
    "segment_name",
    "parse_segment_name",
    "record_size",
    "chain_value",
    "SNAPSHOT_VERSION",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_END_MAGIC",
    "SNAPSHOT_HEADER",
    "SNAPSHOT_HEADER_SIZE",
    "SNAPSHOT_ENTRY",
    "SNAPSHOT_FOOTER",
    "SNAPSHOT_FOOTER_SIZE",
    "MANIFEST_VERSION",
    "MANIFEST_MAGIC",
    "MANIFEST_RECORD",
    "MANIFEST_NAME",
    "SnapshotHeader",
    "SnapshotFooter",
    "Manifest",
    "encode_snapshot_header",
    "decode_snapshot_header",
    "encode_snapshot_entry",
    "encode_snapshot_footer",
    "decode_snapshot_footer",
    "check_snapshot",
    "encode_manifest",
    "decode_manifest",
    "snapshot_name",
    "parse_snapshot_name",
]

Op = tuple[int, bytes, int, bytes, int]
"""A logical op: ``(optype, key, vflag, value, expiry_ms)``."""

OP_PUT = 1
OP_DELETE = 2

REC_PUT = OP_PUT
REC_DELETE = OP_DELETE
REC_BATCH = 3

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"WALCACHE"

SEGMENT_HEADER = struct.Struct("<8sIIQQQI16xI")
"""magic, version, header size, segno, first seqno, created ns, salt, (16 reserved), crc."""
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 64

RECORD_HEADER = struct.Struct("<IBBHQQQI")
"""length, type, vflag, klen, seqno, durable seqno, expiry_ms, vlen."""
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 36

CRC_TRAILER = struct.Struct("<I")

BATCH_OP = struct.Struct("<BBHIQ")
"""optype, vflag, klen, vlen, expiry_ms."""

RESIDUE = 0x2144DF1C  # crc32(B + le32(crc32(B, s)), s) for any B, s.
_ZERO_WORD_CRC = zlib.crc32(b"\0\0\0\0")

MIN_RECORD_BYTES = (RECORD_HEADER_SIZE + 1 + CRC_TRAILER.size + 7) & ~7  # 48: a 1-byte-key delete
# A length above this is garbage, not a record: bounds what a corrupt length field can make the
# reader allocate or skip. The daemon's own --max-value-bytes limit is far below it.
MAX_RECORD_BYTES = 1 << 30
MAX_KEY_BYTES = 0xFFFF

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_SEGMENT_NAME = re.compile(r"wal-([0-9a-f]{16})\.log")


class RecordError(ValueError):
    """Bytes that are not a valid record; ``kind`` says which check failed."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class SegmentHeader(NamedTuple):
    segno: int
    first_seqno: int
    created_ns: int
    salt: int


class DecodedRecord(NamedTuple):
    seqno: int
    durable_seqno: int
    ops: tuple[Op, ...]
    length: int


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@functools.lru_cache(maxsize=64)  # a constant per segment, asked for at every record
def chain_value(salt: int) -> int:
    """V for a salt: ``crc32(record, V) == V`` for every valid record (and run of records)."""
    return RESIDUE ^ zlib.crc32(CRC_TRAILER.pack(salt)) ^ _ZERO_WORD_CRC


def record_size(klen: int, vlen: int) -> int:
    """Bytes a PUT/DELETE record with these key and value lengths takes in the log."""
    return _pad8(RECORD_HEADER_SIZE + klen + vlen + CRC_TRAILER.size)


def _check_op(op: Op) -> None:
    optype, key, vflag, value, expiry = op
    if optype == OP_PUT:
        if not 0 <= vflag <= 255:
            raise ValueError(f"vflag {vflag} is not in 0..255")
        if not 0 <= expiry <= _U64:
            raise ValueError(f"expiry_ms {expiry} is not a u64")
    elif optype == OP_DELETE:
        if value or vflag or expiry:
            raise ValueError("a delete op carries no value, vflag or expiry")
    else:
        raise ValueError(f"unknown optype {optype!r} (1 put, 2 delete)")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"key length {len(key)} is not in 1..{MAX_KEY_BYTES}")


def encode_record(seqno: int, ops: Sequence[Op], *, durable_seqno: int = 0, salt: int = 0) -> bytes:
    """One record for ``ops``: PUT or DELETE for a single op, BATCH for several.

    ``durable_seqno`` is the highest seqno known to be on disk now (0 claims
    nothing, which is always safe); ``salt`` is the log's (segment header).
    Raises ValueError for ops the log cannot hold.
    """
    if not 1 <= seqno <= _U64:
        raise ValueError(f"seqno {seqno} is not in 1..2**64-1")
    if not 0 <= durable_seqno < seqno:
        raise ValueError(f"durable seqno {durable_seqno} must be below the record's seqno {seqno}")
    if not ops:
        raise ValueError("a record needs at least one op")
    for op in ops:
        _check_op(op)
    if len(ops) == 1:
        optype, key, vflag, value, expiry = ops[0]
        payload_parts: list[bytes] = [key, value]
        rtype, klen, vlen = optype, len(key), len(value)
    else:
        payload_parts = []
        for optype, key, vflag, value, expiry in ops:
            payload_parts += (BATCH_OP.pack(optype, vflag, len(key), len(value), expiry), key, value)
        rtype, vflag, klen, expiry = REC_BATCH, 0, 0, 0
        vlen = sum(map(len, payload_parts))
    body_len = RECORD_HEADER_SIZE + klen + vlen
    length = _pad8(body_len + CRC_TRAILER.size)
    if length > MAX_RECORD_BYTES or vlen > _U32:
        raise ValueError(f"record of {length} bytes exceeds the log's limit of {MAX_RECORD_BYTES}")
    header = RECORD_HEADER.pack(length, rtype, vflag, klen, seqno, durable_seqno, expiry, vlen)
    body = b"".join((header, *payload_parts, bytes(length - body_len - CRC_TRAILER.size)))
    return body + CRC_TRAILER.pack(zlib.crc32(body, chain_value(salt)) ^ salt)


def decode_batch(buf: bytes | bytearray | memoryview, start: int, end: int) -> tuple[Op, ...]:
    """The ops of a BATCH op area ``buf[start:end]``; RecordError if it is not a run of ops."""
    ops: list[Op] = []
    unpack = BATCH_OP.unpack_from
    opsize = BATCH_OP.size
    off = start
    while off < end:
        if off + opsize > end:
            raise RecordError("malformed", f"batch op header at {off} runs past the op area")
        optype, vflag, klen, vlen, expiry = unpack(buf, off)
        k = off + opsize
        kv = k + klen
        nxt = kv + vlen
        if nxt > end or klen == 0:
            raise RecordError("malformed", f"batch op at {off} has bad lengths ({klen}, {vlen})")
        if optype == OP_PUT:
            ops.append((OP_PUT, bytes(buf[k:kv]), vflag, bytes(buf[kv:nxt]), expiry))
        elif optype == OP_DELETE and vlen == 0:
            ops.append((OP_DELETE, bytes(buf[k:kv]), 0, b"", 0))
        else:
            raise RecordError("malformed", f"batch op at {off} has type {optype}")
        off = nxt
    if not ops:
        raise RecordError("malformed", "empty batch")
    return tuple(ops)


def record_length_at(buf: bytes | bytearray | memoryview, off: int, end: int) -> int:
    """The length field at ``off`` if it could be a record ending by ``end``; else 0.

    0 also means "zero-filled" (the length field itself is 0). Does not check the CRC.
    """
    if off + 4 > end:
        return 0
    (length,) = CRC_TRAILER.unpack_from(buf, off)
    if length < MIN_RECORD_BYTES or length & 7 or length > MAX_RECORD_BYTES or off + length > end:
        return 0
    return int(length)


def decode_record(
    buf: bytes | bytearray | memoryview, off: int = 0, end: int | None = None, *, salt: int = 0
) -> DecodedRecord:
    """Check and decode the record at ``buf[off:]`` (not beyond ``end``) under ``salt``.

    Raises RecordError with kind ``zero`` (zero-filled space), ``truncated``
    (header or body runs past ``end``), ``length`` (impossible length field),
    ``checksum`` or ``malformed`` (checksum fine, contents inconsistent).
    """
    if end is None:
        end = len(buf)
    if off + 4 > end:
        raise RecordError("truncated", f"{end - off} bytes cannot hold a length field")
    (length,) = CRC_TRAILER.unpack_from(buf, off)
    if length == 0:
        raise RecordError("zero", "length field is 0 (zero-filled space)")
    if length < MIN_RECORD_BYTES or length & 7 or length > MAX_RECORD_BYTES:
        raise RecordError("length", f"impossible record length {length}")
    if off + length > end:
        raise RecordError("truncated", f"record of {length} bytes but only {end - off} remain")
    v = chain_value(salt)
    if zlib.crc32(memoryview(buf)[off : off + length], v) != v:
        raise RecordError("checksum", f"checksum mismatch in a record of {length} bytes")
    _, rtype, vflag, klen, seqno, durable, expiry, vlen = RECORD_HEADER.unpack_from(buf, off)
    k = off + RECORD_HEADER_SIZE
    kv = k + klen
    if kv + vlen + CRC_TRAILER.size > off + length or length - (kv + vlen + CRC_TRAILER.size - off) >= 8:
        raise RecordError("malformed", f"lengths klen={klen} vlen={vlen} do not fill a record of {length}")
    if seqno == 0 or durable >= seqno:
        raise RecordError("malformed", f"seqno {seqno} / durable seqno {durable}")
    ops: tuple[Op, ...]
    if rtype == REC_PUT and klen:
        ops = ((OP_PUT, bytes(buf[k:kv]), vflag, bytes(buf[kv : kv + vlen]), expiry),)
    elif rtype == REC_DELETE and klen and not vlen:
        ops = ((OP_DELETE, bytes(buf[k:kv]), 0, b"", 0),)
    elif rtype == REC_BATCH and not klen:
        ops = decode_batch(buf, kv, kv + vlen)
    else:
        raise RecordError("malformed", f"record type {rtype} with klen={klen} vlen={vlen}")
    return DecodedRecord(seqno, durable, ops, length)


def group_bounds(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(first seqno, last seqno, record count) of a run of encoded records.

    Walks the length fields only (the writer calls it on every group, so it
    stays cheap) and checks that lengths tile ``data`` and seqnos go up by one.
    """
    n = len(data)
    off = 0
    first = last = count = 0
    unpack_len = CRC_TRAILER.unpack_from
    while off < n:
        (length,) = unpack_len(data, off)
        if length < MIN_RECORD_BYTES or length & 7 or off + length > n:
            raise ValueError(f"not a run of whole records: length {length} at offset {off} of {n}")
        (seqno,) = _SEQNO.unpack_from(data, off + 8)
        if count and seqno != last + 1:
            raise ValueError(f"seqno {seqno} follows {last} inside one group")
        if not count:
            first = seqno
        last = seqno
        count += 1
        off += length
    return first, last, count


_SEQNO = struct.Struct("<Q")


def encode_segment_header(segno: int, first_seqno: int, created_ns: int, salt: int) -> bytes:
    body = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, FORMAT_VERSION, SEGMENT_HEADER_SIZE, segno, first_seqno, created_ns, salt, 0
    )[:-4]
    return body + CRC_TRAILER.pack(zlib.crc32(body, RESIDUE))


def decode_segment_header(buf: bytes | bytearray | memoryview) -> SegmentHeader:
    """The header at the start of ``buf``; RecordError (kind ``header``) if it is not one."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        raise RecordError("header", f"{len(buf)} bytes cannot hold the {SEGMENT_HEADER_SIZE}-byte header")
    if zlib.crc32(memoryview(buf)[:SEGMENT_HEADER_SIZE], RESIDUE) != RESIDUE:
        raise RecordError("header", "segment header checksum mismatch")
    magic, version, hsize, segno, first_seqno, created_ns, salt, _ = SEGMENT_HEADER.unpack_from(buf, 0)
    if magic != SEGMENT_MAGIC:
        raise RecordError("header", f"bad magic {magic!r}")
    if version != FORMAT_VERSION or hsize != SEGMENT_HEADER_SIZE:
        raise RecordError(
            "header", f"format version {version} (header {hsize} B); this walcache reads version {FORMAT_VERSION}"
        )
    if first_seqno == 0:
        raise RecordError("header", "first seqno 0")
    return SegmentHeader(segno, first_seqno, created_ns, salt)


def segment_name(segno: int) -> str:
    return f"wal-{segno:016x}.log"


def parse_segment_name(name: str) -> int | None:
    """The segment number of a segment file name, None for any other name."""
    m = _SEGMENT_NAME.fullmatch(name)
    return int(m.group(1), 16) if m else None



# --------------------------------------------------------------------- snapshots and the manifest

SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"WALCSNAP"
SNAPSHOT_END_MAGIC = b"WALCSEND"

SNAPSHOT_HEADER = struct.Struct("<8sIIQQQI16xI")
"""magic, version, header size, seal seqno, next segno, created ns, salt, (16 reserved), crc."""
SNAPSHOT_HEADER_SIZE = SNAPSHOT_HEADER.size  # 64

SNAPSHOT_ENTRY = struct.Struct("<HBxIQQ")
"""klen, vflag, (zero), vlen, seqno, expiry_ms."""

SNAPSHOT_FOOTER = struct.Struct("<8sQQ4xI")
"""magic, entry count, live bytes, (4 reserved), crc of everything before the crc."""
SNAPSHOT_FOOTER_SIZE = SNAPSHOT_FOOTER.size  # 32

MANIFEST_VERSION = 1
MANIFEST_MAGIC = b"WALCMANI"
MANIFEST_NAME = "MANIFEST"

MANIFEST_RECORD = struct.Struct("<8sIIQQQQII4xI")
"""magic, version, size, seal seqno, next segno, snapshot size, entries, snapshot crc, salt, (4), crc."""

_SNAPSHOT_NAME = re.compile(r"snap-([0-9a-f]{16})\.snap")


class SnapshotHeader(NamedTuple):
    seal_seqno: int
    next_segno: int
    created_ns: int
    salt: int


class SnapshotFooter(NamedTuple):
    entries: int
    live_bytes: int
    crc: int


class Manifest(NamedTuple):
    seal_seqno: int
    next_segno: int
    snapshot_bytes: int
    entries: int
    snapshot_crc: int
    salt: int


def _sealed_64(body_60: bytes) -> bytes:
    """A 60-byte body plus the trailer that makes crc32(all 64, RESIDUE) == RESIDUE."""
    return body_60 + CRC_TRAILER.pack(zlib.crc32(body_60, RESIDUE))


def encode_snapshot_header(seal_seqno: int, next_segno: int, created_ns: int, salt: int) -> bytes:
    if seal_seqno < 1 or next_segno < 2:
        raise ValueError(f"a snapshot needs seal seqno >= 1 and next segno >= 2, not {seal_seqno}, {next_segno}")
    body = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC, SNAPSHOT_VERSION, SNAPSHOT_HEADER_SIZE, seal_seqno, next_segno, created_ns, salt, 0
    )[:-4]
    return _sealed_64(body)


def decode_snapshot_header(buf: bytes | bytearray | memoryview) -> SnapshotHeader:
    """The header at the start of ``buf``; RecordError (kind ``snapshot``) if it is not one."""
    if len(buf) < SNAPSHOT_HEADER_SIZE:
        raise RecordError("snapshot", f"{len(buf)} bytes cannot hold the {SNAPSHOT_HEADER_SIZE}-byte header")
    if zlib.crc32(memoryview(buf)[:SNAPSHOT_HEADER_SIZE], RESIDUE) != RESIDUE:
        raise RecordError("snapshot", "snapshot header checksum mismatch")
    magic, version, hsize, seal, nxt, created, salt, _ = SNAPSHOT_HEADER.unpack_from(buf, 0)
    if magic != SNAPSHOT_MAGIC:
        raise RecordError("snapshot", f"bad magic {magic!r}")
    if version != SNAPSHOT_VERSION or hsize != SNAPSHOT_HEADER_SIZE:
        raise RecordError(
            "snapshot", f"snapshot format version {version} (header {hsize} B); this walcache reads {SNAPSHOT_VERSION}"
        )
    if seal < 1 or nxt < 2:
        raise RecordError("snapshot", f"seal seqno {seal} / next segno {nxt}")
    return SnapshotHeader(seal, nxt, created, salt)


def encode_snapshot_entry(key: bytes, vflag: int, value: bytes, seqno: int, expiry_ms: int) -> bytes:
    """One entry (header, key, value); ValueError for what the layout cannot hold."""
    if not 1 <= len(key) <= MAX_KEY_BYTES or len(value) > _U32 or not 0 <= vflag <= 255:
        raise ValueError(f"entry with a {len(key)}-byte key, {len(value)}-byte value, vflag {vflag}")
    return SNAPSHOT_ENTRY.pack(len(key), vflag, len(value), seqno, expiry_ms) + key + value


def encode_snapshot_footer(entries: int, live_bytes: int, crc_so_far: int) -> bytes:
    """The footer; ``crc_so_far`` is crc32 of every byte before it (header and entries)."""
    body = SNAPSHOT_FOOTER.pack(SNAPSHOT_END_MAGIC, entries, live_bytes, 0)[:-4]
    return body + CRC_TRAILER.pack(zlib.crc32(body, crc_so_far))


def decode_snapshot_footer(buf: bytes | bytearray | memoryview) -> SnapshotFooter:
    """The footer at the end of ``buf`` (the whole file); checks its magic, not the CRC."""
    if len(buf) < SNAPSHOT_HEADER_SIZE + SNAPSHOT_FOOTER_SIZE:
        raise RecordError("snapshot", f"{len(buf)} bytes cannot hold a header and a footer")
    magic, entries, live, crc = SNAPSHOT_FOOTER.unpack_from(buf, len(buf) - SNAPSHOT_FOOTER_SIZE)
    if magic != SNAPSHOT_END_MAGIC:
        raise RecordError("snapshot", f"no footer (magic {magic!r}): the file was cut short")
    return SnapshotFooter(entries, live, crc)


def check_snapshot(buf: bytes | bytearray | memoryview) -> tuple[SnapshotHeader, SnapshotFooter]:
    """Header and footer of a whole snapshot file after its checksum passed; RecordError if not."""
    header = decode_snapshot_header(buf)
    footer = decode_snapshot_footer(buf)
    if zlib.crc32(memoryview(buf)[: len(buf) - CRC_TRAILER.size]) != footer.crc:
        raise RecordError("snapshot", "snapshot checksum mismatch")
    return header, footer


def encode_manifest(m: Manifest) -> bytes:
    if m.seal_seqno < 1 or m.next_segno < 2:
        raise ValueError(f"a manifest needs seal seqno >= 1 and next segno >= 2: {m}")
    body = MANIFEST_RECORD.pack(
        MANIFEST_MAGIC, MANIFEST_VERSION, MANIFEST_RECORD.size, m.seal_seqno, m.next_segno,
        m.snapshot_bytes, m.entries, m.snapshot_crc, m.salt, 0,
    )[:-4]  # fmt: skip
    return _sealed_64(body)


def decode_manifest(buf: bytes | bytearray | memoryview) -> Manifest:
    """The manifest in ``buf`` (exactly 64 bytes); RecordError (kind ``manifest``) if it is not one."""
    if len(buf) != MANIFEST_RECORD.size:
        raise RecordError("manifest", f"{len(buf)} bytes, a manifest has {MANIFEST_RECORD.size}")
    if zlib.crc32(memoryview(buf), RESIDUE) != RESIDUE:
        raise RecordError("manifest", "manifest checksum mismatch")
    magic, version, size, seal, nxt, snap_bytes, entries, snap_crc, salt, _ = MANIFEST_RECORD.unpack_from(buf, 0)
    if magic != MANIFEST_MAGIC:
        raise RecordError("manifest", f"bad magic {magic!r}")
    if version != MANIFEST_VERSION or size != MANIFEST_RECORD.size:
        raise RecordError("manifest", f"manifest format version {version}; this walcache reads {MANIFEST_VERSION}")
    if seal < 1 or nxt < 2:
        raise RecordError("manifest", f"seal seqno {seal} / next segno {nxt}")
    return Manifest(seal, nxt, snap_bytes, entries, snap_crc, salt)


def snapshot_name(seal_seqno: int) -> str:
    return f"snap-{seal_seqno:016x}.snap"


def parse_snapshot_name(name: str) -> int | None:
    """The seal seqno of a snapshot file name, None for any other name."""
    m = _SNAPSHOT_NAME.fullmatch(name)
    return int(m.group(1), 16) if m else None
