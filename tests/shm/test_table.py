"""Unit tests of the shared table: the daemon-side ShmTable against separate ShmReader mappings."""

from __future__ import annotations

import array
import multiprocessing
import os
import platform
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from walcache import CacheFull, ReadContention, TableUnavailable
from walcache.codec import encode_key, encode_value
import walcache.shm.writer as writer_mod
from walcache.shm import ShmReader, ShmTable, layout
from walcache.shm.layout import C_GENERATION, C_SEQ, CTL_STRUCT, CTL_TAIL
from walcache.shm.writer import MAX_LOAD

from .helpers import SHM_DIR, leave_write_open, record_word, segments_of

FUTURE = layout.now_ms() + 3_600_000
PAST = 1


def put(t: ShmTable, key: object, value: object, seqno: int = 1, expiry_ms: int = 0) -> None:
    vflag, vb = encode_value(value)
    t.put(encode_key(key), vflag, vb, seqno, expiry_ms)


@pytest.fixture
def table(namespace: str) -> Iterator[ShmTable]:
    t = ShmTable.create(namespace, capacity=16, data_bytes=4096)
    t.publish()
    yield t
    t.close(unlink=True)


@pytest.fixture
def reader(table: ShmTable) -> Iterator[ShmReader]:
    r = ShmReader(table.namespace)
    yield r
    r.close()


def test_reader_returns_every_kind_of_key_and_value(table: ShmTable, reader: ShmReader) -> None:
    cases: dict[object, object] = {
        "str": "text é", b"bytes": b"\x00\xff", 7: 7, -12: [1, "a", None], "none": None,
        "dict": {"a": 1.5, 2: b"x"}, "empty": b"", "t": True, 10**30: "big",
    }  # fmt: skip
    for i, (k, v) in enumerate(cases.items()):
        put(table, k, v, seqno=i + 1)
    for k, v in cases.items():
        assert reader.lookup(k, "MISSING") == v
        assert reader.get(encode_key(k)) == encode_value(v)
        assert reader.contains(encode_key(k))
    # "a", b"a" and 97 are three keys.
    assert reader.lookup("7", "MISSING") == "MISSING"
    assert reader.lookup(b"str", "MISSING") == "MISSING"
    assert reader.get(encode_key("absent")) is None
    assert not reader.contains(encode_key("absent"))
    assert len(reader) == len(table) == len(cases)


def test_overwrite_in_place_and_out_of_place(table: ShmTable, reader: ShmReader) -> None:
    put(table, "k", b"a" * 20, seqno=1)
    w = record_word(table, encode_key("k"))
    put(table, "k", b"b" * 20, seqno=2)  # same chunk size: in place
    assert record_word(table, encode_key("k")) == w
    assert reader.lookup("k") == b"b" * 20
    put(table, "k", b"c" * 200, seqno=3)  # another size: a new chunk
    assert record_word(table, encode_key("k")) != w
    assert reader.lookup("k") == b"c" * 200
    assert table.lookup(encode_key("k")) == (1, b"c" * 200, 3, 0)
    assert len(table) == 1


def test_delete_says_whether_the_key_existed(table: ShmTable, reader: ShmReader) -> None:
    put(table, "k", "v")
    assert table.delete(encode_key("k"), 2) is True
    assert table.delete(encode_key("k"), 3) is False
    assert reader.lookup("k") is None and table.lookup(encode_key("k")) is None
    assert len(reader) == 0
    put(table, "k", "again", seqno=4)  # reuses the tombstone
    assert reader.lookup("k") == "again"
    assert reader.header()["tombstones"] == 0
    assert reader.header()["applied_seqno"] == 4


def test_expired_entries_read_as_missing(table: ShmTable, reader: ShmReader) -> None:
    put(table, "past", "v", expiry_ms=PAST)
    put(table, "future", "v", expiry_ms=FUTURE)
    put(table, "never", "v")
    assert reader.lookup("past", "MISSING") == "MISSING"
    assert reader.get(encode_key("past")) is None
    assert table.lookup(encode_key("past")) is None
    assert reader.lookup("future") == "v" and reader.lookup("never") == "v"
    assert reader.get(encode_key("future")) == (2, b"v")
    assert table.lookup(encode_key("future")) == (2, b"v", 1, FUTURE)
    assert {e[0] for e in reader.iter_entries()} == {encode_key("future"), encode_key("never")}
    assert {e[0] for e in table.items()} == {encode_key("future"), encode_key("never")}
    assert table.delete(encode_key("past"), 5) is False  # it did not exist for anyone


def test_purge_expired_returns_their_memory(namespace: str) -> None:
    t = ShmTable.create(namespace, capacity=100)  # no rebuild (which drops expired entries too)
    try:
        for i in range(10, 60):
            put(t, i, "x" * 40, expiry_ms=PAST if i % 2 else 0)
        assert len(t) == 50
        used = t.used_bytes
        assert t.purge_expired(max_slots=1 << 20) == 25
        assert len(t) == 25
        assert t.used_bytes == used - 25 * t.footprint(len(encode_key(10)), 40)
        assert t.stats()["generation"] == 0
    finally:
        t.close(unlink=True)


def test_used_bytes_is_the_sum_of_footprints_and_fits_respects_max_memory(namespace: str) -> None:
    t = ShmTable.create(namespace, max_memory=1000)
    try:
        key = encode_key("k")
        assert t.fits(key, 100)
        t.put(key, 1, b"x" * 100, 1, 0)
        assert t.used_bytes == t.footprint(len(key), 100) == layout.footprint(2, 100)
        # Overwriting counts the old entry as freed.
        assert t.fits(key, 1000 - layout.REC_HEADER_SIZE - 2 - 8)
        assert not t.fits(key, 1000)
        assert not t.fits(encode_key("other"), 900)
        assert t.stats()["used_bytes"] == t.used_bytes
    finally:
        t.close(unlink=True)


