"""The shared-memory table: byte layout and seqlock protocol (the one place both are written).

A daemon (the single writer, one thread) publishes the live key/value state into POSIX
shared memory; client processes map it read-only and read it without locks. The
pure-Python writer (writer.py), the pure-Python reader (reader.py) and any compiled
reader follow exactly this text. The table is transient: it is rebuilt from the
write-ahead log at every daemon start, so it uses the machine's NATIVE byte order
(little-endian on x86-64) and never needs migrating.

Names
=====

- Control segment ``"/" + namespace`` (``walcache.paths.shm_namespace(data_dir)``), stable
  for a data dir. It names the current data segment. Created once, never truncated.
- Data segments ``"/%s.%016x.%d" % (namespace, incarnation, n)``: ``incarnation`` is a
  random 64-bit number drawn by each writer (each daemon start), ``n`` counts the data
  segments that writer built (1, 2, ...). A name is never reused, so a reader can never
  map a new segment under an old name, and a segment is never truncated while mapped
  (touching a page past EOF is SIGBUS, which kills a Python reader).

All words below are u64 in native byte order at 8-byte-aligned offsets, unless the
type says ``bytes``.

Control segment (CTL_SIZE = 128 bytes)
--------------------------------------

====== ==== ======= =================================================================
offset size type    meaning
====== ==== ======= =================================================================
0      8    bytes   magic ``b"WALCCTL\\0"``
8      8    u64     layout version (LAYOUT_VERSION)
16     8    u64     ctl seq: seqlock over offsets 24..127 (odd = being rewritten)
24     8    u64     generation of the current data segment (+1 at every publish)
32     8    u64     size in bytes of the current data segment
40     8    u64     length of its name (1..63)
48     64   bytes   its name, ASCII, NUL-padded (with the leading "/")
112    16   -       reserved, zero
====== ==== ======= =================================================================

Data segment
------------

``[header 256 B][index: capacity x 8 B][data area, up to segment_bytes]``.
Segment size is at most MAX_SEGMENT_BYTES (32 GiB - 64 B), so that every word index
fits in 32 bits (see the slot word).

Header (HEADER_SIZE = 256 bytes). Offsets 0..127 are written before the segment is
published and then only ``stale``/``closed`` change (once each) and ``index`` (at an
index move); 128..255 are the counters the writer updates on every write (a separate
cache line, so that readers' cached geometry is not invalidated by every put).

====== ==== ======= =================================================================
offset size type    meaning
====== ==== ======= =================================================================
0      8    bytes   magic ``b"WALCTBL\\0"``
8      8    u64     layout version (LAYOUT_VERSION)
16     8    u64     generation (the ctl generation it was published under; 0 = never)
24     8    u64     writer incarnation (random, also in the segment name)
32     8    u64     segment_bytes: total size of this segment
40     8    u64     capacity of the first index: number of slots, a power of two >= 8
48     8    u64     index_off of the first index: byte offset of its slot 0 (= HEADER_SIZE)
56     8    u64     data_off: byte offset of the data area (64-aligned, after the first index)
64     8    u64     writer pid
72     8    u64     writer process start time, ms since the epoch (guards pid reuse)
80     8    u64     stale: 1 once a newer segment is published (never goes back to 0)
88     8    u64     closed: 1 once the writer stopped cleanly (readers keep reading)
96     8    u64     index: the CURRENT index, ``log2(capacity) << 32 | slot0`` where slot0
                    is the word index of its slot 0 (see "Index moves"); one word, so a
                    reader always reads a consistent pair
104    24   -       reserved, zero
128    8    u64     heartbeat: ms since the epoch, written about once a second
136    8    u64     live: number of live keys (expired ones included until purged)
144    8    u64     tombstones: number of TOMBSTONE slots
152    8    u64     used_bytes: sum of footprint() of the live entries
160    8    u64     applied_seqno: highest log sequence number applied to this segment
168    88   -       reserved, zero
====== ==== ======= =================================================================

Index slot (SLOT_SIZE = 8 bytes), one u64; linear probing from ``H & (capacity - 1)``
where ``H = XXH64(encoded key, seed 0)``, in the current index (header offset 96):

==================== ===============================================================
value                meaning
==================== ===============================================================
0                    EMPTY: never used in this segment; a probe stops here (miss)
TOMBSTONE = 1 << 32  deleted: keep probing (fp 1 with record 0, which no entry has)
MOVED = 2**64 - 1    this index is retired: reread the header's index word, and remap
                     through the control segment if the segment is stale
otherwise            live: ``(H >> 32) << 32 | w``: bits 63..32 are the top 32 bits of
                     H (a fingerprint), bits 31..0 the record's WORD index ``w`` (byte
                     offset / 8) from the segment start; data_off/8 <= w and
                     w + 4 <= segment_bytes/8
==================== ===============================================================

One word holds the fingerprint and the record pointer, so a reader always sees a
consistent pair (one aligned 8-byte load), and the index stays 8 bytes per slot: 100k
keys need 1 MiB of index, which stays in L2. A reader computes ``f = H & FP_MASK`` and
takes a slot as a candidate when ``data_off/8 <= x - f < segment_bytes/8 - 3`` (one
subtraction does the fingerprint test and the bounds check; EMPTY, TOMBSTONE, MOVED and
other fingerprints all fall outside that range).

Record at word index ``w`` (REC_HEADER_SIZE = 32 bytes, then key and value, padded to
a multiple of 8; the chunk is ``chunk_words(klen, vlen)`` words):

====== ===== ======= ================================================================
offset size  type    meaning
====== ===== ======= ================================================================
0      8     u64     seq: the record's seqlock word (even = stable, odd = being written)
8      8     u64     lens: ``klen << 32 | vlen`` (klen < 2**16, vlen < 2**32)
16     8     u64     expiry_vflag: ``expiry_ms << 8 | vflag`` (expiry 0 = never; vflag is
                     walcache.codec's value encoding: 0 msgpack, 1 bytes, 2 UTF-8)
24     8     u64     seqno: sequence number of the latest log record for this key
32     klen  bytes   the encoded key (walcache.codec.encode_key: tag byte + payload)
32+kl  vlen  bytes   the value bytes
====== ===== ======= ================================================================

Why not keep small entries inline in the slot (a C reader would save one cache miss
per get): it multiplies the index size by the entry size at a load factor of 0.3-0.6,
which breaks the <= 64 bytes/entry memory target and pushes the index out of L2 for the
pure-Python reader, where measurement showed no gain from inlining.

Seqlock protocol
================

Single writer (the daemon's apply thread). Chunk boundaries never change within a
segment: a freed chunk is reused only for a record of exactly the same chunk size (see
writer.py), so the word at a chunk's start is always that chunk's seq, increasing
forever (u64: no wrap, no ABA). The writer never writes into a chunk that a live slot
points to except under that chunk's seq.

Writer, overwrite with the same chunk size (in place):
  W1. ``Q[w] = s + 1`` (odd)
  W2. write lens, expiry_vflag, seqno, the value bytes
  W3. ``Q[w] = s + 2`` (even)

Writer, insert or overwrite with another chunk size (out of place, chunk ``c``):
  W1. ``Q[c] = s + 1`` (odd)
  W2. write lens, expiry_vflag, seqno, key, value into chunk c
  W3a. if there was an old chunk o: ``Q[o] = t + 1`` (odd; t its seq)
  W3. store the slot word ``S[i] = (H >> 32) << 32 | c`` (one aligned 8-byte store)
  W4. ``Q[c] = s + 2`` (even)
  W5. if there was an old chunk o: ``Q[o] = t + 2`` (even), then put it on its free list
  The old version stops validating (W3a) before the new one can be seen (W3), so no read
  that starts after some reader saw the new version can validate the old one.
  The slot is stored while c is still odd, so a reader can only ever find an even
  record of key K at c after the slot pointed to it: a consistent copy is a version
  that was published.

Writer, delete: ``Q[w] = t + 1``, ``S[i] = TOMBSTONE``, ``Q[w] = t + 2``, then free the
chunk (as W3a, W3, W5).

So within a segment a record's (w, seq) changes whenever what it means changes: it is
rewritten (W1/W3), or no slot names it any more (W5). A reader that once validated
"key K lives at w, seq s" (R5 passed and S[i] still held x after it) may answer K from
(w, s) for as long as ``Q[w] == s`` and the header's ``stale`` is 0, without probing:
the compiled reader's result cache does (_creader.c). Version 1 freed chunks without
touching their seq, which is why later readers refuse version 1 segments; version 2 had
no index word (the index never moved), and a version 3 reader refuses it too.

Index moves
-----------

The first index sits between the header and the data area. When it fills up (live +
tombstones past MAX_LOAD of it) and the data area is not mostly dead, the writer moves
the index instead of copying every record into a new segment: the records stay where
they are, only the 8-byte slots are rewritten.

Writer, index move (new capacity C', in the segment's unused reserve):
  M1. take C' words at the top of the reserve, below any earlier index there (never
      inside the data area's bump range, never reused within this segment), commit
      them, and fill them with a slot for every live slot of the current index, placed
      by linear probing from ``XXH64(key) & (C' - 1)`` (tombstones dropped). Nobody
      reads these words yet.
  M2. store the header's index word (one 8-byte store) naming the new index.
  M3. store MOVED into every slot of the old index, one 8-byte store at a time.
  No record is written between M1 and M3 (the writer is one thread), so until M3
  finishes the old index still describes exactly the current records.
A reader that meets MOVED rereads the index word (M2 was stored before any MOVED, and
x86-TSO keeps the order) and probes the new index from R1; the records it may have
cached (w, s) did not move. The old index's words are never reused in this segment,
so a reader that is still probing it only ever finds slots or MOVED there. A scan
that meets MOVED starts over: slot numbers of one index mean nothing in another.
Moved indexes lie back to back from the current one to the segment's end. A writer
killed during M3 leaves part of the old index live, so the next writer retires such a
segment by storing MOVED over the first index and over all of [current slot0, end).

Writer, new segment (growth, compaction, new daemon): build it completely (nobody maps
it yet), publish it in the control segment (ctl seq odd, fields, ctl seq even), set the
old header's ``stale = 1``, store MOVED into every old slot, one 8-byte store at a time,
then unlink the old name. Readers of the old mapping keep a valid (frozen) table until
they meet MOVED.

Reader, get(encoded key kb):
  R1. ``H = XXH64(kb)``; ``f = H & FP_MASK``; ``i = H & (capacity - 1)``.
  R2. ``x = S[i]``; ``w = x - f``. If ``lo <= w < hi``: candidate, go to R3. If x is
      EMPTY: miss. If x is MOVED: remap (read the control segment under its seq; if it
      names another segment or this one is stale, open and map the named segment; in
      both cases read and validate the header's index word) and start again. Else
      ``i = (i + 1) & (capacity - 1)`` and repeat R2 (at most capacity probes).
  R3. ``s1 = Q[w]``.
  R4. ``m = Q[w + 1]``; bounds-check ``8w + 32 + klen + vlen <= segment_bytes`` before
      touching the bytes; copy the key and the value out; ``xv = Q[w + 2]``.
  R5. ``s2 = Q[w]``. If ``s1`` is odd or ``s2 != s1``: retry from R2 at slot i.
  R6. If the copied key != kb: validate the miss: if ``S[i] != x`` or ``Q[w] != s1``
      retry from R2 at slot i (the slot moved: we followed a stale pointer into a chunk
      reused for another key); else continue probing at i + 1.
  R7. If ``0 < expiry_ms <= now``: miss. Else return (vflag, value). Nothing read
      before R5 is trusted; decoding happens on the validated copy only.
  Retries are bounded by count AND time (RETRY_MIN_TRIES tries and RETRY_MIN_NS):
  then, if the control segment names a newer segment, remap; else if the writer pid
  from the header is dead (or is another process: start time differs) raise
  TableUnavailable (it died mid-write, seq odd forever); else ReadContention (the
  client then asks the daemon).

Hardware assumptions (x86-64 only)
----------------------------------

- An aligned 8-byte load or store is one ``mov`` and is never torn (Intel SDM Vol. 3A
  8.1.1; AMD the same). CPython's ``memoryview.cast("Q")`` element get/set is exactly
  that: ``memory_subscript``/``pack_single`` compile to a single 8-byte ``mov`` for the
  ``Q`` format (checked in this libpython's disassembly, see the design notes).
  Shared words are only ever accessed that way (never through a big-endian struct,
  which reads byte by byte).
- x86-TSO: loads are not reordered with other loads, stores not with other stores
  (SDM 8.2.2), so R3 -> R4 -> R5 and W1 -> W2 -> W3 -> W4 are seen in program order
  without fences; the only reordering (store -> later load) is never relied on. Bulk
  copies (memmove, including non-temporal stores, which glibc follows by sfence) are
  ordered before the writer's next seq store. Each Python-level access is a separate
  C call, so the C compiler cannot merge or hoist loads across them.
- Elsewhere (aarch64, ...) loads may pass loads and stores may pass stores, which pure
  Python cannot fence: LOCK_FREE_OK is False there, ShmReader refuses lock-free reads
  (``ShmReader.lock_free_ok`` is False and reads raise TableUnavailable) and the client
  reads through the daemon. The compiled reader orders its own loads anywhere (C11
  acquire loads, an acquire fence before the seq re-read: the kernel's
  read_seqcount_retry), but that is only half of a seqlock: the writer is Python and
  cannot order its stores (W1 before W2, W3a before W3, W3 before W5) off x86-64, so
  there the client reads through the daemon whichever reader is built.

Any change here bumps LAYOUT_VERSION.
"""

