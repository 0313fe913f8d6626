"""The compiled reader and the reference reader return identical results for the same table.

Real tables come from hypothesis-chosen writer operations (tiny initial sizes, so growth,
tombstones, compaction and expiry all happen); garbage tables from seeded random bytes
with valid headers and slots aimed at the probed keys. On garbage "identical" means the
same value, the same miss or the same exception class, call by call.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walcache import ReadContention, TableUnavailable
from walcache.codec import decode_value, encode_key, encode_value
from walcache.shm import ShmReader, ShmTable, layout
from walcache.shm.creader import CReader

from shm.helpers import unique_namespace, unlink_all, write_raw_table

from .helpers import requires_c

pytestmark = requires_c

PAST = 1
FUTURE = layout.now_ms() + 24 * 3_600_000
KEYS: list[Any] = ["a", b"a", 97, "", b"", 0, -1, 2**64, "é", "k" * 70, b"\x00" * 9, "x" * 31, "y" * 32, "z" * 33]
VALUES = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=100),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack packs
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63), max_size=3),
    st.lists(st.binary(max_size=5), max_size=3),
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "delete"]),
        st.sampled_from(KEYS),
        VALUES,
        st.sampled_from([0, 0, PAST, FUTURE]),
    ),
    max_size=60,
)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except (TableUnavailable, ReadContention) as exc:
        return "raised", type(exc).__name__


def reference_lookup(py: ShmReader, key: Any) -> Any:
    """What ShmReader.lookup is specified to return: _read's entry, decoded. (On garbage
    its inlined fast path may differ: it tests expiry before the value encoding.)"""
    found = py.get(encode_key(key))
    if found is None:
        return "MISSING"
    try:
        return decode_value(*found)
    except Exception:
        raise TableUnavailable("undecodable") from None


def reference_get_many(py: ShmReader, keys: list[Any]) -> dict[Any, Any]:
    out = {}
    for key in keys:
        value = reference_lookup(py, key)
        if value != "MISSING":
            out[key] = value
    return out


def scan(reader: Any) -> tuple[list[Any], str]:
    entries: list[Any] = []
    try:
        for e in reader.iter_entries():
            entries.append(e)
            if len(entries) > 5000:
                break
    except (TableUnavailable, ReadContention) as exc:
        return entries, type(exc).__name__
    return entries, ""


def assert_same(c: CReader, py: ShmReader, keys: list[Any], *, exact_lookup: bool) -> None:
    for key in keys:
        kb = encode_key(key)
        assert outcome(lambda: c.get(kb)) == outcome(lambda: py.get(kb)), key
        assert outcome(lambda: c.contains(kb)) == outcome(lambda: py.contains(kb)), key
        c_lookup = outcome(lambda: c.lookup(key, "MISSING"))
        assert c_lookup == outcome(lambda: reference_lookup(py, key)), key
        if exact_lookup:
            assert c_lookup == outcome(lambda: py.lookup(key, "MISSING")), key
    if exact_lookup:
        assert outcome(lambda: c.get_many(keys)) == outcome(lambda: py.get_many(keys))
    assert outcome(lambda: c.get_many(keys)) == outcome(lambda: reference_get_many(py, keys))
    c_scan, py_scan = scan(c), scan(py)
    assert c_scan == py_scan
    assert len(c) == len(py)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(min_value=1, max_value=64))
def test_same_results_as_the_reference_reader_on_real_tables(ops: list[tuple[str, Any, Any, int]], capacity: int) -> None:
    ns = unique_namespace("eqv")
    table = ShmTable.create(ns, capacity=capacity, data_bytes=1024)
    table.publish()
    c, py = CReader(ns), ShmReader(ns)
    try:
        for seqno, (op, key, value, expiry) in enumerate(ops, 1):
            if op == "put":
                vflag, vb = encode_value(value)
                table.put(encode_key(key), vflag, vb, seqno, expiry)
            else:
                table.delete(encode_key(key), seqno)
            if seqno % 7 == 0:
                assert_same(c, py, KEYS, exact_lookup=True)
        assert_same(c, py, KEYS, exact_lookup=True)
        for key in KEYS:
            kb = encode_key(key)
            assert c._get_entry(kb) == table.lookup(kb)
        with CReader(ns) as c2, ShmReader(ns) as py2:  # fresh mappings see the same
            assert_same(c2, py2, KEYS, exact_lookup=True)
    finally:
        c.close()
        py.close()
        table.close(unlink=True)
        unlink_all(ns)


def garbage_table(seed: int) -> bytes:
    """A segment with a valid header and garbage slots and records, aimed at KEYS."""
    rng = random.Random(seed)
    capacity = 1 << rng.randrange(3, 8)
    data_off = layout.HEADER_SIZE + capacity * layout.SLOT_SIZE
    size = data_off + 8 * rng.randrange(4, 600)
    body = bytearray(rng.randbytes(size))
    layout.HEADER_STRUCT.pack_into(
        body, 0, layout.DATA_MAGIC, layout.LAYOUT_VERSION, 1, 1, size, capacity, layout.HEADER_SIZE,
        data_off, 0, 0, rng.choice([0, 0, 0, 1]), 0, layout.index_word(layout.HEADER_SIZE // 8, capacity),
        0, rng.getrandbits(20), 0, 0, 0,
    )  # fmt: skip
    lo, words = data_off // 8, size // 8
    # Records of KEYS (or of random keys): even seqs mostly (an odd one costs a bounded
    # retry), any vflag, expired or not, lengths that fit, just overrun, or are wild.
    records: dict[bytes, list[int]] = {}
    for _ in range(rng.randrange(0, 40)):
        w = rng.randrange(lo, words - 3)
        room = size - 8 * w - layout.REC_HEADER_SIZE
        key = encode_key(rng.choice(KEYS)) if rng.random() < 0.8 else rng.randbytes(rng.randrange(12))
        klen = len(key) if rng.random() < 0.9 else rng.getrandbits(16)
        vlen = rng.choice([0, rng.randrange(64), max(room - klen, 0), room - klen + 1, rng.getrandbits(32)])
        seq = rng.getrandbits(63) << 1 | (rng.random() < 0.05)
        xv = rng.choice([0, 0, PAST, FUTURE]) << 8 | rng.choice([0, 1, 1, 2, 2, 3, 255])
        rec = layout.RECORD_HEADER.pack(seq, (klen & 0xFFFFFFFF) << 32 | (vlen & 0xFFFFFFFF), xv, rng.getrandbits(64))
        body[8 * w : 8 * w + 32] = rec
        k_at = 8 * w + 32
        body[k_at : k_at + len(key)] = key[: max(0, size - k_at)]
        del body[size:]
        records.setdefault(key, []).append(w)
    # Slots: EMPTY, TOMBSTONE, MOVED, or a key's fingerprint with a pointer to one of its
    # records, to another record, or anywhere near or past the data area.
    for slot in range(capacity):
        kind = rng.random()
        if kind < 0.2:
            word = layout.EMPTY
        elif kind < 0.25:
            word = layout.TOMBSTONE
        elif kind < 0.27:
            word = layout.MOVED
        else:
            kb = encode_key(rng.choice(KEYS))
            h = layout.hash_key(kb)
            mine = records.get(kb) or [lo]
            others = [w for ws in records.values() for w in ws] or [lo]
            w = rng.choice([
                rng.choice(mine), rng.choice(mine), rng.choice(others), rng.randrange(lo, words),
                lo - 1, words - 4, words - 3, rng.getrandbits(32),
            ])  # fmt: skip
            word = (h & layout.FP_MASK) | (w & layout.LOC_MASK)
        body[layout.HEADER_SIZE + 8 * slot : layout.HEADER_SIZE + 8 * slot + 8] = word.to_bytes(8, sys.byteorder)
    # Most keys also get a slot at (or just after) their home slot naming their record.
    for key in KEYS:
        kb = encode_key(key)
        if kb in records and rng.random() < 0.7:
            h = layout.hash_key(kb)
            slot = (h + rng.choice([0, 0, 1])) & (capacity - 1)
            word = (h & layout.FP_MASK) | rng.choice(records[kb])
            body[layout.HEADER_SIZE + 8 * slot : layout.HEADER_SIZE + 8 * slot + 8] = word.to_bytes(8, sys.byteorder)
    return bytes(body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32))
def test_same_results_as_the_reference_reader_on_garbage(seed: int) -> None:
    ns = unique_namespace("eqg")
    try:
        write_raw_table(ns, garbage_table(seed))
        c, py = CReader(ns), ShmReader(ns)
        try:
            assert_same(c, py, KEYS, exact_lookup=False)
        finally:
            c.close()
            py.close()
    finally:
        unlink_all(ns)
