"""felix: pub/sub streams, work queues and a TTL cache over one QUIC connection."""

from felix.client import (
    Cache,
    Client,
    ClientEvent,
    Disconnected,
    Message,
    PublishAck,
    Reconnected,
    SlowConsumer,
    Subscription,
    connect,
)
from felix.errors import (
    BadRequest,
    ConnectionLost,
    CursorError,
    FelixError,
    FelixTimeoutError,
    LocalProtocolError,
    NotFound,
    Overloaded,
    PermissionDenied,
    RemoteProtocolError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Cache",
    "Client",
    "ClientEvent",
    "ConnectionLost",
    "CursorError",
    "Disconnected",
    "FelixError",
    "FelixTimeoutError",
    "LocalProtocolError",
    "Message",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PublishAck",
    "Reconnected",
    "RemoteProtocolError",
    "SlowConsumer",
    "Subscription",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "connect",
]