from __future__ import annotations

import platform
import struct
import time

import xxhash

__all__ = [
    "LAYOUT_VERSION",
    "CTL_MAGIC",
    "DATA_MAGIC",
    "CTL_SIZE",
    "HEADER_SIZE",
    "SLOT_SIZE",
    "REC_HEADER_SIZE",
    "REC_HEADER_WORDS",
    "EMPTY",
    "TOMBSTONE",
    "MOVED",
    "FP_MASK",
    "LOC_MASK",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_SEGMENT_BYTES",
    "MAX_NAME_BYTES",
    "MIN_CAPACITY",
    "RETRY_MIN_TRIES",
    "RETRY_MIN_NS",
    "LOCK_FREE_OK",
    "CTL_STRUCT",
    "CTL_TAIL",
    "HEADER_STRUCT",
    "RECORD_HEADER",
    "SLOT",
    "C_SEQ",
    "C_GENERATION",
    "H_GENERATION",
    "H_STALE",
    "H_CLOSED",
    "H_INDEX",
    "H_WRITER_PID",
    "H_WRITER_START_MS",
    "H_HEARTBEAT",
    "H_LIVE",
    "H_TOMBSTONES",
    "H_USED_BYTES",
    "H_APPLIED_SEQNO",
    "R_SEQ",
    "R_LENS",
    "R_EXPIRY_VFLAG",
    "R_SEQNO",
    "hash_key",
    "index_word",
    "index_geometry",
    "chunk_words",
    "footprint",
    "ctl_name",
    "data_name",
    "now_ms",
]

