"""Shared helpers for the shm tests: namespaces, cleanup, self-checking values, byte surgery."""

from __future__ import annotations

import os
import struct
import uuid
import zlib

import posix_ipc

from walcache.shm import layout
from walcache.shm.writer import ShmTable

SHM_DIR = "/dev/shm"


def unique_namespace(tag: str = "t") -> str:
    """A namespace no other test (or run) uses, short enough for segment names."""
    return f"wctest-{tag}-{uuid.uuid4().hex[:12]}"


def segments_of(namespace: str) -> list[str]:
    """Names ("/...") of every shared-memory segment of ``namespace`` that still exists."""
    return sorted(
        "/" + n for n in os.listdir(SHM_DIR) if n == namespace or n.startswith(namespace + ".")
    )


def unlink_all(namespace: str) -> None:
    for name in segments_of(namespace):
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


# -- self-checking values: [key id u32][version u64][filler][crc32 u32] -------------------

_VHEAD = struct.Struct("<IQ")


def make_value(key_id: int, version: int, length: int) -> bytes:
    """A value that proves its own integrity and names its key (length >= 16)."""
    assert length >= 16
    body = _VHEAD.pack(key_id, version)
    filler = bytes([version & 0xFF]) * (length - 16)
    data = body + filler
    return data + struct.pack("<I", zlib.crc32(data))


def check_value(key_id: int, value: bytes, floor: int = 0) -> str | None:
    """None if ``value`` is a whole value written for ``key_id`` whose version is at least
    ``floor`` (the version the writer had finished before the read began), else what is wrong."""
    if len(value) < 16:
        return f"short value ({len(value)} bytes)"
    data, crc = value[:-4], struct.unpack("<I", value[-4:])[0]
    if zlib.crc32(data) != crc:
        return "checksum mismatch (torn value)"
    kid, version = _VHEAD.unpack_from(value)
    if kid != key_id:
        return f"value of key {kid} returned for key {key_id}"
    if version < floor:
        return f"stale value: version {version}, but version {floor} was published before the read"
    return None


# -- byte surgery on a live table (test-only seams over the writer's own mapping) ----------

def record_word(table: ShmTable, key: bytes) -> int:
    """Word index of ``key``'s record in the table's current segment."""
    seg = table._seg
    assert seg is not None
    _, w = table._probe(seg, key, layout.hash_key(key))
    assert w, f"{key!r} is not in the table"
    return w


def leave_write_open(table: ShmTable, key: bytes) -> None:
    """Make ``key``'s record look like a write in progress (odd seq), as a writer
    killed inside step W2 would leave it."""
    seg = table._seg
    assert seg is not None
    w = record_word(table, key)
    seg.q[w] = seg.q[w] | 1


def write_raw_table(namespace: str, data: bytes) -> str:
    """A control segment naming a data segment holding exactly ``data`` (for fuzzing)."""
    name = layout.data_name(namespace, 0xF0220, 1)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=len(data))
    with open(f"{SHM_DIR}{name}", "r+b") as f:
        f.write(data)
    shm.close_fd()
    ctl = posix_ipc.SharedMemory(layout.ctl_name(namespace), posix_ipc.O_CREAT, mode=0o600, size=layout.CTL_SIZE)
    raw = layout.CTL_STRUCT.pack(layout.CTL_MAGIC, layout.LAYOUT_VERSION, 0, 1, len(data), len(name), name.encode())
    with open(f"{SHM_DIR}{layout.ctl_name(namespace)}", "r+b") as f:
        f.write(raw)
    ctl.close_fd()
    return name
