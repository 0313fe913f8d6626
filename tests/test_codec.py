"""Key and value encoding: distinct key types, round trips, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from walcache.codec import (
    VFLAG_BYTES,
    VFLAG_MSGPACK,
    VFLAG_STR,
    check_encoded_key,
    check_encoded_value,
    decode_key,
    decode_value,
    encode_key,
    encode_value,
)
from walcache.errors import InvalidKey, InvalidValue

keys = st.one_of(st.text(), st.binary(), st.integers())
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def test_str_bytes_and_int_keys_are_distinct() -> None:
    encoded = {encode_key("1"), encode_key(b"1"), encode_key(1)}
    assert len(encoded) == 3


@given(keys)
def test_keys_round_trip(key: object) -> None:
    kb = encode_key(key)
    check_encoded_key(kb)
    back = decode_key(kb)
    assert back == key and type(back) is type(key)


@given(values)
def test_values_round_trip(value: object) -> None:
    vflag, vb = encode_value(value)
    check_encoded_value(vflag, vb)
    assert decode_value(vflag, vb) == value


def test_bytes_and_str_values_skip_msgpack() -> None:
    assert encode_value(b"raw") == (VFLAG_BYTES, b"raw")
    assert encode_value("txt") == (VFLAG_STR, b"txt")
    assert encode_value(None)[0] == VFLAG_MSGPACK


@pytest.mark.parametrize("bad", [True, 1.5, None, ("a",), object()])
def test_bad_keys_name_the_type(bad: object) -> None:
    with pytest.raises(InvalidKey):
        encode_key(bad)


def test_unpackable_value_names_the_type() -> None:
    with pytest.raises(InvalidValue, match="set"):
        encode_value({1, 2})


@pytest.mark.parametrize("kb", [b"", b"x1", b"i01", b"iabc", b"s\xff"])
def test_malformed_encoded_keys_are_refused(kb: bytes) -> None:
    with pytest.raises(InvalidKey):
        check_encoded_key(kb)


@pytest.mark.parametrize("vflag,vb", [(9, b""), (VFLAG_MSGPACK, b"\xc1"), (VFLAG_MSGPACK, b""), (VFLAG_STR, b"\xff")])
def test_malformed_encoded_values_are_refused(vflag: int, vb: bytes) -> None:
    with pytest.raises(InvalidValue):
        check_encoded_value(vflag, vb)