LAYOUT_VERSION = 3

CTL_MAGIC = b"WALCCTL\0"
DATA_MAGIC = b"WALCTBL\0"

CTL_SIZE = 128
HEADER_SIZE = 256
SLOT_SIZE = 8
REC_HEADER_SIZE = 32
REC_HEADER_WORDS = REC_HEADER_SIZE // 8

EMPTY = 0
TOMBSTONE = 1 << 32
MOVED = (1 << 64) - 1
FP_MASK = 0xFFFF_FFFF_0000_0000
LOC_MASK = 0xFFFF_FFFF

MAX_KEY_BYTES = (1 << 16) - 1
MAX_VALUE_BYTES = (1 << 32) - 1
# Every word index must fit the slot's 32-bit field and stay below MOVED's low half.
MAX_SEGMENT_BYTES = (1 << 35) - 64
MAX_NAME_BYTES = 63
MIN_CAPACITY = 8

# Bounded retries: a count alone fires falsely when the writer is descheduled inside a
# write section for over a millisecond (measured), so both bounds must be passed.
RETRY_MIN_TRIES = 64
RETRY_MIN_NS = 1_000_000

# x86-64 ordering (see "Hardware assumptions"); anything else reads through the daemon.
LOCK_FREE_OK = platform.machine().lower() in ("x86_64", "amd64")

