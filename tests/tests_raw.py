"""Raw protocol helpers for tests that must send what the Client never would."""

from __future__ import annotations

import socket

from walcache.protocol import ClientProtocol


def raw_put_with_ttl_ms(socket_path: str, ttl_ms: int) -> str:
    """Send one put with a raw ttl_ms; return "ok" or the error's wire code."""
    from walcache.errors import wire_code

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(socket_path)
    proto = ClientProtocol()
    try:
        s.sendall(proto.hello()[1] + proto.request("put", b"sraw", 0, b"\x01", ttl_ms)[1])
        replies = []
        while len(replies) < 2:
            while (r := proto.next_reply()) is not None:
                replies.append(r)
            if len(replies) < 2:
                data = s.recv(65536)
                assert data, "connection closed"
                proto.receive_data(data)
    finally:
        s.close()
    r = replies[1]
    return "ok" if r.ok else wire_code(r.value)
