"""What a QUIC stream id says about its stream (RFC 9000, section 2.1).

The two low bits of every stream id: bit 0 is who opened the stream (0: the
client, 1: the server), bit 1 its direction (0: bidirectional, 1:
unidirectional). felix's control streams are client-opened bidirectional
ones; its event streams are server-opened unidirectional ones.
"""

from __future__ import annotations

__all__ = ["is_client_initiated", "is_server_initiated", "is_unidirectional"]

_SERVER_INITIATED = 0x1
_UNIDIRECTIONAL = 0x2


def is_server_initiated(stream_id: int) -> bool:
    """True for a stream the server opened."""
    return bool(stream_id & _SERVER_INITIATED)


def is_client_initiated(stream_id: int) -> bool:
    """True for a stream the client opened."""
    return not stream_id & _SERVER_INITIATED


def is_unidirectional(stream_id: int) -> bool:
    """True for a stream that carries data one way only (from whoever opened it)."""
    return bool(stream_id & _UNIDIRECTIONAL)
