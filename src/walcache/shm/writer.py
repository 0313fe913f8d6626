"""The writer side of the shared table (the daemon's apply thread only).

Follows the layout and the numbered seqlock steps in :mod:`walcache.shm.layout`.

Memory reuse. The data area is carved into chunks of exactly ``chunk_words(klen, vlen)``
words. Freed chunks go on a free list per chunk size, kept in this process's memory,
and are reused only for a record of the same size, so chunk boundaries never move
within a segment and the word at a chunk's start is always that chunk's seqlock word
(a reader following a stale pointer lands on a real seq, never on value bytes that
could imitate a record). An overwrite of the same size is done in place under the
record's seq; other sizes write a new chunk, flip the slot, then free the old one.
Rewriting the same keys with values of the same size therefore never grows anything.
When the bump area is exhausted and no chunk of the needed size is free, the writer
rebuilds: a new segment, compacted (live entries copied back to back, tombstones and
expired entries dropped), the same size if the live data then fills at most half of
it, else doubled. A rebuild pauses this thread (every write) for O(live data): 26 ms
for 100,000 keys of 100 B, 0.51 s for 150,000 keys of 4 KiB (bench/bench_rebuild.py);
it never blocks a reader: readers keep the old, frozen mapping until they meet MOVED,
then remap.

Growing in place. A segment is created with a sparse reserve after its data area
(ftruncate: address space, no memory), by default room for a data area of twice the
memory limit (the daemon's --shm-reserve, --max-memory), at most the layout's 32 GiB.
When the bump area runs out and a rebuild would only double it (and no more than a
quarter of it is dead chunks, which a rebuild would compact), the writer moves the
area's end into the reserve instead (grow_in_place): the records stay put, readers
already map the whole segment, and pages are committed as the bump pointer reaches
them, as always. Readers pay in address space: each maps the whole segment, reserve
included.

Moving the index. When live + tombstone slots would pass MAX_LOAD of the capacity, the
index needs replacing: by one with more slots (doubling while live keys exceed MIN_LOAD
of it), or as many when tombstones filled it. If the data
area is not mostly dead, the writer moves the index instead of rebuilding (move_index,
layout.py "Index moves"): a new index at the top of the reserve, below any earlier one,
filled from the old one's slots (only 8-byte slots are rewritten and keys rehashed;
the records stay), then the header's index word, then MOVED in the old index. Its cost
is O(slots), not O(data). Old indexes stay dead in the segment until a rebuild. So only
compaction of a mostly dead area and a spent reserve rebuild.

Why not memcached-style geometric size classes: exact sizes waste at most 7 bytes per
entry (target: <= 64 bytes of overhead per entry) and the compaction above already
handles workloads whose sizes drift; classes would only trade that for internal waste.
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import posix_ipc
import psutil

from ..errors import CacheFull, ConfigError, KeyTooLarge, TableUnavailable, ValueTooLarge
from .layout import (
    CTL_MAGIC,
    CTL_SIZE,
    CTL_STRUCT,
    CTL_TAIL,
    C_GENERATION,
    C_SEQ,
    DATA_MAGIC,
    EMPTY,
    FP_MASK,
    H_APPLIED_SEQNO,
    H_CLOSED,
    H_GENERATION,
    H_HEARTBEAT,
    H_INDEX,
    H_LIVE,
    H_STALE,
    H_TOMBSTONES,
    H_USED_BYTES,
    HEADER_SIZE,
    HEADER_STRUCT,
    LAYOUT_VERSION,
    LOC_MASK,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_SEGMENT_BYTES,
    MAX_VALUE_BYTES,
    MIN_CAPACITY,
    MOVED,
    R_EXPIRY_VFLAG,
    R_LENS,
    R_SEQNO,
    REC_HEADER_SIZE,
    RECORD_HEADER,
    SLOT,
    SLOT_SIZE,
    TOMBSTONE,
    index_geometry,
    index_word,
    chunk_words,
    ctl_name,
    data_name,
    footprint,
    hash_key,
    now_ms,
)

__all__ = ["ShmTable", "MAX_LOAD", "MIN_LOAD"]

log = logging.getLogger("walcache.shm")

# Rebuild the index when live + tombstone slots would exceed MAX_LOAD of it; size the
# new one so live keys fill at most MIN_LOAD. With 8-byte slots the index costs 13-27
# bytes per key, and a miss probes ~3.6 slots on average at the worst load.
MAX_LOAD = 0.6
MIN_LOAD = 0.3
COMMIT_STEP = 1 << 20
_PAGE = 4096


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class ShmOps:
    """The seam through which the table claims shared memory (``posix_fallocate``).

    Claiming pages is the one step of a put that a full /dev/shm can fail; tests put a
    :class:`FaultyShmOps` here to run out of it on purpose, nowhere else.
    """

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)


class FaultyShmOps(ShmOps):
    """ShmOps whose /dev/shm is full once ``limit`` bytes were claimed (for tests).

    A claim that would pass the limit fails whole with ENOSPC, as posix_fallocate on a
    full tmpfs does; nothing given back (segments a rebuild retires) counts again.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.claimed = 0

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        if self.claimed + length > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().fallocate(fd, offset, length)
        self.claimed += length


