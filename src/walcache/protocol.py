"""The wire protocol between clients and the daemon, sans-IO.

No sockets in here: both sides feed received bytes in with ``receive_data`` and
take parsed events out; ``request``/``reply`` return the bytes to send. The
daemon and the client share this module, and tests drive it with plain bytes
(whole buffers and one byte at a time).

Framing
    ======  ====  ======================  =====================================
    offset  size  type                    meaning
    ======  ====  ======================  =====================================
    0       4     uint32, little-endian   N, length of the body (1..max_frame)
    4       N     msgpack                 the message
    ======  ====  ======================  =====================================

Messages (msgpack arrays; strings are UTF-8, binary is msgpack bin)
    request  ``[req_id, op, args]``    req_id: int 0..2**63, op: str, args: array
    reply    ``[req_id, 0, result]``   success
    error    ``[req_id, 1, [code, message]]``   code from walcache.errors.WIRE_CODES

The first request on a connection must be ``hello``; the daemon answers with
its version, the shared-memory namespace and its limits. Replies come back in
request order on each connection, so a client may pipeline (send many
requests before reading a reply).

Requests and their args (keys are encoded keys, see walcache.codec)::

    hello        [version:int, client:str]          -> {"version", "namespace", "pid", "limits", ...}
    ping         []                                 -> "pong"
    put          [key:bin, vflag:int, value:bin, ttl_ms:int|nil]   -> nil
    delete       [key:bin]                          -> bool (the key existed)
    put_many     [[[key, vflag, value], ...], ttl_ms:int|nil]      -> nil (one atomic record)
    delete_many  [[key, ...]]                       -> int (how many existed)
    get          [key:bin]                          -> [vflag, value] | nil (read through the daemon)
    stats        []                                 -> map
    compact      []                                 -> map

Malformed input: a frame that is not valid msgpack, not a request array, or
longer than ``max_frame`` raises :class:`ProtocolError` from ``next_request``
(the daemon answers with one error frame and closes the connection). A well
formed request with bad arguments raises :class:`BadRequest`, which carries
the req_id so the daemon can answer it and keep the connection.

Any change to the framing, a message shape or an op bumps PROTOCOL_VERSION.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, NamedTuple

import msgpack

from .errors import ProtocolError, WalcacheError, error_from_wire, wire_code

__all__ = [
    "PROTOCOL_VERSION",
    "FRAME_HEADER",
    "OPS",
    "Request",
    "Reply",
    "BadRequest",
    "FrameDecoder",
    "ServerProtocol",
    "ClientProtocol",
    "encode_frame",
]

PROTOCOL_VERSION = 1

#: uint32 little-endian body length
FRAME_HEADER = struct.Struct("<I")

MAX_REQ_ID = (1 << 63) - 1
# The shared table keeps expiry in 56 bits of ms; a TTL of 1000 years stays far below.
MAX_TTL_MS = 1000 * 365 * 24 * 3600 * 1000
STATUS_OK = 0
STATUS_ERROR = 1


class Request(NamedTuple):
    req_id: int
    op: str
    args: tuple[Any, ...]


class Reply(NamedTuple):
    req_id: int
    ok: bool
    value: Any  # the result, or a WalcacheError when not ok


class BadRequest(WalcacheError):
    """A well-framed request whose op or arguments are wrong; answered, connection kept."""

    def __init__(self, req_id: int, error: WalcacheError) -> None:
        super().__init__(str(error))
        self.req_id = req_id
        self.error = error


def _is_int(x: object) -> bool:
    return type(x) is int


def _is_bin(x: object) -> bool:
    return type(x) is bytes


def _is_opt_int(x: object) -> bool:
    return x is None or type(x) is int


def _is_entry(x: object) -> bool:
    return (
        type(x) is list
        and len(x) == 3
        and type(x[0]) is bytes
        and type(x[1]) is int
        and type(x[2]) is bytes
    )


# op -> checks for each positional argument (the arity is the tuple's length)
OPS: dict[str, tuple[Any, ...]] = {
    "hello": (_is_int, lambda x: type(x) is str),
    "ping": (),
    "put": (_is_bin, _is_int, _is_bin, _is_opt_int),
    "delete": (_is_bin,),
    "put_many": (lambda x: type(x) is list and all(_is_entry(e) for e in x), _is_opt_int),
    "delete_many": (lambda x: type(x) is list and all(_is_bin(k) for k in x),),
    "get": (_is_bin,),
    "stats": (),
    "compact": (),
}


# One msgpack Packer per thread: ``msgpack.packb`` builds a new Packer on every call,
# which is two thirds of the cost of packing a small request or reply (0.47 vs 0.16 us).
_packers = threading.local()


def _pack(message: Any) -> bytes:
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    body: bytes = pack(message)
    return body


def encode_frame(message: Any) -> bytes:
    body = _pack(message)
    return FRAME_HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies, refusing lengths over ``max_frame``."""

    def __init__(self, max_frame: int, limit_hint: str = "") -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self.limit_hint = limit_hint  # what sets max_frame, for the error (the daemon's option)
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (n,) = FRAME_HEADER.unpack_from(buf, pos)
        if n == 0 or n > self.max_frame:
            raise ProtocolError(f"frame length {n} outside 1..{self.max_frame}{self.limit_hint}")
        end = pos + 4 + n
        if len(buf) < end:
            return None
        body = bytes(buf[pos + 4 : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 1 << 20:
            # Compact now and then so a long pipelined stream does not keep every byte.
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return body


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated classes on garbage
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from None


class ServerProtocol:
    """The daemon's side of one connection."""

    def __init__(self, max_frame: int) -> None:
        self._frames = FrameDecoder(max_frame, " (--max-frame-bytes)")
        self.greeted = False

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._frames.feed(data)

    def next_request(self) -> Request | None:
        """The next complete request, None if more bytes are needed.

        Raises ProtocolError (close the connection) or BadRequest (answer it).
        """
        body = self._frames.next_frame()
        if body is None:
            return None
        msg = _unpack(body)
        if type(msg) is not list or len(msg) != 3:
            raise ProtocolError("a request must be the array [req_id, op, args]")
        req_id, op, args = msg
        if type(req_id) is not int or not 0 <= req_id <= MAX_REQ_ID:
            raise ProtocolError("req_id must be an integer in 0..2**63-1")
        if (
            op == "put"
            and self.greeted
            and type(args) is list
            and len(args) == 4
            and type(args[0]) is bytes
            and type(args[1]) is int
            and type(args[2]) is bytes
            and (args[3] is None or type(args[3]) is int)
        ):
            # The common request, checked inline: the same checks as OPS["put"] below.
            return Request(req_id, op, tuple(args))
        if type(op) is not str or type(args) is not list:
            raise BadRequest(req_id, ProtocolError("op must be a string and args an array"))
        checks = OPS.get(op)
        if checks is None:
            raise BadRequest(req_id, ProtocolError(f"unknown op {op[:40]!r}"))
        if len(args) != len(checks) or not all(ok(a) for ok, a in zip(checks, args)):
            if len(args) != len(checks):
                why = f"{len(args)} arguments, not {len(checks)}"
            else:
                bad = next(i for i, (ok, a) in enumerate(zip(checks, args)) if not ok(a))
                why = f"argument {bad} ({type(args[bad]).__name__}) is not what {op} takes there"
            raise BadRequest(req_id, ProtocolError(f"wrong arguments for {op}: {why}"))
        if not self.greeted:
            if op != "hello":
                raise ProtocolError("the first request must be hello")
            # A hello in another version is answered with an error (by the daemon) and
            # greets nothing: the next request must be a hello again.
            self.greeted = args[0] == PROTOCOL_VERSION
        return Request(req_id, op, tuple(args))

    @staticmethod
    def reply(req_id: int, result: Any) -> bytes:
        return encode_frame([req_id, STATUS_OK, result])

    @staticmethod
    def error(req_id: int, exc: BaseException) -> bytes:
        return encode_frame([req_id, STATUS_ERROR, [wire_code(exc), str(exc)]])


class ClientProtocol:
    """The client's side of one connection: numbers requests and parses replies."""

    def __init__(self, max_frame: int = 1 << 30) -> None:
        # A reply this long is not from a walcache daemon (or the stream is out of step).
        self._frames = FrameDecoder(max_frame, ": is this a walcache daemon's socket?")
        self._next_id = 1

    def request(self, op: str, *args: Any) -> tuple[int, bytes]:
        req_id = self._next_id
        self._next_id = req_id + 1 if req_id < MAX_REQ_ID else 1
        return req_id, encode_frame([req_id, op, list(args)])

    def hello(self) -> tuple[int, bytes]:
        from . import __version__

        return self.request("hello", PROTOCOL_VERSION, f"walcache-py/{__version__}")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._frames.feed(data)

    def next_reply(self) -> Reply | None:
        body = self._frames.next_frame()
        if body is None:
            return None
        msg = _unpack(body)
        if type(msg) is not list or len(msg) != 3 or type(msg[0]) is not int:
            raise ProtocolError("a reply must be the array [req_id, status, result]")
        req_id, status, value = msg
        if status == STATUS_OK:
            return Reply(req_id, True, value)
        if status == STATUS_ERROR and type(value) is list and len(value) == 2:
            return Reply(req_id, False, error_from_wire(str(value[0]), str(value[1])))
        raise ProtocolError(f"reply has unknown status {status!r}")

