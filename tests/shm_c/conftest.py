"""Fixtures for the compiled-reader tests; the namespace fixture is the shm tests' own."""

from __future__ import annotations

from shm.conftest import namespace

__all__ = ["namespace"]
