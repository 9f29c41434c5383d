"""QUIC stateless resets: a restarted gateway tells clients at once that their connection is gone.

Why: a gateway killed with -9 loses its connections' state. Its clients keep
sending to the same address; the restarted gateway (same socket, same port)
cannot decrypt their packets and, without this, drops them, so each client
waits for its idle timeout before reconnecting. RFC 9000 (section 10.3) lets a
server answer such a packet with a *stateless reset*: a datagram ending with a
16-byte token that the server announced for that connection id during the
handshake. The client recognises the token and ends the connection at once.

The token must be the same after a restart, so it is derived, never stored per
connection: ``HMAC-SHA256(node key, connection id)[:16]``. The node key (32
random bytes) lives in the data directory (:data:`KEY_FILE`, mode 0600), made
by whichever gateway process starts first. Only the connection id the server
chose at the handshake gets a derived token (both engines draw further ids'
tokens at random, see felix/quic/engine.py); clients keep that id unless they
migrate, so a reset reaches every client that did not.

Resets are bounded (:class:`ResetBudget`: a token bucket, resets beyond it are
counted and not sent) and always smaller than the packet that triggered them,
so two endpoints can never reset each other in a loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

__all__ = [
    "KEY_FILE",
    "MIN_TRIGGER_SIZE",
    "TOKEN_SIZE",
    "ResetBudget",
    "load_reset_key",
    "reset_token",
    "stateless_reset",
]

#: The node key's file name inside the data directory.
KEY_FILE = "quic-reset.key"
KEY_SIZE = 32
TOKEN_SIZE = 16
#: A stateless reset is at least 21 bytes (RFC 9000, 10.3) and smaller than its trigger.
MIN_RESET_SIZE = 21
MIN_TRIGGER_SIZE = MIN_RESET_SIZE + 1
#: Resets are sent this long at most (the RFC suggests hiding them among short packets).
MAX_RESET_SIZE = 43


def load_reset_key(data_dir: Path) -> bytes:
    """The node's stateless-reset key from ``data_dir``, made on first use.

    Several gateway processes may start at once: the key is written to a
    temporary file and linked into place, so exactly one file wins and every
    process reads that one.
    """
    path = data_dir / KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{KEY_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_SIZE:
        raise ValueError(f"{path}: a stateless-reset key is {KEY_SIZE} bytes, not {len(key)}")
    return key


def reset_token(key: bytes, connection_id: bytes) -> bytes:
    """The stateless-reset token of ``connection_id`` under ``key``."""
    return hmac.new(key, connection_id, hashlib.sha256).digest()[:TOKEN_SIZE]


def stateless_reset(token: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset datagram ending in ``token``, smaller than ``trigger_size``.

    None if the trigger is too small to answer with a smaller reset. The first
    byte looks like a short-header packet's (form bit 0, fixed bit 1); the rest
    before the token is random, so resets cannot be told from packets.
    """
    size = min(trigger_size - 1, MAX_RESET_SIZE)
    if size < MIN_RESET_SIZE:
        return None
    head = bytearray(os.urandom(size - TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)
    return bytes(head) + token


class ResetBudget:
    """At most ``rate`` resets a second on average, bursts up to ``burst`` (clock passed in)."""

    def __init__(self, rate: float = 100.0, burst: float = 100.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None
        #: Resets sent, and resets refused by the budget.
        self.sent = 0
        self.refused = 0

    def take(self, now: float) -> bool:
        """True (and counted as sent) if a reset may be sent at ``now``."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.sent += 1
            return True
        self.refused += 1
        return False
