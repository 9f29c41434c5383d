"""Sans-IO accounting of one subscription: credit, offsets, gaps and the local queue.

How it works (docs/wire-protocol.md, "Sessions", item 3): the client grants the
broker a window of records with SUBSCRIBE and returns credit with CREDIT as the
application consumes; felix's client tops up once half the window has been
consumed, so a steady consumer never stalls and the broker never sends more than
the client can queue. The local queue is therefore bounded by the window (plus
less than one EVENTS frame: the broker may overshoot by part of a shared batch).

Offsets make loss visible: ``next_offset`` is the offset the client expects
next. Anything skipped over (a SLOW_CONSUMER range, a gap between batches, a
later start after a re-subscribe) is added to ``dropped``; records before
``next_offset`` (a re-subscribe overlapping what was already received) are
duplicates and are discarded, their credit returned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from felix.client._e2e import E2EKeys, E2EReceived, Opened, open_record
from felix.errors import RemoteProtocolError

__all__ = ["Message", "SubscriptionFlow"]

_NO_HEADERS: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Message(E2EReceived):
    """One record delivered to a subscription.

    With end-to-end encryption (``e2e=`` on connect) ``data`` is the plaintext and
    ``raw`` the ciphertext the broker stored; ``e2e`` says what happened. ``data``
    raises :class:`~felix.E2EError` for a record that could not be opened (unknown key,
    tampered, or plaintext where e2e is required): it never hands out ciphertext as
    plaintext. ``raw`` and ``headers`` stay readable.
    """

    #: The stream name as given to ``subscribe()``.
    stream: str
    #: The record's offset in the stream (consecutive unless records were dropped).
    offset: int
    #: The payload as the broker stored it (the ciphertext of an e2e record).
    raw: bytes
    #: The record's headers (empty if it has none).
    headers: Mapping[str, str] = field(default_factory=dict)
    _opened: Opened | None = field(default=None, repr=False, compare=False)


class SubscriptionFlow:
    """Credit, offsets and queued messages of one subscription (no I/O, no clock)."""

    def __init__(
        self, stream: str, window: int, e2e: E2EKeys | None = None, path: str = ""
    ) -> None:
        """``e2e``: open records with these keys as they arrive; ``path``: the stream's
        ``tenant/ns/name`` (what a record's encryption is bound to)."""
        if window < 2:
            raise ValueError("the credit window must be at least 2 records")
        self.stream = stream
        self.e2e = e2e
        self.path = path
        self.window = window
        self.queue: deque[Message] = deque()
        #: Offset expected next from the broker; None until the first SUBSCRIBED/EVENTS.
        self.next_offset: int | None = None
        #: Records lost to the slow-subscriber policy or to gaps (never delivered).
        self.dropped = 0
        self._available = 0  # credit the broker still holds, as far as this side knows
        self._consumed = 0  # records taken (or discarded) since credit was last returned

    @property
    def available(self) -> int:
        """Records the broker may still send before it needs more credit."""
        return self._available

    def subscribe_credit(self) -> int:
        """Credit to send with a (re-)SUBSCRIBE: the window minus what is still queued.

        At least 1, because 0 on the wire means "the broker's default window".
        Resets the accounting: a new subscription starts with only this credit.
        """
        credit = max(1, self.window - len(self.queue))
        self._available = credit
        self._consumed = 0
        return credit

    def on_subscribed(self, start_offset: int) -> int:
        """SUBSCRIBED: delivery starts at ``start_offset``. Returns records skipped (dropped)."""
        if self.next_offset is None:
            self.next_offset = start_offset
            return 0
        return self._skip_to(start_offset)

    def on_events(
        self,
        base_offset: int,
        payloads: Sequence[bytes],
        headers: Sequence[Mapping[str, str] | None] | None,
    ) -> int:
        """EVENTS: queue the new records. Returns records skipped before them (dropped).

        Raises RemoteProtocolError if the broker had no credit left: it may
        overshoot within one frame, never start a frame without credit.
        """
        if self._available <= 0:
            raise RemoteProtocolError(
                f"EVENTS for {self.stream!r} at offset {base_offset} without credit"
            )
        self._available -= len(payloads)
        gap = 0
        if self.next_offset is None:
            self.next_offset = base_offset
        elif base_offset > self.next_offset:
            gap = self._skip_to(base_offset)
        duplicates = 0
        for i, payload in enumerate(payloads):
            offset = base_offset + i
            if offset < self.next_offset:
                duplicates += 1
                continue
            record_headers = (headers[i] if headers is not None else None) or _NO_HEADERS
            opened = (
                None
                if self.e2e is None
                else open_record(self.e2e, self.stream, offset, self.path, payload, record_headers)
            )
            self.queue.append(Message(self.stream, offset, payload, record_headers, opened))
            self.next_offset = offset + 1
        # Duplicates used credit but will never be consumed: give it back.
        self._consumed += duplicates
        return gap

    def on_slow_consumer(self, first_dropped: int, dropped: int) -> int:
        """SLOW_CONSUMER: ``dropped`` records from ``first_dropped`` on were lost; the gap."""
        end = first_dropped + dropped
        if self.next_offset is None:
            self.next_offset = end
            self.dropped += dropped
            return dropped
        return self._skip_to(end)

    def restart(self) -> None:
        """The stream begins again at other offsets (a cluster moved its in-memory shard:
        it starts empty on the new owner): the next SUBSCRIBED or EVENTS sets
        ``next_offset`` afresh. Queued records stay queued."""
        self.next_offset = None

    def take(self) -> Message | None:
        """The next queued message (None if the queue is empty); counts it as consumed."""
        if not self.queue:
            return None
        self._consumed += 1
        return self.queue.popleft()

    def credit_due(self) -> int:
        """Credit to return now (0: not yet): everything consumed, once it is half the window."""
        if self._consumed < self.window // 2:
            return 0
        credit = self._consumed
        self._consumed = 0
        self._available += credit
        return credit

    def _skip_to(self, offset: int) -> int:
        assert self.next_offset is not None
        if offset <= self.next_offset:
            return 0
        gap = offset - self.next_offset
        self.next_offset = offset
        self.dropped += gap
        return gap
