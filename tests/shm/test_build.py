"""ShmTable.build: a table built in bulk from recovered state (daemon restart).

Everything here runs the pure-Python builder (``compiled=False``), the reference; the
compiled builder is held to it byte for byte in tests/shm_c/test_build_c.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from walcache import KeyTooLarge, ValueTooLarge
from walcache.codec import encode_key, encode_value
from walcache.shm import ShmReader, ShmTable, layout
from walcache.shm.creader import extension, extension_error
from walcache.shm.writer import MAX_LOAD, MIN_LOAD, _builder, _PyBuilder

from .helpers import check_value, make_value, segments_of, unlink_all
from .test_model import FUTURE, PAST, TableVsModel

Entry = tuple[bytes, int, bytes, int, int]


def entries_of(n: int, vlen: int = 100, first_seqno: int = 1) -> dict[bytes, tuple[int, bytes, int, int]]:
    """What DictTable.entries holds after replaying n puts of self-checking values."""
    return {encode_key(f"k{i:07d}"): (1, make_value(i, 1, vlen), first_seqno + i, 0) for i in range(n)}


def stats(t: ShmTable) -> dict[str, int]:
    """The table's numeric stats."""
    return {k: v for k, v in t.stats().items() if isinstance(v, int)}


@pytest.fixture
def reader_of() -> Iterator[Any]:
    opened: list[ShmReader] = []

    def open_(ns: str) -> ShmReader:
        r = ShmReader(ns)
        opened.append(r)
        return r

    yield open_
    for r in opened:
        r.close()


@pytest.mark.parametrize("form", ["dict", "list", "generator"])
def test_built_table_holds_exactly_the_entries(namespace: str, reader_of: Any, form: str) -> None:
    entries = entries_of(3000)
    source: Any = {
        "dict": entries,
        "list": [(k, *e) for k, e in entries.items()],
        "generator": ((k, *e) for k, e in entries.items()),
    }[form]
    table = ShmTable.build(namespace, source, compiled=False)
    try:
        table.publish()
        r = reader_of(namespace)
        for i, (k, e) in enumerate(entries.items()):
            got = r.get(k)
            assert got is not None and got[0] == 1 and check_value(i, got[1]) is None
            assert table.lookup(k) == e
        assert r.get(encode_key("absent")) is None
        assert set(r.iter_entries()) == {(k, *e) for k, e in entries.items()}
        used = sum(layout.footprint(len(k), len(e[1])) for k, e in entries.items())
        hdr = r.header()
        assert (len(r), hdr["tombstones"], hdr["used_bytes"], hdr["applied_seqno"]) == (3000, 0, used, 3000)
        st_ = stats(table)
        assert (st_["live"], st_["tombstones"], st_["used_bytes"], st_["free_list_bytes"]) == (3000, 0, used, 0)
        # Records lie back to back from the start of the data area: nothing else is allocated.
        assert st_["data_bytes"] - st_["unallocated_bytes"] == used - 3000 * layout.SLOT_SIZE
    finally:
        table.close(unlink=True)


def test_every_kind_of_key_and_value_reads_back(namespace: str, reader_of: Any) -> None:
    cases: dict[object, object] = {
        "str": "text é", b"bytes": b"\x00\xff", 7: 7, -12: [1, "a", None], "none": None,
        "dict": {"a": 1.5, 2: b"x"}, "empty": b"", "t": True, 10**30: "big", "k" * 300: "v" * 5000,
    }  # fmt: skip
    entries = {encode_key(k): (*encode_value(v), i + 1, 0) for i, (k, v) in enumerate(cases.items())}
    with ShmTable.build(namespace, entries, compiled=False) as table:
        table.publish()
        r = reader_of(namespace)
        for k, v in cases.items():
            assert r.lookup(k, "MISSING") == v
        assert r.lookup(b"str", "MISSING") == "MISSING"  # "str" and b"str" are two keys
    unlink_all(namespace)


