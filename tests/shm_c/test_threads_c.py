"""One compiled reader shared by several threads while its table keeps moving.

A client is shared by the threads of a worker (gthread, thread pools): while one thread
follows the table to a new segment, the others must go on reading (the old mapping, then
the new one), never see the reader as closed, and never get a wrong value.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from walcache import ReadContention
from walcache.codec import encode_key
from walcache.shm import ShmTable
from walcache.shm.creader import CReader

from shm.helpers import check_value, make_value
from shm.test_torture import _ctx

from .helpers import requires_c

pytestmark = requires_c

HOT = 32
SECONDS = 2.0


def _grower(namespace: str, ready: Any, stop: Any, seed: int) -> None:
    """Rewrites the hot keys and keeps adding fresh keys: the table grows, again and again."""
    rng = random.Random(seed)
    t = ShmTable.create(namespace, capacity=8, data_bytes=4096)
    for i in range(HOT):
        t.put(encode_key(b"hot-%d" % i), 1, make_value(i, 0, 40), i + 1, 0)
    t.publish()
    ready.set()
    seqno, n = HOT, 0
    while not stop.is_set():
        for _ in range(64):
            seqno += 1
            i = rng.randrange(HOT)
            t.put(encode_key(b"hot-%d" % i), 1, make_value(i, seqno, rng.choice((40, 48, 400))), seqno, 0)
            n += 1
            t.put(encode_key(b"fill-%d" % n), 1, b"x" * 24, seqno, 0)
            if n % 500 == 0:
                # A new daemon: it publishes a new table, which retires this one.
                new = ShmTable.create(namespace, capacity=8, data_bytes=4096)
                for j in range(HOT):
                    new.put(encode_key(b"hot-%d" % j), 1, make_value(j, seqno, 40), seqno, 0)
                new.publish()
                t.close()
                t = new
    t.close(unlink=True)


@pytest.fixture
def grower(namespace: str) -> Iterator[Any]:
    ready, stop = _ctx.Event(), _ctx.Event()
    p = _ctx.Process(target=_grower, args=(namespace, ready, stop, int(os.environ.get("WALCACHE_TEST_SEED", "7"))))
    p.start()
    try:
        assert ready.wait(30), "the writer did not publish"
        yield stop
    finally:
        stop.set()
        p.join(20)
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def test_threads_sharing_a_reader_keep_reading_while_it_remaps(namespace: str, grower: Any) -> None:
    r = CReader(namespace)
    errors: list[str] = []
    reads = [0] * 5
    deadline = time.monotonic() + SECONDS

    def reader(tid: int) -> None:
        rng = random.Random(tid)
        try:
            while time.monotonic() < deadline:
                try:
                    if tid % 2:
                        keys = [b"hot-%d" % rng.randrange(HOT) for _ in range(8)]
                        got = r.get_many(keys)
                        pairs = [(int(k[4:]), got.get(k)) for k in keys]
                    else:
                        i = rng.randrange(HOT)
                        pairs = [(i, r.lookup(b"hot-%d" % i))]
                except ReadContention:
                    continue
                for i, v in pairs:
                    err = "hot key missing" if v is None else check_value(i, v)  # type: ignore[arg-type]
                    if err:
                        errors.append(f"thread {tid}, key {i}: {err}")
                reads[tid] += len(pairs)
        except Exception as exc:
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    hot_keys = {encode_key(b"hot-%d" % i): i for i in range(HOT)}
    fill = encode_key(b"fill-")

    def inspector() -> None:
        try:
            while time.monotonic() < deadline:
                try:
                    assert len(r) >= HOT  # every table the writer publishes holds the hot keys
                    assert r.header()["reader"] == "c"
                    for _, (key, _vflag, value, _seqno, _exp) in zip(range(50), r.iter_entries()):
                        if key in hot_keys:
                            err = check_value(hot_keys[key], value)
                        else:
                            err = "" if key.startswith(fill) and value == b"x" * 24 else "unknown entry"
                        if err:
                            errors.append(f"inspector, key {key!r}: {err}")
                except ReadContention:
                    continue
                reads[4] += 1
        except Exception as exc:
            errors.append(f"inspector: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)] + [threading.Thread(target=inspector)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside the remaps too
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old_interval)
    remaps = r.remaps
    r.close()
    assert not errors, errors[:10]
    assert all(n > 100 for n in reads[:4]), reads
    assert reads[4] > 100, reads  # the inspector's scans ran, during the remaps
    assert remaps >= 3, f"the table hardly moved ({remaps} remaps): the test did not test remapping"