@pytest.mark.parametrize("sizes", [(100,), (60, 300)], ids=["same-size", "alternating-sizes"])
def test_overwriting_every_key_ten_times_does_not_grow_the_segment(namespace: str, sizes: tuple[int, ...]) -> None:
    n = 2000
    t = ShmTable.create(namespace, capacity=n, data_bytes=1 << 20)
    try:
        keys = [encode_key(b"%010d" % i) for i in range(n)]
        seqno = 0
        footprints = []
        for rnd in range(10):
            for k in keys:
                seqno += 1
                t.put(k, 1, bytes([rnd]) * sizes[rnd % len(sizes)], seqno, 0)
            # delete and re-insert a tenth: tombstones and free chunks get reused too
            for k in keys[: n // 10]:
                t.delete(k, seqno)
                t.put(k, 1, bytes([rnd]) * sizes[rnd % len(sizes)], seqno, 0)
            st = t.stats()
            footprints.append((st["name"], st["segment_bytes"], st["unallocated_bytes"]))
        # Once every size has been allocated once, nothing new is ever taken.
        warm = len(sizes)
        assert len(set(footprints[warm - 1 :])) == 1, footprints
        assert t.stats()["generation"] == 0  # never rebuilt
        assert t.lookup(keys[n - 1]) == (1, bytes([9]) * sizes[9 % len(sizes)], seqno, 0)
    finally:
        t.close(unlink=True)


def test_index_growth_moves_readers_to_a_new_segment(table: ShmTable, reader: ShmReader) -> None:
    put(table, "first", "v")
    old = table.name
    assert reader.header()["name"] == old
    capacity = int(table.stats()["capacity"])
    for i in range(int(capacity * MAX_LOAD) + 1):
        put(table, i, i)
    assert table.name != old
    st = table.stats()
    assert int(st["capacity"]) > capacity
    # The pause every write waited through is counted and described for `walcache status`.
    last = st["last_rebuild"]
    assert st["rebuilds"] >= 1 and last["slots"] == st["capacity"]
    assert isinstance(last["ms"], float) and last["ms"] >= 0  # rounded to 0.1 ms: may read 0.0
    assert last["live_keys"] <= st["live"] and last["when"]
    assert "/" + old.lstrip("/") not in segments_of(table.namespace)  # old name unlinked
    # The reader still holds the old mapping: stale, but whole.
    hdr = reader.header()
    assert hdr["name"] == old and hdr["stale"] == 1
    assert reader.lookup("first") == "v"  # meets MOVED, remaps
    assert reader.header()["name"] == table.name
    assert reader.header()["generation"] == table.generation
    assert all(reader.lookup(i) == i for i in range(int(capacity * MAX_LOAD) + 1))


def test_data_area_growth_and_compaction(table: ShmTable, reader: ShmReader) -> None:
    # Values whose sizes drift leave free chunks of unused sizes behind; when the
    # bump area runs out the writer compacts (same size) or doubles, never loses keys.
    seqno = 0
    for rnd in range(30):
        for i in range(40):
            seqno += 1
            put(table, i, b"v" * (8 * ((rnd * 7 + i) % 60)), seqno=seqno)
    st = table.stats()
    assert int(st["data_bytes"]) <= 4 * int(st["used_bytes"]) + 4096
    for i in range(40):
        assert reader.lookup(i) == b"v" * (8 * ((29 * 7 + i) % 60))


def test_publishing_a_new_table_retires_the_previous_one(namespace: str, table: ShmTable, reader: ShmReader) -> None:
    put(table, "k", "old")
    assert reader.lookup("k") == "old"
    old_name = table.name
    # A restarted daemon builds a new table (new incarnation) and publishes it.
    new = ShmTable.create(namespace)
    try:
        put(new, "k", "new")
        assert reader.lookup("k") == "old"  # not published yet
        new.publish()
        assert old_name not in segments_of(namespace)
        assert reader.lookup("k") == "new"
        assert reader.header()["name"] == new.name
        assert reader.header()["generation"] == table.generation + 1
    finally:
        new.close(unlink=True)


def test_a_new_reader_finds_the_current_table(namespace: str, table: ShmTable) -> None:
    put(table, "k", 1)
    for i in range(100):
        put(table, i, i)  # grows a few times
    with ShmReader(namespace) as r:
        assert r.header()["name"] == table.name
        assert r.lookup("k") == 1


def _child_writer(namespace: str, mode: str, ready: multiprocessing.synchronize.Event) -> None:
    t = ShmTable.create(namespace)
    for i in range(100):
        put(t, i, f"v{i}", seqno=i + 1)
    t.publish()
    if mode == "die-mid-write":
        leave_write_open(t, encode_key(7))
        ready.set()
        os._exit(0)
    ready.set()
    time.sleep(60)


def _start_child(namespace: str, mode: str) -> multiprocessing.process.BaseProcess:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_child_writer, args=(namespace, mode, ready), daemon=True)
    p.start()
    assert ready.wait(30), "child writer did not publish"
    return p


def test_reads_go_on_after_the_writer_is_killed_and_move_to_the_next_table(namespace: str) -> None:
    p = _start_child(namespace, "serve")
    try:
        r = ShmReader(namespace)
        assert r.lookup(3) == "v3"
        assert r.header()["writer_alive"] == 1
        assert p.pid is not None
        os.kill(p.pid, 9)
        p.join(10)
        assert r.lookup(3) == "v3" and r.lookup(99) == "v99"
        assert r.header()["writer_alive"] == 0
        t = ShmTable.create(namespace)
        try:
            put(t, 3, "restarted")
            t.publish()
            assert r.lookup(3) == "restarted" and r.lookup(99) is None
        finally:
            t.close(unlink=True)
        r.close()
    finally:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, 9)
        p.join(10)