# Control segment: magic, version, seq, generation, segment bytes, name length, name.
CTL_STRUCT = struct.Struct("=8sQQQQQ64s16x")
# What a publish rewrites: the fields after seq (generation, segment bytes, name length,
# name), at byte 8 * C_GENERATION. Never CTL_STRUCT over a live control segment:
# struct.pack_into zeroes all it covers before it packs, so the seq word would read 0
# (even) for a moment, with the fields after it still zero.
CTL_TAIL = struct.Struct("=QQQ64s")
# Data header: see the table; two halves of 128 bytes.
HEADER_STRUCT = struct.Struct("=8sQQQQQQQQQQQQ24x" "QQQQQ88x")
# Record header: seq, lens, expiry_vflag, seqno.
RECORD_HEADER = struct.Struct("=QQQQ")
# Index slot.
SLOT = struct.Struct("=Q")

# Word indices (offset / 8) of the fields the code touches one at a time.
C_SEQ = 2
C_GENERATION = 3
H_GENERATION = 2
H_WRITER_PID = 8
H_WRITER_START_MS = 9
H_STALE = 10
H_CLOSED = 11
H_INDEX = 12
H_HEARTBEAT = 16
H_LIVE = 17
H_TOMBSTONES = 18
H_USED_BYTES = 19
H_APPLIED_SEQNO = 20
R_SEQ = 0
R_LENS = 1
R_EXPIRY_VFLAG = 2
R_SEQNO = 3

