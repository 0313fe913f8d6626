from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from walcache_testing import Workspace  # noqa: E402


@pytest.fixture
def ws() -> Iterator[Workspace]:
    w = Workspace()
    try:
        yield w
    finally:
        w.cleanup()
