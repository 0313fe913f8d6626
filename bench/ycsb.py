"""YCSB core workloads and key generators, written from the YCSB reference.

Why our own copy: the benchmark must run with nothing but the standard library,
and YCSB's Java generators are short. The formulas follow
``site.ycsb.generator.ZipfianGenerator`` and ``ScrambledZipfianGenerator``
(Gray et al., "Quickly Generating Billion-Record Synthetic Databases", SIGMOD 1994):

- ``ZipfianGenerator`` draws an item in ``[0, n)`` where item 0 is the most
  popular; ``zeta(n)`` is grown incrementally when ``n`` grows (YCSB does the same
  for workload D, where inserts extend the key space).
- ``ScrambledZipfianGenerator`` draws from a zipfian over 10^10 items (with YCSB's
  precomputed zeta) and spreads the popular items over the key space with
  FNV-1a 64 ``% n``, so the hot keys are not the first keys loaded.

Workloads (YCSB ``workloads/workload[abcdf]``), with the zipfian constant 0.99:

====  =========================================  ==================
name  mix                                        key choice
====  =========================================  ==================
A     50% read, 50% update                       scrambled zipfian
B     95% read, 5% update                        scrambled zipfian
C     100% read                                  scrambled zipfian
D     95% read, 5% insert                        latest (zipfian from the newest key down)
F     50% read, 50% read-modify-write            scrambled zipfian
====  =========================================  ==================

Deviations, stated so nobody has to find them: every "record" is one key with one
value of the configured size (YCSB's default is 10 fields of 100 bytes); the
benchmark pre-draws a ring of operations per workload and each client process
walks it from its own offset (drawing a zipfian number in Python costs more than a
shared-memory read, so drawing inside the timed loop would measure the generator);
and in workload D each client reads "latest" relative to its own inserts, then the
loaded keys from the newest down (YCSB uses the global insert counter, which
processes do not share here).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "ZIPFIAN_CONSTANT",
    "READ",
    "UPDATE",
    "INSERT",
    "RMW",
    "OP_NAMES",
    "Workload",
    "WORKLOADS",
    "ZipfianGenerator",
    "ScrambledZipfianGenerator",
    "fnvhash64",
    "zeta",
    "key_for",
    "OpRing",
    "build_ring",
]

ZIPFIAN_CONSTANT = 0.99

# YCSB's ScrambledZipfianGenerator: a zipfian over this many items, zeta precomputed.
_SCRAMBLED_ITEM_COUNT = 10_000_000_000
_SCRAMBLED_ZETAN = 26.46902820178302

_FNV_OFFSET_BASIS_64 = 0xCBF29CE484222325
_FNV_PRIME_64 = 1099511628211
_MASK64 = (1 << 64) - 1

# Operation codes in a ring (small ints: the timed loop compares them).
READ = 0
UPDATE = 1
INSERT = 2
RMW = 3
OP_NAMES: dict[int, str] = {READ: "read", UPDATE: "update", INSERT: "insert", RMW: "rmw"}


def fnvhash64(val: int) -> int:
    """YCSB's ``Utils.fnvhash64``: FNV-1a over the 8 low bytes, as a non-negative Java long."""
    h = _FNV_OFFSET_BASIS_64
    for _ in range(8):
        octet = val & 0xFF
        val >>= 8
        h ^= octet
        h = (h * _FNV_PRIME_64) & _MASK64
    # Java returns Math.abs of the signed long; Long.MIN_VALUE stays negative there,
    # which YCSB then feeds to '%': we map it to 0 instead of producing a negative key.
    if h >= 1 << 63:
        h = (1 << 64) - h
    return h & ((1 << 63) - 1)


def zeta(n: int, theta: float, start: int = 0, initial: float = 0.0) -> float:
    """sum_{i=start+1..n} 1/i^theta added to ``initial`` (YCSB's ``zeta(st, n, theta, initialsum)``)."""
    total = initial
    for i in range(start, n):
        total += 1.0 / ((i + 1) ** theta)
    return total


