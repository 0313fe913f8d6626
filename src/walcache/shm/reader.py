"""The lock-free reader of the shared table (client processes; read-only mapping).

Follows the layout and the numbered reader steps R1-R7 in :mod:`walcache.shm.layout`.
:meth:`ShmReader._read` is the reference implementation of those steps, with the
bounded retries, remapping and dead-writer detection. :meth:`ShmReader.lookup` is the
hot path: the same steps inlined for one optimistic pass (encode, hash, probe, copy,
validate, decode in one function); anything unusual on the way (odd or changed seq, a
fingerprint match with another key, MOVED, out-of-range lengths, an unknown vflag)
hands the key to ``_read``, so the rare cases are written once.

No memoryview into the mapping leaves this module: values are returned as bytes copies.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Iterable, Iterator

import posix_ipc
import psutil

from ..codec import decode_value, encode_key
from ..errors import ReadContention, TableUnavailable
from .layout import (
    CTL_MAGIC,
    CTL_SIZE,
    CTL_STRUCT,
    C_GENERATION,
    C_SEQ,
    DATA_MAGIC,
    EMPTY,
    FP_MASK,
    H_INDEX,
    H_LIVE,
    H_STALE,
    H_WRITER_PID,
    H_WRITER_START_MS,
    HEADER_SIZE,
    HEADER_STRUCT,
    LAYOUT_VERSION,
    LOC_MASK,
    LOCK_FREE_OK,
    MAX_NAME_BYTES,
    MAX_SEGMENT_BYTES,
    MIN_CAPACITY,
    MOVED,
    R_EXPIRY_VFLAG,
    R_LENS,
    R_SEQNO,
    REC_HEADER_SIZE,
    REC_HEADER_WORDS,
    RETRY_MIN_NS,
    RETRY_MIN_TRIES,
    SLOT_SIZE,
    TOMBSTONE,
    ctl_name,
    hash_key,
    index_geometry,
)

__all__ = ["ShmReader"]

log = logging.getLogger("walcache.shm")

_RETRY = object()
_REMAP = object()
_MISSING = object()
_MAX_REMAPS = 16
_YIELD_AFTER = 8
# A writer's start time is read through psutil from /proc: allow for its rounding and
# a boot-time estimate that moved with the clock; pid reuse within a second is not a risk.
_START_TIME_SLACK_MS = 1000

_time = time.time
_FP = FP_MASK
_M32 = LOC_MASK
_MOVED = MOVED


#: how long a control segment may stay odd before its writer is declared dead
CTL_STUCK_NS = 2_000_000_000


class _Corrupt(Exception):
    pass


# One mapping, published with a single store: (slots, words, seq words, mmap, mask,
# lo, hi, end); "seq words" is the words view, or zeros under unsafe_no_seqlock.
_State = tuple[memoryview, memoryview, memoryview, mmap.mmap, int, int, int, int]


class ShmReader:
    """Read-only, lock-free access to the table of one namespace.

    ``unsafe_no_seqlock`` is for tests only: seq words are read from a zero page, so
    every copy passes validation (the control that proves the torn-read test can fail).
    """

    __slots__ = (
        "namespace",
        "lock_free_ok",
        "_unsafe",
        "_ctl",
        "_ctlq",
        "_mm",
        "_q",
        "_sv",
        "_slots",
        "_m",
        "_mask",
        "_lo",
        "_hi",
        "_end",
        "_slot0",
        "_name",
        "_generation",
    )

    def __init__(self, namespace: str, *, unsafe_no_seqlock: bool = False) -> None:
        self.namespace = namespace
        self.lock_free_ok = LOCK_FREE_OK
        self._unsafe = unsafe_no_seqlock
        self._mm: mmap.mmap | None = None
        name = ctl_name(namespace)
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            raise TableUnavailable(
                f"no shared table {name} (namespace {namespace}): is the walcache daemon for this data dir running?"
            ) from None
        except OSError as exc:
            raise TableUnavailable(f"cannot open the shared table {name}: {exc}") from None
        try:
            if shm.size != CTL_SIZE:
                raise TableUnavailable(f"{name} is not a walcache control segment ({shm.size} bytes)")
            self._ctl = mmap.mmap(shm.fd, CTL_SIZE, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        magic, version = CTL_STRUCT.unpack_from(self._ctl, 0)[:2]
        if magic != CTL_MAGIC or version != LAYOUT_VERSION:
            self._ctl.close()
            raise TableUnavailable(
                f"{name} has layout version {version} (magic {magic!r}); this walcache reads version "
                f"{LAYOUT_VERSION}: upgrade the client or the daemon so that they match"
            )
        self._ctlq = memoryview(self._ctl).cast("Q")
        try:
            self._map_current()
        except BaseException:
            self.close()
            raise

    # -- mapping ----------------------------------------------------------------------------------

    def _read_ctl(self) -> tuple[int, int, str]:
        """(generation, segment bytes, name) from the control segment, under its seqlock."""
        ctlq = self._ctlq
        t0 = 0
        tries = 0
        while True:
            s = ctlq[C_SEQ]
            fields = CTL_STRUCT.unpack_from(self._ctl, 0)
            if ctlq[C_SEQ] == s and not s & 1:
                _, _, _, generation, size, n, raw = fields
                if not 0 < n <= MAX_NAME_BYTES:
                    raise TableUnavailable(f"control segment /{self.namespace} names no table yet")
                return generation, size, raw[:n].decode("ascii", "replace")
            tries += 1
            if tries == RETRY_MIN_TRIES:
                t0 = time.monotonic_ns()
            elif tries > RETRY_MIN_TRIES:
                # The control segment changes only at a publish (a few stores), but a
                # writer descheduled in that window can hold it odd for milliseconds on
                # a loaded machine: yield and wait much longer than a record read does
                # before calling the writer dead.
                if time.monotonic_ns() - t0 > CTL_STUCK_NS:
                    raise TableUnavailable(
                        f"control segment /{self.namespace} stayed mid-update for "
                        f"{CTL_STUCK_NS // 1_000_000} ms: its writer died or is stopped"
                    )
                time.sleep(0)

    def _map_current(self) -> None:
        """Map the data segment the control segment names (steps of a remap)."""
        for _ in range(_MAX_REMAPS):
            generation, _, name = self._read_ctl()
            try:
                shm = posix_ipc.SharedMemory(name, read_only=True)
            except posix_ipc.ExistentialError:
                continue  # unlinked after we read the name: a newer one is being published
            except OSError as exc:
                raise TableUnavailable(f"cannot open the shared table {name}: {exc}") from None
            try:
                size = shm.size
                if not HEADER_SIZE <= size <= MAX_SEGMENT_BYTES or size % 8:
                    raise TableUnavailable(f"shared table {name} has a bad size ({size} bytes)")
                try:
                    mm = mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
                except OSError as exc:  # ENOMEM under an address-space limit (ulimit -v)
                    raise TableUnavailable(
                        f"cannot map the shared table {name} ({size} bytes of address space): "
                        f"{exc.strerror or exc}; under an address-space limit (ulimit -v) raise it "
                        "or give the daemon a smaller --shm-reserve (0: none)"
                    ) from None
            finally:
                shm.close_fd()
            try:
                self._install(mm, name)
            except BaseException:
                mm.close()
                raise
            self._generation = generation
            return
        raise TableUnavailable(f"the shared table of {self.namespace} keeps being replaced; try again")

    def _install(self, mm: mmap.mmap, name: str) -> None:
        (magic, version, _, _, seg_bytes, capacity, index_off, data_off) = HEADER_STRUCT.unpack_from(mm, 0)[:8]
        size = len(mm)
        why = ""
        geometry = None
        if magic != DATA_MAGIC or version != LAYOUT_VERSION:
            why = f"magic {magic!r}, layout version {version} (this reader: {LAYOUT_VERSION})"
        elif seg_bytes != size:
            why = f"header says {seg_bytes} bytes, the segment has {size}"
        elif capacity < MIN_CAPACITY or capacity & (capacity - 1) or index_off != HEADER_SIZE:
            why = f"bad index geometry (capacity {capacity}, offset {index_off})"
        elif data_off % 8 or not index_off + capacity * SLOT_SIZE <= data_off <= size - REC_HEADER_SIZE:
            why = f"bad data area offset {data_off}"
        else:
            # One 8-byte load: an index move rewrites this word alone (layout.py "Index moves").
            with memoryview(mm) as raw, raw.cast("Q") as words:
                word = words[H_INDEX]
            geometry = index_geometry(word, size)
            if geometry is None:
                why = f"bad index word {word:#x}"
        if why or geometry is None:
            raise TableUnavailable(f"shared table {name} is not readable: {why}")
        slot0, capacity = geometry
        q = memoryview(mm).cast("Q")
        slots = q[slot0 : slot0 + capacity]
        sv = memoryview(mmap.mmap(-1, size)).cast("Q") if self._unsafe else q
        lo = data_off // 8
        hi = size // 8 - REC_HEADER_WORDS + 1  # w + 4 <= words
        # The old mapping is not released here: another thread may be in the middle of a
        # get on it. It is unmapped when the last reference to its views goes away.
        # Readers take self._m once per call, so they never mix two mappings.
        self._m = (slots, q, sv, mm, capacity - 1, lo, hi, size)
        # The same fields one by one, for the slow paths, the header and the C reader.
        self._mm, self._q, self._slots, self._sv = mm, q, slots, sv
        self._mask, self._lo, self._hi, self._end = capacity - 1, lo, hi, size
        self._slot0 = slot0
        self._name = name

    def _release(self) -> None:
        """Unmap now (close() only: a remap leaves the old mapping to reference counting)."""
        if self._mm is None:
            return
        self._m = None  # type: ignore[assignment]
        self._slots.release()
        if self._sv is not self._q:
            self._sv.release()
        self._q.release()
        self._mm.close()
        self._mm = None

    def close(self) -> None:
        self._release()
        if getattr(self, "_ctl", None) is not None:
            if getattr(self, "_ctlq", None) is not None:
                self._ctlq.release()
            self._ctl.close()

    def __enter__(self) -> ShmReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hot path -----------------------------------------------------------------------------

    def lookup(self, key: object, default: object = None) -> object:
        """The value stored under the user key ``key``, or ``default`` (missing or expired).

        Steps R1-R7 of the layout inlined for one optimistic pass; see the module
        docstring. Raises ReadContention / TableUnavailable as ``_read`` does.
        """
        t = type(key)
        try:
            if t is str:
                kb = b"s" + key.encode()  # type: ignore[attr-defined]
            elif t is bytes:
                kb = b"b" + key  # type: ignore[operator]
            elif t is int:
                kb = b"i%d" % key  # type: ignore[str-format]
            else:
                kb = encode_key(key)
        except ValueError:  # a lone surrogate, an int too long to print: InvalidKey, from the codec
            kb = encode_key(key)
        S, Q, V, M, mask, lo, hi, end = self._m
        h = hash_key(kb)  # R1
        f = h & _FP
        i = h & mask
        home = i
        while True:
            x = S[i]  # R2
            w = x - f
            if lo <= w < hi:
                s = V[w]  # R3
                m = Q[w + 1]  # R4
                a = 8 * w + 32
                b = a + (m >> 32)
                e = b + (m & 0xFFFFFFFF)
                if e <= end and M[a:b] == kb:
                    v = M[b:e]
                    xv = Q[w + 2]
                    if V[w] == s and not s & 1:  # R5
                        # xv is expiry << 8 | vflag: without an expiry it IS the vflag.
                        if xv == 1:
                            return v
                        try:
                            if xv == 2:
                                return v.decode()
                            if xv == 0:
                                return decode_value(0, v)
                            if xv >> 8:
                                if xv >> 8 <= _time() * 1000.0:  # R7
                                    return default
                                xv &= 255
                                if xv == 1:
                                    return v
                                if xv == 2:
                                    return v.decode()
                                if xv == 0:
                                    return decode_value(0, v)
                        except Exception:  # only a corrupt table; _read raises the clear error
                            pass
                break
            elif not x:
                return default
            elif x == _MOVED:
                break
            i = (i + 1) & mask
            if i == home:
                break
        found = self._read(kb)
        if found is None:
            return default
        try:
            return decode_value(*found)
        except Exception as exc:  # msgpack raises several unrelated classes
            raise TableUnavailable(
                f"shared table {self._name} holds an undecodable value for {kb[:40]!r} "
                f"({type(exc).__name__}): it is corrupt; restart the daemon to rebuild it"
            ) from None

    # -- the reference read path ------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """(vflag, value bytes) stored under the encoded key, or None (missing or expired).

        The same one optimistic pass as :meth:`lookup`, without the codec.
        """
        S, Q, V, M, mask, lo, hi, end = self._m
        h = hash_key(key)
        f = h & _FP
        i = h & mask
        home = i
        while True:
            x = S[i]
            w = x - f
            if lo <= w < hi:
                s = V[w]
                m = Q[w + 1]
                a = 8 * w + 32
                b = a + (m >> 32)
                e = b + (m & 0xFFFFFFFF)
                if e <= end and M[a:b] == key:
                    v = M[b:e]
                    xv = Q[w + 2]
                    if V[w] == s and not s & 1:
                        if xv < 3:
                            return xv, v
                        if xv & 255 < 3:
                            return None if xv >> 8 <= _time() * 1000.0 else (xv & 255, v)
                break
            elif not x:
                return None
            elif x == _MOVED:
                break
            i = (i + 1) & mask
            if i == home:
                break
        return self._read(key)

    def contains(self, key: bytes) -> bool:
        return self._read(key) is not None

    def get_many(self, keys: Iterable[object]) -> dict[object, object]:
        """{user key: value} for the keys that are present."""
        lookup = self.lookup
        missing = _MISSING
        out: dict[object, object] = {}
        for k in keys:
            v = lookup(k, missing)
            if v is not missing:
                out[k] = v
        return out

    def __len__(self) -> int:
        if self._m[1][H_STALE]:
            self._remap()
        return self._m[1][H_LIVE]

    def _read(self, kb: bytes) -> tuple[int, bytes] | None:
        """Steps R1-R7 with bounded retries, remaps and dead-writer detection."""
        if not self.lock_free_ok:
            raise TableUnavailable(
                "lock-free shared-memory reads need x86-64 memory ordering; read through the daemon"
            )
        h = hash_key(kb)
        tries = remaps = 0
        t0 = 0
        while True:
            r = self._attempt(kb, h)
            if r is _RETRY:
                tries += 1
                if tries >= _YIELD_AFTER:
                    os.sched_yield()  # let a descheduled writer on this core finish
                if tries == RETRY_MIN_TRIES:
                    t0 = time.monotonic_ns()
                elif tries > RETRY_MIN_TRIES and time.monotonic_ns() - t0 >= RETRY_MIN_NS:
                    self._give_up(kb)  # remaps (then we go on) or raises
                    tries = 0
                    remaps += 1
                    if remaps > _MAX_REMAPS:
                        raise TableUnavailable(f"the shared table of {self.namespace} keeps being replaced")
            elif r is _REMAP:
                remaps += 1
                if remaps > _MAX_REMAPS:
                    raise TableUnavailable(
                        f"shared table {self._name} says it moved but the control segment names no newer one"
                    )
                self._remap()
            else:
                return r  # type: ignore[return-value]

    def _attempt(self, kb: bytes, h: int) -> object:
        """One pass of R2-R7: (vflag, value), None (miss), _RETRY or _REMAP."""
        st = self._m
        S, _, V, _, mask, lo, hi, _ = st
        f = h & _FP
        i = h & mask
        for _ in range(mask + 1):
            x = S[i]
            w = x - f
            if lo <= w < hi:
                s = V[w]
                if s & 1:
                    return _RETRY
                try:
                    key, vflag, value, _, expiry = _copy(st, w)
                except _Corrupt:
                    if V[w] != s:
                        return _RETRY
                    raise TableUnavailable(
                        f"shared table {self._name} holds a record with out-of-range lengths at byte {8 * w}: "
                        "it is corrupt; restart the daemon to rebuild it"
                    ) from None
                if V[w] != s:  # R5
                    return _RETRY
                if key == kb:
                    if vflag > 2:
                        raise TableUnavailable(f"shared table {self._name} holds an unknown value encoding {vflag}")
                    if expiry and expiry <= _time() * 1000.0:  # R7
                        return None
                    return vflag, value
                if S[i] != x or V[w] != s:  # R6: a stale pointer into a reused chunk
                    return _RETRY
            elif x == EMPTY:
                return None
            elif x == _MOVED:
                return _REMAP
            i = (i + 1) & mask
        return None

    def _remap(self) -> None:
        """Follow the current index: of this segment if only the index moved, else of the
        segment the control segment names."""
        old, mm = self._name, self._mm
        assert mm is not None, "reader is closed"
        if self._read_ctl()[2] == old and not self._q[H_STALE]:
            self._install(mm, old)  # the index moved: reread its word, same mapping
            return
        self._map_current()
        log.debug("remapped shm table %s -> %s", old, self._name)

    def _give_up(self, kb: bytes) -> None:
        """Retries are exhausted: move to a newer table, or raise the right error."""
        generation, _, name = self._read_ctl()
        if name != self._name:
            self._remap()
            return
        pid = self._q[H_WRITER_PID]
        if not _alive(pid, self._q[H_WRITER_START_MS]):
            raise TableUnavailable(
                f"the writer of shared table {name} (pid {pid}) died in the middle of a write; "
                "restart the daemon (it rebuilds the table from its log)"
            )
        raise ReadContention(
            f"a read of key {kb[:40]!r} kept colliding with writes for over "
            f"{RETRY_MIN_NS // 1_000_000} ms; read it through the daemon"
        )

    # -- scans and header --------------------------------------------------------------------------

    def iter_entries(self) -> Iterator[tuple[bytes, int, bytes, int, int]]:
        """(key, vflag, value, seqno, expiry_ms) of every live, unexpired entry.

        Each entry is copied under its seqlock. If the table moves during the scan, the
        scan goes on over the new table, skipping keys already yielded (best effort:
        an entry may then be newer than the scan's start).
        """
        if not self.lock_free_ok:
            raise TableUnavailable("lock-free shared-memory reads need x86-64 memory ordering")
        seen: set[bytes] = set()
        remaps = 0
        while True:
            moved = False
            for entry in self._scan():
                if entry is None:
                    moved = True
                    break
                if entry[0] not in seen:
                    seen.add(entry[0])
                    yield entry
            if not moved:
                return
            remaps += 1
            if remaps > _MAX_REMAPS:
                raise TableUnavailable(f"the shared table of {self.namespace} keeps moving during a scan")
            self._remap()

    def _scan(self) -> Iterator[tuple[bytes, int, bytes, int, int] | None]:
        """Entries of the current mapping; None once it turns out to have moved."""
        st = self._m
        S, Q, V, _, mask, lo, hi, _ = st
        for i in range(mask + 1):
            if self._m is not st:
                # A get between two yields remapped (and released S): go on over the new table.
                yield None
                return
            tries = 0
            t0 = 0
            while True:
                x = S[i]
                if x == EMPTY or x == TOMBSTONE:
                    break
                if x == _MOVED or Q[H_STALE]:
                    yield None
                    return
                w = x & _M32
                if not lo <= w < hi:
                    raise TableUnavailable(f"shared table {self._name} has a slot pointing outside its data area")
                s = V[w]
                if not s & 1:
                    try:
                        entry = _copy(st, w)
                    except _Corrupt:
                        entry = None
                    if V[w] == s and S[i] == x:
                        if entry is None:
                            raise TableUnavailable(f"shared table {self._name} holds a corrupt record at byte {8 * w}")
                        if not entry[4] or entry[4] > _time() * 1000.0:
                            yield entry
                        break
                tries += 1
                if tries == RETRY_MIN_TRIES:
                    t0 = time.monotonic_ns()
                elif tries > RETRY_MIN_TRIES and time.monotonic_ns() - t0 >= RETRY_MIN_NS:
                    self._give_up(b"<scan>")
                    yield None  # _give_up remapped
                    return

    def header(self) -> dict[str, int | str]:
        """The current segment's header fields (and its name); a plain, unvalidated copy."""
        assert self._mm is not None, "reader is closed"
        f = HEADER_STRUCT.unpack_from(self._mm, 0)
        return {
            "name": self._name,
            "layout_version": f[1],
            "generation": f[2],
            "incarnation": f[3],
            "segment_bytes": f[4],
            "capacity": 1 << (f[12] >> 32),  # of the current index (f[5]: of the first one)
            "index_slot0": f[12] & LOC_MASK,
            "writer_pid": f[8],
            "writer_start_ms": f[9],
            "stale": f[10],
            "closed": f[11],
            "heartbeat_ms": f[13],
            "live": f[14],
            "tombstones": f[15],
            "used_bytes": f[16],
            "applied_seqno": f[17],
            "writer_alive": int(_alive(f[8], f[9])),
            "reader": "python",
        }

    def refresh(self) -> None:
        """Remap now if the control segment names a newer table (gets do this by themselves)."""
        if self._read_ctl()[2] != self._name or self._q[H_STALE]:
            self._remap()


def _copy(st: _State, w: int) -> tuple[bytes, int, bytes, int, int]:
    """R4: the record at word ``w`` of mapping ``st`` copied out (key, vflag, value, seqno, expiry_ms).

    Only bounds are checked here; the caller validates the copy with the seq word.
    """
    Q, M, end = st[1], st[3], st[7]
    m = Q[w + R_LENS]
    a = 8 * w + REC_HEADER_SIZE
    b = a + (m >> 32)
    e = b + (m & _M32)
    if e > end:
        raise _Corrupt
    xv = Q[w + R_EXPIRY_VFLAG]
    return M[a:b], xv & 0xFF, M[b:e], Q[w + R_SEQNO], xv >> 8


def _alive(pid: int, start_ms: int) -> bool:
    """Whether ``pid`` is still the process that wrote the header (not a reused pid)."""
    if not 0 < pid < 1 << 31:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time() * 1000
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return bool(abs(created - start_ms) <= _START_TIME_SLACK_MS)


if not LOCK_FREE_OK:

    def _refuse(self: ShmReader, key: object, default: object = None) -> object:
        raise TableUnavailable("lock-free shared-memory reads need x86-64 memory ordering; read through the daemon")

    ShmReader.lookup = _refuse  # type: ignore[method-assign]
