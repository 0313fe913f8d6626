"""The shm reader unit tests, run against the compiled reader, plus the paths only it has.

The scenarios are the shm tests' own (imported, not copied): only the ``reader`` fixture
changes, so a behaviour the reference reader has and the C reader lacks fails here.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator

import pytest

from walcache import ReadContention, TableUnavailable
from walcache.codec import encode_key, encode_value
from walcache.shm import ShmTable, layout
from walcache.shm.creader import CReader

# The reference scenarios: each takes the `reader` fixture defined below.
from shm.test_table import (  # noqa: F401
    _start_child,
    put,
    table,
    test_a_fingerprint_match_of_another_key_is_not_a_hit,
    test_a_write_held_open_by_a_live_writer_raises_read_contention,
    test_data_area_growth_and_compaction,
    test_delete_says_whether_the_key_existed,
    test_expired_entries_read_as_missing,
    test_get_many_returns_present_keys_only,
    test_header_reports_writer_liveness_heartbeat_and_close,
    test_index_growth_moves_readers_to_a_new_segment,
    test_iter_entries_and_items_agree,
    test_iter_entries_follows_the_table_when_it_moves,
    test_overwrite_in_place_and_out_of_place,
    test_publishing_a_new_table_retires_the_previous_one,
    test_reader_returns_every_kind_of_key_and_value,
)

from .helpers import requires_c

pytestmark = requires_c


@pytest.fixture
def reader(table: ShmTable) -> Iterator[CReader]:
    r = CReader(table.namespace)
    yield r
    r.close()


def test_the_reader_under_test_is_the_compiled_one(reader: CReader) -> None:
    assert reader.kind == "c" and reader.lock_free_ok
    assert reader.header()["reader"] == "c"
    assert type(reader).lookup.__qualname__ == "Reader.lookup"  # the C method, no Python frame


def test_a_new_reader_finds_the_current_table(namespace: str, table: ShmTable) -> None:
    put(table, "k", 1)
    for i in range(100):
        put(table, i, i)  # grows a few times
    with CReader(namespace) as r:
        assert r.header()["name"] == table.name
        assert r._generation == table.generation
        assert r.lookup("k") == 1


def test_reads_go_on_after_the_writer_is_killed_and_move_to_the_next_table(namespace: str) -> None:
    p = _start_child(namespace, "serve")
    try:
        r = CReader(namespace)
        assert r.lookup(3) == "v3"
        os.kill(p.pid, 9)
        p.join(10)
        assert r.lookup(3) == "v3" and r.lookup(99) == "v99"
        assert r.header()["writer_alive"] == 0
        t = ShmTable.create(namespace)
        try:
            put(t, 3, "restarted")
            t.publish()
            assert r.lookup(3) == "restarted" and r.lookup(99) is None
            assert r.remaps == 1
        finally:
            t.close(unlink=True)
        r.close()
    finally:
        if p.is_alive():
            os.kill(p.pid, 9)
        p.join(10)


def test_a_writer_that_died_mid_write_makes_that_key_unavailable(namespace: str) -> None:
    p = _start_child(namespace, "die-mid-write")
    p.join(10)
    with CReader(namespace) as r:
        assert r.lookup(8) == "v8"  # other keys stay readable
        t0 = time.monotonic_ns()
        with pytest.raises(TableUnavailable, match="died in the middle of a write"):
            r.lookup(7)
        assert time.monotonic_ns() - t0 >= layout.RETRY_MIN_NS
        with pytest.raises(TableUnavailable):
            r.get(encode_key(7))
        with pytest.raises(TableUnavailable):
            r.get_many([8, 7])
        assert r.contended == 3 and r.retries >= 3 * layout.RETRY_MIN_TRIES


def test_contention_is_judged_after_count_and_time(table: ShmTable, reader: CReader) -> None:
    put(table, "k", "v")
    from shm.helpers import leave_write_open

    leave_write_open(table, encode_key("k"))
    for call in (lambda: reader.lookup("k"), lambda: reader.get(encode_key("k")), lambda: reader.contains(encode_key("k"))):
        before = reader.retries
        t0 = time.monotonic_ns()
        with pytest.raises(ReadContention):
            call()
        assert time.monotonic_ns() - t0 >= layout.RETRY_MIN_NS
        assert reader.retries - before >= layout.RETRY_MIN_TRIES


def test_close_with_unlink_leaves_a_mapped_reader_reading(namespace: str) -> None:
    t = ShmTable.create(namespace, capacity=4)
    t.publish()
    for i in range(200):
        put(t, i, i)
    r = CReader(namespace)
    t.close(unlink=True)
    assert r.lookup(5) == 5  # a mapped reader keeps its (now nameless) table
    r.close()
    with pytest.raises(TableUnavailable, match="closed"):
        r.lookup(5)
    r.close()  # idempotent


def test_get_many_follows_the_table_when_it_moves_mid_batch(table: ShmTable, reader: CReader) -> None:
    for i in range(5):
        put(table, i, i)
    assert reader.get_many(range(5)) == {i: i for i in range(5)}
    for i in range(5, 300):
        put(table, i, -i)  # several rebuilds: every old slot is MOVED
    keys = list(range(300)) + ["absent", b"absent"]
    expected = {i: i if i < 5 else -i for i in range(300)}
    assert reader.get_many(keys) == expected
    assert reader.get_many(iter(keys)) == expected  # any iterable
    assert reader.get_many([]) == {}
    assert reader.remaps >= 1


def test_lookup_accepts_the_codecs_key_types_and_refuses_the_rest(table: ShmTable, reader: CReader) -> None:
    class S(str):
        pass

    put(table, "sub", 1)
    put(table, b"ba", 2)
    put(table, 2**80, 3)
    put(table, -(2**63), 4)
    assert reader.lookup(S("sub")) == 1  # via walcache.codec.encode_key
    assert reader.lookup(bytearray(b"ba")) == 2
    assert reader.lookup(2**80) == 3 and reader.lookup(-(2**63)) == 4
    from walcache import InvalidKey

    with pytest.raises(InvalidKey):
        reader.lookup(True)
    with pytest.raises(InvalidKey):
        reader.lookup(1.5)
    with pytest.raises(InvalidKey):
        reader.get_many(["sub", None])
    with pytest.raises(TypeError):
        reader.get("not encoded")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        reader.lookup()  # type: ignore[call-arg]


def test_a_huge_value_and_keys_at_the_limit(table: ShmTable, reader: CReader) -> None:
    big = os.urandom(3 << 20)
    kb = b"b" + b"k" * (layout.MAX_KEY_BYTES - 1)
    table.put(kb, 1, big, 1, 0)
    table.put(encode_key("s"), 2, "é".encode() * 1000, 2, 0)
    assert reader.get(kb) == (1, big)
    assert reader.lookup(b"k" * (layout.MAX_KEY_BYTES - 1)) == big
    assert reader.lookup("s") == "é" * 1000
    assert reader.lookup(b"k" * layout.MAX_KEY_BYTES, "MISSING") == "MISSING"  # longer than any stored key


def test_a_corrupt_value_raises_table_unavailable_not_a_decoder_error(table: ShmTable, reader: CReader) -> None:
    table.put(encode_key("badutf8"), 2, b"\xff\xfe", 1, 0)
    table.put(encode_key("badmsgpack"), 0, b"\xc1", 2, 0)
    table.put(encode_key("badvflag"), 9, b"x", 3, 0)
    for key in ("badutf8", "badmsgpack"):
        with pytest.raises(TableUnavailable, match="undecodable"):
            reader.lookup(key)
        assert reader.get(encode_key(key)) is not None  # the raw bytes are fine
    with pytest.raises(TableUnavailable, match="unknown value encoding"):
        reader.lookup("badvflag")
    with pytest.raises(TableUnavailable, match="unknown value encoding"):
        reader.get(encode_key("badvflag"))


def test_get_entry_carries_seqno_and_expiry(table: ShmTable, reader: CReader) -> None:
    future = layout.now_ms() + 60_000
    table.put(encode_key("k"), 1, b"v", 42, future)
    assert reader._get_entry(encode_key("k")) == (1, b"v", 42, future)
    assert reader._get_entry(encode_key("x")) is None


def _fork_reader(namespace: str, q: multiprocessing.queues.Queue) -> None:  # type: ignore[type-arg]
    # The mapping survives fork unchanged: a reader inherited by a child keeps working.
    q.put(READER.lookup("k"))


READER: CReader


def test_a_reader_inherited_across_fork_keeps_reading(table: ShmTable, reader: CReader) -> None:
    global READER
    put(table, "k", "v")
    READER = reader
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fork_reader, args=(table.namespace, q))
    p.start()
    try:
        assert q.get(timeout=20) == "v"
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
