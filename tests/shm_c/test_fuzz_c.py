"""The compiled reader over garbage returns or raises cleanly, in bounded time, and never
reads outside the segment.

"Cleanly": a value, a miss, TableUnavailable or ReadContention; never another exception,
a crash or a hang (the alarm below bounds time; it is not a speed assertion). Each table
is read twice: through shared memory (CReader, as a client maps it) and from a plain
``bytes`` copy of exactly the segment's size (BytesReader), where a read past the end is
caught by the AddressSanitizer build (scripts/asan_fuzz.sh) instead of landing unseen in
the rest of a page. The garbage includes header geometry (capacity, offsets, sizes) that
only the C side's own checks stand between and the memory.
"""

from __future__ import annotations

import random
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from walcache import ReadContention, TableUnavailable
from walcache.codec import encode_key
from walcache.shm import ShmTable, layout
from walcache.shm.creader import CReader

from shm.helpers import unlink_all, write_raw_table

from .helpers import requires_c
from .test_equivalence import KEYS, garbage_table

pytestmark = requires_c

CLEAN = (TableUnavailable, ReadContention)
SEEDS = range(int(__import__("os").environ.get("WALCACHE_FUZZ_SEEDS", "60")))


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    def _hang(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("the C reader did not finish within the bound: it hangs on garbage")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def exercise(r: Any, seed: int) -> dict[str, int]:
    """Every read API; returns how the calls ended. Anything but CLEAN fails the test."""
    ends = {"value": 0, "miss": 0, "clean error": 0}

    def run(call: Any) -> None:
        try:
            got = call()
        except CLEAN:
            ends["clean error"] += 1
            return
        except Exception as exc:
            pytest.fail(f"seed {seed}: the C reader raised {type(exc).__name__}: {exc}")
        ends["miss" if got in (None, False, "MISSING", {}) else "value"] += 1

    for key in KEYS + [f"key-{i}" for i in range(20)]:
        kb = encode_key(key)
        for _ in range(3):  # the third read of a key can come from the result cache
            run(lambda: r.lookup(key, "MISSING"))
        run(lambda: r.get(kb))
        run(lambda: r.contains(kb))
        run(lambda: r._get_entry(kb))
    for _ in range(3):
        run(lambda: r.get_many(KEYS))
    if isinstance(r, CReader):
        run(lambda: sum(1 for _ in zip(range(10_000), r.iter_entries())))
    else:
        run(lambda: r._scan(0, 1 << 20)[0])
    return ends


def bytes_reader(data: bytes) -> Any:
    from .helpers import BytesReader

    return BytesReader(data)


def random_header_segment(seed: int) -> bytes:
    """Garbage with a header whose geometry words are random or off by a little."""
    rng = random.Random(seed)
    body = bytearray(garbage_table(seed))
    size = len(body)
    q = [int.from_bytes(body[8 * i : 8 * i + 8], sys.byteorder) for i in range(8)]
    capacity, data_off = q[5], q[7]
    log2 = capacity.bit_length() - 1
    choices = {
        # The index word: moved anywhere in the segment, to its very end, one past it,
        # a capacity below the minimum or past 2^32, or random.
        layout.H_INDEX: [
            layout.index_word(rng.randrange(layout.HEADER_SIZE // 8, size // 8 - capacity + 1), capacity),
            layout.index_word(size // 8 - capacity, capacity),
            layout.index_word(size // 8 - capacity + 1, capacity),
            2 << 32 | layout.HEADER_SIZE // 8, 33 << 32 | layout.HEADER_SIZE // 8,
            (log2 + 1) << 32 | layout.HEADER_SIZE // 8, layout.HEADER_SIZE // 8 - 1 | log2 << 32,
            rng.getrandbits(64), 0,
        ],
        4: [size, size - 8, size + 8, size // 2, rng.getrandbits(64), 0],
        5: [capacity, capacity * 2, capacity // 2, capacity + 1, 1 << 40, 0, rng.getrandbits(64)],
        6: [layout.HEADER_SIZE, layout.HEADER_SIZE + 8, 0],
        7: [data_off, data_off - 8, data_off + 4, size - 24, size - 32, size, rng.getrandbits(64)],
    }
    # One or two words at a time: with more, nearly every segment is refused at open and
    # the geometry checks past it go untested (the guard below counts what opens).
    for word in rng.sample(sorted(choices), rng.choice((1, 1, 2))):
        body[8 * word : 8 * word + 8] = (rng.choice(choices[word]) % (1 << 64)).to_bytes(8, sys.byteorder)
    return bytes(body)


@pytest.mark.parametrize("seed", SEEDS)
def test_garbage_records_and_slots_through_shared_memory(namespace: str, seed: int) -> None:
    data = garbage_table(seed)
    write_raw_table(namespace, data)
    with CReader(namespace) as r:
        exercise(r, seed)
    exercise(bytes_reader(data), seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_garbage_header_geometry_is_refused_or_followed_within_bounds(seed: int) -> None:
    data = random_header_segment(seed)
    try:
        r = bytes_reader(data)
    except TableUnavailable:
        return
    assert r._segment_bytes <= len(data)
    exercise(r, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_pure_random_bytes_and_random_corruption_of_a_real_table(namespace: str, seed: int) -> None:
    rng = random.Random(5000 + seed)
    with pytest.raises(TableUnavailable):
        bytes_reader(rng.randbytes(rng.randrange(0, 8192)))
    t = ShmTable.create(namespace, capacity=64)
    try:
        for i, key in enumerate(KEYS):
            t.put(encode_key(key), i % 3, b"\x93\x01\x02\x03" if i % 3 == 0 else b"v" * rng.randrange(80), i + 1, 0)
        t.publish()
        seg = t._seg
        assert seg is not None
        for _ in range(rng.randrange(1, 200)):
            off = rng.randrange(layout.HEADER_SIZE, seg.top * 8)
            seg.mm[off] = rng.randrange(256)
        with CReader(namespace) as r:
            exercise(r, seed)
        exercise(bytes_reader(bytes(seg.mm)), seed)
    finally:
        t.close(unlink=True)
        unlink_all(namespace)


def test_the_header_fuzz_opens_some_segments_and_reads_through_them() -> None:
    # Guards random_header_segment: headers that are all refused at open test only the refusal.
    opened: dict[str, int] = {"value": 0, "miss": 0, "clean error": 0}
    refused, seeds = 0, range(200)  # the parametrized tests' seeds, and more
    for seed in seeds:
        try:
            r = bytes_reader(random_header_segment(seed))
        except TableUnavailable:
            refused += 1
            continue
        for k, v in exercise(r, seed).items():
            opened[k] += v
    assert len(seeds) // 4 <= refused <= len(seeds) - len(seeds) // 5, refused
    assert opened["value"] > 0 and opened["miss"] > 0, opened


def test_the_fuzz_reaches_values_misses_and_errors() -> None:
    # Guards the generators: garbage that only ever raised at open would test nothing.
    totals = {"value": 0, "miss": 0, "clean error": 0}
    for seed in range(20):
        for k, v in exercise(bytes_reader(garbage_table(seed)), seed).items():
            totals[k] += v
    assert all(v > 20 for v in totals.values()), totals
