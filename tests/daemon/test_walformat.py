"""The WAL byte layout: pinned sizes and offsets, round trips, checksum coverage."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walcache.daemon import walformat as wf
from walcache.daemon.walformat import OP_DELETE, OP_PUT, RecordError


def test_layout_sizes_are_pinned() -> None:
    assert wf.SEGMENT_HEADER.size == wf.SEGMENT_HEADER_SIZE == 64
    assert wf.RECORD_HEADER.size == wf.RECORD_HEADER_SIZE == 36
    assert wf.BATCH_OP.size == 16
    assert wf.CRC_TRAILER.size == 4
    assert wf.MIN_RECORD_BYTES == 48
    assert (wf.REC_PUT, wf.REC_DELETE, wf.REC_BATCH) == (1, 2, 3)
    assert wf.FORMAT_VERSION == 1


def test_record_field_offsets_are_pinned() -> None:
    key, value = b"bKEY", b"VALUE!"
    rec = wf.encode_record(0x1122334455667788, [(OP_PUT, key, 7, value, 0xA1A2A3A4A5A6A7A8)],
                           durable_seqno=0x0102030405060708, salt=0xCAFEBABE)
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    length = u32.unpack_from(rec, 0)[0]
    assert length == len(rec) == 56  # 36 + 4 + 6 + 4 = 50, padded to 8
    assert rec[4] == wf.REC_PUT
    assert rec[5] == 7
    assert struct.unpack_from("<H", rec, 6)[0] == len(key)
    assert u64.unpack_from(rec, 8)[0] == 0x1122334455667788
    assert u64.unpack_from(rec, 16)[0] == 0x0102030405060708
    assert u64.unpack_from(rec, 24)[0] == 0xA1A2A3A4A5A6A7A8
    assert u32.unpack_from(rec, 32)[0] == len(value)
    assert rec[36:40] == key
    assert rec[40:46] == value
    assert rec[46:52] == bytes(6)  # zero padding
    v = wf.chain_value(0xCAFEBABE)
    assert u32.unpack_from(rec, 52)[0] == zlib.crc32(rec[:52], v) ^ 0xCAFEBABE


def test_batch_op_offsets_are_pinned() -> None:
    rec = wf.encode_record(5, [(OP_PUT, b"bA", 3, b"xyz", 9), (OP_DELETE, b"bB", 0, b"", 0)])
    assert rec[4] == wf.REC_BATCH and rec[5] == 0 and rec[6:8] == b"\0\0"
    area = struct.unpack_from("<I", rec, 32)[0]
    assert area == (16 + 2 + 3) + (16 + 2)
    op1 = rec[36:52]
    assert struct.unpack("<BBHIQ", op1) == (OP_PUT, 3, 2, 3, 9)
    assert rec[52:54] == b"bA" and rec[54:57] == b"xyz"
    assert struct.unpack("<BBHIQ", rec[57:73]) == (OP_DELETE, 0, 2, 0, 0)
    assert rec[73:75] == b"bB"


def test_segment_header_offsets_are_pinned() -> None:
    h = wf.encode_segment_header(0x0A0B, 0x1234, 0x55, 0xDEADBEEF)
    assert len(h) == 64
    assert h[0:8] == b"WALCACHE"
    assert struct.unpack_from("<I", h, 8)[0] == wf.FORMAT_VERSION
    assert struct.unpack_from("<I", h, 12)[0] == 64
    assert struct.unpack_from("<Q", h, 16)[0] == 0x0A0B
    assert struct.unpack_from("<Q", h, 24)[0] == 0x1234
    assert struct.unpack_from("<Q", h, 32)[0] == 0x55
    assert struct.unpack_from("<I", h, 40)[0] == 0xDEADBEEF
    assert h[44:60] == bytes(16)
    assert zlib.crc32(h, wf.RESIDUE) == wf.RESIDUE
    assert wf.decode_segment_header(h) == wf.SegmentHeader(0x0A0B, 0x1234, 0x55, 0xDEADBEEF)


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just(OP_PUT), st.binary(min_size=1, max_size=40), st.integers(0, 255),
                  st.binary(max_size=300), st.integers(0, 2**64 - 1)),
        st.tuples(st.just(OP_DELETE), st.binary(min_size=1, max_size=40), st.just(0), st.just(b""), st.just(0)),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(seqno=st.integers(1, 2**64 - 1), ops=ops_strategy, salt=st.integers(0, 2**32 - 1), data=st.data())
def test_encode_decode_round_trip(seqno: int, ops: list[wf.Op], salt: int, data: st.DataObject) -> None:
    durable = data.draw(st.integers(0, seqno - 1))
    rec = wf.encode_record(seqno, ops, durable_seqno=durable, salt=salt)
    assert len(rec) % 8 == 0 and len(rec) >= wf.MIN_RECORD_BYTES
    v = wf.chain_value(salt)
    assert zlib.crc32(rec, v) == v
    got = wf.decode_record(rec, salt=salt)
    assert got == wf.DecodedRecord(seqno, durable, tuple(ops), len(rec))
    assert rec[4] == (wf.REC_BATCH if len(ops) > 1 else ops[0][0])
    # Embedded in a larger buffer at an offset, with trailing bytes, it decodes the same.
    buf = b"\x55" * 16 + rec + b"\x77" * 9
    assert wf.decode_record(buf, 16, salt=salt) == got


def test_a_run_of_records_checks_with_one_crc_call_and_only_under_its_salt() -> None:
    run = b"".join(wf.encode_record(i, [(OP_PUT, b"bk%d" % i, 1, b"v" * i, 0)], salt=99) for i in range(1, 50))
    v = wf.chain_value(99)
    assert zlib.crc32(run, v) == v
    other = wf.chain_value(98)
    assert zlib.crc32(run, other) != other
    with pytest.raises(RecordError, match="checksum"):
        wf.decode_record(run, 0, salt=98)


def test_every_single_byte_change_of_a_record_is_detected() -> None:
    recs = [
        wf.encode_record(7, [(OP_PUT, b"bkey", 1, b"value-%d" % n, 0)], durable_seqno=3, salt=5)
        for n in range(3)
    ] + [wf.encode_record(8, [(OP_PUT, b"bA", 0, b"x", 0), (OP_DELETE, b"bB", 0, b"", 0)], salt=5),
         wf.encode_record(9, [(OP_DELETE, b"bB", 0, b"", 0)], salt=5)]
    for rec in recs:
        for i in range(len(rec)):
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(rec)
                bad[i] ^= mask
                with pytest.raises(RecordError):
                    wf.decode_record(bytes(bad), salt=5)


def test_zero_filled_space_is_not_a_record_and_type_0_is_reserved() -> None:
    with pytest.raises(RecordError) as ei:
        wf.decode_record(bytes(64))
    assert ei.value.kind == "zero"
    # A record with type 0 and a correct checksum is still refused.
    rec = bytearray(wf.encode_record(1, [(OP_DELETE, b"bk", 0, b"", 0)], salt=3))
    rec[4] = 0
    body = bytes(rec[:-4])
    rec[-4:] = wf.CRC_TRAILER.pack(zlib.crc32(body, wf.chain_value(3)) ^ 3)
    with pytest.raises(RecordError) as ei:
        wf.decode_record(bytes(rec), salt=3)
    assert ei.value.kind == "malformed"


@pytest.mark.parametrize(
    "seqno, ops, durable, match",
    [
        (1, [], 0, "at least one op"),
        (0, [(OP_PUT, b"bk", 0, b"", 0)], 0, "seqno"),
        (5, [(OP_PUT, b"bk", 0, b"", 0)], 5, "durable"),
        (1, [(9, b"bk", 0, b"", 0)], 0, "optype"),
        (1, [(OP_PUT, b"", 0, b"v", 0)], 0, "key length"),
        (1, [(OP_PUT, b"k" * 65536, 0, b"v", 0)], 0, "key length"),
        (1, [(OP_PUT, b"bk", 256, b"v", 0)], 0, "vflag"),
        (1, [(OP_PUT, b"bk", 0, b"v", -1)], 0, "expiry"),
        (1, [(OP_DELETE, b"bk", 0, b"v", 0)], 0, "delete"),
    ],
)
def test_encode_rejects_what_the_log_cannot_hold(seqno: int, ops: list[wf.Op], durable: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wf.encode_record(seqno, ops, durable_seqno=durable)


def test_decode_reports_truncation_and_impossible_lengths() -> None:
    rec = wf.encode_record(1, [(OP_PUT, b"bk", 0, b"v" * 30, 0)])
    for cut in range(1, len(rec)):
        with pytest.raises(RecordError) as ei:
            wf.decode_record(rec[:cut])
        assert ei.value.kind in ("truncated", "zero") or cut < 4
    bad = bytearray(rec)
    bad[0:4] = struct.pack("<I", 13)
    with pytest.raises(RecordError, match="length"):
        wf.decode_record(bytes(bad))


def test_group_bounds_walks_whole_records_and_refuses_gaps() -> None:
    recs = [wf.encode_record(s, [(OP_PUT, b"bk", 0, b"v" * s, 0)]) for s in range(10, 15)]
    assert wf.group_bounds(b"".join(recs)) == (10, 14, 5)
    assert wf.group_bounds(b"") == (0, 0, 0)
    with pytest.raises(ValueError, match="whole records"):
        wf.group_bounds(b"".join(recs)[:-8])
    with pytest.raises(ValueError, match="follows"):
        wf.group_bounds(recs[0] + recs[2])


def test_segment_header_damage_is_detected() -> None:
    h = wf.encode_segment_header(3, 100, 0, 42)
    for i in range(len(h)):
        bad = bytearray(h)
        bad[i] ^= 0x10
        with pytest.raises(RecordError):
            wf.decode_segment_header(bytes(bad))
    with pytest.raises(RecordError):
        wf.decode_segment_header(h[:63])


def test_segment_names_sort_by_number_and_parse_back() -> None:
    names = [wf.segment_name(n) for n in (1, 2, 10, 255, 2**40)]
    assert names == sorted(names)
    assert [wf.parse_segment_name(n) for n in names] == [1, 2, 10, 255, 2**40]
    assert wf.parse_segment_name("wal-0000000000000001.log.tmp") is None
    assert wf.parse_segment_name("LOCK") is None
