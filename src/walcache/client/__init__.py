"""The client side: :class:`Client` and :func:`connect`."""

from .client import Client, connect

__all__ = ["Client", "connect"]
