"""Building logs and the states they must recover to, for the WAL tests."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from walcache.daemon.apply import Applier, DictTable, apply_ops
from walcache.daemon.fileops import FileOps
from walcache.daemon.recovery import RecoveryReport, open_log
from walcache.daemon.walformat import OP_DELETE, OP_PUT, Op
from walcache.daemon.walwriter import WalWriter

NOW_MS = 1_700_000_000_000  # replay's "now": fixed so expired puts are deterministic
PAST_MS = NOW_MS - 1
FUTURE_MS = NOW_MS + 86_400_000

Record = tuple[int, tuple[Op, ...]]  # (seqno, ops)


def state_after(records: Sequence[Record], k: int) -> dict[bytes, tuple[int, bytes, int]]:
    """The state the first ``k`` records build, through the one apply path."""
    t = DictTable()
    for seqno, ops in records[:k]:
        apply_ops(t, seqno, ops, NOW_MS)
    return t.snapshot()


def recover(
    data_dir: Path, fileops: FileOps | None = None, **kw: object
) -> tuple[WalWriter, RecoveryReport, DictTable]:
    t = DictTable()
    # Through an Applier, so the recovery tests run the reader's one-op fast path.
    writer, report = open_log(data_dir, Applier(t, NOW_MS), fileops=fileops, **kw)  # type: ignore[arg-type]
    return writer, report, t


def random_ops(rng: random.Random, nkeys: int = 12) -> tuple[Op, ...]:
    """One record's ops: mostly single puts, some deletes, some batches; some expiries."""
    def one() -> Op:
        key = b"b" + b"k%d" % rng.randrange(nkeys)
        if rng.random() < 0.25:
            return (OP_DELETE, key, 0, b"", 0)
        expiry = rng.choice([0, 0, 0, FUTURE_MS, PAST_MS])
        return (OP_PUT, key, rng.randrange(3), rng.randbytes(rng.randrange(0, 40)), expiry)

    if rng.random() < 0.2:
        return tuple(one() for _ in range(rng.randrange(2, 6)))
    return (one(),)


def write_log(
    data_dir: Path,
    records_ops: Sequence[Sequence[Op]],
    *,
    group_sizes: Sequence[int] | None = None,
    close: bool = True,
    fileops: FileOps | None = None,
    **kw: object,
) -> list[Record]:
    """Append ``records_ops`` (one record each) in groups; returns (seqno, ops) of each."""
    writer, _report, _t = recover(data_dir, fileops=fileops, **kw)
    out: list[Record] = []
    i = 0
    gi = 0
    while i < len(records_ops):
        n = group_sizes[gi % len(group_sizes)] if group_sizes else 1
        gi += 1
        datas = []
        for ops in records_ops[i : i + n]:
            seqno, data = writer.encode(ops)
            datas.append(data)
            out.append((seqno, tuple(ops)))
        writer.append(b"".join(datas))
        i += n
    if close:
        writer.close()
    return out


def ops_for_seqno(seed: int, seqno: int) -> tuple[Op, ...]:
    """Deterministic ops for a seqno, so a killed writer's log can be checked by another process."""
    return random_ops(random.Random(seed * 1_000_003 + seqno), nkeys=50)
