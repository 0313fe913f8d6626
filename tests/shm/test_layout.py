"""Pins the shared-memory layout: sizes, offsets and the slot encoding (a C reader follows them)."""

from __future__ import annotations

import pathlib
import re
import sys

from walcache.shm import layout as L


def _word(buf: bytes, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 8], sys.byteorder)


def test_record_and_segment_sizes_are_pinned() -> None:
    assert L.LAYOUT_VERSION == 3
    assert (L.CTL_SIZE, L.HEADER_SIZE, L.SLOT_SIZE, L.REC_HEADER_SIZE) == (128, 256, 8, 32)
    assert L.CTL_STRUCT.size == L.CTL_SIZE
    assert L.HEADER_STRUCT.size == L.HEADER_SIZE
    assert L.RECORD_HEADER.size == L.REC_HEADER_SIZE
    assert L.SLOT.size == L.SLOT_SIZE
    assert len(L.CTL_MAGIC) == len(L.DATA_MAGIC) == 8


def test_control_segment_field_offsets() -> None:
    raw = L.CTL_STRUCT.pack(L.CTL_MAGIC, 11, 12, 13, 14, 15, b"/name")
    assert raw[0:8] == L.CTL_MAGIC
    assert [_word(raw, off) for off in (8, 16, 24, 32, 40)] == [11, 12, 13, 14, 15]
    assert raw[48:53] == b"/name" and raw[53:112] == bytes(59)
    assert raw[112:128] == bytes(16)
    assert (L.C_SEQ * 8, L.C_GENERATION * 8) == (16, 24)


def test_data_header_field_offsets() -> None:
    values = list(range(101, 113)) + list(range(201, 206))
    raw = L.HEADER_STRUCT.pack(L.DATA_MAGIC, *values)
    assert raw[0:8] == L.DATA_MAGIC
    offsets = [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 128, 136, 144, 152, 160]
    assert [_word(raw, off) for off in offsets] == values
    assert raw[104:128] == bytes(24) and raw[168:256] == bytes(88)
    named = {
        L.H_GENERATION: 16, L.H_WRITER_PID: 64, L.H_WRITER_START_MS: 72, L.H_STALE: 80,
        L.H_CLOSED: 88, L.H_INDEX: 96, L.H_HEARTBEAT: 128, L.H_LIVE: 136, L.H_TOMBSTONES: 144,
        L.H_USED_BYTES: 152, L.H_APPLIED_SEQNO: 160,
    }  # fmt: skip
    assert {w * 8 for w in named} == set(named.values())
    assert all(w * 8 == off for w, off in named.items())


def test_record_header_field_offsets() -> None:
    raw = L.RECORD_HEADER.pack(1, 2, 3, 4)
    assert [_word(raw, off) for off in (0, 8, 16, 24)] == [1, 2, 3, 4]
    assert (L.R_SEQ, L.R_LENS, L.R_EXPIRY_VFLAG, L.R_SEQNO) == (0, 1, 2, 3)
    assert L.REC_HEADER_WORDS == 4


def test_chunk_words_pads_to_eight_bytes() -> None:
    assert L.chunk_words(0, 0) == 4
    assert L.chunk_words(1, 0) == 5
    assert L.chunk_words(11, 100) == (32 + 111 + 7) // 8 == 18
    assert L.footprint(11, 100) == 18 * 8 + 8


def test_special_slot_words_never_pass_the_candidate_range() -> None:
    # A reader takes x as a candidate when lo <= x - f < hi; lo >= HEADER_SIZE/8 and
    # hi <= MAX_SEGMENT_BYTES/8 - 3. EMPTY, TOMBSTONE and MOVED must fail for every f.
    lo = L.HEADER_SIZE // 8
    hi = L.MAX_SEGMENT_BYTES // 8 - L.REC_HEADER_WORDS + 1
    assert hi < L.LOC_MASK
    for fp in (0, 1, 2, 0x7FFF_FFFF, 0xFFFF_FFFE, 0xFFFF_FFFF):
        f = fp << 32
        for special in (L.EMPTY, L.TOMBSTONE, L.MOVED):
            assert not lo <= special - f < hi, (hex(special), hex(f))
        # A live word with another fingerprint never matches either.
        live = ((fp + 1) & 0xFFFF_FFFF) << 32 | lo
        assert not lo <= live - f < hi


def test_names_fit_and_never_repeat_within_a_writer() -> None:
    ns = "walcache-0123456789abcdef"
    assert L.ctl_name(ns) == "/" + ns
    names = {L.data_name(ns, 0xFFFF_FFFF_FFFF_FFFF, n) for n in range(1, 1000)}
    assert len(names) == 999
    assert max(len(n) for n in names) <= L.MAX_NAME_BYTES


def test_shm_modules_never_use_a_byte_by_byte_struct_order() -> None:
    # '>' and '!' formats read words byte by byte: a shared word read that way can tear.
    src = pathlib.Path(L.__file__).parent
    for path in src.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"Struct\(\s*[\"'][>!]", text), path
        assert not re.search(r"struct\.(un)?pack(_from|_into)?\(\s*[\"'][>!]", text), path


def test_index_word_round_trips_and_refuses_what_leaves_the_segment() -> None:
    size = 1 << 20
    for slot0, capacity in ((L.HEADER_SIZE // 8, 8), (1000, 1 << 10), (size // 8 - 64, 64)):
        assert L.index_geometry(L.index_word(slot0, capacity), size) == (slot0, capacity)
    refused = [
        L.index_word(L.HEADER_SIZE // 8 - 1, 8),  # overlaps the header
        L.index_word(size // 8 - 63, 64),  # one slot past the end
        L.index_word(L.HEADER_SIZE // 8, 4),  # under MIN_CAPACITY
        33 << 32 | L.HEADER_SIZE // 8,  # 2^33 slots: more words than a slot can point at
        0,
        L.MOVED,
    ]
    assert [L.index_geometry(w, size) for w in refused] == [None] * len(refused)
