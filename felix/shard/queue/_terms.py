"""The vocabulary of the queue group engine (felix/shard/queue/group.py, which
re-exports it): member ids, roles, refusals, settle operations, dead letters, bounds,
and a member's credit."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

from felix.errors import BadRequest

__all__ = [
    "JITTER",
    "MAX_DELAY_MS",
    "MAX_DETAIL_BYTES",
    "MAX_MEMBERS",
    "MAX_RANGES",
    "DeadLetter",
    "Delivery",
    "Member",
    "MemberId",
    "Refusal",
    "Role",
    "SettleOp",
    "check_window",
    "truncate_detail",
]

MemberId: TypeAlias = tuple[int, int]  # (gateway index, member token)
Delivery: TypeAlias = tuple[int, int, int]  # (offset, attempts, failures)

MAX_MEMBERS: Final = 1024  # members per group (default)
MAX_RANGES: Final = 1024  # ranges per settle
MAX_DETAIL_BYTES: Final = 1024  # nak/term text kept (UTF-8)
MAX_DELAY_MS: Final = 86_400_000  # an explicit nak delay: at most a day
JITTER: Final = 0.2  # backoff delays vary +-20%


class Role(enum.IntEnum):
    """A member's role (wire values of CONSUMING / CONSUMER_ROLE)."""

    MEMBER = 0
    ACTIVE = 1
    STANDBY = 2


class Refusal(enum.IntEnum):
    """Why an operation on one offset was refused (wire values of SETTLED)."""

    STALE = 1  # leased to another member since (or the lease is gone)
    DEAD = 2  # dead-lettered
    UNKNOWN = 3  # never delivered to this group (or finished)


class SettleOp(enum.IntEnum):
    """Operations on delivered records (their request opcodes)."""

    ACK = 0x22
    NAK = 0x23
    RELEASE = 0x24
    IN_PROGRESS = 0x25
    TERM = 0x26


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the core must append to the dead-letter stream, then confirm."""

    offset: int
    reason: str
    detail: str
    attempts: int
    failures: int
    consumer: str  # "<consumer id>@gateway<n>" of the last member, "" if none


def truncate_detail(text: str) -> str:
    """``text`` cut to :data:`MAX_DETAIL_BYTES` of UTF-8 on a character boundary
    (lone surrogates, which UTF-8 cannot carry, become ``?``)."""
    if len(text) <= MAX_DETAIL_BYTES and text.isascii():
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_DETAIL_BYTES:
        return data.decode("utf-8")
    return data[:MAX_DETAIL_BYTES].decode("utf-8", "ignore")


class Member:
    """A member's credit and what it holds (not persisted)."""

    __slots__ = ("consumer_id", "id", "leased", "nbytes", "records", "role", "used")

    def __init__(self, member: MemberId, consumer_id: int, records: int, nbytes: int) -> None:
        self.id = member
        self.consumer_id = consumer_id
        self.records = records
        self.nbytes = nbytes
        self.leased: dict[int, int] = {}  # offset -> payload size
        self.used = 0  # bytes of the leased records
        self.role = Role.MEMBER

    def has_room(self) -> bool:
        count = len(self.leased)
        return count < self.records and (count == 0 or self.used < self.nbytes)

    def fits(self, size: int) -> bool:
        count = len(self.leased)
        return count < self.records and (count == 0 or self.used + size <= self.nbytes)

    def name(self) -> str:
        return f"{self.consumer_id}@gateway{self.id[0]}"


def check_window(records: int, nbytes: int) -> None:
    if records < 0 or nbytes < 0:
        raise BadRequest(f"a window needs records >= 0 and bytes >= 0, got {records}, {nbytes}")
