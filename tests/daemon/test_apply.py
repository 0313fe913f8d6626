"""The one apply path: an Applier's one-op fast path changes the state exactly as apply_ops does."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from walcache.daemon.apply import Applier, DictTable, apply_ops
from walcache.daemon.walformat import OP_DELETE, OP_PUT, Op
from walcache.daemon.walreader import read_log

from .bytesurgery import all_records, flip_byte
from .logmodel import FUTURE_MS, NOW_MS, PAST_MS, random_ops, write_log


class CountingApplier(Applier):
    """An Applier that counts which entry point each record came through."""

    def __init__(self, table: DictTable, now_ms: int) -> None:
        super().__init__(table, now_ms)
        self.calls = {"put": 0, "delete": 0, "ops": 0}
        self._inside = False  # __call__ applies its ops through put/delete: count the record once

    def __call__(self, seqno: int, ops: Sequence[Op]) -> int:
        self.calls["ops"] += 1
        self._inside = True
        try:
            return super().__call__(seqno, ops)
        finally:
            self._inside = False

    def put(self, seqno: int, key: bytes, vflag: int, value: bytes, expiry_ms: int) -> None:
        if not self._inside:
            self.calls["put"] += 1
        super().put(seqno, key, vflag, value, expiry_ms)

    def delete(self, seqno: int, key: bytes) -> int:
        if not self._inside:
            self.calls["delete"] += 1
        return super().delete(seqno, key)


@pytest.mark.parametrize("seed", range(5))
def test_one_op_entry_points_equal_apply_ops_on_a_one_op_record(seed: int) -> None:
    rng = random.Random(seed)
    by_ops, by_applier = DictTable(), DictTable()
    fast = Applier(by_applier, NOW_MS)
    for seqno in range(1, 2001):
        key = b"bk%d" % rng.randrange(20)
        if rng.random() < 0.3:
            want = apply_ops(by_ops, seqno, ((OP_DELETE, key, 0, b"", 0),), NOW_MS)
            assert fast.delete(seqno, key) == want, f"seed {seed} seqno {seqno}"
        else:
            # NOW_MS itself is the boundary: a value that expires at "now" has expired.
            expiry = rng.choice([0, PAST_MS, NOW_MS, NOW_MS + 1, FUTURE_MS])
            vflag, value = rng.randrange(3), rng.randbytes(rng.randrange(0, 30))
            apply_ops(by_ops, seqno, ((OP_PUT, key, vflag, value, expiry),), NOW_MS)
            fast.put(seqno, key, vflag, value, expiry)
        assert by_applier.entries == by_ops.entries, f"seed {seed} seqno {seqno}"


def test_calling_an_applier_is_apply_ops() -> None:
    rng = random.Random(7)
    by_ops, by_applier = DictTable(), DictTable()
    fast = Applier(by_applier, NOW_MS)
    for seqno in range(1, 500):
        ops = random_ops(rng)
        assert fast(seqno, ops) == apply_ops(by_ops, seqno, ops, NOW_MS)
    assert by_applier.entries == by_ops.entries


def _replay_both(data_dir: Path) -> tuple[DictTable, DictTable, CountingApplier, int, int]:
    by_ops, by_applier = DictTable(), DictTable()
    fast = CountingApplier(by_applier, NOW_MS)
    scan_ops = read_log(data_dir, lambda s, ops: apply_ops(by_ops, s, ops, NOW_MS))
    scan_fast = read_log(data_dir, fast)
    return by_ops, by_applier, fast, scan_ops.last_seqno, scan_fast.last_seqno


def test_replay_through_an_applier_takes_the_fast_path_and_builds_the_same_state(tmp_path: Path) -> None:
    rng = random.Random(11)
    records = [random_ops(rng) for _ in range(600)]
    write_log(tmp_path, records, group_sizes=[1, 5, 9], segment_bytes=8192)
    by_ops, by_applier, fast, last_ops, last_fast = _replay_both(tmp_path)
    assert last_ops == last_fast == 600
    assert by_applier.entries == by_ops.entries  # seqnos included
    single_puts = sum(1 for ops in records if len(ops) == 1 and ops[0][0] == OP_PUT)
    single_deletes = sum(1 for ops in records if len(ops) == 1 and ops[0][0] == OP_DELETE)
    assert single_puts and single_deletes and single_puts + single_deletes < len(records)
    assert fast.calls == {"put": single_puts, "delete": single_deletes,
                          "ops": len(records) - single_puts - single_deletes}


def test_replay_through_an_applier_stops_at_damage_like_apply_ops(tmp_path: Path) -> None:
    rng = random.Random(12)
    write_log(tmp_path, [random_ops(rng) for _ in range(200)], group_sizes=[3])
    target = all_records(tmp_path)[150]
    flip_byte(target.path, target.offset + 40)
    by_ops, by_applier, fast, last_ops, last_fast = _replay_both(tmp_path)
    assert last_ops == last_fast == 150
    assert by_applier.entries == by_ops.entries
    assert sum(fast.calls.values()) == 150
