"""When a node renews its cluster lease, and until when it may serve (sans-IO).

The lease lives in PostgreSQL (``lease_until``, on the database's clock); the node's
right to serve is a deadline on its own monotonic clock, taken from the moment a
successful renewal was *sent*: ``serve_until = sent + ttl - fence_margin``. The
database set ``lease_until = now() + ttl`` after that moment, and the placer waits a
further ``placer_grace`` past ``lease_until`` before it gives the node's shards away,
so a node that cannot renew stops serving at least ``fence_margin + placer_grace``
before anyone else may start (docs/architecture.md, "Membership and leases"). Only
the clocks' rates have to agree over one lease, never their readings.

The caller (felix/cluster/agent.py) passes the clock's reading into every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from felix.errors import ConfigError

__all__ = ["LeaseKeeper", "LeaseSettings"]


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Lease timing, in seconds (``--cluster-lease`` sets ``ttl``)."""

    #: How long one renewal keeps the lease (database clock).
    ttl: float = 10.0
    #: How long before its lease would end the node stops serving (its own clock).
    fence_margin: float = 2.0
    #: How long past a lease's end the placer still treats the node as alive.
    placer_grace: float = 2.0
    #: How often to renew; None: ``ttl / 3`` (two renewals may fail before the fence).
    renew_every: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttl", "fence_margin", "placer_grace", "renew_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"cluster lease {name} must be a positive number, not {value}")
        if self.fence_margin >= self.ttl:
            raise ConfigError(
                f"cluster lease fence_margin ({self.fence_margin}s) must be shorter than "
                f"the lease ({self.ttl}s): the node would never serve"
            )
        if self.renew_interval >= self.ttl - self.fence_margin:
            raise ConfigError(
                f"cluster lease renewals every {self.renew_interval}s leave no time to "
                f"renew before the fence ({self.ttl}s lease - {self.fence_margin}s margin)"
            )

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3 if self.renew_every is None else self.renew_every


class LeaseKeeper:
    """One node's lease: when the next renewal is due and until when it may serve.

    A renewal goes ``renewing(now)`` -> ``renewed()`` (the database extended the lease),
    ``failed()`` (no answer: retried soon, serving continues until ``serve_until``) or
    ``lost()`` (the lease had run out: the node must re-register before serving again).
    """

    def __init__(self, settings: LeaseSettings) -> None:
        self.settings = settings
        self._serve_until = 0.0
        #: Send time of the renewal in flight, if any.
        self._sending: float | None = None
        #: When the next renewal is due (-inf: at once).
        self._due = -math.inf
        #: Delay before retrying a failed renewal (doubles, capped).
        self._retry = 0.0

    @property
    def serve_until(self) -> float:
        """Monotonic deadline after which the node serves nothing (0: not serving)."""
        return self._serve_until

    def serving(self, now: float) -> bool:
        return now < self._serve_until

    def seconds_left(self, now: float) -> float:
        """How long the node may still serve without another successful renewal."""
        return max(0.0, self._serve_until - now)

    def renew_due(self, now: float) -> bool:
        """Whether to send a renewal now (never while one is in flight)."""
        return self._sending is None and now >= self._due

    def next_due(self) -> float:
        """When :meth:`renew_due` turns true (-inf: now; inf: a renewal is in flight)."""
        return math.inf if self._sending is not None else self._due

    def renewing(self, now: float) -> None:
        """A renewal (or registration) is being sent at ``now``."""
        self._sending = now

    def renewed(self) -> None:
        """The renewal sent last succeeded: serve until its send time + ttl - margin."""
        sent = self._take_sent()
        self._serve_until = max(
            self._serve_until, sent + self.settings.ttl - self.settings.fence_margin
        )
        self._due = sent + self.settings.renew_interval
        self._retry = 0.0

    def failed(self) -> None:
        """The renewal got no answer (database down or slow): retry with a backoff that
        starts at a tenth of the renew interval and never exceeds half of it, so a few
        attempts still fit before the fence. Serving continues until ``serve_until``."""
        sent = self._take_sent()
        interval = self.settings.renew_interval
        self._retry = min(interval / 2, max(interval / 10, self._retry * 2))
        self._due = sent + self._retry

    def lost(self) -> None:
        """The lease was gone (presumed dead): stop serving now and re-register."""
        self._sending = None
        self._serve_until = 0.0
        self._due = -math.inf
        self._retry = 0.0

    def _take_sent(self) -> float:
        if self._sending is None:
            raise RuntimeError("no lease renewal is in flight")
        sent, self._sending = self._sending, None
        return sent