def test_an_empty_table_can_be_built_and_grows_by_puts(namespace: str, reader_of: Any) -> None:
    with ShmTable.build(namespace, {}, compiled=False) as table:
        table.publish()
        assert table.stats()["capacity"] == layout.MIN_CAPACITY
        for i in range(200):
            table.put(encode_key(i), 1, make_value(i, 1, 40), i + 1, 0)
        r = reader_of(namespace)
        assert len(r) == 200
        assert all(check_value(i, r.get(encode_key(i))[1]) is None for i in range(200))
    unlink_all(namespace)


def test_expired_entries_are_left_out(namespace: str, reader_of: Any) -> None:
    entries = entries_of(10)
    keys = list(entries)
    for k in keys[:4]:
        vflag, value, seqno, _ = entries[k]
        entries[k] = (vflag, value, seqno, PAST)
    entries[keys[4]] = (*entries[keys[4]][:3], FUTURE)
    with ShmTable.build(namespace, entries, compiled=False) as table:
        table.publish()
        r = reader_of(namespace)
        assert len(r) == len(table) == 6
        assert [r.get(k) is not None for k in keys] == [False] * 4 + [True] * 6
        assert table.lookup(keys[4]) == entries[keys[4]]
        assert r.header()["used_bytes"] == sum(layout.footprint(len(k), len(entries[k][1])) for k in keys[4:])
    unlink_all(namespace)


@pytest.mark.parametrize(("given", "want"), [(0, 10), (5, 10), (99, 99)])
def test_applied_seqno_is_the_last_replayed_one(namespace: str, reader_of: Any, given: int, want: int) -> None:
    # A log whose last records were deletes leaves no entry with its last seqno (99 here).
    with ShmTable.build(namespace, entries_of(10), applied_seqno=given, compiled=False) as table:
        table.publish()
        assert table.stats()["applied_seqno"] == want
        assert reader_of(namespace).header()["applied_seqno"] == want
    unlink_all(namespace)


def test_a_repeated_key_is_refused_and_leaves_no_segment(namespace: str) -> None:
    entries: list[Entry] = [(k, *e) for k, e in entries_of(50).items()]
    entries.append((entries[17][0], 1, b"again", 999, 0))
    with pytest.raises(ValueError, match="given twice"):
        ShmTable.build(namespace, entries, compiled=False)
    assert segments_of(namespace) == []


BAD_ENTRIES: list[tuple[Entry, type[Exception]]] = [
    ((b"", 1, b"v", 1, 0), KeyTooLarge),
    ((b"k" * (layout.MAX_KEY_BYTES + 1), 1, b"v", 1, 0), KeyTooLarge),
    ((b"k", 256, b"v", 1, 0), ValueError),
    ((b"k", -1, b"v", 1, 0), ValueError),
    ((b"k", 1, b"v", -1, 0), ValueError),
    ((b"k", 1, b"v", 1 << 64, 0), ValueError),
    ((b"k", 1, b"v", 1, -5), ValueError),
    ((b"k", 1, b"v", 1, 1 << 56), ValueError),
    # Checked before the expiry is looked at: an expired entry that could never be put is still refused.
    ((b"", 1, b"v", 1, PAST), KeyTooLarge),
]


@pytest.mark.parametrize(("bad", "exc"), BAD_ENTRIES)
def test_entries_put_would_refuse_are_refused(namespace: str, bad: Entry, exc: type[Exception]) -> None:
    entries = [(k, *e) for k, e in entries_of(5).items()] + [bad]
    with pytest.raises(exc):
        ShmTable.build(namespace, entries, compiled=False)
    assert segments_of(namespace) == []
    if bad[3] >= 0 and bad[3] < 1 << 64:  # put leaves seqnos to its caller (the log assigns them)
        with ShmTable.create(namespace) as t, pytest.raises(exc):
            t.put(*bad)
        unlink_all(namespace)


