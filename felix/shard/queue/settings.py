"""A queue group's settings (docs/queues.md, "Settings"), checked once, shared by the
control plane's schema and the shard."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from felix.errors import BadRequest
from felix.names import DLQ_SUFFIX, dead_letter_name, validate_name

__all__ = [
    "DEFAULT_BACKOFF_MS",
    "DLQ_SUFFIX",
    "MAX_GROUPS_PER_SHARD",
    "MAX_GROUPS_PER_STREAM",
    "MAX_GROUPS_PER_TENANT",
    "MAX_SPAN",
    "GroupSettings",
    "dead_letter_name",
]

#: Delays before a nak'ed record is redelivered, by failure count (the last repeats).
DEFAULT_BACKOFF_MS: Final = (1000, 2000, 4000, 8000, 16000, 32000, 60000)
_MAX_BACKOFF_STEPS: Final = 32
#: Queue groups one stream may have, defined or opened by a consumer (each keeps a
#: window of state and a file).
MAX_GROUPS_PER_STREAM: Final = 64
#: Queue groups one shard keeps open, over all its streams (each holds a file open),
#: and what one tenant may take of them: a tenant that opens groups with throwaway
#: names cannot lock the others out.
MAX_GROUPS_PER_SHARD: Final = 4096
MAX_GROUPS_PER_TENANT: Final = 256
#: The widest window a group may have (``max_span``): at most this many offsets are
#: unfinished at once, so a state file's snapshot holds at most this many entries.
MAX_SPAN: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """How one group hands out its stream's records (validated on construction).

    ``start``: ``"earliest"``, ``"latest"`` or an offset (int), for a new group only.
    ``dead_letter``: the dead-letter stream's name in the stream's namespace (None:
    ``<stream>.dlq``, resolved by :meth:`dead_letter_for`).
    """

    start: str | int = "earliest"
    lease_ms: int = 30_000
    max_deliveries: int = 5
    backoff_ms: tuple[int, ...] = DEFAULT_BACKOFF_MS
    max_ack_pending: int = 10_000
    max_span: int = 100_000
    dead_letter: str | None = None
    exclusive: bool = False

    def __post_init__(self) -> None:
        start = self.start
        if not (start in ("earliest", "latest") or (type(start) is int and start >= 0)):
            raise BadRequest(f"start must be earliest, latest or an offset >= 0, got {start!r}")
        _int_in("lease_ms", self.lease_ms, 1000, 3_600_000)
        _int_in("max_deliveries", self.max_deliveries, 1, 1000)
        _int_in("max_ack_pending", self.max_ack_pending, 1, 100_000)
        _int_in("max_span", self.max_span, self.max_ack_pending, MAX_SPAN)
        if not self.backoff_ms or len(self.backoff_ms) > _MAX_BACKOFF_STEPS:
            raise BadRequest(f"backoff_ms needs 1..{_MAX_BACKOFF_STEPS} delays")
        for delay in self.backoff_ms:
            _int_in("backoff_ms", delay, 0, 3_600_000)
        if self.dead_letter is not None:
            validate_name("stream", self.dead_letter)
        if type(self.exclusive) is not bool:
            raise BadRequest(f"exclusive must be true or false, got {self.exclusive!r}")

    def dead_letter_for(self, stream: str) -> str:
        """The dead-letter stream of this group on ``stream``."""
        if self.dead_letter is not None:
            if self.dead_letter == stream:
                raise BadRequest("a group's dead-letter stream cannot be its own stream")
            return self.dead_letter
        return dead_letter_name(stream)

    def backoff_for(self, failures: int) -> int:
        """Milliseconds before the retry after the ``failures``-th failure (no jitter)."""
        steps = self.backoff_ms
        return steps[min(max(failures, 1), len(steps)) - 1]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> GroupSettings:
        """Settings from a control-plane spec (unknown keys refused; missing: defaults)."""
        known = {
            "start",
            "lease_ms",
            "max_deliveries",
            "backoff_ms",
            "max_ack_pending",
            "max_span",
            "dead_letter",
            "exclusive",
        }
        unknown = set(spec) - known
        if unknown:
            raise BadRequest(f"unknown group settings: {', '.join(sorted(unknown))}")
        args = dict(spec)
        start = args.get("start")
        if isinstance(start, Mapping):
            if set(start) != {"offset"}:
                raise BadRequest('start must be "earliest", "latest" or {"offset": n}')
            args["start"] = start["offset"]
        if "backoff_ms" in args:
            backoff = args["backoff_ms"]
            if not isinstance(backoff, list | tuple):
                raise BadRequest("backoff_ms must be a list of delays in milliseconds")
            args["backoff_ms"] = tuple(backoff)
        return cls(**args)

    def to_spec(self) -> dict[str, Any]:
        """The JSON form (the inverse of :meth:`from_spec`)."""
        start: Any = self.start if isinstance(self.start, str) else {"offset": self.start}
        return {
            "start": start,
            "lease_ms": self.lease_ms,
            "max_deliveries": self.max_deliveries,
            "backoff_ms": list(self.backoff_ms),
            "max_ack_pending": self.max_ack_pending,
            "max_span": self.max_span,
            "dead_letter": self.dead_letter,
            "exclusive": self.exclusive,
        }


def _int_in(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in {low}..{high}, got {value!r}")