hash_key = xxhash.xxh64_intdigest
"""XXH64 of the encoded key, seed 0: stable across processes and implementable in C."""


def chunk_words(klen: int, vlen: int) -> int:
    """Words of the data area a record with this key and value occupies."""
    return (REC_HEADER_SIZE + klen + vlen + 7) >> 3


def footprint(klen: int, vlen: int) -> int:
    """Bytes one entry takes: its chunk plus one index slot (empty slots not counted)."""
    return (chunk_words(klen, vlen) << 3) + SLOT_SIZE


def index_word(slot0: int, capacity: int) -> int:
    """The header's index word for an index of ``capacity`` slots at word ``slot0``."""
    return (capacity.bit_length() - 1) << 32 | slot0


def index_geometry(word: int, segment_bytes: int) -> tuple[int, int] | None:
    """(slot0, capacity) named by an index word, or None unless it lies in the segment
    after the header with a capacity that is a power of two >= MIN_CAPACITY."""
    log2, slot0 = word >> 32, word & LOC_MASK
    if not MIN_CAPACITY.bit_length() - 1 <= log2 < 33:
        return None
    capacity = 1 << log2
    if slot0 < HEADER_SIZE // 8 or (slot0 + capacity) * SLOT_SIZE > segment_bytes:
        return None
    return slot0, capacity


def ctl_name(namespace: str) -> str:
    return "/" + namespace


def data_name(namespace: str, incarnation: int, n: int) -> str:
    return "/%s.%016x.%d" % (namespace, incarnation, n)


def now_ms() -> int:
    return int(time.time() * 1000)
