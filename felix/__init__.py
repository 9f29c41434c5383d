"""felix: pub/sub streams, work queues and a TTL cache over one QUIC connection.

The client (``felix.connect`` and its classes) is imported on first use, so the
node's processes, which never use it, do not pay for its imports.
"""

from typing import TYPE_CHECKING, Any

from felix.errors import (
    BadRequest,
    ClientClosed,
    ConfigError,
    ConnectionLost,
    CursorError,
    E2EError,
    FelixError,
    FelixTimeoutError,
    HandshakeFailed,
    LeaseLost,
    LocalProtocolError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RemoteProtocolError,
    ServerError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from felix.client import (
        Cache,
        Client,
        ClientEvent,
        ClientOptions,
        Consumer,
        Disconnected,
        Durability,
        E2EKeys,
        Message,
        PublishAck,
        QueueMessage,
        Reconnected,
        SlowConsumer,
        Subscription,
        connect,
    )

__version__ = "0.1.0"

_CLIENT_NAMES = frozenset(
    {
        "Cache",
        "Client",
        "ClientEvent",
        "ClientOptions",
        "Consumer",
        "Disconnected",
        "Durability",
        "E2EKeys",
        "Message",
        "PublishAck",
        "QueueMessage",
        "Reconnected",
        "SlowConsumer",
        "Subscription",
        "connect",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import felix.client

        return getattr(felix.client, name)
    raise AttributeError(f"module 'felix' has no attribute {name!r}")


__all__ = [
    "BadRequest",
    "Cache",
    "Client",
    "ClientClosed",
    "ClientEvent",
    "ClientOptions",
    "ConfigError",
    "ConnectionLost",
    "Consumer",
    "CursorError",
    "Disconnected",
    "Durability",
    "E2EError",
    "E2EKeys",
    "FelixError",
    "FelixTimeoutError",
    "HandshakeFailed",
    "LeaseLost",
    "LocalProtocolError",
    "Message",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PublishAck",
    "QueueMessage",
    "Reconnected",
    "RemoteProtocolError",
    "ServerError",
    "SlowConsumer",
    "Subscription",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "connect",
]
