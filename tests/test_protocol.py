"""The sans-IO protocol: framing, validation and the one error class for bad input."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walcache.errors import InvalidKey, ProtocolError, WalcacheError
from walcache.protocol import (
    FRAME_HEADER,
    OPS,
    PROTOCOL_VERSION,
    BadRequest,
    ClientProtocol,
    FrameDecoder,
    ServerProtocol,
    encode_frame,
)


def frame_raw(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


def greeted_server(max_frame: int = 1 << 20) -> ServerProtocol:
    server = ServerProtocol(max_frame)
    req_id, data = ClientProtocol().hello()
    server.receive_data(data)
    req = server.next_request()
    assert req is not None and req.op == "hello"
    return server


def test_frame_header_is_four_bytes_little_endian() -> None:
    assert FRAME_HEADER.size == 4
    assert encode_frame(1)[:4] == b"\x01\x00\x00\x00"


def test_requests_parse_whole_and_one_byte_at_a_time() -> None:
    client = ClientProtocol()
    frames = [client.hello()[1]]
    frames.append(client.request("put", b"sk", 2, b"v", None)[1])
    frames.append(client.request("delete", b"sk")[1])
    frames.append(client.request("put_many", [[b"sa", 1, b"x"], [b"i1", 0, b"\xc0"]], 1000)[1])
    stream = b"".join(frames)
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        server = ServerProtocol(1 << 20)
        got = []
        for chunk in chunks:
            server.receive_data(chunk)
            while (req := server.next_request()) is not None:
                got.append(req)
        assert [r.op for r in got] == ["hello", "put", "delete", "put_many"]
        assert [r.req_id for r in got] == [1, 2, 3, 4]
        assert got[1].args == (b"sk", 2, b"v", None)
        assert got[3].args == ([[b"sa", 1, b"x"], [b"i1", 0, b"\xc0"]], 1000)


def test_pipelined_replies_keep_their_order() -> None:
    client = ClientProtocol()
    stream = b"".join(ServerProtocol.reply(i, i * 10) for i in range(1, 50))
    client.receive_data(stream)
    replies = []
    while (r := client.next_reply()) is not None:
        replies.append(r)
    assert [(r.req_id, r.value) for r in replies] == [(i, i * 10) for i in range(1, 50)]


def test_error_reply_rebuilds_the_exception_class() -> None:
    client = ClientProtocol()
    client.receive_data(ServerProtocol.error(7, InvalidKey("keys must be str")))
    reply = client.next_reply()
    assert reply is not None and not reply.ok and reply.req_id == 7
    assert isinstance(reply.value, InvalidKey)
    assert "keys must be str" in str(reply.value)


def test_oversized_length_prefix_is_refused_before_buffering() -> None:
    server = ServerProtocol(1 << 20)
    server.receive_data(struct.pack("<I", 2**31))
    with pytest.raises(ProtocolError, match="frame length 2147483648"):
        server.next_request()


def test_zero_length_frame_is_refused() -> None:
    server = ServerProtocol(1024)
    server.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        server.next_request()


def test_first_request_must_be_hello() -> None:
    server = ServerProtocol(1024)
    server.receive_data(ClientProtocol().request("ping")[1])
    with pytest.raises(ProtocolError, match="hello"):
        server.next_request()


def test_a_hello_in_another_version_greets_nothing() -> None:
    """The daemon answers it with an error; the connection must not then take writes."""
    client = ClientProtocol()
    server = ServerProtocol(1024)
    server.receive_data(client.request("hello", PROTOCOL_VERSION + 98, "x")[1])
    req = server.next_request()
    assert req is not None and req.op == "hello" and not server.greeted
    server.receive_data(client.request("put", b"sk", 1, b"v", None)[1])
    with pytest.raises(ProtocolError, match="hello"):
        server.next_request()
    server = ServerProtocol(1024)
    server.receive_data(client.hello()[1])
    assert server.next_request() is not None and server.greeted


@pytest.mark.parametrize(
    "msg",
    [
        [5, "put", [b"k", 0, b"v"]],  # too few args
        [5, "put", ["k", 0, b"v", None]],  # str key
        [5, "put", [b"k", "0", b"v", None]],  # vflag not int
        [5, "delete", [1]],
        [5, "put_many", [[[b"k", 0]], None]],
        [5, "delete_many", [[b"k", "x"]]],
        [5, "frobnicate", []],
        [5, 3, []],
    ],
)
def test_bad_arguments_are_answerable_with_the_req_id(msg: list[object]) -> None:
    server = greeted_server()
    server.receive_data(frame_raw(msg))
    with pytest.raises(BadRequest) as info:
        server.next_request()
    assert info.value.req_id == 5
    assert isinstance(info.value.error, ProtocolError)
    # The connection stays usable: the next request parses.
    server.receive_data(ClientProtocol().request("ping")[1])
    assert server.next_request() is not None


@pytest.mark.parametrize("msg", [b"\xc1", frame_raw({"a": 1})[4:], frame_raw([1, 2])[4:], frame_raw([-1, "ping", []])[4:]])
def test_malformed_frames_raise_protocol_error(msg: bytes) -> None:
    server = greeted_server()
    server.receive_data(struct.pack("<I", len(msg)) + msg)
    with pytest.raises(ProtocolError):
        server.next_request()


def test_every_op_has_a_checked_arity() -> None:
    assert set(OPS) == {"hello", "ping", "put", "delete", "put_many", "delete_many", "get", "stats", "compact"}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_server_raises_only_walcache_errors(data: bytes) -> None:
    server = greeted_server(max_frame=4096)
    server.receive_data(data)
    for _ in range(100):
        try:
            if server.next_request() is None:
                break
        except BadRequest:
            continue
        except ProtocolError:
            break


def test_fuzz_seeded_random_frames_never_escape_walcache_errors() -> None:
    seed = 20261126
    rng = random.Random(seed)
    atoms: list[object] = [None, True, 0, -1, 2**64 - 1, 1.5, "", "put", b"", b"k" * 10, [], {}, [b"k", 0, b"v"]]
    for i in range(3000):
        msg = [rng.choice(atoms) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5 and msg:
            msg[0] = rng.randint(0, 100)
        if rng.random() < 0.5 and len(msg) > 1:
            msg[1] = rng.choice(list(OPS))
        server = greeted_server(max_frame=4096)
        data = frame_raw(msg)
        if rng.random() < 0.3:
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
        server.receive_data(data)
        try:
            server.next_request()
        except WalcacheError:
            pass
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            pytest.fail(f"seed {seed} case {i}: {type(exc).__name__} escaped for {msg!r}")


def test_frame_decoder_compacts_a_long_pipelined_stream() -> None:
    dec = FrameDecoder(1 << 20)
    frame = encode_frame(b"x" * 1000)
    for _ in range(3000):
        dec.feed(frame)
    n = 0
    while dec.next_frame() is not None:
        n += 1
    assert n == 3000 and dec.buffered == 0
