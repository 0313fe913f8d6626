"""The shm tests' multi-process torn-read torture, with compiled readers.

The writer process (theirs, imported: full speed, self-checking values, growth, in-place
and out-of-place rewrites, space reuse) runs against two reader processes that use the C
reader's lookup, get and get_many and verify every value. The control run switches the
seqlock validation off (the C reader's test-only flag) and must see tears: that is what
proves this test could catch one. Seeds are printed on failure; replay with
WALCACHE_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from walcache import ReadContention, TableUnavailable
from walcache.shm.creader import CReader

from shm.helpers import check_value
from shm.test_torture import (  # noqa: F401
    CONTROL_MAX_SECONDS,
    DEFAULT_SECONDS,
    HOT,
    WAVE,
    Run,
    _check_clean,
    _check_grown_in_place,
    _check_index_kept_moving,
    _churn,
    _ctx,
    _hot,
    _seed,
    _torture,
    _writer,
    procs,
)

from .helpers import requires_c

pytestmark = requires_c

BATCH = 24


def _pick(rng: random.Random, g: int) -> tuple[int, bytes]:
    """(key id, user key): a hot key, or a churn key of the current or the previous wave."""
    if rng.random() < 0.85:
        kid = rng.randrange(HOT)
        return kid, _hot(kid)
    key, kid = _churn(max(0, g - rng.randrange(2)), rng.randrange(WAVE))
    return kid, key


def _reader_c(
    namespace: str, seed: int, unsafe: bool, ready: Any, stop: Any, wave: Any, bad_count: Any, out: Any, floors: Any
) -> None:
    rng = random.Random(seed)
    ready.wait(30)
    r = CReader(namespace, unsafe_no_seqlock=unsafe)
    reads = bad = contention = hot_reads = churn_hits = batched = 0
    examples: list[str] = []
    names = {r.header()["name"]}

    def verify(kid: int, value: object, floor: int) -> None:
        nonlocal reads, hot_reads, churn_hits
        reads += 1
        hot_reads += kid < HOT
        churn_hits += kid >= HOT and value is not None
        if value is None:
            err = "hot key missing" if kid < HOT else None
        elif not isinstance(value, bytes):
            err = f"a {type(value).__name__} where bytes were written"
        else:
            err = check_value(kid, value, floor)
        if err:
            record_bad(f"key {kid}: {err}")

    def record_bad(what: str) -> None:
        nonlocal bad
        bad += 1
        with bad_count.get_lock():
            bad_count.value += 1
        if len(examples) < 5:
            examples.append(what)

    while not stop.is_set():
        g = wave.value
        for n in range(256):
            try:
                if n % 8 == 0:
                    picks = {key: kid for kid, key in (_pick(rng, g) for _ in range(BATCH))}
                    before = {key: floors[kid] if kid < HOT else 0 for key, kid in picks.items()}
                    got = r.get_many(list(picks))
                    batched += len(picks)
                    for key, kid in picks.items():
                        verify(kid, got.get(key), before[key])
                    continue
                kid, key = _pick(rng, g)
                floor = floors[kid] if kid < HOT else 0
                if n & 1:
                    entry = r.get(b"b" + key)
                    verify(kid, None if entry is None else entry[1] if entry[0] == 1 else repr(entry), floor)
                else:
                    verify(kid, r.lookup(key), floor)
            except ReadContention:
                contention += 1
            except TableUnavailable as exc:
                if not unsafe:
                    raise  # a consistent copy of a healthy table never looks corrupt
                # Without the seqlock a torn record can look corrupt (a half-written
                # value that does not decode): that is a bad read too.
                record_bad(f"corrupt-looking copy: {exc}")
        names.add(str(r.header()["name"]))
    out.put({"role": "reader", "reads": reads, "hot_reads": hot_reads, "churn_hits": churn_hits, "bad": bad, "batched": batched,
             "contention": contention, "examples": examples, "segments_seen": len(names),
             "retries": r.retries, "remaps": r.remaps, "cache_hits": r.cache_hits})  # fmt: skip
    r.close()


def _torture_c(
    namespace: str, procs: list[BaseProcess], seconds: float, unsafe: bool, seed: int, max_memory: int | None = None
) -> Run:
    return _torture(namespace, procs, seconds, unsafe, seed, reader=_reader_c, max_memory=max_memory)


def test_c_readers_never_see_a_torn_value(namespace: str, procs: list[BaseProcess]) -> None:
    run = _torture_c(namespace, procs, DEFAULT_SECONDS, unsafe=False, seed=_seed())
    _check_clean(run)
    assert all(rd["segments_seen"] > 1 for rd in run.readers), f"a reader never remapped: {run}"
    assert all(rd["batched"] > 0 and rd["remaps"] > 0 for rd in run.readers), f"get_many or remap not exercised: {run}"
    assert all(rd["cache_hits"] > 0 for rd in run.readers), f"the result cache was never used: {run}"


def test_c_readers_never_see_a_torn_value_while_the_table_grows_in_place(
    namespace: str, procs: list[BaseProcess]
) -> None:
    """Data area grown and index moved under the C readers (and their result cache)."""
    run = _torture_c(namespace, procs, DEFAULT_SECONDS, unsafe=False, seed=_seed(), max_memory=64 << 20)
    _check_grown_in_place(run)


def test_c_readers_never_see_a_torn_value_while_the_index_keeps_moving(
    namespace: str, procs: list[BaseProcess]
) -> None:
    """Inserts only: the index moves again and again under the C readers' result cache."""
    seed = _seed()
    run = _torture(namespace, procs, DEFAULT_SECONDS, False, seed, reader=_reader_c, max_memory=256 << 20, deletes=False)
    _check_index_kept_moving(run)


def test_without_the_seqlock_the_c_readers_see_tears(namespace: str, procs: list[BaseProcess]) -> None:
    run = _torture_c(namespace, procs, CONTROL_MAX_SECONDS, unsafe=True, seed=_seed())
    assert run.bad > 0, f"the control saw no tear: the torture test could not catch one ({run})"


@pytest.mark.stress
def test_c_readers_never_see_a_torn_value_long(namespace: str, procs: list[BaseProcess]) -> None:
    seconds = float(os.environ.get("WALCACHE_STRESS_SECONDS", "10"))
    run = _torture_c(namespace, procs, seconds, unsafe=False, seed=_seed())
    _check_clean(run)
