"""The snapshot and MANIFEST byte layouts (walformat.py): pinned sizes and offsets, checks that catch damage."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walcache.daemon.walformat import (
    MANIFEST_MAGIC,
    MANIFEST_RECORD,
    MANIFEST_VERSION,
    RESIDUE,
    SNAPSHOT_END_MAGIC,
    SNAPSHOT_ENTRY,
    SNAPSHOT_FOOTER,
    SNAPSHOT_FOOTER_SIZE,
    SNAPSHOT_HEADER,
    SNAPSHOT_HEADER_SIZE,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    Manifest,
    RecordError,
    check_snapshot,
    decode_manifest,
    decode_snapshot_header,
    encode_manifest,
    encode_snapshot_entry,
    encode_snapshot_footer,
    encode_snapshot_header,
    parse_snapshot_name,
    record_size,
    snapshot_name,
)


def _snapshot(entries: list[tuple[bytes, int, bytes, int, int]], seal: int = 100, salt: int = 0xABCD) -> bytes:
    body = encode_snapshot_header(seal, 7, 123, salt) + b"".join(encode_snapshot_entry(*e) for e in entries)
    live = sum(record_size(len(k), len(v)) for k, _, v, _, _ in entries)
    return body + encode_snapshot_footer(len(entries), live, zlib.crc32(body))


def test_layout_sizes_and_offsets_are_pinned() -> None:
    assert SNAPSHOT_HEADER.size == SNAPSHOT_HEADER_SIZE == 64
    assert SNAPSHOT_ENTRY.size == 24
    assert SNAPSHOT_FOOTER.size == SNAPSHOT_FOOTER_SIZE == 32
    assert MANIFEST_RECORD.size == 64
    assert (SNAPSHOT_VERSION, MANIFEST_VERSION) == (1, 1)

    h = encode_snapshot_header(0x1122334455667788, 0x99, 0xAABB, 0xCCDDEEFF)
    assert h[0:8] == SNAPSHOT_MAGIC == b"WALCSNAP"
    assert struct.unpack_from("<IIQQQI", h, 8) == (1, 64, 0x1122334455667788, 0x99, 0xAABB, 0xCCDDEEFF)
    assert h[44:60] == bytes(16)
    assert struct.unpack_from("<I", h, 60)[0] == zlib.crc32(h[:60], RESIDUE)

    e = encode_snapshot_entry(b"kk", 2, b"vvv", 0x0102030405060708, 0x1112131415161718)
    assert struct.unpack_from("<HBBIQQ", e, 0) == (2, 2, 0, 3, 0x0102030405060708, 0x1112131415161718)
    assert e[24:] == b"kkvvv"

    f = encode_snapshot_footer(5, 600, 0)
    assert f[0:8] == SNAPSHOT_END_MAGIC == b"WALCSEND"
    assert struct.unpack_from("<QQ", f, 8) == (5, 600)
    assert f[24:28] == bytes(4)
    assert struct.unpack_from("<I", f, 28)[0] == zlib.crc32(f[:28], 0)

    m = encode_manifest(Manifest(0x51, 0x62, 0x73, 0x84, 0x95, 0xA6))
    assert m[0:8] == MANIFEST_MAGIC == b"WALCMANI"
    assert struct.unpack_from("<IIQQQQII", m, 8) == (1, 64, 0x51, 0x62, 0x73, 0x84, 0x95, 0xA6)
    assert m[56:60] == bytes(4)
    assert zlib.crc32(m, RESIDUE) == RESIDUE


def test_snapshot_names_round_trip_and_other_names_are_not_snapshots() -> None:
    assert snapshot_name(0xA0C) == "snap-0000000000000a0c.snap"
    assert parse_snapshot_name(snapshot_name(12345)) == 12345
    for other in ("snap-0000000000000a0c.snap.tmp", "snap-a0c.snap", "MANIFEST", "wal-0000000000000001.log"):
        assert parse_snapshot_name(other) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.integers(0, 255), st.binary(max_size=40),
                          st.integers(1, 100), st.integers(0, 2**63)), max_size=12))
def test_a_snapshot_checks_and_its_counts_round_trip(entries: list[tuple[bytes, int, bytes, int, int]]) -> None:
    buf = _snapshot(entries)
    header, footer = check_snapshot(buf)
    assert (header.seal_seqno, header.next_segno, header.salt) == (100, 7, 0xABCD)
    assert footer.entries == len(entries)
    assert footer.live_bytes == sum(record_size(len(k), len(v)) for k, _, v, _, _ in entries)


def test_every_single_byte_change_of_a_snapshot_is_caught() -> None:
    rng = random.Random(5)
    buf = _snapshot([(b"k%d" % i, 1, rng.randbytes(rng.randrange(30)), i + 1, 0) for i in range(20)])
    check_snapshot(buf)
    for off in range(len(buf)):
        damaged = bytearray(buf)
        damaged[off] ^= 1 << rng.randrange(8)
        with pytest.raises(RecordError) as ei:
            check_snapshot(bytes(damaged))
        assert ei.value.kind == "snapshot"


def test_a_cut_snapshot_is_caught_at_every_length() -> None:
    buf = _snapshot([(b"key%d" % i, 0, b"value%d" % i, i + 1, 0) for i in range(10)])
    for n in range(len(buf)):
        with pytest.raises(RecordError):
            check_snapshot(buf[:n])


def test_every_single_byte_change_of_a_manifest_is_caught() -> None:
    m = encode_manifest(Manifest(10, 3, 4096, 17, 0xDEADBEEF, 42))
    assert decode_manifest(m) == Manifest(10, 3, 4096, 17, 0xDEADBEEF, 42)
    for off in range(len(m)):
        for bit in range(8):
            damaged = bytearray(m)
            damaged[off] ^= 1 << bit
            with pytest.raises(RecordError):
                decode_manifest(bytes(damaged))
    with pytest.raises(RecordError):
        decode_manifest(m + b"\0")


def test_header_fields_that_make_no_sense_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_snapshot_header(0, 2, 0, 0)
    with pytest.raises(ValueError):
        encode_manifest(Manifest(5, 1, 0, 0, 0, 0))
    h = bytearray(encode_snapshot_header(5, 2, 0, 0))
    h[8] = 2  # a future version
    h[60:64] = struct.pack("<I", zlib.crc32(bytes(h[:60]), RESIDUE))
    with pytest.raises(RecordError, match="version"):
        decode_snapshot_header(bytes(h))
