"""How the supervisor judges its children: restart backoff and heartbeats (sans-IO).

Both take ``now`` (monotonic seconds) and never read the clock, so their rules are
tested without sleeping (tests/test_node_liveness.py); the supervisor does the I/O.

Restart backoff: a child that dies (or whose restart fails) is started again
after a delay that doubles from ``minimum`` to ``maximum``, with full jitter in
its upper half so many failing children do not retry in lockstep. A child that
ran for ``healthy_after`` seconds starts over from the minimum. The supervisor
retries forever: it never gives up on a child.

Heartbeat: the supervisor sends each ready child a ping every
:data:`HEARTBEAT_INTERVAL` seconds; a child's event loop answers it. A child that
leaves a ping unanswered for ``unresponsive_after`` seconds is *unresponsive*
(reported by /readyz, logged); after ``kill_after`` seconds it is *dead*: the
supervisor kills it and the ordinary restart path replaces it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

HEARTBEAT_INTERVAL = 1.0
#: Default seconds of silence before a child is reported unresponsive.
UNRESPONSIVE_AFTER = 3.0
#: Default seconds of silence before an unresponsive child is killed and restarted.
KILL_AFTER = 10.0


@dataclass
class RestartBackoff:
    minimum: float = 0.1
    maximum: float = 5.0
    healthy_after: float = 30.0
    #: uniform(a, b): the jitter source (seeded in tests).
    uniform: Callable[[float, float], float] = field(default=random.uniform, repr=False)
    _next: float = field(default=0.0, init=False)
    #: Delays handed out since the last reset (consecutive restarts).
    attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise ValueError("need 0 < minimum <= maximum")
        self._next = self.minimum

    def delay(self, started_at: float, now: float) -> float:
        """Seconds to wait before the next start of a child that has run since
        ``started_at`` and just died (or whose start just failed) at ``now``."""
        if now - started_at >= self.healthy_after:
            self.reset()
        base = self._next
        self._next = min(self._next * 2, self.maximum)
        self.attempts += 1
        return self.uniform(base / 2, base)

    def reset(self) -> None:
        self._next = self.minimum
        self.attempts = 0


class Health(enum.Enum):
    OK = "ok"
    UNRESPONSIVE = "unresponsive"
    DEAD = "dead"


@dataclass
class Heartbeat:
    """One child's heartbeat: how long a ping of ours has gone unanswered.

    Silence counts from the oldest ping still unanswered (never from before the
    first ping: a child is not blamed for pings the supervisor did not send).
    """

    unresponsive_after: float = UNRESPONSIVE_AFTER
    kill_after: float = KILL_AFTER
    seq: int = 0
    #: When the oldest unanswered ping was sent (None: every ping was answered).
    waiting_since: float | None = None
    last_ping_at: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.unresponsive_after <= self.kill_after:
            raise ValueError("need 0 < unresponsive_after <= kill_after")

    def start(self, now: float) -> None:
        """A new incarnation became ready: nothing is owed yet."""
        self.waiting_since = None

    def ping(self, now: float) -> int:
        """Record a ping sent at ``now``; returns its sequence number."""
        self.seq += 1
        self.last_ping_at = now
        if self.waiting_since is None:
            self.waiting_since = now
        return self.seq

    def pong(self, seq: int, now: float) -> None:
        if not 0 < seq <= self.seq:
            return  # never sent: proves nothing
        # An older answer proves the loop ran, but the pings after it are still owed.
        self.waiting_since = None if seq == self.seq else self.last_ping_at

    def silent_for(self, now: float) -> float:
        return 0.0 if self.waiting_since is None else max(0.0, now - self.waiting_since)

    def health(self, now: float) -> Health:
        silent = self.silent_for(now)
        if silent >= self.kill_after:
            return Health.DEAD
        if silent >= self.unresponsive_after:
            return Health.UNRESPONSIVE
        return Health.OK


__all__ = [
    "HEARTBEAT_INTERVAL",
    "KILL_AFTER",
    "UNRESPONSIVE_AFTER",
    "Health",
    "Heartbeat",
    "RestartBackoff",
]