def test_a_writer_that_died_mid_write_makes_that_key_unavailable(namespace: str) -> None:
    p = _start_child(namespace, "die-mid-write")
    p.join(10)
    with ShmReader(namespace) as r:
        assert r.lookup(8) == "v8"  # other keys stay readable
        with pytest.raises(TableUnavailable, match="died in the middle of a write"):
            r.lookup(7)
        with pytest.raises(TableUnavailable):
            r.get(encode_key(7))


def test_a_write_held_open_by_a_live_writer_raises_read_contention(table: ShmTable, reader: ShmReader) -> None:
    put(table, "k", "v")
    leave_write_open(table, encode_key("k"))
    t0 = time.monotonic_ns()
    with pytest.raises(ReadContention):
        reader.lookup("k")
    assert time.monotonic_ns() - t0 >= layout.RETRY_MIN_NS  # bounded by time AND count


def test_a_fingerprint_match_of_another_key_is_not_a_hit(table: ShmTable, reader: ShmReader) -> None:
    # Put B's fingerprint in the slot B probes first, pointing at A's record.
    put(table, "A", "a")
    seg = table._seg
    assert seg is not None
    kb = encode_key("B")
    h = layout.hash_key(kb)
    i = h & seg.mask
    saved = seg.slots[i]
    seg.slots[i] = (h & layout.FP_MASK) | record_word(table, encode_key("A"))
    try:
        assert reader.lookup("B", "MISSING") == "MISSING"
        assert reader.get(kb) is None
    finally:
        seg.slots[i] = saved
    assert reader.lookup("A") == "a"


def test_no_table_raises_table_unavailable(namespace: str) -> None:
    with pytest.raises(TableUnavailable, match="daemon"):
        ShmReader(namespace)
    t = ShmTable.create(namespace)  # created but never published: still nothing to read
    try:
        with pytest.raises(TableUnavailable):
            ShmReader(namespace)
    finally:
        t.close(unlink=True)


def _mode_and_gid(name: str) -> tuple[int, int]:
    st = os.stat(SHM_DIR + name)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_segments_are_private_by_default(namespace: str) -> None:
    old = os.umask(0)
    try:
        t = ShmTable.create(namespace)
        t.publish()
    finally:
        os.umask(old)
    try:
        for name in segments_of(namespace):
            assert _mode_and_gid(name)[0] == 0o600, name
    finally:
        t.close(unlink=True)


def test_a_group_makes_segments_group_readable(namespace: str) -> None:
    gid = os.getgroups()[-1] if os.getgroups() else os.getgid()
    t = ShmTable.create(namespace, gid=gid)
    t.publish()
    try:
        put(t, "k", "v")
        for i in range(64):
            put(t, i, i)  # a grown segment keeps the mode
        names = segments_of(namespace)
        assert len(names) == 2
        for name in names:
            assert _mode_and_gid(name) == (0o640, gid), name
    finally:
        t.close(unlink=True)


def test_close_with_unlink_removes_every_segment(namespace: str) -> None:
    t = ShmTable.create(namespace, capacity=4)
    t.publish()
    for i in range(200):
        put(t, i, i)
    r = ShmReader(namespace)
    assert len(segments_of(namespace)) == 2
    t.close(unlink=True)
    assert segments_of(namespace) == []
    assert r.lookup(5) == 5  # a mapped reader keeps its (now nameless) table
    r.close()


def test_the_reserve_is_committed_only_as_it_is_used(namespace: str) -> None:
    from walcache.shm.writer import COMMIT_STEP

    t = ShmTable.create(namespace, capacity=3000, data_bytes=64 * COMMIT_STEP)
    try:
        path = SHM_DIR + t.name
        assert os.stat(path).st_size >= 64 * COMMIT_STEP
        assert os.stat(path).st_blocks * 512 <= 2 * COMMIT_STEP  # sparse: nothing used yet
        for i in range(3000):
            put(t, i, b"x" * 1000)
        st = t.stats()
        committed = int(st["committed_bytes"])
        assert int(st["used_bytes"]) <= committed <= int(st["used_bytes"]) + 2 * COMMIT_STEP
        assert os.stat(path).st_blocks * 512 >= committed  # posix_fallocate really reserved it
        assert st["name"] == t.name == path[len(SHM_DIR) :] and int(st["segment_bytes"]) >= 64 * COMMIT_STEP
    finally:
        t.close(unlink=True)


