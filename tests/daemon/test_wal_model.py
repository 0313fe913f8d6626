"""The log against a dict model: put, delete, batch, group, sync, reopen, crash (drop unsynced).

The invariant: whatever happens, reopening yields the state after some prefix
of the appended records, and that prefix holds at least every record that was
durable (fsync=always: every append that returned; otherwise every sync).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from walcache.daemon.apply import DictTable, apply_ops
from walcache.daemon.fileops import FaultyFileOps, SimulatedCrash
from walcache.daemon.walformat import OP_DELETE, OP_PUT, Op
from walcache.daemon.walwriter import WalWriter

from .logmodel import FUTURE_MS, NOW_MS, PAST_MS, Record, random_ops, recover, state_after

keys = st.sampled_from([b"ba", b"bb", b"bc", b"sd", b"i1"])
values = st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=700))  # some span sectors
expiries = st.sampled_from([0, 0, FUTURE_MS, PAST_MS])
put_ops = st.tuples(st.just(OP_PUT), keys, st.integers(0, 2), values, expiries)
delete_ops = st.tuples(st.just(OP_DELETE), keys, st.just(0), st.just(b""), st.just(0))
any_op = st.one_of(put_ops, delete_ops)


class WalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="walmodel-"))
        self.records: list[Record] = []  # appended, in order: the log if nothing crashes
        self.pending: list[tuple[int, tuple[Op, ...], bytes]] = []  # encoded, not yet appended
        self.durable = 0  # records that must survive anything
        self.policy = "always"
        self.fo = FaultyFileOps()
        self.writer: WalWriter | None = None
        self.live = DictTable()  # what the daemon publishes: applied after each append returns

    def teardown(self) -> None:
        if self.writer is not None and not self.writer.closed:
            try:
                self.writer.close()
            except BaseException:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def _open(self) -> None:
        """Start the 'process' again on the same machine (self.fo models disk and page cache)."""
        writer, report, table = recover(self.dir, fileops=self.fo, policy=self.policy, interval_ms=1,
                                        segment_bytes=4096)
        self.writer = writer
        k = report.last_seqno
        assert self.durable <= k <= len(self.records), (self.durable, k, len(self.records))
        assert table.snapshot() == state_after(self.records, k)
        self.records = self.records[:k]  # the recovered prefix is the truth from now on
        self.durable = k  # recovery synced it before handing the writer over
        self.live = table

    @initialize(policy=st.sampled_from(["always", "never", "interval"]), seed=st.integers(0, 2**16))
    def start(self, policy: str, seed: int) -> None:
        self.policy = policy
        self.fo = FaultyFileOps(seed=seed)
        self._open()

    def _encode(self, ops: tuple[Op, ...]) -> None:
        assert self.writer is not None
        seqno, data = self.writer.encode(ops)
        assert seqno == len(self.records) + len(self.pending) + 1
        self.pending.append((seqno, ops, data))

    @rule(op=any_op)
    def single(self, op: Op) -> None:
        self._encode((op,))

    @rule(ops=st.lists(any_op, min_size=2, max_size=5))
    def batch(self, ops: list[Op]) -> None:
        self._encode(tuple(ops))

    @precondition(lambda self: bool(self.pending))
    @rule()
    def append_group(self) -> None:
        assert self.writer is not None
        self.writer.append(b"".join(d for _, _, d in self.pending))
        for seqno, ops, _ in self.pending:
            self.records.append((seqno, ops))
            apply_ops(self.live, seqno, ops, NOW_MS)
        self.pending = []
        if self.policy == "always":
            self.durable = len(self.records)

    @rule(groups=st.lists(st.lists(st.lists(any_op, min_size=1, max_size=3), min_size=1, max_size=3),
                          min_size=2, max_size=6))
    def burst(self, groups: list[list[list[Op]]]) -> None:
        """A busy daemon: group after group appended back to back (records of a group may be batches)."""
        for group in groups:
            for ops in group:
                self._encode(tuple(ops))
            self.append_group()

    @rule()
    def sync(self) -> None:
        assert self.writer is not None
        self.writer.sync()
        self.durable = len(self.records)

    @rule()
    def reopen(self) -> None:
        """A clean shutdown: what was encoded but not appended is dropped, the rest is synced."""
        assert self.writer is not None
        self.pending = []
        self.writer.close()
        self.durable = len(self.records)
        self._open()
        assert len(self.records) == self.durable

    @rule()
    def kill(self) -> None:
        """SIGKILL: the page cache keeps every appended record, synced or not."""
        self.pending = []
        n = len(self.records)
        self.fo.kill()
        self._open()
        assert len(self.records) == n

    @rule(keep=st.sampled_from([0.0, 0.25, 0.75, 1.0]), seed=st.integers(0, 2**16))
    def crash(self, keep: float, seed: int) -> None:
        """Power cut: unsynced bytes go, or some of them."""
        self.pending = []
        self.fo.drop_unsynced(keep_fraction=keep, seed=seed)
        self._open()

    @precondition(lambda self: bool(self.pending))
    @rule(cut=st.integers(0, 2000), power=st.sampled_from([None, 0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
    def crash_mid_write(self, cut: int, power: float | None, seed: int) -> None:
        """The process dies `cut` bytes into a group write; then maybe the power goes too."""
        assert self.writer is not None
        self.fo.crash_after_bytes = self.fo.bytes_written + cut
        group = b"".join(d for _, _, d in self.pending)
        try:
            self.writer.append(group)
        except SimulatedCrash:
            pass
        self.fo.crash_after_bytes = None
        # The group may or may not have reached the file: it is a candidate suffix.
        self.records += [(s, ops) for s, ops, _ in self.pending]
        self.pending = []
        if power is None:
            self.fo.kill()
        else:
            self.fo.drop_unsynced(keep_fraction=power, seed=seed)
        self._open()

    @invariant()
    def published_state_is_the_model(self) -> None:
        assert self.live.snapshot() == state_after(self.records, len(self.records))


TestWalModel = WalMachine.TestCase
TestWalModel.settings = settings(
    max_examples=int(os.environ.get("WALCACHE_MODEL_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.stress
def test_random_crash_cycles_stress(tmp_path: Path) -> None:
    """Seeded random crash cycles for WALCACHE_STRESS_SECONDS (default 5); prints the failing seed."""
    budget = float(os.environ.get("WALCACHE_STRESS_SECONDS", "5"))
    base_seed = int(os.environ.get("WALCACHE_TEST_SEED", str(int(time.time()))))
    deadline = time.monotonic() + budget
    cycles = 0
    seed = base_seed
    while time.monotonic() < deadline:
        try:
            cycles += _crash_cycle(tmp_path / f"s{seed}", seed)
        except BaseException:
            print(f"failing seed: WALCACHE_TEST_SEED={seed}")
            raise
        shutil.rmtree(tmp_path / f"s{seed}", ignore_errors=True)
        seed += 1
    assert cycles > 0


def _crash_cycle(d: Path, seed: int) -> int:
    rng = random.Random(seed)
    policy = rng.choice(["always", "never", "interval"])
    records: list[Record] = []
    durable = 0
    cycles = 0
    for _ in range(rng.randrange(3, 10)):
        fo = FaultyFileOps(seed=rng.randrange(1 << 30))
        writer, report, table = recover(d, fileops=fo, policy=policy, interval_ms=1,
                                        segment_bytes=rng.choice([4096, 16384, 1 << 20]))
        k = report.last_seqno
        assert durable <= k <= len(records)
        assert table.snapshot() == state_after(records, k)
        records = records[:k]
        durable = k
        if rng.random() < 0.5:
            fo.crash_after_bytes = fo.bytes_written + rng.randrange(1, 200_000)
        try:
            for _ in range(rng.randrange(1, 300)):
                group = []
                for _ in range(rng.choice([1, 1, 4, 16, 64])):
                    ops = random_ops(rng)
                    seqno, data = writer.encode(ops)
                    group.append(data)
                    records.append((seqno, ops))
                writer.append(b"".join(group))
                if policy == "always":
                    durable = len(records)
                if rng.random() < 0.05:
                    writer.sync()
                    durable = len(records)
        except SimulatedCrash:
            pass
        fo.drop_unsynced(keep_fraction=rng.choice([0.0, 0.3, 0.9, 1.0]))
        cycles += 1
    return cycles
