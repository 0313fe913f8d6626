"""A daemon of this layout taking over a data dir whose table a daemon of an older
layout published: the older table is retired (stale, MOVED, unlinked) like any previous
table, so its readers move off it instead of reading a frozen table forever."""

from __future__ import annotations

import mmap

import posix_ipc
import pytest

from walcache.shm import ShmTable, layout
from walcache.shm.writer import RETIRABLE_LAYOUT_VERSIONS

from .helpers import segments_of
from .test_table import put


def _set_version(name: str, version: int) -> None:
    shm = posix_ipc.SharedMemory(name)
    try:
        with mmap.mmap(shm.fd, shm.size) as mm:
            mm[8:16] = version.to_bytes(8, "little")
    finally:
        shm.close_fd()


def _clear_index_word(name: str) -> None:
    shm = posix_ipc.SharedMemory(name)
    try:
        with mmap.mmap(shm.fd, shm.size) as mm:
            mm[8 * layout.H_INDEX : 8 * layout.H_INDEX + 8] = bytes(8)
    finally:
        shm.close_fd()


@pytest.mark.parametrize("version", [1, 2])
def test_the_table_of_an_older_layout_is_retired_on_publish(namespace: str, version: int) -> None:
    assert version in RETIRABLE_LAYOUT_VERSIONS and layout.LAYOUT_VERSION > version
    old = ShmTable.create(namespace, capacity=16)
    put(old, "k", b"old")
    old.publish()
    old_name = old.name
    # What a daemon of that layout left behind: its control segment and its table. Before
    # layout 3 the header had no index word (offset 96 was reserved, zero).
    _set_version(layout.ctl_name(namespace), version)
    _set_version(old_name, version)
    _clear_index_word(old_name)
    shm = posix_ipc.SharedMemory(old_name)
    reader_view = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)  # an old reader's mapping
    shm.close_fd()
    old.close()  # the old daemon is gone; its segments stay
    q = memoryview(reader_view).cast("Q")
    capacity = q[5]  # header word 5: capacity (layout.py)
    slots = q[layout.HEADER_SIZE // 8 : layout.HEADER_SIZE // 8 + capacity]
    try:
        assert q[layout.H_STALE] == 0 and layout.MOVED not in slots.tolist()
        new = ShmTable.create(namespace, capacity=16)
        try:
            put(new, "k", b"new")
            new.publish()
            stale, slot_words = q[layout.H_STALE], set(slots.tolist())
        finally:
            new.close(unlink=True)
    finally:
        slots.release()
        q.release()
        reader_view.close()
    assert stale == 1, "the older table was not marked stale"
    assert slot_words == {layout.MOVED}, f"the older table's slots do not all say MOVED: {slot_words}"
    assert "/" + old_name.lstrip("/") not in segments_of(namespace), "the older table was not unlinked"


def test_a_control_segment_of_an_unknown_layout_is_replaced_without_touching_others(namespace: str) -> None:
    old = ShmTable.create(namespace, capacity=16)
    old.publish()
    old_name = old.name
    _set_version(layout.ctl_name(namespace), 99)  # nothing this writer knows how to mark
    old.close()
    new = ShmTable.create(namespace, capacity=16)
    try:
        new.publish()
        assert "/" + old_name.lstrip("/") in segments_of(namespace)  # left alone, not guessed at
    finally:
        new.close(unlink=True)
