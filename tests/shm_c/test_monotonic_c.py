"""Reads never go back in time: once a reader has seen a version of a key (or seen it
deleted), no later read returns an older one, whichever path answers it. Run with the
compiled reader and with the pure-Python one (the reference: it has no result cache, but
the same moves and deletes to get right). A writer that leaves a moved record validating
(no W3a) is caught by the compiled run only: without a cache, the Python reader reaches
the old record through the slot just before the move, when it is still current.

One writer process keeps rewriting a few keys at full speed (in place, moved to chunks of
other sizes, deleted and put back); a reader process alternates the full protocol
(``get`` of the encoded key, which never uses the result cache) with ``lookup`` and
``get_many`` (which the cache answers for hot keys) and checks every answer against what
it has already seen. A cache that could still validate a moved or deleted record after
the new state became visible fails this. Seeded; replay with WALCACHE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import random
import struct
import time
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from walcache import ReadContention
from walcache.codec import encode_key
from walcache.shm import ShmReader, ShmTable
from walcache.shm.creader import CReader

from shm.test_torture import _ctx, _seed, procs  # noqa: F401 - procs is a fixture

from .helpers import requires_c

KEYS = 4
SIZES = (24, 24, 64, 200)  # repeats rewrite in place; a change of size moves the key
SECONDS = 2.0


def _value(version: int, size: int) -> bytes:
    return struct.pack("<Q", version) + bytes(size - 8)


def _writer(namespace: str, seed: int, ready: Any, stop: Any, out: Any) -> None:
    rng = random.Random(seed)
    t = ShmTable.create(namespace, capacity=64)
    version = [0] * KEYS
    seqno = 0
    for k in range(KEYS):
        seqno += 1
        t.put(encode_key(f"k{k}"), 1, _value(0, SIZES[0]), seqno, 0)
    t.publish()
    ready.set()
    moves = deletes = 0
    while not stop.is_set():
        for _ in range(200):
            k = rng.randrange(KEYS)
            seqno += 1
            if rng.random() < 0.1:
                t.delete(encode_key(f"k{k}"), seqno)
                deletes += 1
                seqno += 1
            version[k] += 1
            size = rng.choice(SIZES)
            moves += size != SIZES[0]
            t.put(encode_key(f"k{k}"), 1, _value(version[k], size), seqno, 0)
    out.put({"role": "writer", "versions": sum(version), "moves": moves, "deletes": deletes})
    t.close(unlink=True)


def _reader(namespace: str, seed: int, ready: Any, stop: Any, out: Any, kind: str) -> None:
    rng = random.Random(seed)
    ready.wait(30)
    r = CReader(namespace) if kind == "c" else ShmReader(namespace)
    floor = [0] * KEYS  # no answer for key k may be older than this any more
    reads = misses = contention = 0
    bad: list[str] = []

    def seen(k: int, how: str, value: bytes | None) -> None:
        nonlocal reads, misses
        reads += 1
        if value is None:
            misses += 1
            floor[k] = max(floor[k], last[k] + 1)  # whatever was seen before is gone
            return
        ver = struct.unpack_from("<Q", value)[0]
        if ver < floor[k] and len(bad) < 5:
            bad.append(f"k{k} via {how}: version {ver} after version {last[k]} or its deletion was seen")
        last[k] = max(last[k], ver)
        floor[k] = max(floor[k], ver)

    last = [0] * KEYS
    while not stop.is_set() and len(bad) < 5:
        for n in range(300):
            k = rng.randrange(KEYS)
            try:
                got = r.get(encode_key(f"k{k}"))
                seen(k, "get (full protocol)", None if got is None else got[1])
                if n % 4 == 3:
                    seen(k, "get_many", r.get_many([f"k{k}"]).get(f"k{k}"))
                else:
                    seen(k, "lookup", r.lookup(f"k{k}"))
            except ReadContention:
                # The writer was descheduled mid-write past the retry bounds (a client then
                # asks the daemon): no answer, so nothing to check; counted, must stay rare.
                contention += 1
    out.put({"role": "reader", "reads": reads, "misses": misses, "bad": bad, "cache_hits": getattr(r, "cache_hits", None),
             "contention": contention})  # fmt: skip
    r.close()


@pytest.mark.parametrize("kind", [pytest.param("c", marks=requires_c), "python"])
def test_no_read_returns_a_version_older_than_one_already_seen(
    namespace: str, procs: list[BaseProcess], kind: str
) -> None:
    seed = _seed()
    ready, stop = _ctx.Event(), _ctx.Event()
    out: Any = _ctx.Queue()
    w = _ctx.Process(target=_writer, args=(namespace, seed, ready, stop, out), daemon=True)
    procs.append(w)
    w.start()
    assert ready.wait(30), f"seed={seed}: the writer did not publish"
    r = _ctx.Process(target=_reader, args=(namespace, seed + 1, ready, stop, out, kind), daemon=True)
    procs.append(r)
    r.start()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
        assert all(p.is_alive() for p in procs), f"seed={seed}: a process died: {[p.exitcode for p in procs]}"
    stop.set()
    res = {}
    for _ in range(2):
        got = out.get(timeout=30)
        res[got["role"]] = got
    for p in procs:
        p.join(30)
    reader, writer = res["reader"], res["writer"]
    assert not reader["bad"], f"seed={seed}: reads went back in time: {reader['bad']} ({writer})"
    # The run proves something only if keys moved and went away meanwhile (and, in C, the
    # result cache answered).
    assert reader["misses"] > 0, f"seed={seed}: {reader}"
    if kind == "c":
        assert reader["cache_hits"] > 1000, f"seed={seed}: {reader}"
    assert reader["contention"] <= reader["reads"] // 100, f"seed={seed}: too much contention: {reader}"
    assert writer["moves"] > 1000 and writer["deletes"] > 100, f"seed={seed}: {writer}"
