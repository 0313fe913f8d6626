"""Recovery: torn tails are dropped, corruption is refused, every acknowledged record survives.

Crashes come from three places: byte surgery on real files (truncation, flips),
the FaultyFileOps seam (power loss = drop what was not synced, crash points,
EIO, ENOSPC, short writes), and a real writer process killed with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from walcache import DataDirLocked, LogCorrupt, LogFailed, LogFull
from walcache.daemon.fileops import FaultyFileOps, FileOps, SimulatedCrash
from walcache.daemon.lock import DataDirLock
from walcache.daemon.apply import Applier, DictTable
from walcache.daemon.recovery import check_log, open_log
from walcache.daemon.walformat import OP_DELETE, OP_PUT, SEGMENT_HEADER_SIZE, decode_record, segment_name
from walcache.daemon.walreader import nonzero_end

from .bytesurgery import (
    all_records,
    dir_fingerprint,
    flip_byte,
    records_in,
    segments,
    truncate_at,
    zero_range,
)
from .logmodel import FUTURE_MS, NOW_MS, PAST_MS, Record, ops_for_seqno, random_ops, recover, state_after, write_log

SEG1 = segment_name(1)


def _one_segment_log(tmp_path: Path, n: int, seed: int, **kw: object) -> tuple[Path, list[Record], bytes]:
    src = tmp_path / "src"
    rng = random.Random(seed)
    ops = [random_ops(rng) for _ in range(n)]
    written = write_log(src, ops, **kw)  # type: ignore[arg-type]
    assert len(segments(src)) == 1
    return src, written, (src / SEG1).read_bytes()


def _expect_prefix(data_dir: Path, written: list[Record], k: int) -> None:
    writer, report, table = recover(data_dir)
    try:
        assert report.last_seqno == k, (report.last_seqno, k)
        assert writer.next_seqno == k + 1
        assert table.snapshot() == state_after(written, k)
    finally:
        writer.close()


# ------------------------------------------------------------------ truncation


def test_truncation_at_every_byte_offset_recovers_exactly_the_whole_records_before_it(tmp_path: Path) -> None:
    _src, written, buf = _one_segment_log(tmp_path, 16, seed=11, group_sizes=[1, 2, 3], segment_bytes=8192)
    recs = records_in(tmp_path / "src" / SEG1)
    ends = [r.end for r in recs]
    assert any(len(ops) > 1 for _, ops in written)  # batches included
    d = tmp_path / "d"
    for cut in range(0, ends[-1] + 9):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / SEG1).write_bytes(buf[:cut])
        if cut < SEGMENT_HEADER_SIZE:
            # A header cut short cannot come from a crash: segments get their name only once the
            # header is durable. So it is corruption, and nothing is touched.
            with pytest.raises(LogCorrupt) as ei:
                recover(d)
            assert ei.value.offset == 0
            assert (d / SEG1).read_bytes() == buf[:cut]
            continue
        k = sum(1 for e in ends if e <= cut)
        _expect_prefix(d, written, k)
        if cut % 5 == 0:
            # The log stays usable: the next record gets seqno k+1 and survives a reopen.
            writer, _, _ = recover(d)
            seqno, data = writer.encode([(OP_PUT, b"bnew", 0, b"x", 0)])
            assert seqno == k + 1
            writer.append(data)
            writer.close()
            _, report, table = recover(d)
            assert report.last_seqno == k + 1 and table.get(b"bnew") == (0, b"x")


def test_truncation_at_500_sampled_offsets_of_a_large_log(tmp_path: Path) -> None:
    seed = int(os.environ.get("WALCACHE_TEST_SEED", "20240501"))
    _src, written, buf = _one_segment_log(tmp_path, 4000, seed=seed, group_sizes=[1, 8, 64, 3],
                                          segment_bytes=4 << 20)
    ends = [r.end for r in records_in(tmp_path / "src" / SEG1)]
    rng = random.Random(seed)
    d = tmp_path / "d"
    for cut in sorted(rng.sample(range(SEGMENT_HEADER_SIZE, ends[-1] + 1), 500)):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / SEG1).write_bytes(buf[:cut])
        k = sum(1 for e in ends if e <= cut)
        try:
            _expect_prefix(d, written, k)
        except AssertionError:
            print(f"replay with WALCACHE_TEST_SEED={seed}; failing cut {cut}")
            raise


def test_torn_tail_is_dropped_and_logged_with_file_offset_and_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, written, buf = _one_segment_log(tmp_path, 10, seed=12)
    last = records_in(src / SEG1)[-1]
    truncate_at(src / SEG1, last.offset + 30)
    with caplog.at_level(logging.WARNING, logger="walcache.wal"):
        writer, report, table = recover(src)
    writer.close()
    assert report.truncated_path == src / SEG1
    assert report.truncated_offset == last.offset
    assert report.truncated_bytes == len(buf[last.offset : last.offset + 30].rstrip(b"\0"))
    assert report.last_seqno == 9 and table.snapshot() == state_after(written, 9)
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(src / SEG1) in msg and f"offset {last.offset}" in msg and f"zeroed {report.truncated_bytes} bytes" in msg
    # The dropped bytes are gone for good: the next open sees a clean log.
    _, report2, _ = recover(src)
    assert report2.truncated_bytes == 0 and report2.last_seqno == 9


# ------------------------------------------------------------------ flips


def _claims(path: Path) -> list[tuple[int, int]]:
    buf = path.read_bytes()
    out = []
    salt = int.from_bytes(buf[40:44], "little")
    for r in records_in(path):
        d = decode_record(buf, r.offset, salt=salt)
        out.append((d.seqno, d.durable_seqno))
    return out


def test_every_single_byte_flip_in_a_sample_is_detected_and_classified(tmp_path: Path) -> None:
    # fsync=always, one record per append: record s+1 was encoded after s was durable, and says so.
    src, written, buf = _one_segment_log(tmp_path, 30, seed=13, segment_bytes=8192)
    recs = records_in(src / SEG1)
    claims = _claims(src / SEG1)
    assert [c for _, c in claims] == list(range(30))
    d = tmp_path / "d"
    sample = [0, 1, 14, 27, 28, 29]
    for i in sample:
        r = recs[i]
        later_claims = [c for s, c in claims if s > r.seqno]
        middle = any(c >= r.seqno for c in later_claims)
        assert middle == (i < 29)  # only the very last record can be a torn write
        for off in range(r.offset, r.end):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            bad = bytearray(buf)
            bad[off] ^= 0xFF
            (d / SEG1).write_bytes(bytes(bad))
            if middle:
                before = dir_fingerprint(d)
                with pytest.raises(LogCorrupt) as ei:
                    recover(d)
                assert ei.value.path == str(d / SEG1) and ei.value.offset == r.offset, (i, off)
                assert dir_fingerprint(d) == before  # refused, and nothing truncated
            else:
                writer, report, table = recover(d)
                writer.close()
                assert report.last_seqno == r.seqno - 1 and report.truncated_offset == r.offset, (i, off)
                assert table.snapshot() == state_after(written, r.seqno - 1)


def test_flips_in_the_segment_header_are_corruption(tmp_path: Path) -> None:
    src, _written, buf = _one_segment_log(tmp_path, 5, seed=14)
    d = tmp_path / "d"
    for off in range(SEGMENT_HEADER_SIZE):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        bad = bytearray(buf)
        bad[off] ^= 0x04
        (d / SEG1).write_bytes(bytes(bad))
        with pytest.raises(LogCorrupt) as ei:
            recover(d)
        assert ei.value.offset == 0


def test_a_bad_record_in_a_sealed_segment_is_corruption_even_at_its_very_end(tmp_path: Path) -> None:
    rng = random.Random(15)
    write_log(tmp_path, [random_ops(rng) for _ in range(200)], group_sizes=[5], segment_bytes=4096,
              policy="never")
    segs = segments(tmp_path)
    assert len(segs) >= 3
    last_of_first = records_in(segs[0])[-1]
    truncate_at(segs[0], last_of_first.end - 3)
    with pytest.raises(LogCorrupt) as ei:
        recover(tmp_path)
    assert ei.value.path == str(segs[0]) and ei.value.offset == last_of_first.offset


def test_damage_followed_by_records_written_after_a_later_sync_is_corruption(tmp_path: Path) -> None:
    # fsync=never, but an explicit sync in the middle: records encoded after it claim what it covered.
    d = tmp_path / "d"
    writer, _, _ = recover(d, policy="never")
    for i in range(10):
        writer.append(writer.encode([(OP_PUT, b"bk%d" % i, 0, b"v", 0)])[1])
    writer.sync()
    for i in range(10, 20):
        writer.append(writer.encode([(OP_PUT, b"bk%d" % i, 0, b"v", 0)])[1])
    writer.close()
    recs = records_in(d / SEG1)
    zero_range(d / SEG1, recs[4].offset, recs[4].end)  # a synced record zeroed out
    with pytest.raises(LogCorrupt, match="was durable") as ei:
        recover(d)
    assert ei.value.offset == recs[4].offset


def test_with_nothing_ever_synced_damage_in_the_newest_segment_reads_as_torn(tmp_path: Path) -> None:
    # The rule's stated limit: under fsync=never nothing was known durable, so a power cut could have
    # produced exactly this, and recovery keeps the prefix (it never refuses a crash-made log).
    d = tmp_path / "d"
    writer, _, _ = recover(d, policy="never")
    written = []
    for i in range(20):
        ops = ((OP_PUT, b"bk%d" % i, 0, b"v", 0),)
        seqno, data = writer.encode(ops)
        writer.append(data)
        written.append((seqno, ops))
    writer.close()
    recs = records_in(d / SEG1)
    flip_byte(d / SEG1, recs[7].offset + 40)
    _expect_prefix(d, written, 7)


def test_corruption_refuses_to_open_and_changes_nothing(tmp_path: Path) -> None:
    src, _written, _ = _one_segment_log(tmp_path, 20, seed=16)
    r = records_in(src / SEG1)[3]
    flip_byte(src / SEG1, r.offset + 38)
    before = dir_fingerprint(src)
    with pytest.raises(LogCorrupt) as ei:
        recover(src)
    assert ei.value.path == str(src / SEG1) and ei.value.offset == r.offset
    assert "check-log --repair" in str(ei.value)
    assert dir_fingerprint(src) == before


# ------------------------------------------------------------------ deletes and batches


def test_deletes_and_expired_puts_survive_reopen(tmp_path: Path) -> None:
    write_log(tmp_path, [
        [(OP_PUT, b"ba", 1, b"1", 0)],
        [(OP_PUT, b"bb", 1, b"2", 0)],
        [(OP_PUT, b"bc", 1, b"3", FUTURE_MS)],
        [(OP_DELETE, b"ba", 0, b"", 0)],
        [(OP_PUT, b"bd", 1, b"4", 0), (OP_DELETE, b"bb", 0, b"", 0)],
        [(OP_PUT, b"bc", 1, b"old-and-expired", PAST_MS)],  # replaces bc, already expired: bc is gone
    ])
    for _ in range(3):
        writer, report, table = recover(tmp_path)
        writer.close()
        assert report.last_seqno == 6
        assert table.snapshot() == {b"bd": (1, b"4", 0)}


def test_a_batch_is_all_or_nothing_after_a_crash_at_any_byte(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_log(base, [[(OP_PUT, b"bk%d" % i, 0, b"v%d" % i, 0)] for i in range(5)], segment_bytes=8192)
    batch = tuple((OP_PUT, b"bk%d" % i, 1, b"new-%d" % i, 0) for i in range(6)) + ((OP_DELETE, b"bk0", 0, b"", 0),)
    before = state_after([(s, ((OP_PUT, b"bk%d" % (s - 1), 0, b"v%d" % (s - 1), 0),)) for s in range(1, 6)], 5)
    after = dict(before)
    for op in batch:
        if op[0] == OP_PUT:
            after[op[1]] = (op[2], op[3], op[4])
        else:
            after.pop(op[1], None)
    rng = random.Random(17)
    d = tmp_path / "d"
    record_len = None
    cut = 0
    while record_len is None or cut <= record_len:
        for keep in (0.0, 0.5, 1.0):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d)
            fo = FaultyFileOps(crash_after_bytes=cut, seed=rng.randrange(1 << 30))
            writer, _, _ = recover(d, fileops=fo, segment_bytes=8192)
            _, data = writer.encode(batch)
            record_len = len(data)
            with pytest.raises(SimulatedCrash):
                writer.append(data)
            fo.drop_unsynced(keep_fraction=keep)
            w2, report, table = recover(d)
            w2.close()
            got = table.snapshot()
            assert got in (before, after), (cut, keep)
            if cut < record_len:
                assert got == before and report.last_seqno == 5
            elif keep == 1.0:
                assert got == after and report.last_seqno == 6
        cut += 1


# ------------------------------------------------------------------ power loss and I/O errors


@pytest.mark.parametrize("seed", range(12))
def test_power_loss_with_always_keeps_every_acknowledged_record(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    fo = FaultyFileOps(seed=seed, crash_after_bytes=rng.choice([None, rng.randrange(2_000, 40_000)]))
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    written: list[Record] = []
    acked = 0
    try:
        for _ in range(rng.randrange(5, 120)):
            group = []
            for _ in range(rng.choice([1, 1, 3, 8])):
                ops = random_ops(rng)
                seqno, data = writer.encode(ops)
                written.append((seqno, ops))
                group.append(data)
            writer.append(b"".join(group))
            acked = len(written)  # append returned: fsync=always says these are durable
    except SimulatedCrash:
        pass
    fo.drop_unsynced(keep_fraction=rng.choice([0.0, 0.3, 0.7, 1.0]))
    w2, report, table = recover(tmp_path)
    w2.close()
    assert acked <= report.last_seqno <= len(written), (seed, acked, report.last_seqno)
    assert table.snapshot() == state_after(written, report.last_seqno)


@pytest.mark.parametrize("seed", range(12))
def test_power_loss_with_never_still_recovers_a_prefix(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    fo = FaultyFileOps(seed=seed, crash_after_bytes=rng.choice([None, rng.randrange(2_000, 40_000)]))
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096, policy="never")
    written: list[Record] = []
    try:
        for _ in range(rng.randrange(5, 120)):
            group = []
            for _ in range(rng.choice([1, 3, 8])):
                ops = random_ops(rng)
                seqno, data = writer.encode(ops)
                written.append((seqno, ops))
                group.append(data)
            writer.append(b"".join(group))
    except SimulatedCrash:
        pass
    sealed = writer.durable_seqno  # segments are synced when sealed, even under never
    fo.drop_unsynced(keep_fraction=rng.choice([0.0, 0.3, 0.7, 1.0]))
    w2, report, table = recover(tmp_path)  # never LogCorrupt: a crash made this log
    w2.close()
    assert sealed <= report.last_seqno <= len(written)
    assert table.snapshot() == state_after(written, report.last_seqno)


def test_records_replayed_after_a_kill_are_made_durable_before_the_log_reopens(tmp_path: Path) -> None:
    # The daemon publishes what it replays: a later power cut must not take it back.
    fo = FaultyFileOps()  # one object = one machine, across the process restart
    writer, _, _ = recover(tmp_path, fileops=fo, policy="never")
    written: list[Record] = []
    for i in range(30):
        ops = ((OP_PUT, b"bk%d" % i, 0, b"v" * 90, 0),)
        seqno, data = writer.encode(ops)
        writer.append(data)
        written.append((seqno, ops))
    assert writer.durable_seqno == 0  # nothing synced yet: all of it lives in the page cache
    fo.kill()
    w2, report, _ = recover(tmp_path, fileops=fo, policy="never")
    assert report.last_seqno == 30
    fo.drop_unsynced()  # power cut right after the restart
    w3, report2, table = recover(tmp_path)
    w3.close()
    assert report2.last_seqno == 30 and table.snapshot() == state_after(written, 30)


@pytest.mark.parametrize("power_loss", [False, True])
def test_eio_on_fsync_fails_the_append_and_every_later_one(tmp_path: Path, power_loss: bool) -> None:
    fo = FaultyFileOps(fail_fsync_at=1 + 7)  # the first fdatasync creates segment 1; then one per append
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    written: list[Record] = []
    acked = 0
    for i in range(7):
        ops = ((OP_PUT, b"bk%d" % i, 0, b"v" * 100, 0),)
        seqno, data = writer.encode(ops)
        written.append((seqno, ops))
        if i < 6:
            writer.append(data)
            acked = len(written)
        else:
            with pytest.raises(LogFailed) as ei:
                writer.append(data)
            assert ei.value.errno == 5 and ei.value.path == str(tmp_path / SEG1)
    assert writer.failed
    syncs = fo.fsyncs
    with pytest.raises(LogFailed, match="failed earlier"):
        writer.append(data)
    with pytest.raises(LogFailed):
        writer.sync()
    with pytest.raises(LogFailed):
        writer.encode([(OP_PUT, b"bx", 0, b"", 0)])
    assert fo.fsyncs == syncs  # never retried
    writer.close()
    if power_loss:
        fo.drop_unsynced()
    w2, report, table = recover(tmp_path)
    w2.close()
    assert acked <= report.last_seqno <= len(written)
    assert report.last_seqno == (6 if power_loss else 7)
    assert table.snapshot() == state_after(written, report.last_seqno)


def test_enospc_refuses_the_group_and_reopening_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    """No space for the next segment: LogFull (the group is not written, the writer is not
    failed, and refuses again while there is no room); every record acknowledged before it
    is recovered, after a power cut too."""
    fo = FaultyFileOps(enospc_after=4096 + 5_000)  # segment creation writes 4096 bytes
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    written: list[Record] = []
    acked = 0
    with pytest.raises(LogFull) as ei:
        for i in range(1000):
            ops = ((OP_PUT, b"bk%d" % i, 0, b"v" * 150, 0),)
            seqno, data = writer.encode(ops)
            written.append((seqno, ops))
            writer.append(data)
            acked = len(written)
    assert ei.value.errno == 28 and not writer.failed
    assert writer.take_back_unwritten() == acked + 1
    with pytest.raises(LogFull):
        writer.append(writer.encode(((OP_PUT, b"bk-again", 0, b"v", 0),))[1])
    writer.close()
    fo.drop_unsynced()
    w2, report, table = recover(tmp_path)
    w2.close()
    assert 0 < acked == report.last_seqno
    assert table.snapshot() == state_after(written, acked)


def test_short_writes_are_completed_and_leave_an_intact_log(tmp_path: Path) -> None:
    fo = FaultyFileOps(short_write_max=7, seed=3)
    rng = random.Random(18)
    ops = [random_ops(rng) for _ in range(80)]
    written = write_log(tmp_path, ops, group_sizes=[1, 5, 9], fileops=fo, segment_bytes=4096)
    assert fo.writes > 3 * len(written)  # the writes really were short
    _expect_prefix(tmp_path, written, 80)


# ------------------------------------------------------------------ numbered crash points


ROTATION_CRASH_POINTS = [
    ("ftruncate", 1),  # 1. before trimming the sealed segment
    ("fdatasync", 1),  # 1. before syncing it
    ("open", 1),  # 2. before creating the .tmp
    ("fdatasync", 2),  # 2. before syncing the .tmp
    ("rename", 1),  # 3. before the rename
    ("fsync_dir", 1),  # 4. before the directory fsync
    ("pwrite", 3),  # 5. switched: before the group's write
    ("fdatasync", 3),  # 5. before the group's sync
]


@pytest.mark.parametrize("crash_at", ROTATION_CRASH_POINTS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_crash_at_each_step_of_segment_rotation(tmp_path: Path, crash_at: tuple[str, int], keep: float) -> None:
    written = write_log(tmp_path, [[(OP_PUT, b"bk%d" % i, 0, b"v" * 60, 0)] for i in range(30)],
                        segment_bytes=4096)
    assert len(segments(tmp_path)) == 1  # 30 records of 104 bytes fit in 4096; 10 more do not
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    fo.calls.clear()
    fo.crash_at = crash_at  # armed now: counts start at this append
    group_ops = [((OP_PUT, b"bg%d" % i, 0, b"w" * 60, 0),) for i in range(10)]
    datas = []
    for ops in group_ops:
        seqno, data = writer.encode(ops)
        written.append((seqno, ops))
        datas.append(data)
    with pytest.raises(SimulatedCrash):
        writer.append(b"".join(datas))
    fo.drop_unsynced(keep_fraction=keep)
    w2, report, table = recover(tmp_path, segment_bytes=4096)
    assert report.last_seqno in (30, 40)
    assert table.snapshot() == state_after(written, report.last_seqno)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # And the log goes on from there, across the next rotation.
    for i in range(40):
        w2.append(w2.encode([(OP_PUT, b"bafter%d" % i, 0, b"z" * 60, 0)])[1])
    w2.close()
    _, report2, table2 = recover(tmp_path)
    assert report2.last_seqno == report.last_seqno + 40
    assert table2.get(b"bafter39") == (0, b"z" * 60)


def test_a_tmp_segment_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    write_log(tmp_path, [[(OP_PUT, b"bk", 0, b"v", 0)]])
    (tmp_path / (segment_name(2) + ".tmp")).write_bytes(b"half a header")
    writer, report, _ = recover(tmp_path)
    writer.close()
    assert report.removed_tmp == [segment_name(2) + ".tmp"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("wal-")) == [SEG1]


# ------------------------------------------------------------------ check-log


def test_check_log_reports_and_changes_nothing(tmp_path: Path) -> None:
    rng = random.Random(19)
    write_log(tmp_path, [random_ops(rng) for _ in range(150)], segment_bytes=4096)
    clean = check_log(tmp_path)
    assert clean.ok and clean.verdict == "clean" and clean.records == 150
    segs = segments(tmp_path)
    last = records_in(segs[-1])[-1]
    truncate_at(segs[-1], last.offset + 9)  # torn tail
    before = dir_fingerprint(tmp_path)
    torn = check_log(tmp_path)
    assert torn.ok and torn.verdict == "torn" and torn.records == 149
    assert dir_fingerprint(tmp_path) == before
    r = records_in(segs[1])[2]
    flip_byte(segs[1], r.offset + 50)  # corruption in a sealed segment
    before = dir_fingerprint(tmp_path)
    bad = check_log(tmp_path)
    assert not bad.ok and bad.verdict == "corrupt"
    assert bad.problem is not None and bad.problem.path == segs[1] and bad.problem.offset == r.offset
    assert dir_fingerprint(tmp_path) == before
    assert bad.unread_segments == [p.name for p in segs[2:]]
    text = bad.format()
    assert str(segs[1]) in text and f"offset {r.offset}" in text and "CORRUPT" in text
    assert f"repair drops seqnos {r.seqno}-149" in text


def test_check_log_repair_cuts_at_the_corruption_and_reports_dropped_seqnos(tmp_path: Path) -> None:
    rng = random.Random(20)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(150)], segment_bytes=4096)
    segs = segments(tmp_path)
    r = records_in(segs[1])[2]
    zero_range(segs[1], r.offset + 8, r.offset + 16)  # the seqno field of one record
    with pytest.raises(LogCorrupt):
        recover(tmp_path)
    with DataDirLock(tmp_path):  # repair refuses to run beside a daemon
        with pytest.raises(DataDirLocked):
            check_log(tmp_path, repair=True)
    report = check_log(tmp_path, repair=True)
    assert report.repaired and report.ok
    assert report.dropped_seqnos == (r.seqno, 150)
    assert report.intact_after == list(range(r.seqno + 1, 151))  # everything else after it was readable
    assert any(f"dropped seqnos {r.seqno}-150" in a for a in report.actions)
    kept = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == len(segs) - 1  # the cut tail of segment 2, and segments 3.. moved aside
    _expect_prefix(tmp_path, written, r.seqno - 1)
    assert check_log(tmp_path).verdict == "clean"


def test_check_log_repair_on_a_torn_tail_drops_only_the_tail(tmp_path: Path) -> None:
    src, written, _ = _one_segment_log(tmp_path, 12, seed=21)
    last = records_in(src / SEG1)[-1]
    truncate_at(src / SEG1, last.offset + 20)
    report = check_log(src, repair=True)
    assert report.repaired and report.verdict == "torn" and report.dropped_seqnos is None
    _expect_prefix(src, written, 11)


# ------------------------------------------------------------------ a real process, SIGKILL


CHILD = textwrap.dedent(
    """
    import sys, random
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from daemon.logmodel import ops_for_seqno
    from walcache.daemon.recovery import open_log
    data_dir, seed = Path(sys.argv[2]), int(sys.argv[3])
    writer, report = open_log(data_dir, lambda s, ops: None, policy="always", segment_bytes=16384)
    rng = random.Random(seed + report.last_seqno)
    print("ready", report.last_seqno, flush=True)
    while True:
        datas = []
        for _ in range(rng.choice([1, 2, 5, 17])):
            seqno, data = writer.encode(ops_for_seqno(seed, writer.next_seqno))
            datas.append(data)
        writer.append(b"".join(datas))
        print("acked", seqno, flush=True)
    """
)


def test_sigkill_of_a_real_writer_loses_no_acknowledged_record(tmp_path: Path) -> None:
    seed = int(os.environ.get("WALCACHE_TEST_SEED", "7"))
    rng = random.Random(seed)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    tests_dir = str(Path(__file__).resolve().parent.parent)
    d = tmp_path / "data"
    acked = 0
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(script), tests_dir, str(d), str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            first = proc.stdout.readline().split()  # type: ignore[union-attr]
            assert first and first[0] == "ready", proc.stderr.read()  # type: ignore[union-attr]
            assert int(first[1]) >= acked  # the previous round's acknowledged records are all there
            deadline = time.monotonic() + rng.uniform(0.1, 0.6)
            while time.monotonic() < deadline:
                line = proc.stdout.readline().split()  # type: ignore[union-attr]
                assert line and line[0] == "acked", proc.stderr.read()  # type: ignore[union-attr]
                acked = int(line[1])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        writer, report, table = recover(d)
        writer.close()
        assert report.last_seqno >= acked, f"seed {seed} round {round_}: acked {acked}, recovered {report.last_seqno}"
        expected = [(s, ops_for_seqno(seed, s)) for s in range(1, report.last_seqno + 1)]
        assert table.snapshot() == state_after(expected, report.last_seqno)
        acked = report.last_seqno
    assert acked > 0


def test_check_log_repair_of_a_missing_segment_moves_the_later_ones_aside(tmp_path: Path) -> None:
    rng = random.Random(22)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(150)], segment_bytes=4096)
    segs = segments(tmp_path)
    assert len(segs) >= 4
    last_of_first = records_in(segs[0])[-1].seqno
    gone = records_in(segs[1])
    segs[1].unlink()
    with pytest.raises(LogCorrupt) as ei:
        recover(tmp_path)
    assert ei.value.path == str(segs[2])
    report = check_log(tmp_path, repair=True)
    assert report.dropped_seqnos == (last_of_first + 1, 150)
    assert report.intact_after == list(range(gone[-1].seqno + 1, 151))  # segment 2's records are simply gone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("wal-") and p.name.endswith(".log")] == [segs[0].name]
    _expect_prefix(tmp_path, written, last_of_first)


def test_check_log_repair_of_records_missing_at_the_end_of_a_sealed_segment(tmp_path: Path) -> None:
    rng = random.Random(23)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(150)], segment_bytes=4096)
    segs = segments(tmp_path)
    recs = records_in(segs[0])
    zero_range(segs[0], recs[-2].offset, recs[-1].end)  # looks like a clean end, two records short
    report = check_log(tmp_path)
    assert report.verdict == "corrupt" and report.problem is not None and report.problem.kind == "seqno-gap"
    report = check_log(tmp_path, repair=True)
    assert report.dropped_seqnos == (recs[-2].seqno, 150)
    _expect_prefix(tmp_path, written, recs[-2].seqno - 1)
    # The log goes on: the next record reuses no dropped file name and continues the seqnos.
    writer, _, _ = recover(tmp_path, segment_bytes=4096)
    for i in range(60):
        writer.append(writer.encode([(OP_PUT, b"bz%d" % i, 0, b"q" * 80, 0)])[1])
    writer.close()
    _, report2, _ = recover(tmp_path)
    assert report2.last_seqno == recs[-2].seqno - 1 + 60


def test_the_zeroed_torn_tail_survives_a_power_cut_right_after_open(tmp_path: Path) -> None:
    """Recovery zeroes a torn tail and syncs it before it appends: a power cut right after open
    must not bring the torn bytes back (the next records would follow garbage)."""
    src, written, buf = _one_segment_log(tmp_path, 10, seed=12)
    last = records_in(src / SEG1)[-1]
    truncate_at(src / SEG1, last.offset + 30)
    fo = FaultyFileOps()
    writer, report, _ = recover(src, fileops=fo)
    assert report.truncated_bytes > 0
    fo.drop_unsynced()  # power cut before the first new record
    data = (src / SEG1).read_bytes()
    assert nonzero_end(data, report.truncated_offset) == report.truncated_offset


def test_a_restart_makes_the_names_durable_before_it_acknowledges_anything(tmp_path: Path) -> None:
    """Killed between a new segment's rename and the directory fsync, the daemon restarts
    (the machine did not: the page cache still has the entry) and acknowledges writes into
    that segment. A power cut then must not take the segment, and those writes, away."""
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    for i in range(30):
        writer.append(writer.encode(((OP_PUT, b"a%d" % i, 0, b"v" * 60, 0),))[1])
    fo.calls.clear()
    fo.crash_at = ("fsync_dir", 1)  # rotation step 4
    with pytest.raises(SimulatedCrash):
        writer.append(b"".join(writer.encode(((OP_PUT, b"b%d" % i, 0, b"w" * 60, 0),))[1] for i in range(10)))
    fo.kill()
    fo.crash_at = None
    w2, report, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    assert report.last_seqno == 30 and w2.segno == 2  # the renamed, empty segment is the newest
    for i in range(5):
        w2.append(w2.encode(((OP_PUT, b"acked%d" % i, 0, b"x", 0),))[1])  # fdatasync returned: acked
    fo.drop_unsynced()  # power cut, w2 never closed
    w3, report, table = recover(tmp_path)
    w3.close()
    assert report.last_seqno == 35
    assert all(b"acked%d" % i in table.entries for i in range(5))


def test_check_log_repair_at_any_crash_point_keeps_what_it_cut_or_cuts_nothing(tmp_path: Path) -> None:
    """A power cut at each step of a repair: either the cut is not durable (the log is as it
    was), or the copy of the cut bytes is. Running the repair again then ends clean."""
    rng = random.Random(23)
    src = tmp_path / "src"
    written = write_log(src, [random_ops(rng) for _ in range(150)], segment_bytes=4096)
    seg = segments(src)[1]
    r = records_in(seg)[2]
    zero_range(seg, r.offset + 8, r.offset + 16)
    original = seg.read_bytes()
    clean = FaultyFileOps()
    check_log(shutil.copytree(src, tmp_path / "clean"), repair=True, fileops=clean)
    points = [(op, n) for op, count in clean.calls.items() for n in range(1, count + 1)]
    assert ("rename", 1) in points  # later segments are moved aside: those are crash points too
    for op, n in points:
        d = shutil.copytree(src, tmp_path / f"{op}-{n}")
        fo = FaultyFileOps(crash_at=(op, n))
        with pytest.raises(SimulatedCrash):
            check_log(d, repair=True, fileops=fo)
        fo.drop_unsynced()
        now = (d / seg.name).read_bytes()
        if now[r.offset : r.offset + 16] != original[r.offset : r.offset + 16]:  # the cut is durable
            kept = [p.read_bytes() for p in d.iterdir() if p.name.startswith(seg.name + ".corrupt-")]
            assert original[r.offset :] in kept, (op, n)
        report = check_log(d, repair=True)
        assert report.ok, (op, n)
        _expect_prefix(d, written, r.seqno - 1)


def test_a_segment_of_another_log_is_refused_by_its_salt(tmp_path: Path) -> None:
    """Two logs that happen to line up (same segment numbers and seqnos): a segment copied from
    one into the other checks under its own salt, so only the salt tells it apart."""
    def build(d: Path, value: bytes) -> None:
        writer, _, _ = recover(d, segment_bytes=4096)
        for i in range(20):
            writer.append(writer.encode(((OP_PUT, b"k%d" % i, 0, value, 0),))[1])
        writer.rotate()
        for i in range(5):
            writer.append(writer.encode(((OP_PUT, b"n%d" % i, 0, value, 0),))[1])
        writer.close()

    a, b = tmp_path / "a", tmp_path / "b"
    build(a, b"A" * 60)
    build(b, b"B" * 60)
    shutil.copy(b / segment_name(2), a / segment_name(2))
    report = check_log(a)
    assert report.verdict == "corrupt" and report.problem is not None
    assert report.problem.kind == "salt" and report.problem.path == a / segment_name(2)
    with pytest.raises(LogCorrupt, match="belongs to another log"):
        recover(a)
    fixed = check_log(a, repair=True)  # moves the foreign segment aside
    assert fixed.ok and fixed.repaired
    writer, rep, table = recover(a)
    writer.close()
    assert rep.last_seqno == 20 and b"n0" not in table.entries


def _damaged_header_log(d: Path, *, snapshot: bool) -> tuple[Path, dict[bytes, bytes]]:
    """A log of 80 puts in 4 KiB segments (the first 20 folded into a snapshot if asked) whose
    first segment after the snapshot (else segment 1) has one bit flipped in its header."""
    from walcache.daemon.compaction import compact

    table = DictTable()
    writer, _ = open_log(d, Applier(table, NOW_MS), segment_bytes=4096)
    model: dict[bytes, bytes] = {}

    def put(key: bytes) -> None:
        ops = ((OP_PUT, key, 0, b"v" * 60, 0),)
        seqno, data = writer.encode(ops)
        writer.append(data)
        Applier(table, NOW_MS)(seqno, ops)
        model[key] = b"v" * 60

    for i in range(20):
        put(b"k%d" % i)
    first = 1
    if snapshot:
        k, s = writer.seal()
        first = k + 1
    for i in range(60):
        put(b"t%d" % i)
    writer.close()
    if snapshot:
        entries = [(key, e[0], e[1], e[2], e[3]) for key, e in table.entries.items() if key.startswith(b"k")]
        compact(d, entries, seal_seqno=s, next_segno=first, now_ms=NOW_MS)
    seg = d / segment_name(first)
    flip_byte(seg, 20, 0x01)  # in the header's seqno field
    return seg, model


@pytest.mark.parametrize("snapshot", [True, False], ids=["after-a-snapshot", "segment-1"])
def test_repair_rebuilds_a_damaged_header_and_keeps_every_record(tmp_path: Path, snapshot: bool) -> None:
    seg, model = _damaged_header_log(tmp_path, snapshot=snapshot)
    with pytest.raises(LogCorrupt):
        recover(tmp_path)
    report = check_log(tmp_path, repair=True)
    assert report.ok and report.verdict == "clean" and report.dropped_seqnos is None
    assert any(a.startswith(f"rebuilt the header of {seg.name}") for a in report.actions), report.actions
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(seg.name + ".corrupt-")]
    assert len(kept.read_bytes()) == SEGMENT_HEADER_SIZE  # the damaged header, kept
    writer, rep, table = recover(tmp_path)
    writer.close()
    assert rep.last_seqno == 80 and {k: table.entries[k][1] for k in model} == model


def test_repair_does_not_rebuild_a_header_its_records_do_not_follow(tmp_path: Path) -> None:
    """Segment 1's records are not this log's (another salt): no rebuilt header can make them
    check, so the segment is moved aside as before."""
    seg, _ = _damaged_header_log(tmp_path / "a", snapshot=False)
    other = tmp_path / "b"
    _damaged_header_log(other, snapshot=False)
    body = (other / seg.name).read_bytes()
    seg.write_bytes(seg.read_bytes()[:SEGMENT_HEADER_SIZE] + body[SEGMENT_HEADER_SIZE:])
    report = check_log(tmp_path / "a", repair=True)
    assert not any(a.startswith("rebuilt") for a in report.actions), report.actions
    assert any(f"moved {seg.name} aside" in a for a in report.actions), report.actions


def test_repair_does_not_rebuild_an_intact_header_of_another_format_version(tmp_path: Path) -> None:
    """A header whose checksum holds but whose version this walcache does not read (a newer
    walcache's segment after a downgrade) is no damage: repair must not relabel it."""
    import zlib

    from walcache.daemon.walformat import FORMAT_VERSION, RESIDUE, SEGMENT_HEADER, SEGMENT_MAGIC, decode_segment_header

    seg, _ = _damaged_header_log(tmp_path, snapshot=False)
    flip_byte(seg, 20, 0x01)  # undo the flip: the header is whole again
    buf = bytearray(seg.read_bytes())
    h = decode_segment_header(buf)
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION + 1, SEGMENT_HEADER_SIZE, h.segno, h.first_seqno,
                               h.created_ns, h.salt, 0)[:-4]  # fmt: skip
    buf[:SEGMENT_HEADER_SIZE] = body + struct.pack("<I", zlib.crc32(body, RESIDUE))
    seg.write_bytes(bytes(buf))
    report = check_log(tmp_path, repair=True)
    assert not any(a.startswith("rebuilt") for a in report.actions), report.actions
    # Left as it was: the segment is moved aside whole, its header unchanged.
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(seg.name + ".corrupt-")]
    assert kept.read_bytes()[:SEGMENT_HEADER_SIZE] == bytes(buf[:SEGMENT_HEADER_SIZE])
