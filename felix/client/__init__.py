"""The Python client: pooled QUIC connections to a felix node.

::

    async with felix.connect("felix://127.0.0.1:5000", ca="node/ca-cert.pem") as client:
        ack = await client.publish("orders", b"hello")
        async with client.subscribe("orders", start="earliest") as sub:
            async for msg in sub:
                print(msg.offset, msg.data)
        async with client.consume("jobs", "workers") as jobs:  # a durable stream
            async for job in jobs:
                async with job.process():  # ack on success, nak on an exception
                    ...
        sessions = client.cache("sessions")
        await sessions.set("user:1", b"...", ttl=30.0)

See :func:`connect` and :class:`ClientOptions` for the options; each class's docstring
states its contract.
"""

from felix.client._backoff import Backoff
from felix.client._cache import Cache
from felix.client._client import Client, Durability, PublishAck
from felix.client._connect import Connect, connect
from felix.client._consumer import Consumer, QueueMessage, Role
from felix.client._convert import TimeStart
from felix.client._e2e import E2EKeys, E2EState
from felix.client._events import ClientEvent, Disconnected, EventFeed, Reconnected, SlowConsumer
from felix.client._flow import Message
from felix.client._options import ClientOptions
from felix.client._subscription import Subscription

__all__ = [
    "Backoff",
    "Cache",
    "Client",
    "ClientEvent",
    "ClientOptions",
    "Connect",
    "Consumer",
    "Disconnected",
    "Durability",
    "E2EKeys",
    "E2EState",
    "EventFeed",
    "Message",
    "PublishAck",
    "QueueMessage",
    "Reconnected",
    "Role",
    "SlowConsumer",
    "Subscription",
    "TimeStart",
    "connect",
]
