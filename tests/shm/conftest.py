from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from .helpers import unique_namespace, unlink_all


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace; every segment still under it at the end is unlinked."""
    ns = unique_namespace(re.sub(r"[^a-z0-9]", "", request.node.name.lower())[4:12])
    yield ns
    unlink_all(ns)