def test_a_value_over_the_layout_limit_is_refused(namespace: str) -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return layout.MAX_VALUE_BYTES + 1

    with pytest.raises(ValueTooLarge):
        ShmTable.build(namespace, [(b"k", 1, Huge(b"x"), 1, 0)], compiled=False)
    assert segments_of(namespace) == []


def test_the_table_is_sized_like_a_rebuild_and_takes_puts_without_one(namespace: str, reader_of: Any) -> None:
    n = 1000
    with ShmTable.build(namespace, entries_of(n, vlen=64), compiled=False) as table:
        table.publish()
        s = stats(table)
        cap = s["capacity"]
        assert cap & (cap - 1) == 0 and n + 1 <= cap * MIN_LOAD < 2 * (n + 1)
        assert s["data_bytes"] >= 2 * (s["used_bytes"] - n * layout.SLOT_SIZE)
        name = table.name
        # As many new keys of the same size again fill the data area (up to the page the
        # segment size is rounded to): no rebuild.
        for i in range(n, 2 * n):
            table.put(encode_key(f"k{i:07d}"), 1, make_value(i, 1, 64), 10_000 + i, 0)
        assert table.name == name
        assert stats(table)["unallocated_bytes"] < 4096
        r = reader_of(namespace)
        assert len(r) == 2 * n
        assert all(check_value(i, r.get(encode_key(f"k{i:07d}"))[1]) is None for i in range(2 * n))
        # The index only grows once live + tombstone slots pass MAX_LOAD of it.
        assert 2 * n + 1 <= cap * MAX_LOAD
    unlink_all(namespace)


def test_capacity_and_data_bytes_are_minimums(namespace: str) -> None:
    with ShmTable.build(namespace, entries_of(10), capacity=10_000, data_bytes=1 << 22, compiled=False) as t:
        s = stats(t)
        assert s["capacity"] >= 10_000 / MAX_LOAD and s["data_bytes"] >= 1 << 22
        # Reserved, not committed: only the records' pages are.
        assert s["committed_bytes"] < 1 << 21
    unlink_all(namespace)


def test_freed_chunks_of_a_built_table_are_reused(namespace: str, reader_of: Any) -> None:
    entries = entries_of(400, vlen=48)
    keys = list(entries)
    with ShmTable.build(namespace, entries, compiled=False) as table:
        table.publish()
        before = stats(table)
        name = table.name
        for k in keys[::2]:
            assert table.delete(k, 1000)
        mid = stats(table)
        assert mid["tombstones"] == 200 and mid["free_list_bytes"] == 200 * layout.chunk_words(9, 48) * 8
        for j, k in enumerate(keys[::2]):
            table.put(k, 1, make_value(10_000 + j, 2, 48), 2000 + j, 0)
        after = stats(table)
        assert after["free_list_bytes"] == 0
        assert after["unallocated_bytes"] == before["unallocated_bytes"]
        assert table.name == name and after["live"] == 400
        r = reader_of(namespace)
        for i, k in enumerate(keys):
            want = 10_000 + i // 2 if i % 2 == 0 else i
            assert check_value(want, r.get(k)[1]) is None
        # Overwrite in place (same size) and out of place (another size).
        table.put(keys[1], 1, b"short", 3000, 0)
        table.put(keys[3], 1, make_value(3, 9, 48), 3001, 0)
        assert r.get(keys[1]) == (1, b"short") and check_value(3, r.get(keys[3])[1]) is None
    unlink_all(namespace)


def test_publishing_a_built_table_retires_the_one_before(namespace: str, reader_of: Any) -> None:
    old = ShmTable.create(namespace)
    old.put(b"\x02old", 1, b"v", 1, 0)
    old.publish()
    r = reader_of(namespace)
    assert r.get(b"\x02old") == (1, b"v")
    new = ShmTable.build(namespace, entries_of(5), compiled=False)
    new.publish()
    assert r.get(b"\x02old") is None and len(r) == 5
    assert segments_of(namespace) == sorted([layout.ctl_name(namespace), new.name])
    old.close()
    new.close(unlink=True)