@pytest.mark.parametrize("exact", [False, True], ids=["bound", "exact"])
@pytest.mark.parametrize("seed", range(4))
def test_a_reserve_is_enough_for_its_batch_and_a_refused_one_changes_nothing(
    namespace: str, seed: int, exact: bool
) -> None:
    """reserve either makes room for a whole batch or raises, leaving the table as it was.

    After a reserve that returned, applying the batch neither rebuilds (the segment keeps
    its name) nor claims memory: a full /dev/shm can no longer stop a put_many halfway.
    Batches of new keys, overwrites of the same and of other sizes, puts with an expiry
    and deletes, drawn from a seeded generator, until /dev/shm (6 MiB here) is full;
    reserved by the bound alone (every put a new key) or, when that does not fit, by the
    exact changes.
    """
    import random

    from walcache.shm.writer import FaultyShmOps

    rng = random.Random(seed)
    ops = FaultyShmOps(limit=6 << 20)
    t = ShmTable.create(namespace, capacity=16, data_bytes=4096, shmops=ops)
    t.publish()
    r = ShmReader(namespace)
    model: dict[bytes, bytes] = {}
    sizes = [rng.randrange(1, 30_000) for _ in range(40)]  # few sizes: overwrites in place and reuse happen
    seqno = refused = applied = 0
    try:
        for _ in range(300):
            batch: list[tuple[bytes, bytes | None, int]] = []
            for _ in range(rng.randrange(1, 40)):
                key = encode_key(rng.randrange(3000))
                if rng.random() < 0.1:
                    batch.append((key, None, 0))
                else:
                    expiry = FUTURE if rng.random() < 0.1 else 0
                    batch.append((key, rng.randbytes(rng.choice(sizes)), expiry))
            puts = [(k, v) for k, v, _ in batch if v is not None]
            words = sum(layout.chunk_words(len(k), len(v)) for k, v in puts)
            changes = [(k, -1 if v is None else len(v), x != 0) for k, v, x in batch]
            name, claimed = t.name, ops.claimed
            try:
                t.reserve(len(puts), words, (lambda: changes) if exact else None)
            except CacheFull as exc:
                assert "/dev/shm is full" in str(exc)
                refused += 1
                assert (t.name, ops.claimed) == (name, claimed)
                assert {k: v for k, _, v, _, _ in t.items()} == model  # nothing changed
                continue
            name, claimed = t.name, ops.claimed
            for k, v, x in batch:
                seqno += 1
                if v is None:
                    t.delete(k, seqno)
                    model.pop(k, None)
                else:
                    t.put(k, 0, v, seqno, x)
                    model[k] = v
            applied += 1
            assert (t.name, ops.claimed) == (name, claimed)  # no rebuild, no claim: nothing could fail
            assert {k: v for k, _, v, _, _ in t.items()} == model
        assert refused >= 3 and applied >= 10, (refused, applied)  # both sides were exercised
        for k, v in model.items():
            assert r.get(k) == (0, v)
    finally:
        r.close()
        t.close(unlink=True)


def test_a_full_dev_shm_still_takes_overwrites_reused_chunks_and_repeated_keys(namespace: str) -> None:
    """With /dev/shm full, reserve with the exact changes lets through what needs no new
    memory: an overwrite of the same size, a put into a chunk a delete freed, and a
    put_many repeating one key many times (which also does not grow the table)."""
    from walcache.shm.writer import FaultyShmOps

    ops = FaultyShmOps(limit=1 << 20)
    t = ShmTable.create(namespace, capacity=16, data_bytes=4096, shmops=ops)
    try:
        value = b"v" * 1000
        nw = layout.chunk_words(4, len(value))
        seqno = 0
        with pytest.raises(CacheFull):
            for i in range(10_000):  # until /dev/shm is full
                key = b"k%03d" % i
                t.reserve(1, nw, lambda: [(key, len(value), False)])
                seqno += 1
                t.put(key, 0, value, seqno, 0)
        n = len(t)
        assert n > 100
        name, claimed = t.name, ops.claimed
        # A new key of the same size is refused, an overwrite is not.
        with pytest.raises(CacheFull, match="/dev/shm is full"):
            t.reserve(1, nw, lambda: [(b"new!", len(value), False)])
        t.reserve(1, nw, lambda: [(b"k000", len(value), False)])
        seqno += 1
        t.put(b"k000", 0, b"w" * 1000, seqno, 0)
        # A put_many of one key a million times: one in-place chunk at most.
        t.reserve(10**6, 10**6 * nw, lambda: [(b"k001", len(value), False)] * 10**6)
        # Deleting two keys frees two chunks of that size: two new keys fit, a third does not.
        for key in (b"k002", b"k003"):
            seqno += 1
            t.delete(key, seqno)
        fresh = [(b"n%03d" % i, len(value), False) for i in range(3)]
        t.reserve(2, 2 * nw, lambda: fresh[:2])
        with pytest.raises(CacheFull):
            t.reserve(3, 3 * nw, lambda: fresh)
        for i in range(2):
            seqno += 1
            t.put(b"n%03d" % i, 0, value, seqno, 0)
        assert (t.name, ops.claimed) == (name, claimed)  # nothing rebuilt, nothing claimed
        assert len(t) == n and t.lookup(b"k000") is not None and t.lookup(b"n001") is not None
    finally:
        t.close(unlink=True)


def test_a_segment_over_the_layout_limit_is_refused(namespace: str) -> None:
    with pytest.raises(CacheFull, match="limit"):
        ShmTable.create(namespace, data_bytes=layout.MAX_SEGMENT_BYTES)
    assert segments_of(namespace) == []


def test_header_reports_writer_liveness_heartbeat_and_close(table: ShmTable, reader: ShmReader) -> None:
    hdr = reader.header()
    assert hdr["writer_pid"] == os.getpid() and hdr["writer_alive"] == 1
    assert hdr["closed"] == 0 and hdr["stale"] == 0 and hdr["layout_version"] == layout.LAYOUT_VERSION
    before = int(hdr["heartbeat_ms"])
    time.sleep(0.01)
    table.heartbeat()
    assert int(reader.header()["heartbeat_ms"]) > before
    put(table, "k", "v")
    table.mark_closed()
    assert reader.header()["closed"] == 1
    assert reader.lookup("k") == "v"  # readers keep reading a closed table


def test_iter_entries_and_items_agree(table: ShmTable, reader: ShmReader) -> None:
    for i in range(30):
        put(table, i, i, seqno=100 + i, expiry_ms=FUTURE if i % 3 else 0)
    table.delete(encode_key(4), 200)
    expected = {(encode_key(i), 0, encode_value(i)[1], 100 + i, FUTURE if i % 3 else 0) for i in range(30) if i != 4}
    assert set(reader.iter_entries()) == expected
    assert set(table.items()) == expected


def test_iter_entries_follows_the_table_when_it_moves(table: ShmTable, reader: ShmReader) -> None:
    for i in range(5):
        put(table, i, i)
    it = reader.iter_entries()
    first = next(it)
    for i in range(5, 100):
        put(table, i, i)  # forces growth: the scan meets MOVED
    rest = list(it)
    keys = [first[0]] + [e[0] for e in rest]
    assert len(keys) == len(set(keys))
    assert set(keys) == {encode_key(i) for i in range(100)}


