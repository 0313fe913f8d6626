"""Byte surgery on log files, so crash and corruption tests read as what they do."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from walcache.daemon.walformat import (
    CRC_TRAILER,
    SEGMENT_HEADER_SIZE,
    chain_value,
    decode_record,
    decode_segment_header,
    RecordError,
)
from walcache.daemon.walreader import list_segments


@dataclass(frozen=True)
class RecordAt:
    path: Path
    offset: int
    length: int
    seqno: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def segments(data_dir: Path) -> list[Path]:
    return [p for _, p in list_segments(data_dir)]


def salt_of(path: Path) -> int:
    return decode_segment_header(path.read_bytes()).salt


def records_in(path: Path) -> list[RecordAt]:
    """Every record of a healthy segment, in order."""
    buf = path.read_bytes()
    salt = decode_segment_header(buf).salt
    out = []
    off = SEGMENT_HEADER_SIZE
    while off < len(buf):
        try:
            rec = decode_record(buf, off, salt=salt)
        except RecordError as exc:
            if exc.kind == "zero":
                break
            raise
        out.append(RecordAt(path, off, rec.length, rec.seqno))
        off += rec.length
    return out


def all_records(data_dir: Path) -> list[RecordAt]:
    return [r for p in segments(data_dir) for r in records_in(p)]


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"{path} has no byte at {offset}"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def truncate_at(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def zero_range(path: Path, start: int, end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_checksum(path: Path, offset: int) -> None:
    """Recompute the CRC trailer of the record at ``offset`` after editing it (a well-formed lie)."""
    buf = bytearray(path.read_bytes())
    salt = decode_segment_header(buf).salt
    (length,) = CRC_TRAILER.unpack_from(buf, offset)
    body = bytes(buf[offset : offset + length - 4])
    crc = zlib.crc32(body, chain_value(salt)) ^ salt
    CRC_TRAILER.pack_into(buf, offset + length - 4, crc)
    path.write_bytes(bytes(buf))


def dir_fingerprint(data_dir: Path) -> dict[str, bytes]:
    """Every file's bytes, by name: to prove that something changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file()}