def test_segments_are_private_unless_a_group_is_given(namespace: str) -> None:
    with ShmTable.build(namespace, entries_of(3), compiled=False) as t:
        assert os.stat(f"/dev/shm{t.name}").st_mode & 0o777 == 0o600
    unlink_all(namespace)
    with ShmTable.build(namespace, entries_of(3), gid=os.getgid(), compiled=False) as t:
        assert os.stat(f"/dev/shm{t.name}").st_mode & 0o777 == 0o640
    unlink_all(namespace)


def test_pure_python_is_chosen_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _builder(False) is None
    monkeypatch.setenv("WALCACHE_PURE_PYTHON", "1")
    assert _builder(None) is None


_NO_EXTENSION_CHILD = r'''
import sys

class NoCompiler:
    # An install without a C compiler: the extension module does not exist.
    def find_spec(self, name, path=None, target=None):
        if name == "walcache.shm._creader":
            raise ImportError("not built")
        return None

sys.meta_path.insert(0, NoCompiler())
from walcache.shm import ShmReader, ShmTable
from walcache.shm.creader import extension
from walcache.shm.writer import _builder

assert extension is None
assert _builder(None) is None
try:
    _builder(True)
except RuntimeError as exc:
    assert "unavailable" in str(exc)
else:
    raise AssertionError("compiled=True without the extension did not raise")
ns = sys.argv[1]
entries = {b"s%d" % i: (1, b"v%d" % i, i + 1, 0) for i in range(500)}
t = ShmTable.build(ns, entries, applied_seqno=900)
t.publish()
r = ShmReader(ns)
assert all(r.get(k) == (1, e[1]) for k, e in entries.items())
assert len(r) == 500 and r.header()["applied_seqno"] == 900
r.close()
t.close(unlink=True)
print("built without the extension")
'''


def test_build_works_without_the_compiled_extension(namespace: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _NO_EXTENSION_CHILD, namespace],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if k != "WALCACHE_PURE_PYTHON"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "built without the extension"


@pytest.mark.parametrize(
    "pure",
    ["1", pytest.param("0", marks=pytest.mark.skipif(extension is None, reason=f"not built: {extension_error}"))],
)
def test_publishing_marks_every_slot_of_the_retired_table_moved(
    namespace: str, reader_of: Any, monkeypatch: pytest.MonkeyPatch, pure: str
) -> None:
    # Both loops (Python, and the extension's when built) store MOVED slot by slot.
    monkeypatch.setenv("WALCACHE_PURE_PYTHON", pure)
    old = ShmTable.build(namespace, entries_of(700), compiled=False)
    old.publish()
    r = reader_of(namespace)
    assert len(r) == 700
    new = ShmTable.build(namespace, entries_of(10, first_seqno=5000), compiled=False)
    new.publish()
    seg = old._seg
    assert seg is not None
    assert seg.q[layout.H_STALE] == 1
    assert set(seg.slots.tolist()) == {layout.MOVED} and len(seg.slots) == seg.capacity
    # The records themselves are untouched: the old mapping stays a frozen copy.
    assert seg.q[seg.lo + layout.R_SEQNO] == 1
    assert len(r) == 10  # the reader met MOVED or stale and followed the new table
    old.close()
    new.close(unlink=True)


# -- the two builders' own guards (ShmTable.build never trips them; a caller's bug must) ----------

