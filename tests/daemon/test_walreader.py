"""The reader: replays good records in order, reports the first problem, decides nothing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from walcache.daemon import walformat as wf
from walcache.daemon.walformat import OP_DELETE, OP_PUT, Op
from walcache.daemon.walreader import (
    Problem,
    find_intact_records,
    iter_records,
    list_segments,
    nonzero_end,
    read_log,
)

from .bytesurgery import (
    all_records,
    fix_checksum,
    flip_byte,
    records_in,
    salt_of,
    segments,
    truncate_at,
    write_at,
    zero_range,
)
from .logmodel import random_ops, write_log


def _collect(data_dir: Path, **kw: object) -> tuple[list[tuple[int, tuple[Op, ...]]], list[Problem], object]:
    got: list[tuple[int, tuple[Op, ...]]] = []
    problems: list[Problem] = []
    scan = read_log(data_dir, lambda s, ops: got.append((s, tuple(ops))), on_problem=problems.append, **kw)  # type: ignore[arg-type]
    return got, problems, scan


def test_replays_every_record_in_order_across_segments(tmp_path: Path) -> None:
    rng = random.Random(1)
    ops = [random_ops(rng) for _ in range(300)]
    written = write_log(tmp_path, ops, group_sizes=[1, 3, 7], segment_bytes=4096)
    assert len(segments(tmp_path)) > 3
    got, problems, scan = _collect(tmp_path)
    assert got == written
    assert problems == []
    assert scan.last_seqno == 300 and scan.records == 300  # type: ignore[attr-defined]


def test_iter_records_yields_what_read_log_applies(tmp_path: Path) -> None:
    rng = random.Random(2)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(120)], segment_bytes=4096)
    assert list(iter_records(tmp_path)) == written


def test_reading_can_start_at_any_segment(tmp_path: Path) -> None:
    rng = random.Random(3)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(200)], segment_bytes=4096)
    segs = list_segments(tmp_path)
    for segno, path in segs:
        first = records_in(path)[0].seqno
        got, problems, _ = _collect(tmp_path, first_segno=segno)
        assert problems == []
        assert got == written[first - 1 :]


def test_damage_mid_segment_stops_replay_exactly_before_it(tmp_path: Path) -> None:
    rng = random.Random(4)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(60)], group_sizes=[4])
    recs = all_records(tmp_path)
    target = recs[30]
    flip_byte(target.path, target.offset + 20)
    got, problems, _ = _collect(tmp_path)
    assert got == written[:30]  # the slow path took over and stopped at the damage
    assert len(problems) == 1
    p = problems[0]
    assert (p.path, p.offset, p.kind, p.last_good_seqno, p.final) == (target.path, target.offset, "checksum", 30, True)


def test_torn_last_record_is_reported_as_truncated(tmp_path: Path) -> None:
    rng = random.Random(5)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(10)])
    last = all_records(tmp_path)[-1]
    truncate_at(last.path, last.offset + 10)
    got, problems, _ = _collect(tmp_path)
    assert got == written[:9]
    assert problems[0].kind == "truncated" and problems[0].offset == last.offset


def test_zero_length_followed_by_data_is_reported_as_trailing(tmp_path: Path) -> None:
    rng = random.Random(6)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(10)])
    recs = all_records(tmp_path)
    zero_range(recs[5].path, recs[5].offset, recs[5].end)
    got, problems, _ = _collect(tmp_path)
    assert got == written[:5]
    assert problems[0].kind == "trailing" and problems[0].offset == recs[5].offset


def test_a_well_formed_record_with_the_wrong_seqno_is_a_problem(tmp_path: Path) -> None:
    rng = random.Random(7)
    written = write_log(tmp_path, [random_ops(rng) for _ in range(10)])
    r = all_records(tmp_path)[4]
    write_at(r.path, r.offset + 8, (99).to_bytes(8, "little"))
    fix_checksum(r.path, r.offset)
    got, problems, _ = _collect(tmp_path)
    assert got == written[:4]
    assert problems[0].kind == "seqno"


def test_structure_problems_between_segments(tmp_path: Path) -> None:
    rng = random.Random(8)
    write_log(tmp_path, [random_ops(rng) for _ in range(200)], segment_bytes=4096)
    segs = segments(tmp_path)
    assert len(segs) >= 4
    # Segment 3's header damaged.
    flip_byte(segs[2], 30)
    _, problems, _ = _collect(tmp_path)
    assert problems[0].kind == "header" and problems[0].path == segs[2] and problems[0].offset == 0
    flip_byte(segs[2], 30)  # restore
    # A whole segment gone.
    segs[1].rename(segs[1].with_suffix(".gone"))
    _, problems, _ = _collect(tmp_path)
    assert problems[0].kind == "missing-segment" and problems[0].path == segs[2]


def test_records_lost_from_the_end_of_a_sealed_segment_show_as_a_seqno_gap(tmp_path: Path) -> None:
    rng = random.Random(9)
    write_log(tmp_path, [random_ops(rng) for _ in range(200)], segment_bytes=4096)
    segs = segments(tmp_path)
    last = records_in(segs[0])[-1]
    truncate_at(segs[0], last.offset)  # a clean-looking end, one record short
    _, problems, _ = _collect(tmp_path)
    assert problems[0].kind == "seqno-gap" and problems[0].path == segs[1]
    assert problems[0].last_good_seqno == last.seqno - 1


def test_find_intact_records_skips_damage_and_zero_runs(tmp_path: Path) -> None:
    rng = random.Random(10)
    write_log(tmp_path, [random_ops(rng) for _ in range(40)])
    recs = all_records(tmp_path)
    path = recs[0].path
    for r in recs[10:13]:
        flip_byte(path, r.offset)  # break three length fields
    zero_range(path, recs[20].offset, recs[25].offset)
    buf = path.read_bytes()
    found = find_intact_records(buf, recs[10].offset, len(buf), salt=salt_of(path))
    expected = [r for i, r in enumerate(recs) if i >= 13 and not 20 <= i < 25]
    assert [(f.offset, f.seqno, f.length) for f in found] == [(r.offset, r.seqno, r.length) for r in expected]


def test_record_bytes_stored_as_a_value_are_not_taken_for_records(tmp_path: Path) -> None:
    # A client could store bytes that form a valid record of some log; only the log's own salt validates.
    salt = None
    forged_records = b"".join(
        wf.encode_record(10_000 + i, [(OP_PUT, b"bx", 0, b"y", 0)], durable_seqno=9_999 + i, salt=s)
        for i, s in enumerate([0, 1, 12345])
    )
    write_log(tmp_path, [[(OP_PUT, b"bkey", 1, forged_records, 0)], [(OP_DELETE, b"bkey", 0, b"", 0)]])
    recs = all_records(tmp_path)
    salt = salt_of(recs[0].path)
    buf = recs[0].path.read_bytes()
    found = find_intact_records(buf, recs[0].offset + 8, len(buf), salt=salt)
    assert [f.seqno for f in found] == [2]
    # The same scan with a forged record's salt would have found it: the salt is what protects.
    assert any(f.seqno == 10_000 for f in find_intact_records(buf, recs[0].offset + 8, len(buf), salt=0))


def test_nonzero_end() -> None:
    assert nonzero_end(bytes(10), 0) == 0
    assert nonzero_end(b"\0\1\0\0", 0) == 2
    assert nonzero_end(b"\1" + bytes(200_000), 0) == 1
    assert nonzero_end(b"\1" + bytes(200_000), 1) == 1
    big = bytearray(300_000)
    big[150_001] = 7
    assert nonzero_end(bytes(big), 10) == 150_002


@pytest.mark.parametrize("damage", ["flip_header_crc", "other_salt"])
def test_a_segment_from_elsewhere_does_not_validate(tmp_path: Path, damage: str) -> None:
    write_log(tmp_path, [[(OP_PUT, b"bk%d" % i, 0, b"v", 0)] for i in range(5)])
    seg = segments(tmp_path)[0]
    buf = bytearray(seg.read_bytes())
    if damage == "flip_header_crc":
        buf[61] ^= 1
    else:  # a well-formed header with another salt: the records no longer check
        h = wf.decode_segment_header(buf)
        buf[:64] = wf.encode_segment_header(h.segno, h.first_seqno, h.created_ns, h.salt ^ 1)
    seg.write_bytes(bytes(buf))
    got, problems, _ = _collect(tmp_path)
    assert got == []
    assert problems[0].kind == ("header" if damage == "flip_header_crc" else "checksum")
