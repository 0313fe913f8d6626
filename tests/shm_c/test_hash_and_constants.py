"""The compiled reader computes what the Python writer computes: XXH64 of the encoded key
(every length path), the codec's key encoding, and the layout's constants."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import example, given, settings
from hypothesis import strategies as st

from walcache import InvalidKey
from walcache.codec import encode_key
from walcache.shm import layout
from walcache.shm.creader import extension

from .helpers import requires_c

pytestmark = requires_c


def test_every_length_path_agrees_with_xxhash() -> None:
    # 0..31 bytes: no stripe; 32+: stripes of 32; then the 8-byte, 4-byte and 1-byte tails
    # in every combination (length mod 32 covers them all), at every alignment of the input.
    assert extension is not None
    rng = random.Random(8)
    for n in range(0, 300):
        data = rng.randbytes(n + 7)
        for shift in range(8):
            chunk = memoryview(data)[shift : shift + n]
            assert extension.xxh64(chunk) == xxhash.xxh64_intdigest(bytes(chunk)), (n, shift)
    assert extension.xxh64(b"") == 0xEF46DB3751D8E999  # the published empty-input value


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**64 - 1))
@example(b"", 0)
@example(b"\xff" * 32, 2**64 - 1)
@example(b"a" * 31, 1)
@example(b"a" * 36, 0)
@example(b"a" * 47, 0)
def test_xxh64_matches_the_python_writers_hash(data: bytes, seed: int) -> None:
    assert extension is not None
    assert extension.xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed)
    assert extension.xxh64(data) == layout.hash_key(data)


KEYS = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, "", b""]),
)


@settings(max_examples=500)
@given(KEYS)
def test_key_encoding_matches_the_codec(key: object) -> None:
    assert extension is not None
    try:
        expected = encode_key(key)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            extension.encode_key(key)
        return
    assert extension.encode_key(key) == expected


def test_key_types_the_codec_handles_or_refuses() -> None:
    assert extension is not None

    class I(int):
        pass

    for key in (I(5), bytearray(b"x"), memoryview(b"y")):
        assert extension.encode_key(key) == encode_key(key)
    for bad in (True, None, 1.0, ("a",)):
        with pytest.raises(InvalidKey):
            extension.encode_key(bad)


def test_layout_constants_are_the_layout_modules() -> None:
    assert extension is not None
    for name in (
        "LAYOUT_VERSION", "HEADER_SIZE", "SLOT_SIZE", "REC_HEADER_SIZE", "MIN_CAPACITY", "MAX_KEY_BYTES",
        "MAX_SEGMENT_BYTES", "RETRY_MIN_TRIES", "RETRY_MIN_NS", "TOMBSTONE", "MOVED", "FP_MASK", "DATA_MAGIC",
    ):  # fmt: skip
        assert getattr(extension, name) == getattr(layout, name), name


def test_header_and_record_word_indices_are_the_layouts() -> None:
    assert extension is not None
    # The header struct's field order: magic, version, generation, incarnation,
    # segment_bytes, capacity, index_off, data_off, ...
    fields = layout.HEADER_STRUCT.format.lstrip("=")
    assert fields.startswith("8sQQQQQQQ")
    offset = {name: 8 * i for i, name in enumerate(
        ["magic", "version", "generation", "incarnation", "segment_bytes", "capacity", "index_off", "data_off"]
    )}  # fmt: skip
    assert 8 * extension.H_VERSION == offset["version"]
    assert 8 * extension.H_GENERATION == offset["generation"] == 8 * layout.H_GENERATION
    assert 8 * extension.H_SEGMENT_BYTES == offset["segment_bytes"]
    assert 8 * extension.H_CAPACITY == offset["capacity"]
    assert 8 * extension.H_INDEX_OFF == offset["index_off"]
    assert 8 * extension.H_DATA_OFF == offset["data_off"]
    assert extension.H_STALE == layout.H_STALE
    assert extension.H_INDEX == layout.H_INDEX == 12  # byte 96, in the half that rarely changes
    rec = (layout.R_SEQ, layout.R_LENS, layout.R_EXPIRY_VFLAG, layout.R_SEQNO)
    assert (extension.R_SEQ, extension.R_LENS, extension.R_EXPIRY_VFLAG, extension.R_SEQNO) == rec