def test_a_get_that_remaps_in_the_middle_of_a_scan(table: ShmTable, reader: ShmReader) -> None:
    for i in range(5):
        put(table, i, i)
    it = reader.iter_entries()
    seen = [next(it)[0]]
    for i in range(5, 100):
        put(table, i, i)
    assert len(reader) == 100  # len() notices the stale table and remaps
    assert reader.lookup(99) == 99
    seen += [e[0] for e in it]
    assert sorted(seen) == sorted(encode_key(i) for i in range(100))


def test_get_many_returns_present_keys_only(table: ShmTable, reader: ShmReader) -> None:
    put(table, "a", 1)
    put(table, b"b", None)
    assert reader.get_many(["a", b"b", "c"]) == {"a": 1, b"b": None}


def test_lock_free_reads_are_offered_on_x86_64_only(table: ShmTable, reader: ShmReader) -> None:
    assert reader.lock_free_ok == (platform.machine().lower() in ("x86_64", "amd64"))
    assert layout.LOCK_FREE_OK == reader.lock_free_ok


def test_keys_and_values_over_the_layout_limits_are_refused(table: ShmTable) -> None:
    from walcache import KeyTooLarge

    with pytest.raises(KeyTooLarge):
        table.put(b"s" + b"x" * layout.MAX_KEY_BYTES, 1, b"", 1, 0)
    with pytest.raises(KeyTooLarge):
        table.put(b"", 1, b"", 1, 0)


class _OddWhileWritten:
    """A struct of the control segment whose every pack_into into the live segment (a publish)
    checks that the seq word is odd first and that the pack does not cover it: CPython's
    pack_into zeroes all it covers before packing, and a seq zeroed for a moment reads even."""

    def __init__(self, real: Any, checks: list[int]) -> None:
        self.real = real
        self.checks = checks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def pack_into(self, buf: Any, off: int, *fields: Any) -> None:
        words = memoryview(buf).cast("Q")
        if words[C_GENERATION]:  # a published segment (a fresh one is packed before anyone maps it)
            assert words[C_SEQ] & 1, f"control fields rewritten while its seq is even ({words[C_SEQ]})"
            assert off >= 8 * (C_SEQ + 1), f"a pack at byte {off} covers the seq word (it zeroes it first)"
            self.checks.append(off)
        self.real.pack_into(buf, off, *fields)