BUILDERS = [
    pytest.param(_PyBuilder(), id="python"),
    pytest.param(extension, id="c", marks=pytest.mark.skipif(extension is None, reason=f"not built: {extension_error}")),
]


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(
    ("capacity", "data_off", "data_words", "size"),
    [
        (7, 512, 10, 4096),  # not a power of two
        (4, 512, 10, 4096),  # under MIN_CAPACITY
        (8, 300, 10, 4096),  # index runs into the data area
        (8, 516, 10, 4096),  # data area not word-aligned
        (8, 512, 500, 4096),  # data area past the buffer
        (1 << 40, 512, 10, 4096),
    ],
)
def test_a_bad_geometry_is_refused_before_anything_is_written(
    builder: Any, capacity: int, data_off: int, data_words: int, size: int
) -> None:
    buf = bytearray(b"\xee" * size)
    with pytest.raises(ValueError, match="geometry"):
        builder.build_fill(buf, {b"k": (1, b"v", 1, 0)}, capacity, data_off, data_words, 0)
    assert buf == b"\xee" * size


@pytest.mark.parametrize("builder", BUILDERS)
def test_entries_that_grew_after_measuring_are_refused_not_written_past_the_end(builder: Any) -> None:
    entries = {encode_key(i): (1, b"x" * 50, i, 0) for i in range(100)}
    live, words, _ = builder.build_measure(entries, 0)
    entries[encode_key("late")] = (1, b"y" * 50, 1000, 0)
    data_off = 256 + 8 * 1024
    buf = bytearray(data_off + 8 * words + 64)
    guard = bytes(range(64))
    buf[-64:] = guard
    with pytest.raises(RuntimeError, match="changed"):
        builder.build_fill(buf, entries, 1024, data_off, words, 0)
    assert buf[-64:] == guard
    # With room for every entry, it writes them all and says so.
    del entries[encode_key("late")]
    assert builder.build_fill(buf, entries, 1024, data_off, words, 0) == (live, words, 99)


@pytest.mark.parametrize("builder", BUILDERS)
def test_an_index_with_no_room_left_is_refused(builder: Any) -> None:
    entries = {encode_key(i): (1, b"", i, 0) for i in range(8)}
    _, words, _ = builder.build_measure(entries, 0)
    buf = bytearray(256 + 64 + 8 * words)
    with pytest.raises(RuntimeError):
        builder.build_fill(buf, entries, 8, 320, words, 0)  # 8 keys cannot leave an EMPTY slot


# -- the writer model, on tables built in bulk ---------------------------------------------------

EXTRA_KEYS = st.binary(min_size=1, max_size=40).map(lambda b: b"\x01" + b)
BUILD_ENTRIES = st.dictionaries(
    EXTRA_KEYS,
    st.tuples(st.integers(0, 2), st.binary(max_size=200), st.integers(1, 1 << 40),
              st.sampled_from([0, 0, FUTURE, PAST])),
    max_size=60,
)  # fmt: skip


class BuiltTableVsModel(TableVsModel):
    """TableVsModel whose tables come from ShmTable.build: the first from a random state,
    every restart from the model. All of put, delete, purge and growth then run on them."""

    compiled: bool | None = False

    def _build_from_model(self) -> None:
        live = {k: e for k, e in self.model.items() if e[3] != PAST}
        new = ShmTable.build(self.ns, self.model, applied_seqno=self.seqno, compiled=self.compiled)
        assert new.stats()["applied_seqno"] == max([self.seqno, *(e[2] for e in live.values())])
        new.publish()
        self.table.close()
        self.table = new
        self.model = live
        self.segment = new.name

    @initialize(entries=BUILD_ENTRIES)
    def start_from_a_built_table(self, entries: dict[bytes, tuple[int, bytes, int, int]]) -> None:
        self.model = dict(entries)
        self.seqno = max([0, *(e[2] for e in entries.values())])
        self._build_from_model()

    @rule()
    def restart(self) -> None:
        self._build_from_model()

    @invariant()
    def every_model_key_reads_back(self) -> None:
        # The base invariants probe the fixed KEYS only; the built state has keys of its own.
        for k in self.model:
            expected = self._expected(k)
            assert self.reader.get(k) == expected
            e = self.model[k]
            assert self.table.lookup(k) == (None if expected is None else e)


BuiltTableVsModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_built_table_matches_dict_model = BuiltTableVsModel.TestCase

