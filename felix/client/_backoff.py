"""Exponential backoff with full jitter, sans-IO: it computes delays, callers sleep.

"Full jitter" (AWS architecture blog, "Exponential Backoff And Jitter"): attempt
``n`` (0-based) waits a uniformly random time in ``[0, min(cap, base * 2**n))``.
Randomising the whole interval, on every attempt including the first, is what
spreads many clients reconnecting after one broker restart (docs/reliability.md, R6)
instead of letting them retry in synchronised waves.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive retries of one operation.

    ``random`` returns floats in ``[0, 1)`` (default: :func:`random.random`);
    tests pass a deterministic source. Call :meth:`next_delay` before each
    attempt and :meth:`reset` after a success.
    """

    def __init__(
        self,
        *,
        base: float = 0.1,
        cap: float = 10.0,
        random: Callable[[], float] = random.random,
    ) -> None:
        if not (base > 0 and cap >= base):
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self._random = random
        #: Attempts made since the last reset.
        self.attempts = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay: ``min(cap, base * 2**attempts)``."""
        # Compare exponents rather than compute 2**attempts: it would grow without bound.
        if self.attempts >= 64 or self.base * 2.0**self.attempts >= self.cap:
            return self.cap
        return self.base * 2.0**self.attempts

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (uniform in ``[0, ceiling)``), and count it."""
        delay = self.ceiling() * self._random()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start over after a success: the next delay is drawn below ``base`` again."""
        self.attempts = 0