class _Segment:
    """One data segment mapped read-write, plus the writer's private allocation state.

    The segment is reserved sparse (ftruncate) and its pages are committed with
    posix_fallocate ahead of the bump pointer, COMMIT_STEP at a time: a full /dev/shm
    then fails a put with CacheFull instead of SIGBUS, and the reserve left by growth
    costs no memory until it is used. Readers only follow slots to committed chunks.
    """

    def __init__(
        self,
        name: str,
        fd: int,
        mm: mmap.mmap,
        capacity: int,
        data_off: int,
        committed: int,
        ops: ShmOps,
        data_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.ops = ops
        self.fd = fd
        self.mm = mm
        self.committed = committed
        self.size = len(mm)
        self.capacity = capacity
        self.mask = capacity - 1
        self.q = memoryview(mm).cast("Q")
        self.slot0 = HEADER_SIZE // 8  # word index of the current index's slot 0
        self.slots = self.q[self.slot0 : self.slot0 + capacity]
        self.lo = data_off // 8
        self.top = self.lo  # bump pointer (word index)
        # The data area's hard end: the segment's end, then the lowest moved index (moved
        # indexes lie back to back from there to the segment's end).
        self.end_words = self.size // 8
        # The bump area in use ends here; past it up to end_words is reserve (sparse: no
        # memory until used), which ShmTable.grow_in_place hands out instead of a rebuild.
        self.limit = self.end_words if data_bytes is None else min(self.end_words, self.lo + data_bytes // 8)
        self.free: dict[int, list[int]] = {}
        self.free_words = 0

    @property
    def data_words(self) -> int:
        return self.limit - self.lo

    @property
    def moved_index_words(self) -> int:
        """Words of the moved indexes, the current one included if it moved (committed)."""
        return self.size // 8 - self.end_words

    @property
    def retired_index_words(self) -> int:
        """Words of the indexes an index move retired: dead until a rebuild. The first
        index lies between the header and the data area."""
        if self.slot0 == HEADER_SIZE // 8:
            return 0
        return (self.lo - HEADER_SIZE // 8) + self.moved_index_words - self.capacity

    def alloc(self, nw: int) -> int:
        """Word index of a free chunk of ``nw`` words, or 0 when the segment is full."""
        lst = self.free.get(nw)
        if lst:
            self.free_words -= nw
            return lst.pop()
        w = self.top
        if w + nw > self.limit:
            return 0
        if (w + nw) << 3 > self.committed:
            self.commit((w + nw) << 3)
        self.top = w + nw
        return w

    def commit(self, end: int) -> None:
        """Commit the pages up to byte ``end`` (rounded up to COMMIT_STEP, never into
        the moved indexes at the top, which are committed on their own)."""
        new = min(self.end_words << 3, _round_up(end, COMMIT_STEP))
        if new <= self.committed:
            return
        try:
            self.ops.fallocate(self.fd, self.committed, new - self.committed)
        except OSError as exc:
            raise CacheFull(
                f"cannot commit {new - self.committed} more bytes of shared memory for {self.name} "
                f"({exc.strerror}): /dev/shm is full or limited; free space there or lower --max-memory"
            ) from exc
        self.committed = new

    def release(self, w: int, nw: int) -> None:
        # The caller already retired the chunk (its seq went odd before its slot moved
        # and even again after: layout.py W3a/W5); from here on it is private memory.
        self.free.setdefault(nw, []).append(w)
        self.free_words += nw

    def close(self) -> None:
        self.slots.release()
        self.q.release()
        self.mm.close()
        os.close(self.fd)


# Layouts whose data segments this writer can retire: the header's stale word and the
# MOVED slot value are the same in all of them; the index is at the header's offsets 40
# and 48 before layout 3, at its index word from 3 on (layout.py).
RETIRABLE_LAYOUT_VERSIONS = (1, 2, LAYOUT_VERSION)


class ShmTable:
    """The daemon's read-write view of the shared table; see the module docstring."""

    def __init__(
        self,
        namespace: str,
        *,
        max_memory: int | None,
        mode: int,
        gid: int | None,
        shmops: ShmOps | None = None,
        data_reserve: int | None = None,
    ) -> None:
        # Use ShmTable.create(); this only sets the fields.
        self.namespace = namespace
        self._ops = shmops if shmops is not None else ShmOps()
        self.max_memory = max_memory
        # Address space a new segment reserves for its data area (grow_in_place); None:
        # twice max_memory; 0: none. Read when a segment is made, so it may change any time.
        self.data_reserve = data_reserve
        self._mode = mode
        self._gid = gid
        self._incarnation = secrets.randbits(64)
        self._n = 0
        self._pid = os.getpid()
        self._start_ms = int(psutil.Process(self._pid).create_time() * 1000)
        self._seg: _Segment | None = None
        self._ctl: mmap.mmap | None = None
        self._ctlq: memoryview | None = None
        # Control segments whose name was removed under us (restore_names): readers that
        # mapped one before go on following this table through it, so it gets every update.
        self._lost_ctls: list[tuple[mmap.mmap, memoryview]] = []
        # The data segment a control segment of an older layout named when _open_ctl
        # replaced it: publish() retires it, so that readers of that layout move off it.
        self._older_layout_segment = ""
        self._published = False
        self._generation = 0
        self._live = 0
        self._tombstones = 0
        self._live_words = 0  # data words of live chunks
        self._applied = 0
        self._purge_cursor = 0
        # Every write waits while the table rebuilds: how often and how long, for stats.
        self.rebuilds = 0
        self.last_rebuild: dict[str, Any] | None = None
        self.growths_in_place = 0  # data-area growths that needed no rebuild
        self.index_moves = 0  # index growths that needed no rebuild
        self.last_index_move: dict[str, Any] | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        namespace: str,
        *,
        capacity: int = 1024,
        data_bytes: int = 1 << 20,
        max_memory: int | None = None,
        mode: int | None = None,
        gid: int | None = None,
        shmops: ShmOps | None = None,
        data_reserve: int | None = None,
    ) -> ShmTable:
        """A fresh, unpublished table (a new incarnation): call publish() to make it current.

        ``capacity`` is the number of keys expected (the index is sized for it);
        ``mode`` defaults to 0o600, or 0o640 when ``gid`` names the readers' group.
        """
        if mode is None:
            mode = 0o640 if gid is not None else 0o600
        if len(data_name(namespace, 0, 1 << 30)) > MAX_NAME_BYTES:
            raise ValueError(f"namespace {namespace!r} is too long for a shared-memory name")
        table = cls(namespace, max_memory=max_memory, mode=mode, gid=gid, shmops=shmops, data_reserve=data_reserve)
        slots = max(MIN_CAPACITY, _pow2_at_least(int(capacity / MAX_LOAD) + 1))
        table._seg = table._new_segment(slots, max(data_bytes, _PAGE), 0)
        return table

    @classmethod
    def build(
        cls,
        namespace: str,
        entries: Mapping[bytes, tuple[int, bytes, int, int]] | Iterable[tuple[bytes, int, bytes, int, int]],
        *,
        applied_seqno: int = 0,
        capacity: int = 0,
        data_bytes: int = 0,
        max_memory: int | None = None,
        mode: int | None = None,
        gid: int | None = None,
        compiled: bool | None = None,
        shmops: ShmOps | None = None,
        data_reserve: int | None = None,
    ) -> ShmTable:
        """A fresh, unpublished table holding exactly ``entries``, built in bulk (restart).

        ``entries`` is either a mapping ``key -> (vflag, value, seqno, expiry_ms)`` (what
        ``DictTable.entries`` holds after replay) or an iterable of ``(key, vflag, value,
        seqno, expiry_ms)`` with unique keys (a repeated key raises ValueError); keys and
        values are bytes. Entries already expired are left out, as a rebuild leaves them.
        The limits are put's (KeyTooLarge, ValueTooLarge, ValueError).

        The table is sized once, the way a rebuild sizes one: the index is the smallest
        power of two holding ``capacity`` keys at MAX_LOAD and the entries at MIN_LOAD; the
        data area is twice the records and at least ``data_bytes``. Records are written
        back to back in the order given and the slots are filled by the same linear
        probing a put does, so afterwards put, delete and every reader work exactly as
        on a table grown by puts.

        ``applied_seqno`` is the last log seqno replayed: the header's applied seqno is the
        larger of it and the entries' seqnos (a log that ends in deletes leaves no entry
        carrying its last seqno, and the compaction handshake waits for that number).

        ``compiled``: None uses the compiled builder of ``walcache.shm._creader`` unless it
        is not built or ``WALCACHE_PURE_PYTHON=1``; True requires it (RuntimeError if it is
        missing); False is the pure-Python builder, the reference the compiled one must
        match byte for byte.
        """
        t0 = time.perf_counter()
        if mode is None:
            mode = 0o640 if gid is not None else 0o600
        if len(data_name(namespace, 0, 1 << 30)) > MAX_NAME_BYTES:
            raise ValueError(f"namespace {namespace!r} is too long for a shared-memory name")
        ext = _builder(compiled)
        builder: _Builder = ext if ext is not None else _PyBuilder()
        source: _Entries
        if isinstance(entries, dict):
            source = entries
        elif isinstance(entries, Mapping):
            source = dict(entries)
        elif isinstance(entries, list):
            source = entries
        else:
            source = list(entries)
        now = now_ms()
        live, words, max_seqno = builder.build_measure(source, now)
        slots = max(MIN_CAPACITY, _pow2_at_least(int(capacity / MAX_LOAD) + 1))
        while live + 1 > slots * MIN_LOAD:
            slots *= 2
        table = cls(namespace, max_memory=max_memory, mode=mode, gid=gid, shmops=shmops, data_reserve=data_reserve)
        table._applied = max(applied_seqno, max_seqno)
        seg = table._new_segment(slots, max(2 * (words << 3), data_bytes, _PAGE), words << 3)
        try:
            # Nothing runs between the two calls in the daemon; a caller that changed the
            # entries meanwhile gets an error, never a record past the committed end.
            got = builder.build_fill(seg.mm, source, slots, seg.lo << 3, words, now)
            if got != (live, words, max_seqno):
                raise RuntimeError(
                    f"the entries changed while the table was built: measured {(live, words, max_seqno)}, wrote {got}"
                )
        except BaseException:
            seg.close()
            _unlink(seg.name)
            raise
        seg.top = seg.lo + words
        table._seg = seg
        table._live = live
        table._live_words = words
        table._store_counts(seg)
        log.info(
            "built shm table %s: %d keys, %d slots, %d data bytes (%s builder) in %.3f s",
            seg.name, live, slots, seg.data_words << 3, "compiled" if ext is not None else "pure-Python",
            time.perf_counter() - t0,
        )  # fmt: skip
        return table

    def _new_segment(self, capacity: int, data_bytes: int, data_needed: int) -> _Segment:
        """A segment whose bump area has ``data_bytes`` in use and ``data_needed`` committed.

        The segment reserves (sparse, no memory) room for a data area of ``data_reserve``
        bytes, by default twice ``max_memory`` (none without a limit), at most what the
        layout's 32 GiB allows: the data can then grow without a rebuild, which stops
        every write while it copies the table (see grow_in_place).
        """
        self._n += 1
        name = data_name(self.namespace, self._incarnation, self._n)
        data_off = _round_up(HEADER_SIZE + capacity * SLOT_SIZE, 64)
        size = _round_up(data_off + data_bytes, _PAGE)
        if size > MAX_SEGMENT_BYTES:
            raise CacheFull(
                f"the shared table would need a {size}-byte segment, over the "
                f"{MAX_SEGMENT_BYTES}-byte limit of the layout; lower --max-memory"
            )
        in_use = size - data_off  # what the segment would hold without a reserve
        reserve = self.data_reserve if self.data_reserve is not None else 2 * (self.max_memory or 0)
        if reserve:
            size = max(size, min(_round_up(data_off + reserve, _PAGE), MAX_SEGMENT_BYTES // _PAGE * _PAGE))
        fd, mm = self._create_shm(name, size)
        seg = _Segment(name, fd, mm, capacity, data_off, 0, self._ops, in_use)
        try:
            seg.commit(data_off + data_needed)
        except BaseException:
            seg.close()
            _unlink(name)
            raise
        HEADER_STRUCT.pack_into(
            mm, 0, DATA_MAGIC, LAYOUT_VERSION, 0, self._incarnation, size, capacity,
            HEADER_SIZE, data_off, self._pid, self._start_ms, 0, 0,
            index_word(HEADER_SIZE // 8, capacity), now_ms(), 0, 0, 0, self._applied,
        )  # fmt: skip
        log.debug("created shm segment %s: %d bytes, %d slots", name, size, capacity)
        return seg

    def _create_shm(self, name: str, size: int) -> tuple[int, mmap.mmap]:
        """A new segment of ``size`` bytes, reserved but not committed, and its mapping."""
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self._mode)
        fd = os.dup(shm.fd)
        shm.close_fd()
        try:
            # shm_open applies the umask: set the mode we were asked for exactly.
            os.fchmod(fd, self._mode)
            if self._gid is not None:
                try:
                    os.fchown(fd, -1, self._gid)
                except OSError as exc:
                    raise ConfigError(f"cannot give shared memory {name} to group {self._gid}: {exc}") from exc
            os.ftruncate(fd, size)
            return fd, mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            shm.unlink()
            raise

    # -- the Table protocol (walcache.daemon.apply) -------------------------------------

    def put(self, key: bytes, vflag: int, value: bytes, seqno: int, expiry_ms: int) -> None:
        """Insert or overwrite ``key``; grows the table as needed (never blocks readers)."""
        klen = len(key)
        vlen = len(value)
        if not 0 < klen <= MAX_KEY_BYTES:
            raise KeyTooLarge(f"encoded key of {klen} bytes: the shared table takes 1..{MAX_KEY_BYTES}")
        if vlen > MAX_VALUE_BYTES:
            raise ValueTooLarge(f"value of {vlen} bytes: the shared table takes at most {MAX_VALUE_BYTES}")
        if not 0 <= vflag <= 255 or expiry_ms < 0 or expiry_ms >= 1 << 56:
            raise ValueError(f"bad vflag {vflag} or expiry {expiry_ms}")
        nw = chunk_words(klen, vlen)
        h = hash_key(key)
        seg = self._seg
        assert seg is not None, "table is closed"
        i, w = self._probe(seg, key, h)
        if w:
            old_nw = chunk_words(klen, seg.q[w + R_LENS] & LOC_MASK)
            if old_nw == nw:
                self._write_in_place(seg, w, vflag, value, klen, seqno, expiry_ms)
                self._account(seqno)
                return
            c = seg.alloc(nw) or self._alloc_grown(nw)
            if not c:
                self._rebuild(extra_words=nw)
                return self.put(key, vflag, value, seqno, expiry_ms)
            self._write_new(seg, c, i, h, key, vflag, value, seqno, expiry_ms, old=w)
            seg.release(w, old_nw)
            self._live_words += nw - old_nw
        else:
            if seg.slots[i] == EMPTY and self._live + self._tombstones + 1 > seg.capacity * MAX_LOAD:
                if not self._move_index(1):
                    self._rebuild(extra_words=nw)
                return self.put(key, vflag, value, seqno, expiry_ms)
            c = seg.alloc(nw) or self._alloc_grown(nw)
            if not c:
                self._rebuild(extra_words=nw)
                return self.put(key, vflag, value, seqno, expiry_ms)
            if seg.slots[i] == TOMBSTONE:
                self._tombstones -= 1
            self._write_new(seg, c, i, h, key, vflag, value, seqno, expiry_ms)
            self._live += 1
            self._live_words += nw
        self._account(seqno)

    def delete(self, key: bytes, seqno: int) -> bool:
        """Remove ``key``; True if it was there and not expired."""
        seg = self._seg
        assert seg is not None, "table is closed"
        i, w = self._probe(seg, key, hash_key(key))
        existed = False
        if w:
            q = seg.q
            xv = q[w + R_EXPIRY_VFLAG]
            existed = not (xv >> 8 and xv >> 8 <= now_ms())
            self._remove(seg, i, w)
        self._account(seqno)
        return existed

    # -- writer-side reads ----------------------------------------------------------------

    def lookup(self, key: bytes) -> tuple[int, bytes, int, int] | None:
        """(vflag, value, seqno, expiry_ms) of ``key``, None if missing or expired."""
        seg = self._seg
        assert seg is not None, "table is closed"
        _, w = self._probe(seg, key, hash_key(key))
        if not w:
            return None
        entry = self._entry(seg, w)
        if entry[4] and entry[4] <= now_ms():
            return None
        return entry[1], entry[2], entry[3], entry[4]

    def items(self) -> Iterator[tuple[bytes, int, bytes, int, int]]:
        """(key, vflag, value, seqno, expiry_ms) of every live, unexpired entry."""
        seg = self._seg
        assert seg is not None, "table is closed"
        now = now_ms()
        for x in seg.slots.tolist():
            if x == EMPTY or x == TOMBSTONE:
                continue
            entry = self._entry(seg, x & LOC_MASK)
            if not entry[4] or entry[4] > now:
                yield entry

    def __len__(self) -> int:
        return self._live

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.lookup(key) is not None

    # -- accounting -------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Sum of footprint() over the live entries (what --max-memory limits)."""
        return (self._live_words << 3) + self._live * SLOT_SIZE

    def footprint(self, klen: int, vlen: int) -> int:
        """Bytes one entry of that size takes: its chunk plus one index slot."""
        return footprint(klen, vlen)

    def fits(self, key: bytes, vlen: int) -> bool:
        """Whether putting ``key`` with a ``vlen``-byte value keeps used_bytes <= max_memory.

        The daemon asks before logging a put, so that the table never has to refuse a
        put the log already holds (replay must always succeed).
        """
        if self.max_memory is None:
            return True
        seg = self._seg
        assert seg is not None, "table is closed"
        _, w = self._probe(seg, key, hash_key(key))
        old = footprint(len(key), seg.q[w + R_LENS] & LOC_MASK) if w else 0
        return self.used_bytes - old + footprint(len(key), vlen) <= self.max_memory

    def reserve(
        self, keys: int, words: int, changes: Callable[[], Iterable[tuple[bytes, int, bool]]] | None = None
    ) -> None:
        """Make room now for what some writes will take when applied, or raise CacheFull.

        The daemon reserves for every write not yet applied before it logs one more, so
        that applying a logged record never needs shared memory it cannot get: a full
        /dev/shm refuses the write whole, before anything of it is logged or visible,
        instead of failing a put_many halfway through its ops. ``keys`` and ``words``
        bound what the writes take: a put takes at most one index slot and
        ``chunk_words`` words of the bump area, and nothing else takes either (deletes
        and tombstone reuse leave live + tombstones as they are). After this returns,
        applying writes within that bound neither rebuilds nor claims memory.

        That bound counts every put as a new key of new words. When it does not fit,
        ``changes()`` (the writes, in order, as ``(key, value length or -1 for a
        delete, has an expiry)``) gives the exact need instead (see ``_need``): an
        overwrite of the same size takes nothing, and chunks on the free lists serve
        new ones first. So a full /dev/shm still takes overwrites and reuses what
        deletes freed, and a put_many repeating one key does not grow the table.
        When the segment is short even then, this rebuilds as put would (growing it);
        when the memory cannot be had, no entry changes (an index move that fitted may
        already have happened: readers find the same entries through the new index).
        """
        seg = self._seg
        assert seg is not None, "table is closed"
        top = seg.top + words
        if self._live + self._tombstones + keys <= seg.capacity * MAX_LOAD and top <= seg.limit and top << 3 <= seg.committed:
            return  # the usual case: already there
        if changes is not None:
            keys, chunks = self._need(changes())
            # Chunks of each size come from its free list first, while the segment stays.
            words = sum(max(0, n - len(seg.free.get(nw, ()))) * nw for nw, n in chunks.items())
        index_full = self._live + self._tombstones + keys > seg.capacity * MAX_LOAD
        if index_full and self._move_index(keys):
            index_full = False
        if index_full or (seg.top + words > seg.limit and not self._grow_in_place(words)):
            if changes is not None:  # a rebuild leaves no free lists: every chunk from the bump area
                words = sum(n * nw for nw, n in chunks.items())
            try:
                self._rebuild(extra_words=words, extra_keys=keys)
            except (OSError, posix_ipc.Error) as exc:
                raise CacheFull(f"cannot grow the shared table ({type(exc).__name__}: {exc})") from exc
            seg = self._seg
            assert seg is not None
        seg.commit((seg.top + words) << 3)

    def _need(self, changes: Iterable[tuple[bytes, int, bool]]) -> tuple[int, dict[int, int]]:
        """(index slots, {chunk words: chunks}) that applying ``changes`` in order takes at most.

        Follows each key through the changes from what the table holds now: a put of a
        key that is absent takes a slot and a chunk; of a key whose chunk has another
        size, a chunk; of the same size, nothing (rewritten in place). A put with an
        expiry may be applied as a delete, so the key counts as absent after it.
        Chunks the changes free are not counted: this only overestimates. Nothing else
        between now and the apply can make it wrong: purge_expired only turns a key
        into a tombstone on its own probe path (which its next put reuses) and a free
        chunk of its own size.
        """
        seg = self._seg
        assert seg is not None, "table is closed"
        q = seg.q
        size_now: dict[bytes, int] = {}  # chunk words of the key after the changes so far; 0: absent
        slots = 0
        chunks: dict[int, int] = {}
        for key, vlen, expires in changes:
            old = size_now.get(key)
            if old is None:
                _, w = self._probe(seg, key, hash_key(key))
                old = chunk_words(len(key), q[w + R_LENS] & LOC_MASK) if w else 0
            if vlen < 0:
                size_now[key] = 0
                continue
            nw = chunk_words(len(key), vlen)
            if old == 0:
                slots += 1
            if old != nw:
                chunks[nw] = chunks.get(nw, 0) + 1
            size_now[key] = 0 if expires else nw
        return slots, chunks

    def purge_expired(self, max_slots: int = 4096) -> int:
        """Free up to ``max_slots`` slots' worth of expired entries; returns how many.

        Expired entries already read as missing; this returns their memory. It scans
        incrementally from where the last call stopped, so the daemon can call it with
        the heartbeat. Nothing is logged: an expired put can never come back (replay
        drops it too).
        """
        seg = self._seg
        assert seg is not None, "table is closed"
        now = now_ms()
        purged = 0
        i = self._purge_cursor % seg.capacity
        for _ in range(min(max_slots, seg.capacity)):
            x = seg.slots[i]
            if x != EMPTY and x != TOMBSTONE:
                w = x & LOC_MASK
                xv = seg.q[w + R_EXPIRY_VFLAG]
                if xv >> 8 and xv >> 8 <= now:
                    self._remove(seg, i, w)
                    purged += 1
            i = (i + 1) & seg.mask
        self._purge_cursor = i
        if purged:
            self._store_counts(seg)
        return purged

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        assert self._seg is not None, "table is closed"
        return self._seg.name

    @property
    def generation(self) -> int:
        return self._generation

    def publish(self) -> None:
        """Make this table the current one for its namespace.

        Creates the control segment if needed, points it at this table's segment, then
        retires the segment it named before (a previous daemon's or our own): stale
        flag, MOVED in every slot, unlink. Readers move over on their next get.
        """
        seg = self._seg
        assert seg is not None, "table is closed"
        ctlq = self._open_ctl()
        previous = self._ctl_current_name()
        self._point_ctl_at(seg)
        self._published = True
        if previous and previous != seg.name:
            self._retire_by_name(previous)
        if self._older_layout_segment:
            # Readers of the older layout see MOVED, find the control segment of this
            # layout under the same name and refuse it with a clear error (their client
            # then reads through the daemon) instead of reading a frozen table forever.
            self._retire_by_name(self._older_layout_segment)
            self._older_layout_segment = ""
        # Segments of this namespace that no control segment names any more: a table a
        # writer killed mid-rebuild never published, or one whose retirement it did not
        # finish. Nothing can find them (readers go through the control segment), so
        # they would hold /dev/shm for good. Only when the control segment was one this
        # writer reads (it named ``previous``): beside another layout's, touch nothing.
        if previous:
            for orphan in _namespace_segments(self.namespace):
                if orphan != seg.name:
                    self._retire_by_name(orphan, only_known=True)
        log.info(
            "published shm table %s (generation %d, %d keys, %d slots, %d bytes)",
            seg.name, ctlq[C_GENERATION], self._live, seg.capacity, seg.size,
        )  # fmt: skip

    def heartbeat(self) -> None:
        assert self._seg is not None, "table is closed"
        self._seg.q[H_HEARTBEAT] = now_ms()

    def mark_closed(self) -> None:
        """Say in the header that the writer stopped cleanly; readers keep reading."""
        assert self._seg is not None, "table is closed"
        self._seg.q[H_HEARTBEAT] = now_ms()
        self._seg.q[H_CLOSED] = 1

    def stats(self) -> dict[str, Any]:
        seg = self._seg
        assert seg is not None, "table is closed"
        return {
            "name": seg.name,
            "generation": self._generation,
            "capacity": seg.capacity,
            "live": self._live,
            "tombstones": self._tombstones,
            "segment_bytes": seg.size,
            "data_bytes": seg.data_words << 3,
            "used_bytes": self.used_bytes,
            "free_list_bytes": seg.free_words << 3,
            "unallocated_bytes": (seg.limit - seg.top) << 3,
            "reserve_bytes": (seg.end_words - seg.limit) << 3,
            # A data commit rounded up before a move may reach into the moved indexes.
            "committed_bytes": min(seg.committed, seg.end_words << 3) + (seg.moved_index_words << 3),
            "index_bytes": seg.moved_index_words << 3,
            "retired_index_bytes": seg.retired_index_words << 3,
            "applied_seqno": self._applied,
            "rebuilds": self.rebuilds,
            "last_rebuild": self.last_rebuild,
            "growths_in_place": self.growths_in_place,
            "index_moves": self.index_moves,
            "last_index_move": self.last_index_move,
        }

    def close(self, unlink: bool = False) -> None:
        """Unmap. ``unlink=True`` also removes the segment's name, and the control
        segment's if it names this table (tests and `walcache` cleanup use it)."""
        seg = self._seg
        if seg is None:
            return
        self._seg = None
        if unlink:
            if self._ctl is not None and self._ctl_current_name() == seg.name:
                _unlink(ctl_name(self.namespace))
            _unlink(seg.name)
        seg.close()
        if self._ctlq is not None:
            self._ctlq.release()
            self._ctlq = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        for mm, q in self._lost_ctls:
            q.release()
            mm.close()
        self._lost_ctls = []

    def restore_names(self, pending_keys: int = 0, pending_words: int = 0) -> str:
        """Put back the names of the published table if something removed them from
        /dev/shm (systemd-logind's RemoveIPC at a user's logout, a hand-made cleanup):
        without them no new reader can attach. Returns what was restored ("" if nothing).

        A removed control segment is made again under its name with the same contents
        (generations only go up); the old one keeps being updated for the readers that
        map it. A removed data segment cannot get its name back: the table is rebuilt
        into a new segment, which every control segment then names, and the old one is
        retired, so its readers move.
        """
        seg = self._seg
        if seg is None or not self._published or self._ctl is None or self._ctlq is None:
            return ""
        if seg.q[H_STALE]:
            return ""  # another writer retired this table: the namespace is not ours to restore
        ctl = ctl_name(self.namespace)
        lost_ctl = not os.path.exists(SHM_DIR + ctl)
        lost_seg = not os.path.exists(SHM_DIR + seg.name)
        if not (lost_ctl or lost_seg):
            return ""
        if lost_ctl:
            old_mm, old_q = self._ctl, self._ctlq
            mm = self._create_ctl(ctl)
            q = memoryview(mm).cast("Q")
            # The old contents under the seqlock (odd while copied; then past the old seq).
            s = old_q[C_SEQ]
            q[C_SEQ] = s + 1
            mm[8 * C_GENERATION : CTL_SIZE] = old_mm[8 * C_GENERATION : CTL_SIZE]
            q[C_SEQ] = s + 2
            self._lost_ctls.append((old_mm, old_q))
            self._ctl, self._ctlq = mm, q
        if lost_seg:
            # Room for what the caller has reserved and not applied yet (ShmTable.reserve's
            # promise: applying a logged record never needs new memory). Every control
            # segment then names the new one.
            self._rebuild(extra_words=pending_words, extra_keys=pending_keys)
        else:
            self._point_ctl_at(seg)
        what = " and ".join(w for w, lost in (("control segment", lost_ctl), ("data segment", lost_seg)) if lost)
        log.warning("the %s of shm table /%s had been removed from /dev/shm: restored", what, self.namespace)
        return what

    def __enter__(self) -> ShmTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _probe(self, seg: _Segment, key: bytes, h: int) -> tuple[int, int]:
        """(slot, record word) of ``key``, or (slot to insert at, 0) when it is absent."""
        slots = seg.slots
        q = seg.q
        mm = seg.mm
        mask = seg.mask
        f = h & FP_MASK
        klen = len(key)
        i = h & mask
        first_free = -1
        for _ in range(seg.capacity):
            x = slots[i]
            if x == EMPTY:
                return (i if first_free < 0 else first_free), 0
            if x == TOMBSTONE:
                if first_free < 0:
                    first_free = i
            elif x & FP_MASK == f:
                w = x & LOC_MASK
                if q[w + R_LENS] >> 32 == klen and mm[8 * w + REC_HEADER_SIZE : 8 * w + REC_HEADER_SIZE + klen] == key:
                    return i, w
            i = (i + 1) & mask
        # The load bound keeps EMPTY slots; only tombstones can fill a probe cycle.
        assert first_free >= 0, "index has neither an empty slot nor a tombstone"
        return first_free, 0

    def _write_in_place(
        self, seg: _Segment, w: int, vflag: int, value: bytes, klen: int, seqno: int, expiry_ms: int
    ) -> None:
        q = seg.q
        s = q[w]
        q[w] = s + 1  # W1
        q[w + R_LENS] = klen << 32 | len(value)  # W2
        q[w + R_EXPIRY_VFLAG] = expiry_ms << 8 | vflag
        q[w + R_SEQNO] = seqno
        a = 8 * w + REC_HEADER_SIZE + klen
        seg.mm[a : a + len(value)] = value
        q[w] = s + 2  # W3

    def _write_new(
        self,
        seg: _Segment,
        c: int,
        i: int,
        h: int,
        key: bytes,
        vflag: int,
        value: bytes,
        seqno: int,
        expiry_ms: int,
        old: int = 0,
    ) -> None:
        q = seg.q
        s = q[c]
        q[c] = s + 1  # W1
        q[c + R_LENS] = len(key) << 32 | len(value)  # W2
        q[c + R_EXPIRY_VFLAG] = expiry_ms << 8 | vflag
        q[c + R_SEQNO] = seqno
        a = 8 * c + REC_HEADER_SIZE
        seg.mm[a : a + len(key) + len(value)] = key + value
        if old:
            so = q[old]
            q[old] = so + 1  # W3a: the old version stops validating before the new one shows
        seg.slots[i] = (h & FP_MASK) | c  # W3: published while c is still odd
        q[c] = s + 2  # W4
        if old:
            q[old] = so + 2  # W5

    def _remove(self, seg: _Segment, i: int, w: int) -> None:
        q = seg.q
        nw = chunk_words(q[w + R_LENS] >> 32, q[w + R_LENS] & LOC_MASK)
        s = q[w]
        q[w] = s + 1  # the record stops validating before the key is gone (as W3a)
        seg.slots[i] = TOMBSTONE
        q[w] = s + 2  # as W5
        seg.release(w, nw)
        self._live -= 1
        self._tombstones += 1
        self._live_words -= nw

    def _account(self, seqno: int) -> None:
        if seqno > self._applied:
            self._applied = seqno
        seg = self._seg
        assert seg is not None
        self._store_counts(seg)

    def _store_counts(self, seg: _Segment) -> None:
        q = seg.q
        q[H_LIVE] = self._live
        q[H_TOMBSTONES] = self._tombstones
        q[H_USED_BYTES] = self.used_bytes
        q[H_APPLIED_SEQNO] = self._applied

    def _entry(self, seg: _Segment, w: int) -> tuple[bytes, int, bytes, int, int]:
        q = seg.q
        lens = q[w + R_LENS]
        xv = q[w + R_EXPIRY_VFLAG]
        a = 8 * w + REC_HEADER_SIZE
        b = a + (lens >> 32)
        return seg.mm[a:b], xv & 0xFF, seg.mm[b : b + (lens & LOC_MASK)], q[w + R_SEQNO], xv >> 8

    def _grow_in_place(self, extra_words: int) -> bool:
        """Room for ``extra_words`` more in the bump area from the segment's reserve, if a
        rebuild would only double the data area; False when it would compact (most of the
        area is dead chunks) or the reserve is spent, and a rebuild must run. The records
        stay where they are, so readers see nothing change; only used pages take memory.
        """
        seg = self._seg
        assert seg is not None
        words = seg.data_words
        need = (self._live_words + extra_words) * 2  # _rebuild's rule for doubling
        if need <= words or seg.limit >= seg.end_words:
            return False
        if self._mostly_dead(seg):
            return False
        while need > words:
            words *= 2
        seg.limit = min(seg.end_words, seg.lo + words)
        self.growths_in_place += 1
        log.info("shm table data area grown in place to %d bytes (no rebuild)", seg.data_words << 3)
        return seg.top + extra_words <= seg.limit

    def _mostly_dead(self, seg: _Segment, retiring: int = 0) -> bool:
        """A rebuild would compact: the waste is over a quarter of the data area. Waste is
        dead chunks (freed, taken by no put since) and retired indexes (``retiring``: words
        of one about to be): growing in place or moving the index would keep it."""
        dead = (seg.top - seg.lo) - self._live_words + seg.retired_index_words + retiring
        return dead > seg.data_words // 4

    def _move_index(self, extra_keys: int, compiled: bool | None = None) -> bool:
        """Room for ``extra_keys`` more keys in a new index without a rebuild (layout.py
        "Index moves"); False when a rebuild must run instead: the data area is mostly
        dead, or the reserve has no room for the new index.

        The new index takes the top of the reserve, below any earlier one, so it never
        overlaps the data area's bump range and its words were never written. Every
        write waits while it is filled: O(slots) with keys rehashed, the records stay.
        ``compiled`` picks the fill (see _fill_index).
        """
        seg = self._seg
        assert seg is not None
        capacity = seg.capacity
        while self._live + extra_keys > capacity * MIN_LOAD:
            capacity *= 2
        slot0 = seg.end_words - capacity
        # Retired indexes keep their memory (a reader may still be probing one), so they
        # count as waste: moves stop, and a rebuild reclaims them, before it passes a
        # quarter of the data area (with tiny records: after a few doublings).
        if slot0 < seg.limit or self._mostly_dead(seg, retiring=seg.capacity):
            return False
        t0 = time.perf_counter()
        try:
            self._ops.fallocate(seg.fd, slot0 << 3, capacity << 3)
        except OSError as exc:
            raise CacheFull(
                f"cannot commit {capacity << 3} bytes of shared memory for a larger index of {seg.name} "
                f"({exc.strerror}): /dev/shm is full or limited; free space there or lower --max-memory"
            ) from exc
        _fill_index(seg, slot0, capacity, compiled)  # M1
        seg.q[H_INDEX] = index_word(slot0, capacity)  # M2
        _store_moved(seg.slots)  # M3
        old_capacity = seg.capacity
        seg.slots.release()
        seg.slots = seg.q[slot0 : slot0 + capacity]
        seg.slot0, seg.capacity, seg.mask = slot0, capacity, capacity - 1
        seg.end_words = slot0
        seg.limit = min(seg.limit, slot0)
        self._tombstones = 0
        self._store_counts(seg)
        self.index_moves += 1
        self.last_index_move = self._pause(t0, capacity)
        ms = self.last_index_move["ms"]
        log.info(
            "moved shm index in %.1f ms (no rebuild): %d -> %d slots, %d live keys (%s)",
            ms, old_capacity, capacity, self._live, seg.name,
        )  # fmt: skip
        return True

    def _pause(self, t0: float, slots: int, **more: int) -> dict[str, Any]:
        """What stats report of a rebuild or an index move that started at ``t0``."""
        ms = round((time.perf_counter() - t0) * 1e3, 1)
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        return {"when": when, "ms": ms, "live_keys": self._live, "slots": slots, **more}

    def _alloc_grown(self, nw: int) -> int:
        """seg.alloc after growing in place; 0 when a rebuild is needed instead."""
        seg = self._seg
        assert seg is not None
        return seg.alloc(nw) if self._grow_in_place(nw) else 0

    def _rebuild(self, extra_words: int, extra_keys: int = 1, compiled: bool | None = None) -> None:
        """Copy the live entries into a new segment (compacted, maybe larger); retire the old.

        Every write waits while this runs; ``compiled`` picks the copy (see _copy_live).
        """
        old = self._seg
        assert old is not None
        t0 = time.perf_counter()
        capacity = old.capacity
        while self._live + extra_keys > capacity * MIN_LOAD:
            capacity *= 2
        data_words = old.data_words
        while (self._live_words + extra_words) * 2 > data_words:
            data_words *= 2
        new = self._new_segment(capacity, data_words << 3, (self._live_words + extra_words) << 3)
        try:
            self._copy_live(old, new, compiled)
        except BaseException:
            new.close()
            _unlink(new.name)
            raise
        self._seg = new
        if self._published:
            self._point_ctl_at(new)
            self._retire(old)
        else:
            _unlink(old.name)
        old.close()
        self.rebuilds += 1
        self.last_rebuild = self._pause(t0, new.capacity, data_bytes=new.data_words << 3)
        ms = self.last_rebuild["ms"]
        # Every write waited this long: the figure an operator needs to size the table up front.
        log.info(
            "rebuilt shm table in %.0f ms: %d -> %d slots, %d -> %d data bytes, %d live keys (%s -> %s)",
            ms, old.capacity, new.capacity, old.data_words << 3,
            new.data_words << 3, self._live, old.name, new.name,
        )  # fmt: skip

    def _copy_live(self, old: _Segment, new: _Segment, compiled: bool | None = None) -> None:
        """Every live, unexpired record of ``old`` into ``new`` (not mapped by anyone yet).

        ``compiled`` as in :meth:`build`: the extension's ``copy_live`` does the same as
        the loop below, byte for byte, without the GIL and at memory speed (a rebuild
        stops every write while it runs).
        """
        now = now_ms()
        ext = _builder(compiled)
        if ext is not None:
            # Only the committed pages of the new segment: past them a store could fault.
            with memoryview(new.mm) as whole, whole[: new.committed] as room:
                live, live_words, top = ext.copy_live(
                    old.mm, room, old.slot0, old.capacity, old.lo, new.capacity, new.top, now
                )
            new.top = top
            self._live, self._tombstones, self._live_words = live, 0, live_words
            self._store_counts(new)
            return
        # The reference: plain bulk copies, no seqlock.
        oq, om, nq, nm = old.q, old.mm, new.q, new.mm
        nslots, nmask = new.slots, new.mask
        live = live_words = 0
        top = new.top
        for x in old.slots.tolist():
            if x == EMPTY or x == TOMBSTONE:
                continue
            w = x & LOC_MASK
            lens = oq[w + R_LENS]
            xv = oq[w + R_EXPIRY_VFLAG]
            if xv >> 8 and xv >> 8 <= now:
                continue
            klen = lens >> 32
            nw = chunk_words(klen, lens & LOC_MASK)
            nm[8 * top : 8 * (top + nw)] = om[8 * w : 8 * (w + nw)]
            nq[top] = 0
            k = 8 * w + REC_HEADER_SIZE
            i = hash_key(om[k : k + klen]) & nmask
            while nslots[i] != EMPTY:
                i = (i + 1) & nmask
            nslots[i] = (x & FP_MASK) | top
            top += nw
            live += 1
            live_words += nw
        new.top = top
        self._live, self._tombstones, self._live_words = live, 0, live_words
        self._store_counts(new)

    def _retire(self, seg: _Segment) -> None:
        """After the control segment names a newer segment: make ``seg``'s readers move."""
        seg.q[H_STALE] = 1
        _store_moved(seg.slots)
        _unlink(seg.name)

    def _retire_by_name(self, name: str, *, only_known: bool = False) -> None:
        _retire_named(name, only_known=only_known)

    # -- control segment ----------------------------------------------------------------------

    def _open_ctl(self) -> memoryview:
        if self._ctlq is not None:
            return self._ctlq
        name = ctl_name(self.namespace)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            shm = None
        if shm is not None:
            ok = shm.size == CTL_SIZE
            if ok:
                mm = mmap.mmap(shm.fd, CTL_SIZE)
                magic, version, _seq, _gen, _size, n, raw = CTL_STRUCT.unpack_from(mm, 0)
                ok = magic == CTL_MAGIC and version == LAYOUT_VERSION
                if not ok:
                    mm.close()
                    if magic == CTL_MAGIC and version in RETIRABLE_LAYOUT_VERSIONS and 0 < n <= MAX_NAME_BYTES:
                        # publish() retires the table it names, so its readers move off it.
                        self._older_layout_segment = raw[:n].decode("ascii", "replace")
            shm.close_fd()
            if not ok:
                # Never truncate or rewrite a segment of another layout in place: old
                # readers may map it. Unlink it; they keep their mapping.
                log.warning("control segment %s has another size or layout: replacing it", name)
                shm.unlink()
                shm = None
        if shm is None:
            mm = self._create_ctl(name)
        self._ctl = mm
        self._ctlq = memoryview(mm).cast("Q")
        return self._ctlq

    def _create_ctl(self, name: str) -> mmap.mmap:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=self._mode)
        try:
            os.fchmod(shm.fd, self._mode)
            if self._gid is not None:
                os.fchown(shm.fd, -1, self._gid)
            os.ftruncate(shm.fd, CTL_SIZE)
            os.posix_fallocate(shm.fd, 0, CTL_SIZE)
            mm = mmap.mmap(shm.fd, CTL_SIZE)
        except OSError as exc:
            shm.unlink()
            raise TableUnavailable(f"cannot create the control segment {name}: {exc}") from exc
        finally:
            shm.close_fd()
        CTL_STRUCT.pack_into(mm, 0, CTL_MAGIC, LAYOUT_VERSION, 0, 0, 0, 0, b"")
        return mm

    def _ctl_current_name(self) -> str:
        if self._ctl is None:
            return ""
        fields = CTL_STRUCT.unpack_from(self._ctl, 0)
        n = fields[5]
        return fields[6][:n].decode("ascii", "replace") if 0 < n <= MAX_NAME_BYTES else ""

    def _point_ctl_at(self, seg: _Segment) -> None:
        ctlq = self._open_ctl()
        assert self._ctl is not None
        generation = ctlq[C_GENERATION] + 1
        self._generation = generation
        seg.q[H_GENERATION] = generation
        s = ctlq[C_SEQ]
        ctlq[C_SEQ] = s + 1
        name = seg.name.encode("ascii")
        # Only the fields after seq (CTL_TAIL): pack_into zeroes what it covers first, and a
        # seq zeroed for a moment is even: a reader took the zeroed name for "no table yet".
        CTL_TAIL.pack_into(self._ctl, 8 * C_GENERATION, generation, seg.size, len(name), name)
        ctlq[C_SEQ] = s + 2
        for mm, q in self._lost_ctls:
            s = q[C_SEQ]
            q[C_SEQ] = s + 1
            CTL_TAIL.pack_into(mm, 8 * C_GENERATION, generation, seg.size, len(name), name)
            q[C_SEQ] = s + 2


def _every_index(hdr: tuple[Any, ...], size: int) -> list[tuple[int, int]]:
    """Word ranges of every index a segment of a previous writer may have readers in
    (HEADER_STRUCT fields ``hdr``), or [] if its header is not one this writer knows.

    Not only the current index: a writer that died in step M3 of an index move left
    part of the old one live, and readers whose probes meet no MOVED there would read
    it forever. Moved indexes lie back to back from the current one to the segment's
    end (each takes the top of what the previous left), and the first one at 40/48.
    """
    magic, version, _, _, seg_bytes, capacity, index_off, data_off = hdr[:8]
    if magic != DATA_MAGIC or version not in RETIRABLE_LAYOUT_VERSIONS or seg_bytes != size:
        return []
    first_end = HEADER_SIZE // 8 + capacity
    if index_off != HEADER_SIZE or capacity < MIN_CAPACITY or capacity & (capacity - 1) or first_end * 8 > size:
        return []
    ranges = [(HEADER_SIZE // 8, first_end)]
    if version >= 3:  # the index may have moved (layouts 1 and 2: the first one, always)
        current = index_geometry(hdr[12], size)
        if current is None:
            return []
        slot0 = current[0]
        if slot0 != HEADER_SIZE // 8:
            if slot0 * 8 < data_off:
                return []  # a moved index always lies past the data area's start
            ranges.append((slot0, size // 8))
    return ranges


def _retire_named(name: str, *, only_known: bool = False) -> None:
    """Mark a previous segment stale (MOVED in its indexes) and unlink it.

    ``only_known``: leave a segment whose layout this writer does not know (a newer
    walcache's) untouched; otherwise it is unlinked without being marked.
    """
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return
    try:
        if shm.size < HEADER_SIZE:
            if not only_known:
                shm.unlink()
            return
        mm = mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()
    hdr = HEADER_STRUCT.unpack_from(mm, 0)
    indexes = _every_index(hdr, len(mm))
    # A header of zeros: a segment whose writer died before it wrote the header (it sizes and
    # commits the segment first). Nobody can read it; it is as good as known.
    if not indexes and only_known and any(bytes(mm[:HEADER_SIZE])):
        mm.close()
        return
    shm.unlink()
    try:
        if indexes:
            q = memoryview(mm).cast("Q")
            q[H_STALE] = 1
            for start, end in indexes:
                with q[start:end] as slots:
                    _store_moved(slots)
            q.release()
        else:
            log.warning("previous shm segment %s has an unknown layout: unlinked without marking it", name)
    finally:
        mm.close()
    log.info("retired previous shm segment %s", name)


def drop_namespace(namespace: str) -> list[tuple[str, int]]:
    """Unlink the control and data segments of ``namespace``: (name, bytes) of each.

    For a table no daemon writes any more (the caller holds its data dir's lock).
    """
    removed = []
    for name in [*_namespace_segments(namespace), ctl_name(namespace)]:
        try:
            size = os.stat(SHM_DIR + name).st_size
        except FileNotFoundError:
            continue
        if name == ctl_name(namespace):
            _unlink(name)
        else:
            # Marked as a retired table first: readers still attached move off it (and,
            # finding no table, read through the daemon) instead of reading it for good.
            _retire_named(name)
        removed.append((name, size))
    return removed


SHM_DIR = "/dev/shm"


def _namespace_segments(namespace: str) -> list[str]:
    """Names (with the leading "/") of the data segments of ``namespace`` in /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:  # pragma: no cover - Linux always has it
        return []
    prefix = namespace.lstrip("/") + "."
    return ["/" + n for n in names if n.startswith(prefix)]


def _store_moved(slots: memoryview) -> None:
    """MOVED into every slot of a retired index (after the stale flag or the new index
    word, whichever retires it)."""
    # One aligned 8-byte store per slot: a bulk memset could tear a slot word that a
    # reader is loading (vector stores are not promised atomic per 8 bytes). The compiled
    # loop does the same stores (a restart retires a 4M-slot index: ~0.3 s in Python).
    ext = _builder(None)
    if ext is not None:
        ext.mark_moved(slots)
        return
    for i in range(len(slots)):
        slots[i] = MOVED


def _fill_index(seg: _Segment, slot0: int, capacity: int, compiled: bool | None = None) -> int:
    """Step M1 of an index move: in the ``capacity`` slots at word ``slot0`` (all EMPTY,
    read by nobody yet), a slot for every live slot of ``seg``'s current index, placed by
    linear probing from XXH64(key) & (capacity - 1), in the old index's slot order;
    returns how many.

    The compiled ``fill_index`` does the same, slot for slot, without the GIL; this loop
    is the reference (tests compare the two).
    """
    ext = _builder(compiled)
    if ext is not None:
        return ext.fill_index(seg.mm, seg.slot0, seg.capacity, slot0, capacity, seg.lo)
    q, mm = seg.q, seg.mm
    nmask = capacity - 1
    n = 0
    mm[slot0 << 3 : (slot0 + capacity) << 3] = bytes(capacity << 3)  # all EMPTY, as the C fill
    with q[slot0 : slot0 + capacity] as new:
        for x in seg.slots.tolist():
            if x == EMPTY or x == TOMBSTONE:
                continue
            w = x & LOC_MASK
            k = 8 * w + REC_HEADER_SIZE
            i = hash_key(mm[k : k + (q[w + R_LENS] >> 32)]) & nmask
            while new[i] != EMPTY:
                i = (i + 1) & nmask
            new[i] = x
            n += 1
    return n


def _unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


# -- bulk build (ShmTable.build) ----------------------------------------------------------------
#
# Two implementations of one algorithm, byte for byte, with one interface: the compiled
# one in _creader.c (build_measure, build_fill) and the pure-Python reference below.
# Both walk the entries in the order given, validate every entry first (so a bad one is
# reported even if it has expired), leave out the expired ones, write the records back
# to back from the start of the data area (seq 0, zero padding) and place each slot by
# linear probing from ``H & (capacity - 1)``, in entry order, over an index that starts
# all EMPTY. Nobody maps the segment yet, so plain bulk stores are enough (no seqlock).

_Entries = dict[bytes, tuple[int, bytes, int, int]] | list[tuple[bytes, int, bytes, int, int]]


def _pairs(entries: _Entries) -> Iterable[tuple[bytes, tuple[int, bytes, int, int]]]:
    """``(key, (vflag, value, seqno, expiry_ms))`` for either form of the entries."""
    if isinstance(entries, dict):
        return entries.items()
    return ((e[0], e[1:]) for e in entries)


def _bad_entry(key: bytes, klen: int, vlen: int, vflag: int, seqno: int, expiry: int) -> Exception:
    if not 0 < klen <= MAX_KEY_BYTES:
        return KeyTooLarge(f"encoded key of {klen} bytes: the shared table takes 1..{MAX_KEY_BYTES}")
    if vlen > MAX_VALUE_BYTES:
        return ValueTooLarge(f"value of {vlen} bytes: the shared table takes at most {MAX_VALUE_BYTES}")
    return ValueError(f"bad vflag {vflag}, expiry {expiry} or seqno {seqno} for key {key[:40]!r}")


class _PyBuilder:
    """The pure-Python builder: the reference the compiled one matches byte for byte."""

    # One Struct per (klen, vlen) packs a whole padded record in one call (several times
    # faster than packing the header and copying key and value apart); past this many
    # distinct shapes, the rest are packed in pieces.
    MAX_SHAPES = 4096

    @staticmethod
    def build_measure(entries: _Entries, now_ms: int) -> tuple[int, int, int]:
        live = words = max_seqno = 0
        kmax, vmax, xlim, slim = MAX_KEY_BYTES, MAX_VALUE_BYTES, 1 << 56, 1 << 64
        for key, (vflag, value, seqno, expiry) in _pairs(entries):
            klen = len(key)
            vlen = len(value)
            if not (0 < klen <= kmax and vlen <= vmax and 0 <= vflag <= 255 and 0 <= expiry < xlim and 0 <= seqno < slim):
                raise _bad_entry(key, klen, vlen, vflag, seqno, expiry)
            if expiry and expiry <= now_ms:
                continue
            live += 1
            words += (REC_HEADER_SIZE + 7 + klen + vlen) >> 3
            if seqno > max_seqno:
                max_seqno = seqno
        return live, words, max_seqno

    @classmethod
    def build_fill(
        cls, buf: mmap.mmap | bytearray, entries: _Entries, capacity: int, data_off: int, data_words: int, now_ms: int
    ) -> tuple[int, int, int]:
        if (
            capacity < MIN_CAPACITY
            or capacity & (capacity - 1)
            or data_off % 8
            or data_off < HEADER_SIZE + capacity * SLOT_SIZE
            or data_off + data_words * 8 > min(len(buf), MAX_SEGMENT_BYTES)
        ):
            raise ValueError(
                f"bad geometry: capacity {capacity}, data_off {data_off}, data_words {data_words} "
                f"for a buffer of {len(buf)} bytes"
            )
        mask = capacity - 1
        index = array.array("Q", bytes(capacity * SLOT_SIZE))
        shapes: dict[int, struct.Struct] = {}
        pack_header = RECORD_HEADER.pack_into
        lo = data_off >> 3
        off = data_off
        end = data_off + data_words * 8
        live = max_seqno = 0
        kmax, vmax, xlim, slim, fp_mask, hash_ = MAX_KEY_BYTES, MAX_VALUE_BYTES, 1 << 56, 1 << 64, FP_MASK, hash_key
        for key, (vflag, value, seqno, expiry) in _pairs(entries):
            klen = len(key)
            vlen = len(value)
            if not (0 < klen <= kmax and vlen <= vmax and 0 <= vflag <= 255 and 0 <= expiry < xlim and 0 <= seqno < slim):
                raise _bad_entry(key, klen, vlen, vflag, seqno, expiry)
            if expiry and expiry <= now_ms:
                continue
            size = (REC_HEADER_SIZE + 7 + klen + vlen) & ~7
            if off + size > end or live + 1 >= capacity:
                raise RuntimeError("the entries changed after build_measure: more of them than the table was sized for")
            lens = klen << 32 | vlen
            shape = shapes.get(lens)
            if shape is None and len(shapes) < cls.MAX_SHAPES:
                shape = shapes[lens] = struct.Struct(f"=QQQQ{klen}s{vlen}s{size - REC_HEADER_SIZE - klen - vlen}x")
            if shape is not None:
                shape.pack_into(buf, off, 0, lens, expiry << 8 | vflag, seqno, key, value)
            else:
                pack_header(buf, off, 0, lens, expiry << 8 | vflag, seqno)
                a = off + REC_HEADER_SIZE
                buf[a : off + size] = key + value + bytes(size - REC_HEADER_SIZE - klen - vlen)
            h = hash_(key)
            i = h & mask
            x = index[i]
            while x:
                if not (x ^ h) & fp_mask and _key_at(buf, x & LOC_MASK) == key:
                    raise ValueError(f"key {key[:40]!r} is given twice")
                i = (i + 1) & mask
                x = index[i]
            index[i] = (h & fp_mask) | (off >> 3)
            off += size
            live += 1
            if seqno > max_seqno:
                max_seqno = seqno
        buf[HEADER_SIZE : HEADER_SIZE + capacity * SLOT_SIZE] = index.tobytes()
        return live, (off >> 3) - lo, max_seqno


def _key_at(buf: mmap.mmap | bytearray, w: int) -> bytes:
    """The key of the record at word ``w`` of ``buf``."""
    a = 8 * w
    (lens,) = SLOT.unpack_from(buf, a + 8)
    return bytes(buf[a + REC_HEADER_SIZE : a + REC_HEADER_SIZE + (lens >> 32)])


class _Builder(Protocol):
    def build_measure(self, entries: _Entries, now_ms: int, /) -> tuple[int, int, int]: ...

    def build_fill(
        self, buf: mmap.mmap, entries: _Entries, capacity: int, data_off: int, data_words: int, now_ms: int, /
    ) -> tuple[int, int, int]: ...


class _Compiled(_Builder, Protocol):
    """What writer.py uses of the extension: the builder, the rebuild copy and the retiring loop."""

    def mark_moved(self, slots: memoryview, /) -> None: ...

    def copy_live(
        self,
        old: mmap.mmap,
        new: memoryview,
        old_slot0: int,
        old_capacity: int,
        old_lo: int,
        new_capacity: int,
        new_top: int,
        now_ms: int,
        /,
    ) -> tuple[int, int, int]: ...

    def fill_index(
        self, buf: mmap.mmap, old_slot0: int, old_capacity: int, new_slot0: int, new_capacity: int, lo: int, /
    ) -> int: ...


def _builder(compiled: bool | None) -> _Compiled | None:
    """The compiled builder (and mark_moved) to use, or None for pure Python (see ShmTable.build)."""
    if compiled is False:
        return None
    from .creader import extension, extension_error

    if extension is not None and not hasattr(extension, "fill_index"):
        extension, extension_error = None, "built from an older source without the builder: rebuild it"
    if compiled is None:
        if extension is None or os.environ.get("WALCACHE_PURE_PYTHON", "") not in ("", "0"):
            return None
    elif extension is None:
        raise RuntimeError(f"the compiled table builder is unavailable: {extension_error}")
    return extension
