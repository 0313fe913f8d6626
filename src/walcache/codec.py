"""Key and value encoding: the serialization seam between Python objects and bytes.

The log, the wire and the shared table store only bytes. This module is the one
place that turns user keys and values into those bytes and back.

Keys
    A key is ``str``, ``bytes`` or ``int`` and the three are distinct (``"a"``,
    ``b"a"`` and ``97`` are three keys). The encoded key is one tag byte and the
    payload::

        b"b" + raw bytes          bytes key
        b"s" + UTF-8              str key
        b"i" + ASCII decimal      int key (any size; "-" for negatives)

    ``bool`` is refused: ``True == 1`` in a dict, so accepting it would make
    ``c[True]`` and ``c[1]`` silently different keys.

Values
    A value is stored as (vflag, bytes):

    ========  =====================  ==========================================
    vflag     bytes                  why
    ========  =====================  ==========================================
    0         msgpack                every other msgpack type (None, bool, int,
                                     float, list, dict, ...)
    1         the bytes themselves   bytes stay bytes, no decoding on read
    2         UTF-8                  str, decoded without msgpack on read
    ========  =====================  ==========================================

    msgpack packs with ``use_bin_type=True`` and unpacks with ``raw=False`` and
    ``strict_map_key=False``: tuples come back as lists, dict keys may be any
    msgpack type. No pickle: a value that msgpack cannot pack raises
    :class:`~walcache.errors.InvalidValue`.

Any change to a tag or a vflag changes the stored format: bump the log and the
table layout versions.
"""

from __future__ import annotations

from typing import Any, Union

import msgpack

from .errors import InvalidKey, InvalidValue

__all__ = [
    "Key",
    "VFLAG_MSGPACK",
    "VFLAG_BYTES",
    "VFLAG_STR",
    "VFLAGS",
    "encode_key",
    "decode_key",
    "encode_value",
    "decode_value",
    "check_encoded_key",
    "check_encoded_value",
]

Key = Union[str, bytes, int]

TAG_BYTES = 0x62  # b"b"
TAG_STR = 0x73  # b"s"
TAG_INT = 0x69  # b"i"

VFLAG_MSGPACK = 0
VFLAG_BYTES = 1
VFLAG_STR = 2
VFLAGS = frozenset((VFLAG_MSGPACK, VFLAG_BYTES, VFLAG_STR))

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb


def encode_key(key: object) -> bytes:
    """The stored form of ``key``: a tag byte and the payload."""
    try:
        return _encode_key(key)
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"a str key must be valid Unicode (it is stored as UTF-8): {exc}") from None
    except ValueError as exc:  # an int past sys.get_int_max_str_digits()
        raise InvalidKey(f"an int key this large cannot be stored: {exc}") from None


def _encode_key(key: object) -> bytes:
    t = type(key)
    if t is str:
        return b"s" + str.encode(key)  # type: ignore[arg-type]
    if t is bytes:
        return b"b" + key  # type: ignore[operator]
    if t is int:
        return b"i" + str(key).encode()
    if isinstance(key, (bytearray, memoryview)):
        return b"b" + bytes(key)
    if isinstance(key, bool):
        raise InvalidKey("bool keys are refused (True == 1 would alias); use an int or a str")
    if isinstance(key, str):
        return b"s" + str(key).encode()
    if isinstance(key, int):
        return b"i" + str(int(key)).encode()
    raise InvalidKey(f"keys must be str, bytes or int, not {type(key).__name__}")


def decode_key(kb: bytes) -> Key:
    """The Python key for a stored key (inverse of :func:`encode_key`)."""
    if not kb:
        raise ValueError("empty encoded key")
    tag = kb[0]
    if tag == TAG_STR:
        return kb[1:].decode()
    if tag == TAG_BYTES:
        return bytes(kb[1:])
    if tag == TAG_INT:
        return int(kb[1:])
    raise ValueError(f"unknown key tag {tag:#x}")


def check_encoded_key(kb: bytes) -> None:
    """Raise InvalidKey unless ``kb`` is a key :func:`encode_key` could have made."""
    try:
        key = decode_key(kb)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidKey(f"malformed encoded key: {exc}") from None
    if type(key) is int and encode_key(key) != kb:
        raise InvalidKey("malformed encoded int key (not canonical decimal)")


def encode_value(value: Any) -> tuple[int, bytes]:
    """(vflag, bytes) for ``value``."""
    t = type(value)
    if t is bytes:
        return VFLAG_BYTES, value
    try:
        if t is str:
            return VFLAG_STR, value.encode()
        return VFLAG_MSGPACK, _packb(value)
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidValue(
            f"cannot store a {type(value).__name__}: values must be msgpack types "
            f"(None, bool, int, float, str, bytes, list, dict): {exc}"
        ) from None


def decode_value(vflag: int, vb: bytes) -> Any:
    """The Python value for stored (vflag, bytes)."""
    if vflag == VFLAG_BYTES:
        return vb
    if vflag == VFLAG_STR:
        return vb.decode()
    return _unpackb(vb, raw=False, strict_map_key=False)


def check_encoded_value(vflag: int, vb: bytes) -> None:
    """Raise InvalidValue unless (vflag, vb) decodes; the daemon checks before logging."""
    if vflag not in VFLAGS:
        raise InvalidValue(f"unknown value encoding {vflag}")
    try:
        decode_value(vflag, vb)
    except TypeError as exc:  # e.g. unhashable type: 'list'
        raise InvalidValue(
            f"a value whose dict keys come back as lists (tuple keys?) cannot be stored: {exc}"
        ) from None
    except Exception as exc:  # msgpack raises several unrelated classes
        raise InvalidValue(f"malformed encoded value: {type(exc).__name__}: {exc}") from None
