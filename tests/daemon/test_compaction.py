"""Compaction in one process: the numbered procedure, crashes after each step, recovery from snapshots.

The live state handed to ``compact`` is a model table (DictTable) kept exactly
as the daemon keeps the shared table: every record is applied after it is
appended. The shared-memory scan itself is tested in test_compaction_process.py
and end to end in tests/e2e/test_compaction_e2e.py.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from walcache import LogCorrupt
from walcache.daemon.apply import DictTable, apply_ops
from walcache.daemon.compaction import (
    COMPACT_LOCK_NAME,
    STEPS,
    CompactionResult,
    NothingToCompact,
    compact,
)
from walcache.daemon.fileops import FaultyFileOps, FileOps, SimulatedCrash
from walcache.daemon.recovery import RecoveryReport, check_log, open_log
from walcache.daemon.walformat import MANIFEST_NAME, OP_DELETE, OP_PUT, Op, segment_name, snapshot_name
from walcache.daemon.walwriter import WalWriter
from walcache.errors import StorageError

from .bytesurgery import dir_fingerprint, flip_byte, segments
from .logmodel import NOW_MS, Record, state_after

Entry = tuple[bytes, int, bytes, int, int]


# --------------------------------------------------------------------- helpers


class Log:
    """A writer plus the model table the daemon would keep: apply after append, as the daemon does."""

    def __init__(
        self, data_dir: Path, *, fileops: FileOps | None = None, now_ms: int = NOW_MS,
        also: Sequence[Any] = (), **kw: Any,
    ) -> None:
        self.data_dir = data_dir
        self.now_ms = now_ms
        self.table = DictTable()
        self.tables: list[Any] = [self.table, *also]  # e.g. a real ShmTable beside the model
        self.writer, self.report = open_log(
            data_dir, self._apply, fileops=fileops, segment_bytes=kw.pop("segment_bytes", 4096), **kw,
        )
        self.written: list[Record] = []
        self.first_seal = 0

    def _apply(self, seqno: int, ops: Sequence[Op]) -> None:
        for t in self.tables:
            apply_ops(t, seqno, ops, self.now_ms)

    def write(self, ops: Sequence[Op]) -> int:
        seqno, data = self.writer.encode(ops)
        self.writer.append(data)
        self._apply(seqno, ops)
        self.written.append((seqno, tuple(ops)))
        return seqno

    def put(self, key: bytes, value: bytes, expiry: int = 0) -> int:
        return self.write([(OP_PUT, key, 0, value, expiry)])

    def delete(self, key: bytes) -> int:
        return self.write([(OP_DELETE, key, 0, b"", 0)])

    def entries(self) -> Iterator[Entry]:
        """The table's entries as the shared table's scan yields them (read when reached)."""
        for key in list(self.table.entries):
            e = self.table.entries.get(key)
            if e is not None:
                yield key, e[0], e[1], e[2], e[3]

    def seal_and_compact(self, fileops: FileOps | None = None, **kw: Any) -> CompactionResult:
        k, s = self.writer.seal()
        return compact(self.data_dir, self.entries(), seal_seqno=s, next_segno=k + 1,
                       fileops=fileops, now_ms=kw.pop("now_ms", self.now_ms), **kw)

    def model(self) -> dict[bytes, tuple[int, bytes, int]]:
        return self.table.snapshot()


def reopen(data_dir: Path, now_ms: int = NOW_MS, **kw: Any) -> tuple[WalWriter, RecoveryReport, DictTable]:
    t = DictTable()
    writer, report = open_log(data_dir, lambda s, ops: apply_ops(t, s, ops, now_ms), segment_bytes=4096, **kw)
    return writer, report, t


def recovered_state(data_dir: Path, now_ms: int = NOW_MS) -> dict[bytes, tuple[int, bytes, int]]:
    writer, _, t = reopen(data_dir, now_ms)
    writer.close()
    return t.snapshot()


def overwrite_heavy(log: Log, rng: random.Random, n: int, nkeys: int = 40) -> None:
    """Every key rewritten many times, some deleted, a few batches."""
    for i in range(n):
        key = b"bk%d" % rng.randrange(nkeys)
        r = rng.random()
        if r < 0.15:
            log.delete(key)
        elif r < 0.25:
            log.write([(OP_PUT, b"bk%d" % rng.randrange(nkeys), 1, b"b%d-%d" % (i, j), 0) for j in range(3)])
        else:
            log.put(key, b"v%d-" % i + rng.randbytes(rng.randrange(10, 60)))


def file_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------- seal


def test_seal_names_the_segments_that_hold_exactly_the_records_up_to_the_seal(tmp_path: Path) -> None:
    log = Log(tmp_path)
    assert log.writer.seal() == (0, 0)  # nothing to seal; nothing rotated
    assert len(segments(tmp_path)) == 1
    for i in range(5):
        log.put(b"bk%d" % i, b"v")
    assert log.writer.seal() == (1, 5)
    assert [p.name for p in segments(tmp_path)] == [segment_name(1), segment_name(2)]
    # The current segment is empty: sealing again rotates nothing and still says "segments <= 1".
    assert log.writer.seal() == (1, 5)
    assert len(segments(tmp_path)) == 2
    log.put(b"bk9", b"w")
    assert log.writer.seal() == (2, 6)
    log.writer.close()


# --------------------------------------------------------------------- the procedure


def test_compaction_keeps_the_state_and_removes_what_the_snapshot_covers(tmp_path: Path) -> None:
    rng = random.Random(1)
    log = Log(tmp_path)
    overwrite_heavy(log, rng, 400)
    k, s = log.writer.seal()
    sealed = [p for p in segments(tmp_path)][:-1]
    assert len(sealed) == k > 5
    before = sum(p.stat().st_size for p in sealed)
    res = compact(tmp_path, log.entries(), seal_seqno=s, next_segno=k + 1, now_ms=NOW_MS)
    k1 = res.next_segno
    assert res.entries == len(log.model()) and res.newer == 0
    assert file_names(tmp_path) == sorted([MANIFEST_NAME, snapshot_name(res.seal_seqno), segment_name(k1)])
    assert res.removed == [segment_name(n) for n in range(1, k1)]
    assert res.removed_bytes == before and res.reclaimed_bytes > 0
    assert recovered_state(tmp_path) == log.model()
    # Writes go on after the seal, and a second compaction folds the first snapshot in.
    overwrite_heavy(log, rng, 300)
    res2 = log.seal_and_compact()
    assert snapshot_name(res.seal_seqno) in res2.removed
    assert recovered_state(tmp_path) == log.model()
    writer, report, table = reopen(tmp_path)
    assert report.snapshot is not None and report.snapshot.seal_seqno == res2.seal_seqno
    assert report.first_seqno == res2.seal_seqno + 1 and report.last_seqno == log.written[-1][0]
    # A restarted log goes on with the next seqno, and compacts again.
    seqno, data = writer.encode([(OP_PUT, b"bafter", 0, b"x", 0)])
    assert seqno == log.written[-1][0] + 1
    writer.append(data)
    writer.close()
    log.writer.close()


def test_deleted_keys_stay_deleted_and_expired_keys_do_not_come_back(tmp_path: Path) -> None:
    t0 = NOW_MS
    log = Log(tmp_path, now_ms=t0)
    for i in range(10):
        log.put(b"bk%d" % i, b"old%d" % i)
    log.delete(b"bk2")
    log.put(b"bk3", b"brief", expiry=t0 + 1000)
    log.write([(OP_DELETE, b"bk4", 0, b"", 0), (OP_PUT, b"bk5", 0, b"new5", 0)])
    later = t0 + 5000  # bk3 has expired by the time the compactor runs
    res = log.seal_and_compact(now_ms=later)
    assert (res.entries, res.expired) == (7, 1)
    snap = (tmp_path / snapshot_name(res.seal_seqno)).read_bytes()
    for gone in (b"bk2", b"bk3", b"bk4", b"brief", b"old2", b"old4"):
        assert gone not in snap  # no tombstones, no dead values
    state = recovered_state(tmp_path, later)
    assert set(state) == {b"bk0", b"bk1", b"bk5", b"bk6", b"bk7", b"bk8", b"bk9"}
    assert state[b"bk5"] == (0, b"new5", 0)
    # And after more writes, another compaction and a restart: still gone.
    log.put(b"bk6", b"six")
    log.seal_and_compact(now_ms=later)
    state = recovered_state(tmp_path, later)
    assert b"bk2" not in state and b"bk3" not in state and b"bk4" not in state and state[b"bk6"][1] == b"six"
    log.writer.close()


def _racing_scan(log: Log, at: int, race: Callable[[], None]) -> Iterator[Entry]:
    """Yield the table's entries one key at a time (as the shm scan does), running ``race`` midway."""
    keys = list(log.table.entries)
    for i, key in enumerate(keys):
        if i == at:
            race()
        e = log.table.entries.get(key)
        if e is not None:
            yield key, e[0], e[1], e[2], e[3]


