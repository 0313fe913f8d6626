"""A hypothesis state machine: writer operations on ShmTable against a dict model,
read back through a separate ShmReader mapping (which must follow growth and restarts)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from walcache.codec import decode_value, encode_key, encode_value
from walcache.shm import ShmReader, ShmTable, layout

from .helpers import unique_namespace, unlink_all

PAST = 1  # expired since 1970
FUTURE = layout.now_ms() + 24 * 3_600_000
MISSING = object()

KEYS: list[Any] = ["a", b"a", 97, "b", -5, 2**70, "é" * 3, b"\x00" * 3, "k" * 120, b"z"]
VALUES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80),
    st.integers(-(2**63), 2**64 - 1),
    st.none(),
    st.lists(st.integers(-1000, 1000), max_size=4),
)


class TableVsModel(RuleBasedStateMachine):
    MAX_MEMORY: int | None = None  # a limit gives segments a reserve: the data area grows in place

    def __init__(self) -> None:
        super().__init__()
        self.ns = unique_namespace("model")
        # Tiny on purpose: puts keep growing the index and compacting the data area.
        self.table = self._new_table()
        self.table.publish()
        self.reader = ShmReader(self.ns)
        # encoded key -> (vflag, value bytes, seqno, expiry_ms): every stored entry, expired or not
        self.model: dict[bytes, tuple[int, bytes, int, int]] = {}
        self.seqno = 0
        self.segment = self.table.name

    def _new_table(self) -> ShmTable:
        return ShmTable.create(self.ns, capacity=2, data_bytes=1024, max_memory=self.MAX_MEMORY)

    def _next_seqno(self) -> int:
        self.seqno += 1
        return self.seqno

    def _after_write(self) -> None:
        if self.table.name != self.segment:
            # A rebuild copies live entries only: expired ones are gone.
            self.segment = self.table.name
            self.model = {k: e for k, e in self.model.items() if e[3] != PAST}

    @rule(key=st.sampled_from(KEYS), value=VALUES, expiry=st.sampled_from([0, 0, 0, PAST, FUTURE]))
    def put(self, key: Any, value: Any, expiry: int) -> None:
        kb = encode_key(key)
        vflag, vb = encode_value(value)
        seqno = self._next_seqno()
        self.table.put(kb, vflag, vb, seqno, expiry)
        self._after_write()  # a rebuild happens before the put it makes room for
        self.model[kb] = (vflag, vb, seqno, expiry)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: Any) -> None:
        kb = encode_key(key)
        entry = self.model.pop(kb, None)
        segment = self.table.name
        existed = self.table.delete(kb, self._next_seqno())
        assert existed == (entry is not None and entry[3] != PAST)
        assert self.table.name == segment  # deletes never rebuild

    @rule()
    def restart(self) -> None:
        """A new daemon: rebuild from the model (the log), publish, drop the old table."""
        new = self._new_table()
        live = {k: e for k, e in self.model.items() if e[3] != PAST}
        for kb, (vflag, vb, seqno, expiry) in live.items():
            new.put(kb, vflag, vb, seqno, expiry)
        new.publish()
        self.table.close()
        self.table = new
        self.model = live
        self.segment = new.name

    @rule()
    def purge_expired(self) -> None:
        expired = sum(1 for e in self.model.values() if e[3] == PAST)
        assert self.table.purge_expired(max_slots=1 << 20) == expired
        self.model = {k: e for k, e in self.model.items() if e[3] != PAST}

    @rule()
    def new_reader_sees_the_same(self) -> None:
        with ShmReader(self.ns) as other:
            for key in KEYS:
                assert other.get(encode_key(key)) == self._expected(encode_key(key))

    def _expected(self, kb: bytes) -> tuple[int, bytes] | None:
        e = self.model.get(kb)
        return None if e is None or e[3] == PAST else (e[0], e[1])

    @invariant()
    def reader_matches_model(self) -> None:
        for key in KEYS:
            kb = encode_key(key)
            expected = self._expected(kb)
            assert self.reader.get(kb) == expected, key
            assert self.reader.contains(kb) == (expected is not None)
            want = MISSING if expected is None else decode_value(*expected)
            assert self.reader.lookup(key, MISSING) == want, key
            e = self.model.get(kb)
            assert self.table.lookup(kb) == (None if expected is None or e is None else e)

    @invariant()
    def scans_and_counts_match_model(self) -> None:
        live = {(k, e[0], e[1], e[2], e[3]) for k, e in self.model.items() if e[3] != PAST}
        assert set(self.reader.iter_entries()) == live
        assert set(self.table.items()) == live
        assert len(self.table) == len(self.reader) == len(self.model)
        assert self.table.used_bytes == sum(layout.footprint(len(k), len(e[1])) for k, e in self.model.items())
        assert self.reader.header()["used_bytes"] == self.table.used_bytes

    def teardown(self) -> None:
        self.reader.close()
        self.table.close(unlink=True)
        unlink_all(self.ns)


TableVsModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_table_matches_dict_model = TableVsModel.TestCase


class TableVsModelWithReserve(TableVsModel):
    MAX_MEMORY = 1 << 20


TableVsModelWithReserve.TestCase.settings = TableVsModel.TestCase.settings
test_table_with_a_memory_limit_matches_dict_model = TableVsModelWithReserve.TestCase
