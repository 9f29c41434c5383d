"""felix's one error tree.

Everything felix raises on purpose is a :class:`FelixError`. Protocol errors are
split the h11 way: :class:`LocalProtocolError` means *this* side misused the API
(a caller mistake, such as a request id without an ack mode), while
:class:`RemoteProtocolError` means the peer sent bytes that break the wire
format. Errors that a broker reports to a client carry a stable wire ``code``
(see docs/wire-protocol.md, "Error codes") and map to exactly one class each;
:class:`ErrorCode` lists them, and its slugs name them in audit lines and in the
control plane's problem types.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """felix's error codes: in ERROR frames and SUBSCRIPTION_END (1-8, 13), and for the
    control plane's resource conflicts (9-12, answered over HTTP only)."""

    BAD_REQUEST = 1
    NOT_FOUND = 2
    PERMISSION_DENIED = 3
    UNAUTHENTICATED = 4
    OVERLOADED = 5
    UNAVAILABLE = 6
    TOO_LARGE = 7
    #: Sent as its own frame, CURSOR_ERROR, with the offsets.
    CURSOR_ERROR = 8
    ALREADY_EXISTS = 9
    HAS_CHILDREN = 10
    VERSION_CONFLICT = 11
    SETTING_CONFLICT = 12
    #: A publish batch with duplicate message ids it cannot acknowledge as one run.
    DUPLICATES_IN_BATCH = 13

    @property
    def slug(self) -> str:
        """The code's name in audit lines and problem type URIs: ``not-found``."""
        return self.name.lower().replace("_", "-")


class FelixError(Exception):
    """Root of every error felix raises on purpose."""

    #: Stable wire code for errors a broker sends (0: not a server error).
    code: int = 0
    #: True when the same call may succeed if retried (after a backoff).
    retryable: bool = False


class ProtocolError(FelixError):
    """The FLX1 wire format was broken, by this side or by the peer."""


class LocalProtocolError(ProtocolError):
    """The caller asked the codec for something the wire format cannot say."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a malformed, truncated, oversized or unknown frame."""


class ShmProtocolError(RemoteProtocolError):
    """A same-host peer broke the shared-memory transport's framing or stream rules.

    ``transport_code`` is the QUIC transport error code it maps to (RFC 9000, 20.1:
    0x4 STREAM_LIMIT_ERROR, 0x5 STREAM_STATE_ERROR, 0x7 FRAME_ENCODING_ERROR,
    0xA PROTOCOL_VIOLATION); the connection is closed with it.
    """

    def __init__(self, message: str, transport_code: int = 0xA) -> None:
        super().__init__(message)
        self.transport_code = transport_code


class ConfigError(FelixError, ValueError):
    """A setting, flag or file felix was given cannot be used."""


class HandshakeFailed(FelixError, ConnectionError):
    """The QUIC/TLS handshake with the peer failed (certificate, ALPN, timeout)."""


class RingError(FelixError):
    """A shared-memory ring could not be created, attached or used."""


class ServerError(FelixError):
    """An error reported by the broker in reply to one request."""

    code: int = ErrorCode.BAD_REQUEST


class BadRequest(ServerError):
    """The broker understood the frame but refused the request as invalid."""

    code = ErrorCode.BAD_REQUEST


class NotFound(ServerError):
    """The named tenant, namespace, stream or cache does not exist."""

    code = ErrorCode.NOT_FOUND


class PermissionDenied(ServerError):
    """The session's token does not grant this operation."""

    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(ServerError):
    """No valid token: missing, expired or rejected."""

    code = ErrorCode.UNAUTHENTICATED


class Overloaded(ServerError):
    """A bound was hit (ring full, budget spent); retry after a backoff."""

    code = ErrorCode.OVERLOADED
    retryable = True