def test_writes_racing_the_scan_end_with_the_newest_value(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for i in range(20):
        log.put(b"bk%d" % i, b"v1-%d" % i)
    k, s = log.writer.seal()
    judged = [b"bk0", b"bk1", b"bk2"]  # yielded (judged live) before the race
    pending = [b"bk15", b"bk16"]  # reached after the race

    def race() -> None:
        log.put(b"bk0", b"v2-0")  # overwritten after it was judged live
        log.delete(b"bk1")  # deleted after it was judged live
        log.write([(OP_PUT, b"bk2", 0, b"v2-2", 0), (OP_DELETE, b"bk15", 0, b"", 0)])
        log.put(b"bk16", b"v2-16")
        log.put(b"bnew", b"born after the seal")

    res = compact(tmp_path, _racing_scan(log, 5, race), seal_seqno=s, next_segno=k + 1, now_ms=NOW_MS)
    assert res.newer == 1  # bk16 is newer than the seal when the scan reaches it; bk15 is gone
    assert res.entries == 20 - 2
    state = recovered_state(tmp_path)
    assert state == log.model()
    assert state[b"bk0"][1] == b"v2-0" and b"bk1" not in state and state[b"bk2"][1] == b"v2-2"
    assert b"bk15" not in state and state[b"bk16"][1] == b"v2-16" and b"bnew" in state
    assert all(key in state for key in judged[2:] + pending[1:])
    log.writer.close()


def test_compact_refuses_a_seal_that_is_not_past_the_snapshot_or_not_of_this_log(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for i in range(5):
        log.put(b"bk%d" % i, b"v")
    res = log.seal_and_compact()
    with pytest.raises(NothingToCompact):
        compact(tmp_path, log.entries(), seal_seqno=res.seal_seqno, next_segno=res.next_segno)
    log.put(b"bk9", b"w")
    k, s = log.writer.seal()
    with pytest.raises(StorageError, match="not a seal of this log"):
        compact(tmp_path, log.entries(), seal_seqno=s + 1, next_segno=k + 1)
    with pytest.raises(StorageError, match="cannot be read"):
        compact(tmp_path, log.entries(), seal_seqno=s, next_segno=k + 7)
    assert recovered_state(tmp_path) == log.model()
    log.writer.close()


# --------------------------------------------------------------------- crash after each step


class _StepRecorder(FaultyFileOps):
    """FaultyFileOps that notes, for each step, the first durable call made during it."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.first_call: dict[int, tuple[str, int]] = {}

    def on_step(self, k: int, what: str) -> None:
        self.step = k

    def _enter(self, op: str) -> None:
        super()._enter(op)
        self.first_call.setdefault(self.step, (op, self.calls[op]))


def _second_compaction_ready(data_dir: Path, seed: int) -> Log:
    """A log with one snapshot already, more writes after it, and a leftover for step 0 to remove."""
    rng = random.Random(seed)
    log = Log(data_dir)
    overwrite_heavy(log, rng, 250)
    log.first_seal = log.seal_and_compact().seal_seqno
    overwrite_heavy(log, rng, 250)
    (data_dir / (snapshot_name(999_999) + ".tmp")).write_bytes(b"half a snapshot")
    return log


def _crash_point(tmp_path: Path, after_step: int) -> tuple[str, int] | None:
    """The (op, n) that starts the first step after ``after_step``, from a dry run on a copy."""
    dry = tmp_path / "dry"
    log = _second_compaction_ready(dry, seed=7)
    rec = _StepRecorder()
    log.seal_and_compact(fileops=rec, on_step=rec.on_step)
    log.writer.close()
    later = sorted(k for k in rec.first_call if k > after_step)
    assert set(rec.first_call) == {0, *range(2, 13)}, rec.first_call  # every step does durable I/O here
    shutil.rmtree(dry)
    return rec.first_call[later[0]] if later else None


@pytest.mark.parametrize("mode", ["kill", "power", "power-some"])
@pytest.mark.parametrize("after_step", [k for k, _ in STEPS if k >= 1])
def test_a_crash_after_each_numbered_step_recovers_to_the_model(tmp_path: Path, after_step: int, mode: str) -> None:
    crash_at = _crash_point(tmp_path, after_step)
    d = tmp_path / "d"
    log = _second_compaction_ready(d, seed=7)
    expected = log.model()
    fo = FaultyFileOps(crash_at=crash_at, seed=after_step)
    if crash_at is None:
        log.seal_and_compact(fileops=fo)  # after the last step: the crash hits a finished compaction
    else:
        with pytest.raises(SimulatedCrash):
            log.seal_and_compact(fileops=fo)
    if mode == "kill":
        fo.kill()  # the compactor died; the page cache (and the daemon's appends) stay
    else:
        fo.drop_unsynced(keep_fraction=0.0 if mode == "power" else 0.5, seed=after_step)
    log.writer.close()  # under fsync=always everything the daemon appended is durable already
    writer, report, table = reopen(d)
    assert table.snapshot() == expected
    names = set(os.listdir(d))
    assert not [n for n in names if n.endswith(".tmp")]  # leftovers are gone after the start
    snaps = [n for n in names if n.startswith("snap-")]
    assert len(snaps) == 1 and MANIFEST_NAME in names
    assert report.snapshot is not None
    if after_step >= 10 or (after_step == 9 and mode == "kill"):
        assert report.snapshot.seal_seqno == log.written[-1][0]  # the new snapshot counts
    elif after_step < 9:
        assert report.snapshot.seal_seqno == log.first_seal  # the old MANIFEST still rules
    # The log goes on, and the next compaction works from whatever state the crash left.
    seqno, data = writer.encode([(OP_PUT, b"bafter", 0, b"z", 0)])
    writer.append(data)
    apply_ops(table, seqno, [(OP_PUT, b"bafter", 0, b"z", 0)], NOW_MS)
    k, s = writer.seal()
    entries = [(key, e[0], e[1], e[2], e[3]) for key, e in table.entries.items()]
    compact(d, entries, seal_seqno=s, next_segno=k + 1, now_ms=NOW_MS)
    writer.close()
    assert recovered_state(d) == table.snapshot()


def test_after_the_manifest_rename_a_power_cut_may_keep_either_manifest_and_both_recover(tmp_path: Path) -> None:
    """Step 9 done, step 10 not: the new MANIFEST is not durable yet; both versions must work."""
    for keep in (0.0, 1.0):
        d = tmp_path / f"keep{keep}"
        log = _second_compaction_ready(d, seed=3)
        expected = log.model()
        fo = FaultyFileOps(crash_at=("fsync_dir", 3))  # 0: leftovers, 6: snapshot, 10: MANIFEST
        with pytest.raises(SimulatedCrash):
            log.seal_and_compact(fileops=fo)
        assert (d / MANIFEST_NAME).exists()
        fo.drop_unsynced(keep_fraction=keep, seed=1)
        log.writer.close()
        writer, report, table = reopen(d)
        writer.close()
        assert table.snapshot() == expected


# --------------------------------------------------------------------- fsync=never: step 4


def test_under_fsync_never_a_power_cut_after_compaction_keeps_the_state_at_the_seal(tmp_path: Path) -> None:
    """A key overwritten after the seal is left to the tail; the tail must be durable before the switch.

    One FaultyFileOps plays the machine's page cache for the daemon and the
    compactor, as one kernel would. Without step 4 the overwrite is lost in the
    power cut and the key with it (its older value went with the old segments).
    """
    fo = FaultyFileOps()
    log = Log(tmp_path, fileops=fo, policy="never")
    for i in range(30):
        log.put(b"bk%d" % i, b"v1-%d" % i)
    k, s = log.writer.seal()  # the seal syncs the sealed segment, even under never
    log.put(b"bk0", b"v2-0")  # written, applied, not synced
    log.delete(b"bk1")
    res = compact(tmp_path, log.entries(), seal_seqno=s, next_segno=k + 1, fileops=fo, now_ms=NOW_MS)
    assert res.newer == 1 and res.entries == 28
    fo.drop_unsynced()
    state = recovered_state(tmp_path)
    assert state[b"bk0"] == (0, b"v2-0", 0)
    assert b"bk1" not in state
    assert len(state) == 29


# --------------------------------------------------------------------- what is never loaded


def test_snapshots_the_manifest_does_not_name_are_never_loaded_and_are_removed(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for i in range(10):
        log.put(b"bk%d" % i, b"v%d" % i)
    res = log.seal_and_compact()
    # A complete, well-formed snapshot that no MANIFEST names (a crash between steps 5 and 9)
    # holding different data, a newer seal, and a .tmp: recovery must use none of them.
    other = tmp_path.parent / "other"
    olog = Log(other)
    for i in range(30):
        olog.put(b"bk%d" % i, b"OTHER")
    ores = olog.seal_and_compact()
    olog.writer.close()
    stale = snapshot_name(res.seal_seqno + 100)
    shutil.copy(other / snapshot_name(ores.seal_seqno), tmp_path / stale)
    (tmp_path / (snapshot_name(res.seal_seqno + 101) + ".tmp")).write_bytes(b"x" * 100)
    (tmp_path / "MANIFEST.tmp").write_bytes(b"y" * 64)
    log.writer.close()
    writer, report, table = reopen(tmp_path)
    writer.close()
    assert table.snapshot() == log.model()
    assert sorted(report.removed_leftovers) == sorted(
        [stale, snapshot_name(res.seal_seqno + 101) + ".tmp", "MANIFEST.tmp"]
    )
    assert file_names(tmp_path) == sorted(
        [MANIFEST_NAME, snapshot_name(res.seal_seqno), segment_name(res.next_segno)]
    )


def _damaged_cases() -> list[tuple[str, Callable[[Path, CompactionResult, Path], None], str]]:
    def flip_snapshot(d: Path, res: CompactionResult, other: Path) -> None:
        flip_byte(d / snapshot_name(res.seal_seqno), 200)

    def swap_snapshot(d: Path, res: CompactionResult, other: Path) -> None:
        # A valid snapshot with the right name and seal, but not the bytes the MANIFEST names.
        shutil.copy(other / snapshot_name(res.seal_seqno), d / snapshot_name(res.seal_seqno))

    def cut_snapshot(d: Path, res: CompactionResult, other: Path) -> None:
        p = d / snapshot_name(res.seal_seqno)
        p.write_bytes(p.read_bytes()[:-10])

    def lose_snapshot(d: Path, res: CompactionResult, other: Path) -> None:
        (d / snapshot_name(res.seal_seqno)).unlink()

    def flip_manifest(d: Path, res: CompactionResult, other: Path) -> None:
        flip_byte(d / MANIFEST_NAME, 20)

    def lose_manifest(d: Path, res: CompactionResult, other: Path) -> None:
        (d / MANIFEST_NAME).unlink()

    def lose_next_segment(d: Path, res: CompactionResult, other: Path) -> None:
        (d / segment_name(res.next_segno)).unlink()

    return [
        ("flipped-snapshot", flip_snapshot, "snapshot"),
        ("other-snapshot", swap_snapshot, "snapshot"),
        ("cut-snapshot", cut_snapshot, "snapshot"),
        ("missing-snapshot", lose_snapshot, "snapshot"),
        ("flipped-manifest", flip_manifest, "manifest"),
        ("missing-manifest", lose_manifest, "log-start"),
        ("missing-next-segment", lose_next_segment, "log-start"),
    ]


@pytest.mark.parametrize("name,damage,kind", _damaged_cases(), ids=[c[0] for c in _damaged_cases()])
def test_damage_to_what_the_manifest_names_is_refused_and_changes_nothing(
    tmp_path: Path, name: str, damage: Callable[[Path, CompactionResult, Path], None], kind: str
) -> None:
    def build(d: Path, value: bytes) -> CompactionResult:
        log = Log(d)
        for i in range(40):
            log.put(b"bk%d" % i, value)
        res = log.seal_and_compact()
        log.writer.close()
        return res

    d, other = tmp_path / "d", tmp_path / "other"
    res = build(d, b"mine")
    ores = build(other, b"THEIRS")
    assert ores.seal_seqno == res.seal_seqno
    damage(d, res, other)
    before = dir_fingerprint(d)
    with pytest.raises(LogCorrupt) as ei:
        reopen(d)
    assert "backup" in str(ei.value) or kind == "log-start"
    assert dir_fingerprint(d) == before
    report = check_log(d)
    assert report.verdict == "corrupt" and report.problem is not None and report.problem.kind == kind
    assert "--repair" not in report.format().split("verdict")[-1]
    with pytest.raises(LogCorrupt):
        check_log(d, repair=True)
    before.pop("LOCK", None)
    after = dir_fingerprint(d)
    after.pop("LOCK", None)
    assert after == before


def test_check_log_reads_the_snapshot_and_names_the_leftovers(tmp_path: Path) -> None:
    rng = random.Random(4)
    log = Log(tmp_path)
    overwrite_heavy(log, rng, 200)
    res = log.seal_and_compact()
    overwrite_heavy(log, rng, 50)
    log.writer.close()
    (tmp_path / (snapshot_name(res.seal_seqno + 5) + ".tmp")).write_bytes(b"partial")
    report = check_log(tmp_path)
    assert report.verdict == "clean" and report.ok
    assert report.snapshot is not None and report.snapshot.entries == res.entries
    assert report.live_keys == len(log.model())
    assert report.leftovers == [snapshot_name(res.seal_seqno + 5) + ".tmp"]
    text = report.format()
    assert f"{MANIFEST_NAME}: snapshot {snapshot_name(res.seal_seqno)}" in text
    assert "left by an interrupted compaction" in text and "after the snapshot" in text


def test_without_a_manifest_the_log_must_start_at_segment_one(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for i in range(200):
        log.put(b"bk%d" % (i % 7), b"v" * 50)
    log.writer.close()
    assert len(segments(tmp_path)) >= 3
    segments(tmp_path)[0].unlink()  # someone deleted the oldest segment
    with pytest.raises(LogCorrupt, match="log-start"):
        reopen(tmp_path)


def test_recovery_changes_nothing_when_no_compactor_ever_ran(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.put(b"bk", b"v")
    log.writer.close()
    reopen(tmp_path)[0].close()
    assert not (tmp_path / COMPACT_LOCK_NAME).exists()


# --------------------------------------------------------------------- a model-based run


class CompactionMachine(RuleBasedStateMachine):
    """Puts, deletes, batches, compactions (some cut by a crash at any durable call), restarts.

    Invariant after every restart: the recovered state is the model's. Every
    write is acknowledged once append returns (fsync=always), so nothing may be
    missing, whatever step a crash cut.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="wcm-"))
        self.log = Log(self.dir)

    def teardown(self) -> None:
        self.log.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    keys = st.integers(0, 9).map(lambda i: b"bk%d" % i)

    @rule(key=keys, value=st.binary(max_size=30))
    def put(self, key: bytes, value: bytes) -> None:
        self.log.put(key, value)

    @rule(key=keys)
    def delete(self, key: bytes) -> None:
        self.log.delete(key)

    @rule(pairs=st.lists(st.tuples(keys, st.one_of(st.none(), st.binary(max_size=10))), min_size=2, max_size=4))
    def batch(self, pairs: list[tuple[bytes, bytes | None]]) -> None:
        self.log.write([(OP_DELETE, k, 0, b"", 0) if v is None else (OP_PUT, k, 0, v, 0) for k, v in pairs])

    @rule()
    def compact(self) -> None:
        try:
            self.log.seal_and_compact()
        except NothingToCompact:
            pass

    @rule(op=st.sampled_from(["open", "pwrite", "fdatasync", "rename", "fsync_dir", "unlink"]),
          n=st.integers(1, 4), power=st.booleans())
    def compact_and_crash(self, op: str, n: int, power: bool) -> None:
        fo = FaultyFileOps(crash_at=(op, n))
        try:
            self.log.seal_and_compact(fileops=fo)
        except (SimulatedCrash, NothingToCompact):
            pass
        if power:
            fo.drop_unsynced()
        else:
            fo.kill()
        self.restart()

    @rule()
    def restart(self) -> None:
        expected = self.log.model()
        written = self.log.written
        self.log.writer.close()
        self.log = Log(self.dir)
        self.log.written = written
        assert self.log.model() == expected


TestCompactionMachine = CompactionMachine.TestCase
TestCompactionMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
