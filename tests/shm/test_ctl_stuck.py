"""A control segment left mid-update: a slow writer is waited for, a dead one is reported."""

from __future__ import annotations

import threading
import time

import pytest

from walcache import TableUnavailable
from walcache.shm import ShmReader, ShmTable
from walcache.shm.layout import C_SEQ
from walcache.shm.reader import CTL_STUCK_NS


def _publish_two(namespace: str) -> tuple[ShmTable, ShmTable]:
    old = ShmTable.create(namespace, capacity=8)
    old.put(b"sk", 2, b"v1", 1, 0)
    old.publish()
    new = ShmTable.create(namespace, capacity=8)
    new.put(b"sk", 2, b"v2", 2, 0)
    return old, new


def test_a_writer_descheduled_mid_publish_is_waited_for(namespace: str) -> None:
    old, new = _publish_two(namespace)
    reader = ShmReader(namespace)
    try:
        assert reader.get(b"sk") == (2, b"v1")
        ctlq = old._ctlq
        assert ctlq is not None
        seq = ctlq[C_SEQ]
        ctlq[C_SEQ] = seq + 1  # the writer "stops" inside the control update for 50 ms
        resumed = threading.Event()

        def resume() -> None:
            resumed.set()
            ctlq[C_SEQ] = seq

        timer = threading.Timer(0.05, resume)
        timer.start()
        reader.refresh()  # reads the control segment: must wait, not call the writer dead
        assert resumed.is_set()  # it returned only once the update was complete
        timer.join()
        new.publish()
        assert reader.get(b"sk") == (2, b"v2")
    finally:
        reader.close()
        new.close(unlink=True)
        old.close(unlink=True)


def test_a_control_segment_odd_for_good_is_reported(namespace: str) -> None:
    old, new = _publish_two(namespace)
    reader = ShmReader(namespace)
    try:
        ctlq = old._ctlq
        assert ctlq is not None
        ctlq[C_SEQ] = ctlq[C_SEQ] + 1  # never made even again: the writer died there
        t0 = time.monotonic()
        with pytest.raises(TableUnavailable, match="mid-update"):
            reader.refresh()
        assert time.monotonic() - t0 >= CTL_STUCK_NS / 1e9 * 0.9
    finally:
        reader.close()
        new.close(unlink=True)
        old.close(unlink=True)