def test_every_publish_rewrites_the_control_segment_under_an_odd_seq(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish rewrites the control segment's fields (segment name, sizes) in place; a reader
    tells a torn rewrite by an odd seq, so the seq must be odd before the first field changes
    and stay odd until the last (a pack over the seq word zeroed it: a reader running
    test_threads_c under ASan once took the zeroed name for "no table yet"). Publishes are too
    rare and too quick for the torture tests to catch this; spies on the table's own structs
    check every rewrite."""
    checks: list[int] = []
    monkeypatch.setattr(writer_mod, "CTL_STRUCT", _OddWhileWritten(CTL_STRUCT, checks))
    monkeypatch.setattr(writer_mod, "CTL_TAIL", _OddWhileWritten(CTL_TAIL, checks))
    t = ShmTable.create(namespace, capacity=8, data_bytes=4096)
    t.put(b"sk", 2, b"v", 1, 0)
    t.publish()
    for i in range(200):  # growth publishes new segments
        t.put(b"sk%d" % i, 2, b"v" * 100, i + 2, 0)
    assert len(checks) >= 3
    r = ShmReader(namespace)
    assert r.get(b"sk199") == (2, b"v" * 100)
    r.close()
    t.close(unlink=True)


def _readers(namespace: str) -> list[Any]:
    """Both readers where the extension is built (the growth must be invisible to each)."""
    from walcache.shm.creader import CReader, extension

    return [ShmReader(namespace)] + ([CReader(namespace)] if extension is not None else [])


def test_with_a_memory_limit_the_data_area_grows_in_place(namespace: str) -> None:
    """With --max-memory the segment reserves room (sparse) for twice that much data, so
    growing the data area is a pointer move, not a rebuild that copies the table and
    stops every write: same segment, no rebuild, readers keep their mapping and read it
    all, and only the pages used are committed."""
    t = ShmTable.create(namespace, capacity=4000, data_bytes=64 << 10, max_memory=16 << 20)
    t.publish()
    readers = _readers(namespace)
    try:
        name = t.name
        st = t.stats()
        assert 64 << 10 <= st["data_bytes"] < (64 << 10) + 8192 and st["reserve_bytes"] > 31 << 20
        for i in range(3000):  # about 1.5 MB of records: the 64 KiB area doubles 5 times
            put(t, i, b"x" * 500, seqno=i + 1)
            if i % 500 == 0:
                for r in readers:
                    assert r.lookup(i) == b"x" * 500
        st = t.stats()
        assert t.name == name and st["rebuilds"] == 0
        assert (1 << 20) < st["data_bytes"] <= 8 << 20 and st["committed_bytes"] < 4 << 20
        for r in readers:
            assert all(r.lookup(i) == b"x" * 500 for i in range(3000))
            assert r.header()["name"] == name
    finally:
        for r in readers:
            r.close()
        t.close(unlink=True)


def test_with_a_memory_limit_dead_chunks_are_still_compacted(namespace: str) -> None:
    """Growing in place only replaces the rebuilds that would double the area: when most of
    it is dead chunks (every round a new value size, so the free lists never serve one),
    the table still rebuilds to compact it, and the area stays within a few times the
    live data instead of taking the whole reserve."""
    t = ShmTable.create(namespace, capacity=64, data_bytes=4096, max_memory=16 << 20)
    t.publish()
    try:
        seqno = 0
        for rnd in range(200):
            for i in range(40):
                seqno += 1
                put(t, i, b"v" * (8 * rnd + 8), seqno=seqno)
        st = t.stats()
        assert st["rebuilds"] >= 1
        assert int(st["data_bytes"]) <= 4 * int(st["used_bytes"]) + 4096
        assert st["reserve_bytes"] > 30 << 20
    finally:
        t.close(unlink=True)


def _burst_then_churn(namespace: str, limit: int | None) -> int:
    """A burst of new keys, deleted again, then churn with a new value size each round:
    the data area the table ends with."""
    t = ShmTable.create(namespace, capacity=4000, data_bytes=8 << 20, max_memory=limit)
    t.publish()
    seqno = 0

    def put_(k: int, n: int) -> None:
        nonlocal seqno
        seqno += 1
        t.put(b"k%06d" % k, 1, b"x" * n, seqno, 0)

    try:
        for k in range(500):
            put_(k, 10_000)
        for k in range(500):
            put_(k, 10_008)  # another chunk size: the first chunks are dead
        for k in range(1000, 1470):
            put_(k, 15_000)  # a burst of new keys
        for k in range(1000, 1470):
            seqno += 1
            t.delete(b"k%06d" % k, seqno)
        for r in range(30):
            for k in range(500):
                put_(k, 10_016 + 8 * r)
        return int(t.stats()["data_bytes"])
    finally:
        t.close(unlink=True)


def test_a_burst_then_drifting_churn_takes_no_more_room_with_a_memory_limit(namespace: str) -> None:
    """Growing in place must not keep dead chunks that a rebuild would have compacted: the
    same writes end with the same data area with a memory limit as without one (a review
    found it doubled: the growth kept the dead chunks, so the area filled again sooner)."""
    without = _burst_then_churn(namespace + "a", None)
    with_limit = _burst_then_churn(namespace + "b", 1 << 30)
    assert with_limit <= without, (with_limit, without)


# ---------------------------------------------------------------- index moves


def _moved_table(namespace: str, **kw: Any) -> ShmTable:
    t = ShmTable.create(namespace, capacity=8, data_bytes=1 << 20, max_memory=64 << 20, **kw)
    t.publish()
    return t


def test_with_a_reserve_the_index_grows_by_moving_and_readers_follow_it(namespace: str) -> None:
    """The index grows by moving to the top of the reserve (layout.py "Index moves"): no
    record is copied, the segment stays, readers opened before every move find every key
    (they meet MOVED in the old index, reread the index word, probe the new one), and
    each old index is left all MOVED while the segment is not stale."""
    t = _moved_table(namespace)
    readers = _readers(namespace)
    try:
        name = t.name
        first = int(t.stats()["capacity"])
        seen: list[tuple[int, int]] = []  # (slot0, capacity) of every index the table had
        for i in range(5000):
            put(t, i, b"v%d" % i, seqno=i + 1)
            seg = t._seg
            assert seg is not None
            if not seen or seen[-1] != (seg.slot0, seg.capacity):
                seen.append((seg.slot0, seg.capacity))
                for r in readers:  # a get right after a move takes the new index
                    assert r.lookup(i) == b"v%d" % i and r.lookup(0) == b"v0"
        st = t.stats()
        assert t.name == name and st["rebuilds"] == 0 and st["index_moves"] == len(seen) - 1 >= 3
        assert st["capacity"] > first and st["last_index_move"]["slots"] == st["capacity"]
        assert st["retired_index_bytes"] == 8 * sum(cap for _, cap in seen[:-1])
        seg = t._seg
        assert seg is not None
        # Each index lies below the previous one, above the data area; all but the last are MOVED.
        assert seen[0][0] == layout.HEADER_SIZE // 8
        for (s_prev, _), (s_next, cap) in zip(seen[1:], seen[2:]):
            assert s_next + cap <= s_prev
        assert seen[-1][0] >= seg.limit >= seg.top
        for slot0, cap in seen[:-1]:
            assert set(seg.q[slot0 : slot0 + cap].tolist()) == {layout.MOVED}
        assert seg.q[layout.H_INDEX] == layout.index_word(seg.slot0, seg.capacity)
        for r in readers:
            hdr = r.header()
            assert hdr["name"] == name and hdr["stale"] == 0 and hdr["capacity"] == st["capacity"]
            assert all(r.lookup(i) == b"v%d" % i for i in range(5000))
            assert sorted(k for k, *_ in r.iter_entries()) == sorted(encode_key(i) for i in range(5000))
    finally:
        for r in readers:
            r.close()
        t.close(unlink=True)


def test_a_reader_that_slept_through_several_moves_catches_up(namespace: str) -> None:
    t = _moved_table(namespace)
    put(t, "early", "e")
    readers = _readers(namespace)
    try:
        for i in range(3000):
            put(t, i, i, seqno=i + 2)
        assert t.index_moves >= 2
        for r in readers:
            assert r.lookup("early") == "e" and r.lookup(2999) == 2999 and r.lookup("absent") is None
    finally:
        for r in readers:
            r.close()
        t.close(unlink=True)


def test_without_a_reserve_the_index_grows_by_rebuilding(namespace: str) -> None:
    t = ShmTable.create(namespace, capacity=8, data_bytes=1 << 20, max_memory=64 << 20, data_reserve=0)
    t.publish()
    try:
        for i in range(500):
            put(t, i, i, seqno=i + 1)
        st = t.stats()
        assert st["index_moves"] == 0 and st["rebuilds"] >= 2 and st["capacity"] >= 500 / MAX_LOAD
    finally:
        t.close(unlink=True)


def test_tombstones_clear_by_moves_until_retired_indexes_are_worth_a_rebuild(namespace: str) -> None:
    """Deletes fill the index with tombstones: a move of the same size clears them. Each
    retired index stays (a reader may still probe it) and counts as waste, so after a few
    a rebuild reclaims them all instead of the reserve filling with dead indexes."""
    t = ShmTable.create(namespace, capacity=3000, data_bytes=1 << 20, max_memory=64 << 20)
    t.publish()
    r = ShmReader(namespace)
    try:
        seqno = 0
        for rnd in range(40):
            for i in range(1000):
                seqno += 1
                put(t, f"{rnd}-{i}", b"x" * 40, seqno=seqno)  # same size: chunks are reused
            for i in range(1000):
                seqno += 1
                t.delete(encode_key(f"{rnd}-{i}"), seqno)
            put(t, "keep", rnd, seqno=seqno + 1)
            seqno += 1
            assert r.lookup("keep") == rnd
        st = t.stats()
        assert st["index_moves"] >= 2 and st["rebuilds"] >= 1, {k: st[k] for k in ("index_moves", "rebuilds", "capacity", "data_bytes")}
        seg = t._seg
        assert seg is not None
        assert seg.retired_index_words <= seg.data_words // 4  # what a move may leave
    finally:
        r.close()
        t.close(unlink=True)


def test_a_full_dev_shm_refuses_an_index_move_whole(namespace: str) -> None:
    """The new index's pages are claimed before anything changes: a full /dev/shm fails the
    reserve with CacheFull and leaves the index, the keys and the readers as they were."""
    ops = writer_mod.FaultyShmOps(limit=1 << 60)
    t = ShmTable.create(namespace, capacity=8, data_bytes=1 << 20, max_memory=64 << 20, shmops=ops)
    t.publish()
    r = ShmReader(namespace)
    try:
        n = 0
        while t._live + t._tombstones + 1 <= int(t.stats()["capacity"]) * MAX_LOAD:
            put(t, n, n, seqno=n + 1)
            n += 1
        before = (t._seg.slot0, t._seg.capacity) if t._seg else None
        ops.limit = ops.claimed  # nothing more can be claimed
        with pytest.raises(CacheFull, match="larger index"):
            t.reserve(1, 8)
        assert t._seg is not None and (t._seg.slot0, t._seg.capacity) == before and t.index_moves == 0
        assert all(r.lookup(i) == i for i in range(n))
        ops.limit = 1 << 60
        t.reserve(1, 8)
        put(t, n, n, seqno=n + 1)
        assert t.index_moves == 1 and all(r.lookup(i) == i for i in range(n + 1))
    finally:
        r.close()
        t.close(unlink=True)


def test_publishing_retires_a_previous_table_whose_index_moved(namespace: str) -> None:
    """A restart retires the previous daemon's segment by its CURRENT index (the header's
    index word), so readers still on it see MOVED there and move to the new table."""
    old = _moved_table(namespace)
    for i in range(1000):
        put(old, i, "old", seqno=i + 1)
    assert old.index_moves >= 1
    r = ShmReader(namespace)
    assert r.lookup(5) == "old"
    seg = old._seg
    assert seg is not None
    slot0, cap = seg.slot0, seg.capacity
    new = ShmTable.create(namespace, capacity=16)
    put(new, 5, "new")
    new.publish()
    try:
        assert seg.q[layout.H_STALE] == 1
        assert set(seg.q[slot0 : slot0 + cap].tolist()) == {layout.MOVED}
        assert r.lookup(5) == "new"
    finally:
        r.close()
        new.close(unlink=True)
        old.close(unlink=True)


def _keys_with_home(lo: int, hi: int, capacity: int, n: int, tag: str) -> list[str]:
    """``n`` str keys whose home slot in an index of ``capacity`` slots is in [lo, hi)."""
    out = []
    i = 0
    while len(out) < n:
        k = f"{tag}{i}"
        if lo <= layout.hash_key(encode_key(k)) & (capacity - 1) < hi:
            out.append(k)
        i += 1
    return out


def test_a_scan_restarts_when_the_index_moves_between_two_batches(namespace: str) -> None:
    """iter_entries reads the index in batches (the C reader: SCAN_BATCH slots per call). A
    move between two batches lays the slots out anew: the scan must start over, or a key
    that moved from the unscanned part to the scanned part is never yielded (a review
    found the C reader resumed at the same slot number in the new index)."""
    from walcache.shm.creader import CReader, extension

    kinds: list[Any] = [ShmReader] + ([CReader] if extension is not None else [])
    for n, kind in enumerate(kinds):
        t = ShmTable.create(f"{namespace}s{n}", capacity=4000, data_bytes=1 << 20, max_memory=64 << 20)
        try:
            t.publish()
            _scan_across_a_move(t, kind)
        finally:
            t.close(unlink=True)


def _scan_across_a_move(t: ShmTable, kind: Any) -> None:
    from walcache.shm.creader import SCAN_BATCH

    cap = int(t.stats()["capacity"])
    assert cap == 2 * SCAN_BATCH
    # A probe cluster straddling the batch boundary; deleting its first half leaves the
    # rest past the boundary, though their home slots are before it.
    cluster = _keys_with_home(SCAN_BATCH - 40, SCAN_BATCH, cap, 120, "c")
    seqno = 0
    for k in cluster:
        seqno += 1
        put(t, k, k, seqno=seqno)
    for k in cluster[:60]:
        seqno += 1
        t.delete(encode_key(k), seqno)
    early = _keys_with_home(0, 100, cap, 5, "e")  # so the first batch yields something
    for k in early:
        seqno += 1
        put(t, k, k, seqno=seqno)
    expected = {encode_key(k) for k in cluster[60:] + early}
    seg = t._seg
    assert seg is not None
    r = kind(t.namespace)
    try:
        scan = r.iter_entries()
        got = {next(scan)[0]}  # the first batch is read
        # Fillers inserted and deleted: tombstones until the index moves (same size), and
        # the survivors of the cluster go back before the boundary.
        moves = t.index_moves
        j = 0
        while t.index_moves == moves:
            seqno += 2
            put(t, f"f{j}", 0, seqno=seqno)
            t.delete(encode_key(f"f{j}"), seqno + 1)
            j += 1
        assert int(t.stats()["capacity"]) == cap
        back = [k for k in cluster[60:] if t._probe(seg, encode_key(k), layout.hash_key(encode_key(k)))[0] < SCAN_BATCH]
        assert back, "no key crossed the batch boundary: the test shows nothing"
        assert r.lookup("absent") is None  # meets MOVED: the reader takes the new index
        got |= {e[0] for e in scan}
        assert expected <= got, f"{kind.__name__} missed {len(expected - got)} keys"
    finally:
        r.close()


def test_a_restart_retires_every_index_of_a_writer_that_died_moving_one(namespace: str) -> None:
    """A writer killed between M2 and the end of M3 leaves part of the old index live.
    The next daemon retires the segment by every index it may have had (the first one
    and all moved ones), so a reader still probing the old one moves to the new table
    instead of answering from a dead one forever."""
    old = ShmTable.create(namespace, capacity=8, data_bytes=1 << 20, max_memory=64 << 20)
    old.publish()
    readers = _readers(namespace)  # they follow the first index
    try:
        seg = old._seg
        assert seg is not None
        before: list[int] = []
        n = 0
        while old.index_moves == 0:
            before = seg.slots.tolist()
            first = (seg.slot0, seg.capacity)
            put(old, n, "old", seqno=n + 1)
            n += 1
        # The kill: M2 stored, M3 not even begun (the first index still names every key).
        seg.q[first[0] : first[0] + first[1]] = memoryview(array.array("Q", before)).cast("B").cast("Q")
        for r in readers:
            assert r.lookup(0) == "old"
        new = ShmTable.create(namespace, capacity=16)
        for i in range(n):
            put(new, i, "new", seqno=i + 1)
        new.publish()
        try:
            assert set(seg.q[first[0] : first[0] + first[1]].tolist()) == {layout.MOVED}
            for r in readers:
                assert [r.lookup(i) for i in range(n)] == ["new"] * n
        finally:
            new.close(unlink=True)
    finally:
        for r in readers:
            r.close()
        old.close(unlink=True)


def test_publish_removes_segments_of_its_namespace_that_nothing_names(namespace: str) -> None:
    """A writer killed during a rebuild leaves a segment it never published: no control
    segment names it, so no reader can find it. The next publish removes it."""
    first = ShmTable.create(namespace, capacity=8)
    put(first, "k", "v1")
    first.publish()
    orphan = ShmTable.create(namespace, capacity=8)  # built, never published
    assert orphan._seg is not None
    orphan_name = orphan._seg.name
    orphan.close()
    assert os.path.exists("/dev/shm" + orphan_name)
    second = ShmTable.create(namespace, capacity=8)
    put(second, "k", "v2")
    second.publish()
    try:
        assert second._seg is not None
        assert segments_of(namespace) == ["/" + namespace.lstrip("/"), second._seg.name]  # control + current
        with ShmReader(namespace) as r:
            assert r.lookup("k") == "v2"
    finally:
        first.close()
        second.close(unlink=True)


@pytest.mark.parametrize("lost", ["control", "control+data", "data"])
def test_names_removed_from_dev_shm_are_restored_and_every_reader_follows(namespace: str, lost: str) -> None:
    """systemd-logind's RemoveIPC (or a hand-made cleanup) unlinks the table's files under a
    running writer: restore_names() puts them back, new readers attach again, and readers
    that mapped the old ones see every later write."""
    table = ShmTable.create(namespace, capacity=8)
    put(table, "k", "v1")
    table.publish()
    readers = _readers(namespace)
    try:
        assert table.restore_names() == ""  # nothing missing: nothing done
        assert table._seg is not None
        put(table, "other", 1)
        table.publish()  # generation 2: the restored control segment must not go back to 1
        before = table.generation
        if "control" in lost:
            os.unlink(SHM_DIR + layout.ctl_name(namespace))
        if "data" in lost:
            os.unlink(SHM_DIR + table._seg.name)
        restored = table.restore_names()
        assert restored == {"control": "control segment", "control+data": "control segment and data segment",
                            "data": "data segment"}[lost]  # fmt: skip
        assert table.restore_names() == ""
        assert table.generation > before  # generations only go up, in the new control segment too
        put(table, "k", "v2")
        put(table, "new", "n")
        for r in readers:
            assert (r.lookup("k"), r.lookup("new")) == ("v2", "n"), type(r).__name__
        with ShmReader(namespace) as late:  # a reader attaching after the removal
            assert (late.lookup("k"), late.lookup("new")) == ("v2", "n")
    finally:
        for r in readers:
            r.close()
        table.close(unlink=True)


def test_publish_removes_an_orphan_killed_before_its_header_was_written(namespace: str) -> None:
    """A segment is sized and committed before its header is written: a writer killed in
    between leaves zeros where the header goes. It is this writer's kind, unfinished."""
    import posix_ipc

    first = ShmTable.create(namespace, capacity=8)
    first.publish()
    name = "/" + namespace.lstrip("/") + ".00000000deadbeef.9"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=1 << 16)
    shm.close_fd()
    second = ShmTable.create(namespace, capacity=8)
    second.publish()
    try:
        assert second._seg is not None
        assert segments_of(namespace) == ["/" + namespace.lstrip("/"), second._seg.name]
    finally:
        first.close()
        second.close(unlink=True)
