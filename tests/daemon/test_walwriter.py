"""The writer: group commit, fsync policies, failure is final, segments, the encode/append threads."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from walcache import ConfigError, LogFailed, LogFull
from walcache.daemon.fileops import FaultyFileOps
from walcache.daemon.server import _Flusher
from walcache.daemon.walwriter import WalWriter
from walcache.daemon.walformat import OP_DELETE, OP_PUT, SEGMENT_HEADER_SIZE, decode_record, segment_name

from .bytesurgery import all_records, records_in, salt_of, segments
from .logmodel import recover, state_after


def _put(i: int, size: int = 20) -> tuple[tuple[int, bytes, int, bytes, int], ...]:
    return ((OP_PUT, b"bk%d" % i, 1, b"v" * size, 0),)


def test_group_commit_is_one_write_and_one_fdatasync(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo)
    writes, syncs = fo.writes, fo.fsyncs
    datas = [writer.encode(_put(i))[1] for i in range(64)]
    writer.append(b"".join(datas))
    assert (fo.writes - writes, fo.fsyncs - syncs) == (1, 1)
    assert writer.durable_seqno == writer.written_seqno == 64
    writer.close()
    assert [r.seqno for r in all_records(tmp_path)] == list(range(1, 65))


def test_policy_never_leaves_syncing_to_the_os_until_close(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo, policy="never")
    syncs = fo.fsyncs
    for i in range(20):
        writer.append(writer.encode(_put(i))[1])
    writer.sync_if_due()
    assert fo.fsyncs == syncs and writer.durable_seqno == 0
    writer.sync()
    assert fo.fsyncs == syncs + 1 and writer.durable_seqno == 20
    writer.append(writer.encode(_put(99))[1])
    writer.close()  # a clean close syncs under every policy
    assert fo.fsyncs == syncs + 2 and fo.synced_length(tmp_path / segment_name(1)) > 0


class _Clock:
    """A monotonic clock the test moves (the writer's ``clock=`` seam)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_policy_interval_syncs_once_the_interval_has_passed(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    clock = _Clock()
    writer, _, _ = recover(tmp_path, fileops=fo, policy="interval", interval_ms=50, clock=clock)
    syncs = fo.fsyncs
    writer.append(writer.encode(_put(1))[1])
    writer.append(writer.encode(_put(2))[1])
    assert fo.fsyncs == syncs  # interval not yet over
    clock.now += 0.049
    writer.sync_if_due()
    assert fo.fsyncs == syncs
    clock.now += 0.002
    writer.sync_if_due()
    assert fo.fsyncs == syncs + 1 and writer.durable_seqno == 2
    clock.now += 1.0
    writer.sync_if_due()  # nothing new: no sync
    assert fo.fsyncs == syncs + 1
    writer.append(writer.encode(_put(3))[1])  # due at append time: synced right there
    assert fo.fsyncs == syncs + 2 and writer.durable_seqno == 3
    writer.close()


class _HeldSync(FaultyFileOps):
    """A disk whose next fdatasync (once ``hold`` is set) returns only when the test says so."""

    def __init__(self, fail_held: bool = False) -> None:
        super().__init__()
        self.hold = False
        self.fail_held = fail_held  # the held sync then fails with EIO
        self.entered = threading.Event()
        self.release = threading.Event()
        self.after_failure: list[int] = []  # descriptors synced after the held sync failed

    def fdatasync(self, fd: int) -> None:
        if self.fail_held and self.entered.is_set():
            self.after_failure.append(fd)
        super().fdatasync(fd)

    def device_sync(self, fd: int) -> None:  # after the model noted what the call covers
        if self.hold:
            self.hold = False  # only this one: later syncs (a rotation's) go through
            self.entered.set()
            assert self.release.wait(30), "the test never released the sync"
            if self.fail_held:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().device_sync(fd)


def _wait_until_parked(writer: WalWriter) -> None:
    """Until one thread waits on the writer's condition (for the background sync to end)."""
    deadline = time.monotonic() + 10
    while not writer._sync_done._waiters:  # type: ignore[attr-defined]  # CPython's Condition
        assert time.monotonic() < deadline, "no thread came to wait for the sync in flight"
        time.sleep(0.001)


def _in_thread(fn: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_interval_appends_go_on_while_the_timed_sync_runs(tmp_path: Path) -> None:
    """The daemon's loop thread appends under --fsync interval: a timed sync (the flusher's
    sync_if_due) must not hold the writer while its fdatasync runs. The sync makes the
    records written before it durable; one appended meanwhile waits for the next sync."""
    fo = _HeldSync()
    writer, _, _ = recover(tmp_path, fileops=fo, policy="interval", interval_ms=1)
    writer.sync_in_background = True
    writer.append(writer.encode(_put(1))[1])
    assert writer.durable_seqno == 0  # appends no longer sync by themselves
    time.sleep(0.01)  # past the 1 ms interval: due
    fo.hold = True
    syncer, sync_errors = _in_thread(writer.sync_if_due)
    assert fo.entered.wait(10)
    appender, append_errors = _in_thread(lambda: writer.append(writer.encode(_put(2))[1]))
    appender.join(10)
    done_while_held = not appender.is_alive()
    fo.release.set()
    syncer.join(10)
    appender.join(10)
    assert done_while_held, "the append waited for the fdatasync in flight"
    assert not sync_errors and not append_errors, (sync_errors, append_errors)
    assert writer.written_seqno == 2 and writer.durable_seqno == 1
    assert writer.sync_due_in() is not None  # record 2 still waits for a sync
    time.sleep(0.01)
    writer.sync_if_due()
    assert writer.durable_seqno == 2 and writer.sync_due_in() is None
    writer.close()


def test_a_power_cut_after_a_timed_sync_keeps_what_it_claimed(tmp_path: Path) -> None:
    """The background timed sync claims (durable_seqno) only the records written before it
    started; a power cut right after it keeps at least those, and a prefix."""
    fo = _HeldSync()
    writer, _, _ = recover(tmp_path, fileops=fo, policy="interval", interval_ms=1)
    writer.sync_in_background = True
    for i in range(1, 6):
        writer.append(writer.encode(_put(i))[1])
    time.sleep(0.01)
    fo.hold = True
    syncer, sync_errors = _in_thread(writer.sync_if_due)
    assert fo.entered.wait(10)
    for i in range(6, 9):  # written while the sync runs: not claimed by it
        writer.append(writer.encode(_put(i))[1])
    fo.release.set()
    syncer.join(10)
    assert not sync_errors and writer.durable_seqno == 5 and writer.written_seqno == 8
    fo.drop_unsynced()
    _, report, table = recover(tmp_path)
    kept = sorted(int(k[2:]) for k in table.entries)
    assert kept == [1, 2, 3, 4, 5], kept  # the model keeps what was written before the sync began


def _rotate_during_a_held_sync(
    tmp_path: Path, fo: _HeldSync
) -> tuple[WalWriter, int, list[BaseException], list[BaseException]]:
    """Two records fill a 4096-byte segment; hold the timed sync of that segment, append a
    third (which must rotate), wait until that append waits for the sync, release it.
    Returns the writer, the first segment's number and the errors of sync and append."""
    writer, _, _ = recover(tmp_path, fileops=fo, policy="interval", interval_ms=1, segment_bytes=4096)
    writer.sync_in_background = True
    big = 1500  # two records fit in a 4096-byte segment, the third starts the next one
    writer.append(writer.encode(_put(1, big))[1])
    writer.append(writer.encode(_put(2, big))[1])
    segno = writer.segno
    time.sleep(0.01)
    fo.hold = True
    syncer, sync_errors = _in_thread(writer.sync_if_due)
    assert fo.entered.wait(10)
    rotator, rotate_errors = _in_thread(lambda: writer.append(writer.encode(_put(3, big))[1]))
    _wait_until_parked(writer)  # times out if the rotation goes on without waiting
    fo.release.set()
    syncer.join(10)
    rotator.join(10)
    return writer, segno, sync_errors, rotate_errors


def test_a_rotation_waits_for_the_timed_sync_of_the_segment_it_closes(tmp_path: Path) -> None:
    """A rotation closes the old segment's descriptor: with a timed sync of that segment in
    flight outside the lock, it must wait for it (else the sync fails on a closed fd)."""
    writer, segno, sync_errors, rotate_errors = _rotate_during_a_held_sync(tmp_path, _HeldSync())
    assert not sync_errors and not rotate_errors, (sync_errors, rotate_errors)
    assert not writer.failed and writer.segno == segno + 1 and writer.durable_seqno >= 2
    writer.close()
    assert [r.seqno for r in all_records(tmp_path)] == [1, 2, 3]


def test_an_append_that_waited_for_a_failed_timed_sync_fails_too(tmp_path: Path) -> None:
    """The timed sync fails (EIO) while an append waits for it to rotate: the append must
    raise LogFailed, not sync the failed segment again (nothing is retried) and go on into
    a new segment, where its record would be acknowledged."""
    fo = _HeldSync(fail_held=True)
    writer, segno, sync_errors, rotate_errors = _rotate_during_a_held_sync(tmp_path, fo)
    assert [type(e) for e in sync_errors] == [LogFailed] and [type(e) for e in rotate_errors] == [LogFailed]
    assert writer.failed and writer.segno == segno and writer.durable_seqno == 0
    assert fo.after_failure == []
    with pytest.raises(LogFailed):
        writer.sync()
    writer.close()


def test_interval_no_write_waits_much_more_than_the_interval(tmp_path: Path) -> None:
    """--fsync interval through the daemon's flusher thread: a write made just after a sync and
    followed by another one before the interval ends is synced when the interval ends.
    The flusher used to restart a whole interval's wait at every append, which made the first
    write wait almost twice the interval (about 1.9 s)."""
    fo = FaultyFileOps()
    clock = _Clock()
    writer, _, _ = recover(tmp_path, fileops=fo, policy="interval", interval_ms=1000, clock=clock)
    wake_r, wake_w = os.pipe()
    flusher = _Flusher(writer, wake_w, 1.0)
    flusher.start()

    def put(i: int) -> None:
        flusher.submit_records([writer.encode(_put(i))[1]])
        while not flusher.done:
            time.sleep(0.001)
        assert flusher.done.popleft()[0] is None

    def synced_through(seqno: int) -> None:
        flusher.submit_records([])  # wakes the flusher, which syncs what is due
        deadline = time.monotonic() + 10
        while writer.durable_seqno < seqno and time.monotonic() < deadline:
            time.sleep(0.001)
        assert writer.durable_seqno >= seqno, "no fdatasync within 10 s"

    try:
        syncs = writer.syncs
        assert flusher.idle_timeout() == 1.0  # nothing unsynced: an interval
        put(1)
        clock.now += 1.0
        synced_through(1)  # a timed sync: the next one is due a second from now
        put(2)
        clock.now += 0.8
        put(3)
        assert writer.durable_seqno == 1  # not due yet: nothing synced at append time
        # The flusher sleeps until put(2) is due, not a whole interval after put(3).
        assert flusher.idle_timeout() == pytest.approx(0.2)
        clock.now += 0.2
        synced_through(3)
        # Both were timed syncs: the daemon's fsync percentiles (stats) count them.
        assert len(writer.sync_latencies) == writer.syncs - syncs == 2
    finally:
        flusher.submit(None)
        flusher.join(10)
        writer.close()
        os.close(wake_r)
        os.close(wake_w)


def test_records_claim_what_was_durable_when_they_were_encoded(tmp_path: Path) -> None:
    writer, _, _ = recover(tmp_path, policy="never")
    writer.append(writer.encode(_put(1))[1])
    writer.append(writer.encode(_put(2))[1])
    writer.sync()
    early = writer.encode(_put(3))[1]  # encoded after the sync of 1..2
    writer.append(early)
    writer.close()
    path = tmp_path / segment_name(1)
    buf = path.read_bytes()
    claims = [decode_record(buf, r.offset, salt=salt_of(path)).durable_seqno for r in records_in(path)]
    assert claims == [0, 0, 2]


def test_failure_is_final_and_nothing_is_retried(tmp_path: Path) -> None:
    fo = FaultyFileOps(fail_fsync_at=3)  # 1: segment creation, 2: first append, 3: second append
    writer, _, _ = recover(tmp_path, fileops=fo)
    writer.append(writer.encode(_put(1))[1])
    _, data = writer.encode(_put(2))
    with pytest.raises(LogFailed) as ei:
        writer.append(data)
    assert ei.value.errno == 5 and "nothing is retried" in str(ei.value)
    assert writer.failed and writer.durable_seqno == 1
    counts = (fo.writes, fo.fsyncs)
    for call in (lambda: writer.append(data), writer.sync, writer.sync_if_due, writer.rotate,
                 lambda: writer.encode(_put(3))):
        with pytest.raises(LogFailed, match="failed earlier"):
            call()
    assert (fo.writes, fo.fsyncs) == counts
    writer.close()  # closes without another sync attempt
    assert fo.fsyncs == counts[1]


def test_a_failed_write_fails_the_log_too(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo)
    fo.fail_write_at = {fo.writes + 1}
    with pytest.raises(LogFailed) as ei:
        writer.append(writer.encode(_put(1))[1])
    assert ei.value.errno == 5 and writer.failed


def test_append_refuses_records_out_of_order_and_writes_nothing(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo)
    _, d1 = writer.encode(_put(1))
    _, d2 = writer.encode(_put(2))
    writes = fo.writes
    with pytest.raises(ValueError, match="seqno order"):
        writer.append(d2)
    with pytest.raises(ValueError, match="whole records"):
        writer.append(d1[:-8])
    assert fo.writes == writes and not writer.failed
    writer.append(d1 + d2)
    writer.append(b"")  # an empty group is a no-op
    writer.close()
    assert [r.seqno for r in all_records(tmp_path)] == [1, 2]


def test_encode_touches_no_file_and_keeps_the_counter_on_bad_ops(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo)
    before = dict(fo.calls)
    assert writer.encode(_put(1))[0] == 1
    assert writer.encode(_put(2))[0] == 2
    with pytest.raises(ValueError):
        writer.encode([(OP_PUT, b"", 0, b"v", 0)])
    assert writer.next_seqno == 3
    assert fo.calls == before
    writer.close()


def test_segments_rotate_are_trimmed_and_continue_seqnos(tmp_path: Path) -> None:
    writer, _, _ = recover(tmp_path, segment_bytes=4096)
    written = []
    for i in range(100):
        seqno, data = writer.encode(_put(i, 50))
        written.append((seqno, _put(i, 50)))
        writer.append(data)
    writer.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    for a, b in zip(segs, segs[1:]):
        ra, rb = records_in(a), records_in(b)
        assert a.stat().st_size == ra[-1].end  # sealed segments are trimmed to their last record
        assert rb[0].seqno == ra[-1].seqno + 1
    # A group bigger than a segment gets a segment of its own.
    writer, report, table = recover(tmp_path, segment_bytes=4096)
    assert report.last_seqno == 100 and table.snapshot() == state_after(written, 100)
    seqno, big = writer.encode(((OP_PUT, b"bbig", 0, b"x" * 10_000, 0),))
    writer.append(big)
    writer.close()
    last = segments(tmp_path)[-1]
    assert [r.seqno for r in records_in(last)] == [101]
    assert records_in(last)[0].offset == SEGMENT_HEADER_SIZE


def test_rotate_seals_on_demand_and_is_a_noop_on_an_empty_segment(tmp_path: Path) -> None:
    writer, _, _ = recover(tmp_path)
    assert writer.rotate() == 1 and len(segments(tmp_path)) == 1
    writer.append(writer.encode(_put(1))[1])
    assert writer.rotate() == 1
    assert writer.segno == 2 and len(segments(tmp_path)) == 2
    writer.append(writer.encode(_put(2))[1])
    writer.close()
    assert [r.seqno for r in records_in(segments(tmp_path)[1])] == [2]


def test_close_is_idempotent_and_later_appends_fail(tmp_path: Path) -> None:
    writer, _, _ = recover(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(LogFailed, match="closed"):
        writer.append(b"")
    with pytest.raises(LogFailed, match="closed"):
        writer.encode(_put(1))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"policy": "sometimes"}, "fsync policy"),
        ({"policy": "interval", "interval_ms": 0}, "interval"),
        ({"segment_bytes": 100}, "segment size"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_touched(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recover(tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()


def test_encode_on_one_thread_append_on_another(tmp_path: Path) -> None:
    """The daemon's shape: the loop thread encodes while the flusher appends and syncs."""
    writer, _, _ = recover(tmp_path, policy="always")
    queue: list[bytes] = []
    cv = threading.Condition()
    done = threading.Event()
    errors: list[BaseException] = []

    def flusher() -> None:
        try:
            while True:
                with cv:
                    while not queue and not done.is_set():
                        cv.wait(0.05)
                    if not queue and done.is_set():
                        return
                    group = b"".join(queue)
                    queue.clear()
                writer.append(group)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=flusher)
    t.start()
    written = []
    try:
        for i in range(3000):
            ops = ((OP_DELETE, b"bk%d" % (i - 1), 0, b"", 0),) if i % 7 == 0 else _put(i)
            with cv:
                seqno, data = writer.encode(ops)
                queue.append(data)
                cv.notify()
            written.append((seqno, ops))
    finally:
        done.set()
        t.join(timeout=60)
    assert not t.is_alive() and errors == []
    assert writer.syncs < 3000  # groups formed while syncs were in flight
    writer.close()
    _, report, table = recover(tmp_path)
    assert report.last_seqno == 3000 and table.snapshot() == state_after(written, 3000)


def test_a_new_log_makes_its_segment_and_its_data_dir_durable(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    d = tmp_path / "new" / "data"
    writer, _, _ = recover(d, fileops=fo)
    writer.close()
    assert fo.dirs_synced == [d, d.resolve().parent]
    fo2 = FaultyFileOps()
    # An existing log: its names too, whatever a killed daemon left only in the page cache.
    writer, _, _ = recover(d, fileops=fo2)
    writer.close()
    assert fo2.dirs_synced == [d, d.resolve().parent]


def test_power_loss_model_reverts_only_files_the_seam_touched(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    before = {tmp_path / "neighbour-old": b"old", d / "LOCKISH": b"pid"}
    for p, content in before.items():
        p.write_bytes(content)
    fo = FaultyFileOps()
    writer, _, _ = recover(d, fileops=fo)  # fsyncs d and its parent (tmp_path)
    after = {tmp_path / "neighbour-new": b"new", d / "made-later": b"x"}
    for p, content in after.items():
        p.write_bytes(content)
    writer.append(writer.encode(_put(1))[1])  # synced (always)
    writer.close()
    seg = d / segment_name(1)
    synced = seg.read_bytes()
    with open(seg, "r+b") as f:  # an unsynced change made outside the seam to a touched file
        f.seek(SEGMENT_HEADER_SIZE + 500)
        f.write(b"unsynced")
    (d / "wal-0000000000000002.log.tmp").write_bytes(b"junk")  # untouched by the seam
    fo.drop_unsynced()
    for p, content in {**before, **after}.items():
        assert p.read_bytes() == content, p
    assert (d / "wal-0000000000000002.log.tmp").read_bytes() == b"junk"
    assert seg.read_bytes() == synced  # the touched file lost its unsynced change


def test_power_loss_model_reverts_an_unsynced_rename(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    a, b = tmp_path / "a", tmp_path / "b"
    fd = fo.open(a, os.O_RDWR | os.O_CREAT)
    fo.pwrite_all(fd, b"hello", 0)
    fo.fdatasync(fd)
    fo.close(fd)
    fo.fsync_dir(tmp_path)
    fo.rename(a, b)  # no directory fsync after it
    fo.drop_unsynced()
    assert a.read_bytes() == b"hello" and not b.exists()
    fo.rename(a, b)
    fo.fsync_dir(tmp_path)
    fo.drop_unsynced()
    assert b.read_bytes() == b"hello" and not a.exists()


def test_no_space_to_grow_the_log_refuses_the_group_whole_and_the_writer_goes_on(tmp_path: Path) -> None:
    """ENOSPC while an extent is zero-filled: LogFull, nothing of the group written, the
    writer not failed; the seqnos are taken back, and once space is freed the same records
    (re-encoded) are appended. Recovery finds exactly the groups that were written."""
    fo = FaultyFileOps(disk_free=(256 << 10) + 64 + 1000)  # the first extent, and 1000 B more
    writer, _, _ = recover(tmp_path, fileops=fo)
    big = [writer.encode(_put(i, size=50_000))[1] for i in range(5)]  # 5 x 50 KB: the extent holds them
    writer.append(b"".join(big))
    assert writer.written_seqno == 5
    seqno, rec = writer.encode(_put(5, size=50_000))  # needs the next extent: no room
    with pytest.raises(LogFull, match="no disk space to extend"):
        writer.append(rec)
    assert not writer.failed and writer.written_seqno == 5
    assert writer.take_back_unwritten() == seqno == 6
    with pytest.raises(LogFull):
        writer.append(writer.encode(_put(6, size=50_000))[1])  # still full: refused again
    writer.take_back_unwritten()
    fo.free_space()
    again, rec = writer.encode(_put(7, size=50_000))
    assert again == 6
    writer.append(rec)
    writer.close()
    assert [r.seqno for r in all_records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    again_writer, _, table = recover(tmp_path)
    again_writer.close()
    # Seqno 6 is the put encoded after the take-back; the refused ones are nowhere.
    assert sorted(table.entries) == [b"bk0", b"bk1", b"bk2", b"bk3", b"bk4", b"bk7"]


def test_no_space_for_the_next_segment_refuses_the_group_and_leaves_no_tmp(tmp_path: Path) -> None:
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    for i in range(3):
        writer.append(writer.encode(_put(i, size=1000))[1])
    fo.disk_free = 100  # the next segment's header and first extent do not fit
    with pytest.raises(LogFull, match="no disk space to start segment"):
        writer.append(writer.encode(_put(3, size=1000))[1])
    assert not writer.failed and writer.segno == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    writer.take_back_unwritten()
    syncs = fo.fsyncs
    with pytest.raises(LogFull):  # a retry while still full: the old segment is not synced again
        writer.append(writer.encode(_put(3, size=1000))[1])
    assert fo.fsyncs == syncs
    writer.take_back_unwritten()
    fo.free_space()
    writer.append(writer.encode(_put(4, size=1000))[1])  # the rotation is retried
    assert writer.segno == 2
    writer.close()
    assert [r.seqno for r in all_records(tmp_path)] == [1, 2, 3, 4]


def test_no_space_after_the_new_segment_is_renamed_fails_the_log(tmp_path: Path) -> None:
    """ENOSPC from the directory fsync that follows the rename: the new segment exists under
    its final name and starts at the next seqno, so the old one must take no more records.
    That is a LogFailed (the daemon stops), not a LogFull; recovery finds every record."""
    fo = FaultyFileOps()
    writer, _, _ = recover(tmp_path, fileops=fo, segment_bytes=4096)
    for i in range(3):
        writer.append(writer.encode(_put(i, size=1000))[1])
    fo.fail_dir_fsync_at = {fo.dir_fsyncs + 1}
    fo.dir_fsync_errno = errno.ENOSPC
    with pytest.raises(LogFailed, match="No space"):
        writer.append(writer.encode(_put(3, size=1000))[1])
    assert writer.failed
    writer.close()
    w2, report, table = recover(tmp_path)
    w2.append(w2.encode(_put(4, size=10))[1])  # the log goes on after the restart
    w2.close()
    assert report.last_seqno == 3 and sorted(table.entries) == [b"bk0", b"bk1", b"bk2"]
    assert [r.seqno for r in all_records(tmp_path)] == [1, 2, 3, 4]


def test_a_data_dir_moved_under_the_log_stops_it_instead_of_splitting_it(tmp_path: Path) -> None:
    """mv data data.old && mkdir data while the daemon runs: the next segment would go into
    the new, empty directory and the log would be split across two. The rotation refuses."""
    d = tmp_path / "data"
    writer, _, _ = recover(d, segment_bytes=4096)
    for i in range(3):
        writer.append(writer.encode(_put(i, size=1000))[1])
    d.rename(tmp_path / "data.old")
    d.mkdir()
    with pytest.raises(LogFailed, match="no longer the directory this log was opened in"):
        writer.append(writer.encode(_put(3, size=1000))[1])  # needs the next segment
    writer.close()
    assert list(d.iterdir()) == []
    w2, report, table = recover(tmp_path / "data.old")
    w2.close()
    assert report.last_seqno == 3 and sorted(table.entries) == [b"bk0", b"bk1", b"bk2"]
