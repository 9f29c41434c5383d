"""felix: pub/sub streams, work queues and a TTL cache over one QUIC connection."""

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
    "ConnectionLost",
    "CursorError",
    "FelixError",
    "FelixTimeoutError",
    "LocalProtocolError",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "RemoteProtocolError",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