class Unavailable(ServerError):
    """The owner of the request is down or restarting; retry after a backoff."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class TooLarge(ServerError):
    """A key, value, payload or frame exceeds its configured limit."""

    code = ErrorCode.TOO_LARGE


class CursorError(ServerError):
    """A subscription's start offset cannot be served.

    ``reason`` is ``"too_old"`` (``available`` is the oldest retained offset) or
    ``"in_future"`` (``available`` is the current tail).
    """

    code = ErrorCode.CURSOR_ERROR

    def __init__(self, reason: str, requested: int, available: int) -> None:
        super().__init__(f"cursor {reason}: requested {requested}, available {available}")
        self.reason = reason
        self.requested = requested
        self.available = available


class AlreadyExists(ServerError):
    """A resource with this path exists (control plane, HTTP 409)."""

    code = ErrorCode.ALREADY_EXISTS


class HasChildren(ServerError):
    """The resource still has children; delete them or pass cascade (control plane, HTTP 409)."""

    code = ErrorCode.HAS_CHILDREN


class VersionConflict(ServerError):
    """``If-Match`` named another version than the stored one (control plane, HTTP 412)."""

    code = ErrorCode.VERSION_CONFLICT


class DiskFull(Overloaded):
    """Durable data was refused: a disk budget is spent or the disk is (nearly) full.

    Nothing was written; retry after retention frees space or an operator adds room.
    """


class LogError(Unavailable):
    """A stream's on-disk log cannot serve: it is damaged, or a write or fsync failed.

    Not retryable by itself: an operator (or, for a failed fsync, a restart that
    recovers from disk) has to act first.
    """

    retryable = False


class LogDamaged(LogError):
    """Bytes on disk are not what felix wrote: names the file, the byte position and why.

    felix never deletes or rewrites the damaged data on its own.
    """

    def __init__(self, file: str, position: int, why: str) -> None:
        super().__init__(f"log damaged: {file} at byte {position}: {why}")
        self.file = file
        self.position = position
        self.why = why


class LogPoisoned(LogError):
    """A write or fsync of this log failed earlier; the log refuses every later call.

    An fsync error is never retried (the kernel may have dropped the dirty pages and
    a second fsync would report success): the owner must stop, and reopening the log
    recovers from what is really on disk.
    """


class KeyUnavailable(LogError):
    """Data at rest cannot be encrypted or decrypted with the keys this node has.

    The region key is missing or is not the one that wrapped the tenant's data keys,
    a wrapped data key file is missing, damaged or was altered, a record names a data
    key the tenant's key file does not hold, or a record does not authenticate with
    its key (altered on disk). The message names the key, the file and the fix. The
    affected stream or group is refused (Unavailable on the wire): felix never serves
    garbage and never falls back to writing plaintext. Not retryable by itself: an
    operator has to give the node the right key first.
    """


class SettingConflict(BadRequest):
    """Settings of one request contradict each other, such as ``fsync="commit"`` on a
    stream that is not durable (control plane, HTTP 409).

    A BadRequest, so code that refuses invalid settings catches it too.
    """

    code = ErrorCode.SETTING_CONFLICT


class DuplicatesInBatch(BadRequest):
    """A publish batch holds records whose ``felix-msg-id`` the stream already stored
    (or an id twice), and their offsets would not be one contiguous run with the new
    records, which is what a PUBLISH_OFFSETS ack says: nothing of the batch was
    stored. Publish its records one by one (the Python client does so by itself); each
    duplicate is then acknowledged with its original offset.
    """

    code = ErrorCode.DUPLICATES_IN_BATCH


class WrongRegion(BadRequest):
    """Something names another region than this node's or control plane's (issue #15):
    a resource's spec, a change of a resource's region, a control plane's feed
    (control plane: HTTP 400; a node refuses to follow such a feed)."""

    def __init__(self, message: str, *, region: str | None, expected: str) -> None:
        super().__init__(message)
        #: The region named (None: none, or cleared), and this cluster's.
        self.region = region
        self.expected = expected


class FelixTimeoutError(FelixError, TimeoutError):
    """A call did not complete within its timeout."""


class ConnectionLost(FelixError):
    """The connection closed while the call was in flight."""

    retryable = True


class LeaseLost(FelixError):
    """A queue record could not be settled: ``reason`` ``stale`` (leased to another
    consumer since: it was redelivered), ``dead`` (dead-lettered already), ``unknown``
    (never delivered to this group) or ``lost`` (the connection it came on was lost)."""

    def __init__(self, offset: int, reason: str, detail: str) -> None:
        super().__init__(f"record {offset}: {detail}")
        self.offset = offset
        self.reason = reason


class E2EError(FelixError):
    """An end-to-end encrypted record or cache value could not be opened by this client,
    so its plaintext is not given out. ``reason``: ``unknown_key`` (encrypted with a key
    id this client does not hold), ``tampered`` (authentication failed: its ciphertext,
    nonce or bound headers were changed, or it was encrypted for another stream, cache
    or key), ``unsupported`` (another algorithm) or ``not_encrypted`` (plaintext at a
    client that requires end-to-end encryption)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ClusterError(FelixError):
    """The cluster's shared state in PostgreSQL (issue #16, felix/cluster) refused or
    failed an operation."""


class ClusterUnavailable(ClusterError):
    """The cluster database could not be reached, or did not answer in time. A node
    keeps serving until its lease's fence passes and retries (docs/architecture.md,
    "Membership and leases")."""

    retryable = True


class ClusterMismatch(ClusterError, ConfigError):
    """The cluster in this database was created with another number of logical shards
    or for another region than this node was given; both are fixed for a cluster's life."""


class ShardArchiveError(ClusterError):
    """Moving a logical shard's durable data (``felix cluster export-shard`` /
    ``import-shard``) was refused: the archive is damaged or truncated, does not match
    the data dir or keys given, a stream already holds records there, or the node of
    the data dir is running. Nothing was changed."""


class NodeIdInUse(ClusterError):
    """Another process (another incarnation) holds a live lease on this node id: two
    processes never serve under one id. Retry once ``seconds_left`` have passed (the
    old lease then expires, unless it is still being renewed)."""

    retryable = True

    def __init__(self, node_id: str, seconds_left: float) -> None:
        super().__init__(
            f"node id {node_id!r} is held by another process whose lease ends in "
            f"{seconds_left:.1f}s"
        )
        self.node_id = node_id
        self.seconds_left = seconds_left


class ClientClosed(ConnectionLost):
    """The call was made on a client that is closed or draining (not retryable)."""

    retryable = False


_BY_CODE: dict[int, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        Overloaded,
        Unavailable,
        TooLarge,
        AlreadyExists,
        HasChildren,
        VersionConflict,
        SettingConflict,
        DuplicatesInBatch,
    )
}


def error_for_code(code: int, message: str) -> ServerError:
    """The exception a client raises for a wire error ``code`` (unknown codes: ServerError)."""
    cls = _BY_CODE.get(code, ServerError)
    err = cls(message)
    if cls is ServerError:
        err.code = code
    return err


def error_slug(exc: BaseException) -> str:
    """How audit lines name why ``exc`` refused something: its code's slug
    (``permission-denied``), ``bad-request`` for a broken wire format, else
    ``internal-error``."""
    if isinstance(exc, ProtocolError):
        return ErrorCode.BAD_REQUEST.slug
    if isinstance(exc, FelixError) and exc.code:
        try:
            return ErrorCode(exc.code).slug
        except ValueError:  # a code from a newer broker
            pass
    return "internal-error"
