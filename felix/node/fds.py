"""The supervisor's file descriptors: a raised limit, and a reserve for restarts.

Every client of the node's HTTP ports costs the supervisor a descriptor while
its connection is open. Descriptors must never run out where it matters most:
restarting a child (a socket pair, a copy of the UDP socket, the spawn itself).

- At start the supervisor raises its soft ``RLIMIT_NOFILE`` to the hard limit
  (:func:`raise_nofile_limit`; children inherit it). Raise the hard limit itself
  with the service manager (``LimitNOFILE=`` in systemd, ``ulimit -Hn``).
- It keeps :data:`RESERVE` descriptors open on ``/dev/null`` (:class:`FdReserve`)
  and frees them just before it starts a child, then takes them back: even when
  a flood of connections has taken every other descriptor, a restart finds the
  ones it needs (the start runs without yielding to the event loop, so nothing
  else can take them in between).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator

log = logging.getLogger("felix.supervisor")

#: Descriptors held back for starting children (a start needs about six).
RESERVE = 32


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. a hard limit above the kernel's nr_open
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


class FdReserve:
    """Descriptors held open so they can be freed for something that must not fail."""

    def __init__(self, size: int = RESERVE) -> None:
        self.size = size
        self._fds: list[int] = []
        self.refill()

    @property
    def held(self) -> int:
        return len(self._fds)

    def refill(self) -> None:
        """Take back as many descriptors as are missing (as many as are free)."""
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release_all(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Free the reserve for the body (which must not yield to the event loop before
        it has taken what it needs), then take it back."""
        self.release_all()
        try:
            yield
        finally:
            self.refill()


__all__ = ["RESERVE", "FdReserve", "raise_nofile_limit"]
