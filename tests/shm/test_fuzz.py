"""A reader over segments of seeded random bytes returns or raises cleanly, in bounded time.

"Cleanly": a value, a miss, TableUnavailable or ReadContention; never another exception,
a crash (SIGBUS/SIGSEGV) or a hang. A hang fails through the alarm below (a bound on
time, not a speed assertion).
"""

from __future__ import annotations

import random
import sys
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from walcache import ReadContention, TableUnavailable
from walcache.codec import encode_key
from walcache.shm import ShmReader, ShmTable, layout

from .helpers import unlink_all, write_raw_table

CLEAN = (TableUnavailable, ReadContention)
SEEDS = range(40)
KEYS = [f"key-{i}" for i in range(30)] + [b"bytes", 7, -1]


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    def _hang(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("reader did not finish within the bound: it hangs on garbage")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _geometry_header(rng: random.Random, size: int, capacity: int) -> bytes:
    """A valid header (so the reader gets past open) with random counters."""
    data_off = layout.HEADER_SIZE + capacity * layout.SLOT_SIZE
    return layout.HEADER_STRUCT.pack(
        layout.DATA_MAGIC, layout.LAYOUT_VERSION, 1, rng.getrandbits(64), size, capacity,
        layout.HEADER_SIZE, data_off, rng.getrandbits(31) | 1 << 30, rng.getrandbits(40),
        rng.getrandbits(1), rng.getrandbits(1), layout.index_word(layout.HEADER_SIZE // 8, capacity),
        rng.getrandbits(40), rng.getrandbits(20), rng.getrandbits(20), rng.getrandbits(30), rng.getrandbits(30),
    )  # fmt: skip


def _exercise(namespace: str) -> int:
    """Every read API over the table; returns how many calls ended cleanly with an error."""
    errors = 0
    try:
        r = ShmReader(namespace)
    except CLEAN:
        return 1
    try:
        for key in KEYS:
            kb = encode_key(key)
            for call, arg in ((r.lookup, key), (r.get, kb), (r.contains, kb)):
                try:
                    call(arg)  # type: ignore[arg-type]
                except CLEAN:
                    errors += 1
        try:
            for i, entry in enumerate(r.iter_entries()):
                assert len(entry) == 5
                if i > 10_000:
                    break
        except CLEAN:
            errors += 1
        r.header()
        len(r)
    finally:
        r.close()
    return errors


@pytest.mark.parametrize("seed", SEEDS)
def test_reader_over_random_bytes_returns_or_raises_cleanly(namespace: str, seed: int) -> None:
    rng = random.Random(seed)
    capacity = 1 << rng.randrange(3, 9)
    size = layout.HEADER_SIZE + capacity * 8 + 8 * rng.randrange(8, 2048)
    body = bytearray(rng.randbytes(size))
    variant = seed % 4
    if variant >= 1:  # valid geometry: the reader gets to the index and the records
        body[: layout.HEADER_SIZE] = _geometry_header(rng, size, capacity)
    if variant >= 2:  # slots that match the probed keys' fingerprints, pointing anywhere
        lo = (layout.HEADER_SIZE + capacity * 8) // 8
        for key in KEYS:
            h = layout.hash_key(encode_key(key))
            i = h & (capacity - 1)
            w = rng.randrange(lo, size // 8) if variant == 2 else rng.randrange(0, 1 << 32)
            body[layout.HEADER_SIZE + 8 * i : layout.HEADER_SIZE + 8 * i + 8] = ((h & layout.FP_MASK) | w).to_bytes(8, sys.byteorder)
    if variant == 3:  # sprinkle EMPTY and MOVED slots too
        for _ in range(capacity // 4):
            i = rng.randrange(capacity)
            word = rng.choice([layout.EMPTY, layout.MOVED, layout.TOMBSTONE])
            body[layout.HEADER_SIZE + 8 * i : layout.HEADER_SIZE + 8 * i + 8] = word.to_bytes(8, sys.byteorder)
    if variant >= 1 and seed % 8 >= 4:  # the index word names random bytes as a moved index
        if seed % 16 >= 8:
            word = rng.getrandbits(64)  # mostly invalid: refused cleanly
        else:
            cap = 1 << rng.randrange(3, 9)
            word = layout.index_word(rng.randrange(layout.HEADER_SIZE // 8, size // 8 - cap + 1), cap)
        body[8 * layout.H_INDEX : 8 * layout.H_INDEX + 8] = word.to_bytes(8, sys.byteorder)
    write_raw_table(namespace, bytes(body))
    try:
        _exercise(namespace)
    except AssertionError:
        raise
    except Exception as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"seed {seed}: reader raised {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("seed", range(20))
def test_reader_over_a_real_table_with_random_corruption(namespace: str, seed: int) -> None:
    """Flip random bytes of a real table (index, record headers, values)."""
    rng = random.Random(1000 + seed)
    t = ShmTable.create(namespace, capacity=64)
    for i, key in enumerate(KEYS):
        t.put(encode_key(key), i % 3, b"\x93\x01\x02\x03" if i % 3 == 0 else b"v" * rng.randrange(50), i + 1, 0)
    t.publish()
    seg = t._seg
    assert seg is not None
    used_end = seg.top * 8
    for _ in range(rng.randrange(1, 200)):
        off = rng.randrange(layout.HEADER_SIZE, used_end)
        seg.mm[off] = rng.randrange(256)
    try:
        _exercise(namespace)
    except AssertionError:
        raise
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"seed {1000 + seed}: reader raised {type(exc).__name__}: {exc}")
    finally:
        t.close(unlink=True)
        unlink_all(namespace)


def test_a_control_segment_of_another_layout_is_refused(namespace: str) -> None:
    write_raw_table(namespace, bytes(4096))
    import posix_ipc

    shm = posix_ipc.SharedMemory(layout.ctl_name(namespace))
    with open("/dev/shm" + layout.ctl_name(namespace), "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(8, sys.byteorder))
    shm.close_fd()
    with pytest.raises(TableUnavailable, match="layout version 99"):
        ShmReader(namespace)
