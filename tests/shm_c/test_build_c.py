"""The compiled table builder (_creader.build_measure / build_fill) against the pure-Python
reference in writer.py: byte-identical segments, the same refusals, no crash on bad input,
and the writer model on compiled-built tables read back through the C reader."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walcache import KeyTooLarge
from walcache.codec import encode_key
from walcache.shm import ShmTable, layout
from walcache.shm.creader import CReader, extension

from shm.helpers import make_value, segments_of, unique_namespace, unlink_all
from shm.test_build import BAD_ENTRIES, BuiltTableVsModel, Entry, entries_of
from shm.test_model import FUTURE, PAST

from .helpers import requires_c

pytestmark = requires_c

# Header words that differ between two tables built by one process: the writer
# incarnation (random per table) and the heartbeat (the clock at creation).
_VOLATILE_WORDS = (3, 16)


def segment_bytes(t: ShmTable) -> bytes:
    seg = t._seg
    assert seg is not None
    raw = bytearray(seg.mm)
    for w in _VOLATILE_WORDS:
        raw[8 * w : 8 * w + 8] = bytes(8)
    return bytes(raw)


def build_both(entries: Any, **kw: Any) -> tuple[bytes, bytes, dict[str, Any], dict[str, Any]]:
    """Build ``entries`` with each builder; the two segments (volatile words zeroed) and stats."""
    out = []
    for compiled in (True, False):
        ns = unique_namespace("bc")
        try:
            t = ShmTable.build(ns, entries, compiled=compiled, **kw)
            try:
                stats = t.stats()
                del stats["name"]
                out.append((segment_bytes(t), stats))
            finally:
                t.close(unlink=True)
        finally:
            unlink_all(ns)
    (c_bytes, c_stats), (py_bytes, py_stats) = out
    return c_bytes, py_bytes, c_stats, py_stats


def assert_identical(entries: Any, **kw: Any) -> None:
    c_bytes, py_bytes, c_stats, py_stats = build_both(entries, **kw)
    assert c_stats == py_stats
    if c_bytes != py_bytes:
        first = next(i for i in range(len(c_bytes)) if c_bytes[i] != py_bytes[i])
        raise AssertionError(f"segments differ first at byte {first} (word {first // 8}) of {len(c_bytes)}")


KEYS = st.binary(min_size=1, max_size=80)
ENTRY_META = st.tuples(
    st.integers(0, 255),
    st.binary(max_size=300),
    st.integers(0, (1 << 64) - 1),
    st.one_of(st.sampled_from([0, 0, 0, PAST, FUTURE]), st.integers(FUTURE, (1 << 56) - 1)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.dictionaries(KEYS, ENTRY_META, max_size=120),
    as_list=st.booleans(),
    applied=st.integers(0, 1 << 63),
    capacity=st.integers(0, 3000),
    data_bytes=st.integers(0, 1 << 16),
)
def test_compiled_and_pure_python_builds_are_byte_identical(
    entries: dict[bytes, tuple[int, bytes, int, int]], as_list: bool, applied: int, capacity: int, data_bytes: int
) -> None:
    source: Any = [(k, *e) for k, e in entries.items()] if as_list else entries
    assert_identical(source, applied_seqno=applied, capacity=capacity, data_bytes=data_bytes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(st.tuples(st.binary(min_size=1, max_size=2), st.integers(0, 3), st.binary(max_size=20),
                               st.integers(0, 100), st.just(0)), max_size=40),
)  # fmt: skip
def test_a_repeated_key_is_refused_by_both(entries: list[Entry]) -> None:
    repeated = len({e[0] for e in entries}) != len(entries)
    for compiled in (True, False):
        ns = unique_namespace("bd")
        try:
            if repeated:
                with pytest.raises(ValueError, match="given twice"):
                    ShmTable.build(ns, entries, compiled=compiled)
                assert segments_of(ns) == []
            else:
                ShmTable.build(ns, entries, compiled=compiled).close(unlink=True)
        finally:
            unlink_all(ns)
    if not repeated:
        assert_identical(entries)


def test_a_large_mixed_build_is_byte_identical() -> None:
    entries: dict[bytes, tuple[int, bytes, int, int]] = {}
    for i in range(30_000):
        vlen = (i * 7919) % 700
        expiry = PAST if i % 11 == 0 else FUTURE if i % 5 == 0 else 0
        entries[encode_key(i if i % 3 else f"key-{i}")] = (i % 3, make_value(i, 1, 16 + vlen), i + 1, expiry)
    assert_identical(entries)
    assert_identical([(k, *e) for k, e in entries.items()], capacity=100_000)


@pytest.mark.parametrize(("bad", "exc"), BAD_ENTRIES)
def test_entries_put_would_refuse_are_refused_alike(bad: Entry, exc: type[Exception]) -> None:
    entries = [(k, *e) for k, e in entries_of(5).items()] + [bad]
    for compiled in (True, False):
        ns = unique_namespace("bb")
        try:
            with pytest.raises(exc):
                ShmTable.build(ns, entries, compiled=compiled)
            assert segments_of(ns) == []
        finally:
            unlink_all(ns)


@pytest.mark.parametrize(
    "entries",
    [
        {b"k": (1, b"v", 1)},  # short tuple
        {b"k": [1, b"v", 1, 0]},  # not a tuple
        {"k": (1, b"v", 1, 0)},  # str key
        {b"k": (1, "v", 1, 0)},  # str value
        {b"k": (1, bytearray(b"v"), 1, 0)},
        {b"k": (1.0, b"v", 1, 0)},  # float vflag
        {b"k": (1, b"v", None, 0)},
        [(b"k", 1, b"v", 1)],
        [[b"k", 1, b"v", 1, 0]],
        [None],
        (("k", 1, b"v", 1, 0),),
        "not entries",
        42,
    ],
)
def test_malformed_entries_raise_type_error_and_never_crash(entries: Any) -> None:
    assert extension is not None
    with pytest.raises(TypeError):
        extension.build_measure(entries, layout.now_ms())
    buf = bytearray(1 << 16)
    with pytest.raises(TypeError):
        extension.build_fill(buf, entries, 8, 512, 100, layout.now_ms())


def test_a_read_only_buffer_is_refused() -> None:
    assert extension is not None
    with pytest.raises((BufferError, TypeError)):
        extension.build_fill(bytes(4096), {b"k": (1, b"v", 1, 0)}, 8, 512, 10, 0)


def test_the_compiled_builder_is_the_default(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="walcache.shm"):
        ShmTable.build(namespace, entries_of(3)).close(unlink=True)
    assert "compiled builder" in caplog.text


def test_the_key_limit_message_names_the_size() -> None:
    assert extension is not None
    with pytest.raises(KeyTooLarge, match="65536 bytes"):
        extension.build_measure([(b"k" * 65536, 1, b"", 1, 0)], 0)


def test_mark_moved_stores_moved_in_every_slot_and_nothing_else() -> None:
    assert extension is not None
    raw = bytearray(range(256)) * 16
    q = memoryview(raw).cast("Q")
    extension.mark_moved(q[4:100])
    words = q.tolist()
    assert words[4:100] == [layout.MOVED] * 96
    untouched = memoryview(bytearray(range(256)) * 16).cast("Q").tolist()
    assert words[:4] == untouched[:4] and words[100:] == untouched[100:]


@pytest.mark.parametrize("bad", [bytearray(12), bytes(16), memoryview(bytearray(24))[4:20]])
def test_mark_moved_refuses_what_is_not_whole_writable_aligned_slots(bad: Any) -> None:
    assert extension is not None
    with pytest.raises((ValueError, TypeError, BufferError)):
        extension.mark_moved(bad)


class BuiltTableVsModelC(BuiltTableVsModel):
    """The bulk-built writer model with the compiled builder, read through the C reader."""

    compiled = True

    def __init__(self) -> None:
        super().__init__()
        self.reader.close()
        self.reader = CReader(self.ns)  # type: ignore[assignment]


BuiltTableVsModelC.TestCase.settings = BuiltTableVsModel.TestCase.settings
test_compiled_built_table_matches_dict_model_through_the_c_reader = BuiltTableVsModelC.TestCase


def test_a_published_compiled_build_reads_back_through_the_c_reader(namespace: str) -> None:
    entries = entries_of(5000)
    with ShmTable.build(namespace, entries, applied_seqno=7000) as t:
        t.publish()
        with CReader(namespace) as r:
            assert r.get_many([f"k{i:07d}" for i in range(0, 5000, 7)]) == {
                f"k{i:07d}": entries[encode_key(f"k{i:07d}")][1] for i in range(0, 5000, 7)
            }
            for k, e in entries.items():
                assert r.get(k) == (e[0], e[1])
            assert r._get_entry(next(iter(entries))) == (1, entries[next(iter(entries))][1], 1, 0)
            assert len(t) == 5000 and t.stats()["applied_seqno"] == 7000
    unlink_all(namespace)


# ---------------------------------------------------------------- rebuild copy (copy_live)

OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "delete"]),
        st.integers(0, 60),  # key id: repeats overwrite (in place or not) and delete
        st.integers(0, 300),  # value length: chunk sizes change, free lists fill
        st.sampled_from([0, 0, 0, PAST, FUTURE]),
    ),
    max_size=250,
)


def _apply(t: ShmTable, ops: list[tuple[str, int, int, int]]) -> None:
    for seqno, (op, kid, vlen, expiry) in enumerate(ops, 1):
        key = encode_key(f"key-{kid}")
        if op == "put":
            t.put(key, 1, bytes([kid]) * vlen, seqno, expiry)
        else:
            t.delete(key, seqno)


def copies_both(
    ops: list[tuple[str, int, int, int]], grow: int, moved: bool = False
) -> tuple[bytes, bytes, tuple[int, int, int]]:
    """Apply ``ops`` to a small table, then copy its live records into two new segments,
    once with the compiled copy_live and once with the pure-Python loop: both segments
    (volatile header words zeroed) and the counters each left. ``moved``: the table
    starts tiny with a reserve, so its index has moved (to the reserve) before the copy."""
    ns = unique_namespace("cl")
    out: list[bytes] = []
    counters = []
    try:
        if moved:
            t = ShmTable.create(ns, capacity=4, data_bytes=1 << 16, max_memory=1 << 22)
        else:
            t = ShmTable.create(ns, capacity=64, data_bytes=1 << 16)
        try:
            _apply(t, ops)
            old = t._seg
            assert old is not None
            for compiled in (True, False):
                new = t._new_segment(old.capacity * grow, old.data_words << 3, t._live_words << 3)
                try:
                    t._copy_live(old, new, compiled=compiled)
                    raw = bytearray(new.mm[: new.committed])
                    for w in _VOLATILE_WORDS:
                        raw[8 * w : 8 * w + 8] = bytes(8)
                    out.append(bytes(raw) + new.top.to_bytes(8, "little"))
                    counters.append((t._live, t._tombstones, t._live_words))
                finally:
                    new.close()
        finally:
            t.close(unlink=True)
    finally:
        unlink_all(ns)
    assert counters[0] == counters[1], counters
    return out[0], out[1], counters[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, grow=st.sampled_from([1, 2, 4]), moved=st.booleans())
def test_compiled_and_pure_python_rebuild_copies_are_byte_identical(
    ops: list[tuple[str, int, int, int]], grow: int, moved: bool
) -> None:
    c_bytes, py_bytes, (live, tombstones, _words) = copies_both(ops, grow, moved)
    assert tombstones == 0
    if c_bytes != py_bytes:
        first = next(i for i in range(min(len(c_bytes), len(py_bytes))) if c_bytes[i] != py_bytes[i])
        raise AssertionError(f"copies differ first at byte {first} (word {first // 8})")


def test_a_rebuild_copy_keeps_what_is_live_and_drops_what_is_not() -> None:
    """Not only equal to each other: the copy holds exactly the live, unexpired keys."""
    ops = [("put", k, 40 + k, 0) for k in range(50)]
    ops += [("delete", k, 0, 0) for k in range(0, 50, 5)]  # 10 deletes leave tombstones
    ops += [("put", k, 90, 0) for k in range(1, 50, 7)]  # overwrites of another chunk size
    ops += [("put", 100 + k, 30, PAST) for k in range(5)] + [("put", 200 + k, 30, FUTURE) for k in range(5)]
    model: dict[int, int] = {}  # key id -> value length, what a reader must find
    for op, kid, vlen, expiry in ops:
        model.pop(kid, None)
        if op == "put" and expiry != PAST:
            model[kid] = vlen
    c_bytes, _py, (live, tombstones, words) = copies_both(ops, 2)
    assert (live, tombstones) == (len(model), 0) and len(model) == 46
    assert words == sum(layout.chunk_words(len(encode_key(f"key-{k}")), n) for k, n in model.items())


def test_copy_live_refuses_a_bad_geometry_and_a_new_segment_too_small() -> None:
    assert extension is not None
    old = bytearray(layout.HEADER_SIZE + 8 * 8 + 64 * 8)
    h0, lo = layout.HEADER_SIZE // 8, layout.HEADER_SIZE // 8 + 8
    for bad in (
        (h0, 8, lo, 12, lo, 0),  # new capacity not a power of two
        (h0 - 1, 8, lo, 8, lo, 0),  # old index over the header
        (len(old) // 8 - 7, 8, lo, 8, lo, 0),  # old index one slot past the end
        (h0, 8, h0 - 1, 8, lo, 0),  # data area starting in the header
        (h0, 8, lo, 8, len(old) // 8 + 1, 0),  # new top past the new segment
    ):
        with pytest.raises(ValueError, match="bad geometry"):
            extension.copy_live(old, bytearray(len(old)), *bad)
    q = memoryview(old).cast("Q")
    q[lo + layout.R_LENS] = 3 << 32 | 100  # a 3-byte key and 100-byte value: 17 words
    old[8 * lo + 32 : 8 * lo + 35] = b"abc"
    q[layout.HEADER_SIZE // 8] = lo
    with pytest.raises(RuntimeError, match="too small"):
        extension.copy_live(old, bytearray(8 * (lo + 10)), h0, 8, lo, 8, lo, 0)
    q[lo + layout.R_LENS] = 3 << 32 | 10_000  # runs past the end of the old segment
    with pytest.raises(RuntimeError, match="past the end"):
        extension.copy_live(old, bytearray(len(old) * 40), h0, 8, lo, 8, lo, 0)


# ---------------------------------------------------------------- index move (fill_index)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, grow=st.sampled_from([1, 2, 4, 8]))
def test_compiled_and_pure_python_index_fills_are_identical(ops: list[tuple[str, int, int, int]], grow: int) -> None:
    """Step M1 of an index move, both ways, into two regions of the same segment's reserve:
    the same slots, in the same places, and exactly one per live slot of the old index."""
    from walcache.shm.writer import _fill_index

    ns = unique_namespace("fi")
    try:
        t = ShmTable.create(ns, capacity=64, data_bytes=1 << 16, max_memory=1 << 22)
        try:
            _apply(t, ops)
            seg = t._seg
            assert seg is not None
            cap = seg.capacity * grow
            a, b = seg.end_words - cap, seg.end_words - 2 * cap
            placed = [_fill_index(seg, a, cap, compiled=True), _fill_index(seg, b, cap, compiled=False)]
            old = seg.slots.tolist()
            live = [x for x in old if x not in (layout.EMPTY, layout.TOMBSTONE)]
            assert placed == [len(live)] * 2
            ca, cb = seg.q[a : a + cap].tolist(), seg.q[b : b + cap].tolist()
            assert ca == cb
            assert sorted(x for x in ca if x) == sorted(live)
            for i, x in enumerate(ca):  # every slot is reachable from its key's home slot
                if x:
                    w = x & layout.LOC_MASK
                    klen = seg.q[w + layout.R_LENS] >> 32
                    j = layout.hash_key(bytes(seg.mm[8 * w + 32 : 8 * w + 32 + klen])) & (cap - 1)
                    while j != i:
                        assert ca[j] != 0, "a probe from the key's home slot stops before its slot"
                        j = (j + 1) & (cap - 1)
        finally:
            t.close(unlink=True)
    finally:
        unlink_all(ns)


def test_fill_index_refuses_a_bad_geometry_and_a_bad_slot() -> None:
    assert extension is not None
    h0 = layout.HEADER_SIZE // 8
    buf = bytearray(8 * (h0 + 8 + 64 + 32))
    top = len(buf) // 8
    lo = h0 + 8
    for bad in (
        (h0, 8, top - 16, 12, lo),  # new capacity not a power of two
        (h0, 8, top - 7, 8, lo),  # new index one slot past the end
        (h0 - 1, 8, top - 8, 8, lo),  # old index over the header
        (h0, 8, h0 + 4, 8, lo),  # new index overlapping the old one
        (h0, 8, top - 8, 8, h0 - 1),  # data area starting in the header
    ):
        with pytest.raises(ValueError, match="bad geometry"):
            extension.fill_index(buf, *bad)
    with pytest.raises(BufferError):
        extension.fill_index(bytes(buf), h0, 8, top - 8, 8, lo)
    q = memoryview(buf).cast("Q")
    q[h0] = 1 << 32 | (h0 + 2)  # a live slot pointing into the old index: below the data area
    with pytest.raises(RuntimeError, match="outside"):
        extension.fill_index(buf, h0, 8, top - 8, 8, lo)
    q[h0] = 1 << 32 | lo
    q[lo + layout.R_LENS] = 60_000 << 32  # a key running past the end
    with pytest.raises(RuntimeError, match="past the end"):
        extension.fill_index(buf, h0, 8, top - 8, 8, lo)
    q[lo + layout.R_LENS] = 3 << 32
    for i in range(1, 8):  # 8 live slots cannot fit an index of 8 (one must stay EMPTY)
        q[h0 + i] = 1 << 32 | lo
    with pytest.raises(RuntimeError, match="too small"):
        extension.fill_index(buf, h0, 8, top - 8, 8, lo)
    q.release()


def test_both_index_fills_overwrite_whatever_the_region_held() -> None:
    """M1 must not trust the new index's words to be zero: both fills clear them first (a
    leftover word would be a slot pointing at a chunk that may since hold another key)."""
    from walcache.shm.writer import _fill_index

    ns = unique_namespace("fz")
    try:
        t = ShmTable.create(ns, capacity=64, data_bytes=1 << 16, max_memory=1 << 22)
        try:
            for i in range(40):
                t.put(encode_key(f"key-{i}"), 1, b"v" * i, i + 1, 0)
            seg = t._seg
            assert seg is not None
            cap = seg.capacity * 2
            clean, c_dirty, py_dirty = (seg.end_words - k * cap for k in (1, 2, 3))
            for start in (c_dirty, py_dirty):  # every other word garbage (not EMPTY)
                seg.q[start : start + cap] = memoryview((bytes(range(1, 9)) + bytes(8)) * (cap // 2)).cast("Q")
            _fill_index(seg, clean, cap, compiled=False)
            _fill_index(seg, c_dirty, cap, compiled=True)
            _fill_index(seg, py_dirty, cap, compiled=False)
            want = seg.q[clean : clean + cap].tolist()
            assert want.count(0) == cap - 40
            assert seg.q[c_dirty : c_dirty + cap].tolist() == want
            assert seg.q[py_dirty : py_dirty + cap].tolist() == want
        finally:
            t.close(unlink=True)
    finally:
        unlink_all(ns)
