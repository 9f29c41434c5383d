"""The small interfaces client objects hold each other by.

A :class:`~felix.client.Cache` or :class:`~felix.client.Subscription` is made by
a Client and calls back into it; the pool and the client drive the
subscriptions that live on pooled connections. Each side is typed by the
Protocol here, not by the other's class, so what one may ask of the other is
stated in one place (and the modules import no cycle). The members keep their
leading underscore: they are for felix's own objects, not for applications.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from felix import wire
from felix.client._connection import Connection, R, SubscriptionSink
from felix.client._convert import WireStart
from felix.client._events import ClientEvent
from felix.errors import FelixError

__all__ = ["ClientLink", "PooledMember", "PooledSubscription"]


class PooledMember(Protocol):
    """What the pool does to what lives on one of its connections (subscriptions, queue
    consumers): pause it when the connection is lost, resume it after the reconnect."""

    def _on_end(self, error: FelixError | None) -> None:
        """It ends for good with ``error`` (e.g. the session's token expired)."""

    def _on_disconnected(self) -> None:
        """Its connection was lost; the pool reconnects and calls :meth:`_resume`."""

    def _resume(self, conn: Connection) -> None:
        """Subscribe again on ``conn`` (after a reconnect), in the background."""

    def _on_client_closed(self) -> None:
        """The client closed: end iteration without unsubscribing."""

    def _reroute(self) -> None:
        """Subscribe again through the client's shard map (a cluster), in the background."""


class PooledSubscription(SubscriptionSink, PooledMember, Protocol):
    """What the client does to a subscription besides: (re)subscribe."""

    @property
    def _route(self) -> tuple[str, str]:
        """The names after the tenant in its routing key: namespace, stream."""

    async def _subscribe_on(self, conn: Connection, start: WireStart | None = None) -> None:
        """SUBSCRIBE on ``conn`` from ``start`` (None: where the subscription was asked to)."""


class ClientLink(Protocol):
    """What a Cache or Subscription asks of the client that made it."""

    @property
    def tenant(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def request_timeout(self) -> float: ...

    async def _request(
        self,
        build: Callable[[int], bytes],
        reply_type: type[R],
        opcode: int,
        *,
        key: object | None = None,
        idempotent: bool = False,
        route: tuple[str, ...] | None = None,
    ) -> R:
        """Send ``build(request_id)``; the reply (a ``reply_type`` with ``opcode``), else
        raise what the broker answered."""

    async def _start_subscription(self, sub: PooledSubscription) -> None:
        """Subscribe ``sub`` on a pooled connection, within the request timeout."""

    def _forget_subscription(self, sub: PooledSubscription) -> None:
        """``sub`` ended: stop resuming it."""

    async def _resubscribe(self, sub: PooledSubscription, start: WireStart) -> None:
        """SUBSCRIBE ``sub`` again from ``start`` on the connection the shard map picks."""

    def _reroutes(self, error: FelixError | None) -> bool:
        """Whether a subscription the broker ended with ``error`` should subscribe again
        through the shard map (its shard moved) instead of ending."""

    def _learn(self, redirect: wire.Redirect) -> None:
        """Update the shard map from a REDIRECT."""

    def _emit(self, event: ClientEvent) -> None:
        """Deliver a connection event to the client's listeners and feeds."""