class ZipfianGenerator:
    """Zipfian over ``[0, items)``, item 0 the most popular; ``next(items)`` may grow the range."""

    def __init__(
        self,
        items: int,
        rng: random.Random,
        theta: float = ZIPFIAN_CONSTANT,
        zetan: float | None = None,
    ) -> None:
        if items < 1:
            raise ValueError("items must be >= 1")
        self._rng = rng
        self.theta = theta
        self.alpha = 1.0 / (1.0 - theta)
        self.zeta2theta = zeta(2, theta)
        self.items = items
        self.zetan = zeta(items, theta) if zetan is None else zetan
        self._eta = self._compute_eta()

    def _compute_eta(self) -> float:
        return (1.0 - float((2.0 / self.items) ** (1.0 - self.theta))) / (1.0 - self.zeta2theta / self.zetan)

    def _grow(self, items: int) -> None:
        # YCSB only supports growing incrementally (recomputing from scratch when
        # shrinking); inserts only ever grow the range.
        if items > self.items:
            self.zetan = zeta(items, self.theta, start=self.items, initial=self.zetan)
        else:
            self.zetan = zeta(items, self.theta)
        self.items = items
        self._eta = self._compute_eta()

    def next(self, items: int | None = None) -> int:
        if items is not None and items != self.items:
            self._grow(items)
        u = self._rng.random()
        uz = u * self.zetan
        if uz < 1.0:
            return 0
        if uz < 1.0 + 0.5**self.theta:
            return 1
        return int(self.items * (self._eta * u - self._eta + 1.0) ** self.alpha)


class ScrambledZipfianGenerator:
    """YCSB's scrambled zipfian over ``[0, items)``: popular items spread by FNV hashing."""

    def __init__(self, items: int, rng: random.Random, theta: float = ZIPFIAN_CONSTANT) -> None:
        self.items = items
        if theta == ZIPFIAN_CONSTANT:
            # YCSB uses the precomputed zeta only for its default constant.
            self._gen = ZipfianGenerator(_SCRAMBLED_ITEM_COUNT, rng, theta, _SCRAMBLED_ZETAN)
        else:
            self._gen = ZipfianGenerator(_SCRAMBLED_ITEM_COUNT, rng, theta)

    def next(self) -> int:
        return fnvhash64(self._gen.next()) % self.items


@dataclass(frozen=True)
class Workload:
    name: str
    read: float
    update: float
    insert: float
    rmw: float
    latest: bool
    description: str


WORKLOADS: dict[str, Workload] = {
    "A": Workload("A", 0.50, 0.50, 0.0, 0.0, False, "50% read / 50% update (session store)"),
    "B": Workload("B", 0.95, 0.05, 0.0, 0.0, False, "95% read / 5% update (photo tagging)"),
    "C": Workload("C", 1.00, 0.0, 0.0, 0.0, False, "100% read (user profile cache)"),
    "D": Workload("D", 0.95, 0.0, 0.05, 0.0, True, "95% read latest / 5% insert (status updates)"),
    "F": Workload("F", 0.50, 0.0, 0.0, 0.50, False, "50% read / 50% read-modify-write (user database)"),
}


def key_for(keynum: int) -> bytes:
    """The loaded key for record number ``keynum`` (YCSB's "user" prefix)."""
    return b"user%d" % keynum


@dataclass
class OpRing:
    """A pre-drawn sequence of (op, item) that client processes walk in a loop.

    For ``latest`` workloads ``items`` holds zipfian offsets from the newest key
    (0 = newest) instead of record numbers; the client maps them to keys.
    """

    workload: Workload
    ops: list[int]
    items: list[int]
    seed: int


def build_ring(workload: Workload, record_count: int, length: int, seed: int) -> OpRing:
    """Draw ``length`` operations of ``workload`` over ``record_count`` keys, seeded."""
    rng = random.Random(seed)
    ops: list[int] = []
    items: list[int] = []
    thresholds = (
        (workload.read, READ),
        (workload.read + workload.update, UPDATE),
        (workload.read + workload.update + workload.insert, INSERT),
        (1.0, RMW),
    )
    if workload.latest:
        # The item count grows by one per insert, as YCSB's SkewedLatestGenerator sees it.
        latest = ZipfianGenerator(record_count, rng)
        inserted = 0
        for _ in range(length):
            op = _choose(rng.random(), thresholds)
            ops.append(op)
            if op == INSERT:
                inserted += 1
                items.append(0)
            else:
                items.append(latest.next(record_count + inserted))
    else:
        scrambled = ScrambledZipfianGenerator(record_count, rng)
        for _ in range(length):
            ops.append(_choose(rng.random(), thresholds))
            items.append(scrambled.next())
    return OpRing(workload, ops, items, seed)


def _choose(u: float, thresholds: tuple[tuple[float, int], ...]) -> int:
    for bound, op in thresholds:
        if u < bound:
            return op
    return thresholds[-1][1]
