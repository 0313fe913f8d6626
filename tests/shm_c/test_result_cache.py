"""The compiled reader's result cache: a hot key is answered without probing or decoding,
and never with a version that is no longer the key's live record.

A key enters the cache on its second miss, so each scenario reads a key three times after
every change (the third read is one the cache can answer) and compares all of them with
what was written. The multi-process proof that no
read returns an older version than the writer had published is in test_torture_c.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from walcache.codec import encode_key
from walcache.shm import ShmTable
from walcache.shm.creader import CReader

from shm.test_table import put, table  # noqa: F401

from .helpers import requires_c

pytestmark = requires_c

MISSING = object()


@pytest.fixture
def reader(table: ShmTable) -> Iterator[CReader]:  # noqa: F811
    r = CReader(table.namespace)
    yield r
    r.close()


def _via_lookup(r: CReader, key: Any) -> Any:
    return r.lookup(key, MISSING)


def _via_get_many(r: CReader, key: Any) -> Any:
    return r.get_many([key]).get(key, MISSING)


READS = [pytest.param(_via_lookup, id="lookup"), pytest.param(_via_get_many, id="get_many")]


def _read_thrice(r: CReader, read: Callable[[CReader, Any], Any], key: Any) -> Any:
    got = [read(r, key) for _ in range(3)]
    assert got[0] == got[1] == got[2], (key, got)
    return got[2]


def test_a_repeated_get_is_answered_from_the_cache(table: ShmTable, reader: CReader) -> None:  # noqa: F811
    put(table, "k", b"v" * 40)
    first = reader.lookup("k")  # a miss: the key is marked
    a = reader.lookup("k")  # the second miss: it is admitted
    hits = reader.cache_hits
    b = reader.lookup("k")
    assert first == a == b == b"v" * 40
    assert first is not a  # a new object for each miss
    assert reader.cache_hits == hits + 1
    assert a is b  # the same immutable object, not a copy
    reader._use_cache = 0
    c = reader.lookup("k")
    assert c == a and c is not a and reader.cache_hits == hits + 1
    reader._use_cache = 1


@pytest.mark.parametrize("read", READS)
def test_every_change_of_a_cached_key_is_seen(table: ShmTable, reader: CReader, read: Callable[[CReader, Any], Any]) -> None:  # noqa: F811
    seqno = iter(range(1, 10_000))
    steps: list[tuple[str, Any]] = [
        ("first", b"a" * 40),
        ("same size: rewritten in place", b"b" * 40),
        ("another size: moved to a new chunk", b"c" * 300),
        ("back to the first size: the freed chunk is reused", b"d" * 40),
        ("a str", "text"),
        ("an int (msgpack)", 12345),
        ("None", None),
    ]
    hits = reader.cache_hits
    for what, value in steps:
        put(table, "k", value, next(seqno))
        assert _read_thrice(reader, read, "k") == value, what
    assert reader.cache_hits > hits, "the scenario never exercised the cache"
    table.delete(encode_key("k"), next(seqno))
    assert _read_thrice(reader, read, "k") is MISSING, "deleted"
    put(table, "k", b"e" * 40, next(seqno))  # reinserted: may land in the chunk just freed
    assert _read_thrice(reader, read, "k") == b"e" * 40, "reinserted"
    put(table, "k", b"f" * 40, next(seqno), expiry_ms=int(time.time() * 1000) + 150)
    assert _read_thrice(reader, read, "k") == b"f" * 40, "with a ttl"
    time.sleep(0.2)
    assert _read_thrice(reader, read, "k") is MISSING, "expired while cached"
    put(table, "k", b"g" * 40, next(seqno))
    assert _read_thrice(reader, read, "k") == b"g" * 40
    name = table.name
    for i in range(200):  # grow the index: a new segment; the old one goes stale, frozen
        put(table, f"fill-{i}", i, next(seqno))
    assert table.name != name
    put(table, "k", b"h" * 40, next(seqno))
    assert _read_thrice(reader, read, "k") == b"h" * 40, "after the table moved"


def test_mutable_values_are_never_shared_between_gets(table: ShmTable, reader: CReader) -> None:  # noqa: F811
    put(table, "list", [1, 2])
    put(table, "map", {"a": 1})
    hits = reader.cache_hits
    first = reader.lookup("list")
    first.append(3)
    assert reader.lookup("list") == [1, 2]
    m = reader.get_many(["map"])["map"]
    m["b"] = 2
    assert reader.get_many(["map"]) == {"map": {"a": 1}}
    assert reader.cache_hits == hits


def test_keys_that_only_differ_in_type_stay_apart(table: ShmTable, reader: CReader) -> None:  # noqa: F811
    # hash("1") == hash(b"1") in Python: the same cache set; the encoded key tells them apart.
    # An ASCII str and bytes are matched from the key object's own bytes, a non-ASCII str
    # and an int from their encoding: "é" and its UTF-8 bytes are two keys as well.
    model = {"1": "str one", b"1": b"bytes one", 1: "int one", "é": "str e", "é".encode(): b"bytes e"}
    for k, v in model.items():
        put(table, k, v)
    for _ in range(3):
        for k, v in model.items():
            assert reader.lookup(k) == v
        assert reader.get_many(list(model)) == model
    hits = reader.cache_hits
    for k, v in model.items():
        assert reader.lookup(k) == v
    assert reader.cache_hits == hits + len(model)  # every kind of key is answered by the cache


def test_big_values_and_long_keys_are_read_but_not_kept(table: ShmTable, reader: CReader) -> None:  # noqa: F811
    put(table, "big", b"x" * 5000)
    put(table, "k" * 100, b"long key")
    put(table, b"k" * 300, b"longer than the stack buffer")  # encoded on the heap
    hits = reader.cache_hits
    for _ in range(3):
        assert reader.lookup("big") == b"x" * 5000
        assert reader.lookup("k" * 100) == b"long key"
        assert reader.lookup(b"k" * 300) == b"longer than the stack buffer"
        assert reader.get_many(["big", "k" * 100, b"k" * 300, b"k" * 301]) == {
            "big": b"x" * 5000, "k" * 100: b"long key", b"k" * 300: b"longer than the stack buffer",
        }  # fmt: skip
    assert reader.cache_hits == hits


def test_a_str_subclass_key_reads_the_same_entry_without_the_cache(table: ShmTable, reader: CReader) -> None:  # noqa: F811
    class Name(str):
        pass

    put(table, "user", b"u" * 20)
    assert reader.lookup("user") == reader.lookup("user") == b"u" * 20
    hits = reader.cache_hits
    assert reader.lookup(Name("user")) == b"u" * 20
    assert reader.cache_hits == hits  # only exact str, bytes and int are served from it


def test_a_full_cache_answers_every_key_with_its_own_value(namespace: str) -> None:
    """About as many hot keys as the cache holds: both ways of many sets are taken, some
    sets overflow, keys of one batch share sets, hits in the second way reorder a set."""
    rng = random.Random(7)
    t = ShmTable.create(namespace, capacity=8192)
    try:
        model = {f"key-{i}": (b"%d" % i) * (1 + i % 5) for i in range(1500)}
        for seqno, (k, v) in enumerate(model.items(), 1):
            put(t, k, v, seqno)
        t.publish()
        r = CReader(namespace)
        try:
            keys = list(model)
            for _ in range(3):
                rng.shuffle(keys)
                for k in keys:
                    assert r.lookup(k) == model[k], k
                for i in range(0, len(keys), 64):
                    batch = keys[i : i + 64]
                    assert r.get_many(batch) == {k: model[k] for k in batch}
            assert r.cache_hits > len(keys) and r._cache_bypass == 0
        finally:
            r.close()
    finally:
        t.close(unlink=True)


def test_a_cache_that_does_not_pay_is_bypassed_for_a_while(namespace: str) -> None:
    """Keys read twice each and never again (a scan): every entry is evicted unused, so the
    cache is judged useless and skipped; reads stay right throughout and after."""
    t = ShmTable.create(namespace, capacity=32768)
    try:
        for i in range(12000):
            put(t, i, i * 3, i + 1)
        t.publish()
        r = CReader(namespace)
        try:
            for i in range(12000):
                assert r.lookup(i) == r.lookup(i) == i * 3  # the second miss stores it
            assert r.cache_hits == 0
            assert r._cache_bypass > 0, "a cache that only evicts unused entries was not bypassed"
            left = r._cache_bypass
            assert r.get_many([5, 6, 7]) == {5: 15, 6: 18, 7: 21}
            assert r.lookup(8) == 24 and r._cache_bypass == left - 4
        finally:
            r.close()
    finally:
        t.close(unlink=True)


def test_a_key_whose_eq_runs_python_cannot_pull_the_cache_from_under_get_many(
    table: ShmTable, reader: CReader  # noqa: F811
) -> None:
    """Inserting a cached answer into the result may compare the key with an equal one
    already there whose __eq__ is Python; here that __eq__ empties the cache (a remap
    would) while later keys of the same group were answered from it."""
    for k in ["a", "b"] + [f"f{i}" for i in range(31)]:
        put(table, k, b"v-" + k.encode())
    for _ in range(3):
        reader.lookup("a"), reader.lookup("b")  # admitted: both cached

    class Key(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            reader._detach()  # frees the result cache's entries
            return str.__eq__(self, other)

    # The first group (32 keys) ends with Key("a") in the dict; the second group's "a" and
    # "b" are answered by the cache, and inserting "a" runs Key.__eq__.
    keys: list[Any] = [Key("a")] + [f"f{i}" for i in range(31)] + ["a", "b"]
    try:
        got = reader.get_many(keys)
    except Exception as exc:  # noqa: BLE001 - a clean error is acceptable, a crash is not
        assert "closed" in str(exc), exc
    else:
        assert got["b"] == b"v-b" and got["a"] == b"v-a"
