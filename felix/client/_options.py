"""The client's options, stated once: :class:`ClientOptions`.

``felix.connect(url, ...)`` takes these as keyword arguments (checked here, at
run time) or as one ``ClientOptions`` built by the caller (checked by a type
checker too); either way the :class:`~felix.client.Client` gets one frozen object.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from felix.client._backoff import Backoff
from felix.client._e2e import E2EKeys
from felix.client._events import EventListener
from felix.client._hosts import parse_host_patterns
from felix.errors import ConfigError
from felix.names import validate_name
from felix.quic import QuicEngine

__all__ = ["ClientOptions", "TokenProvider"]

TokenProvider: TypeAlias = Callable[[], str] | Callable[[], Awaitable[str]]
PathLike: TypeAlias = str | os.PathLike[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How a client connects and behaves; every field has a default.

    Raises ConfigError for a value it cannot use (checked when it is made).
    """

    #: The tenant every request names (the broker checks it against the token).
    tenant: str = "default"
    #: Where relative stream and cache names live (``"ns/name"`` reaches another one).
    namespace: str = "default"
    #: The credential sent in ``auth``. Neither this nor ``token_provider``: an empty
    #: token (loopback dev mode). A static token that expires ends the client's
    #: subscriptions and calls with Unauthenticated.
    token: str | None = None
    #: A function (async or sync) returning the token, asked again for every new
    #: connection and, when its token is a JWT with ``exp``, before that expires (at
    #: 80% of its lifetime, or 30 s before, with jitter): the fresh token is presented
    #: on the live connection (REAUTH), which keeps its subscriptions. If no fresh
    #: token can be had (bounded retries) the broker closes the connection at expiry:
    #: its subscriptions and calls fail with Unauthenticated, new calls use a new one.
    token_provider: TokenProvider | None = None
    #: PEM file of the CA(s) to trust, exclusively. None: the system trust store,
    #: plus the file named by ``FELIX_CA_FILE`` if set.
    ca: PathLike | None = None
    #: (certificate chain PEM, private key PEM) presented to a node that requires
    #: client certificates (``felix up --tls-client-ca``). None:
    #: ``FELIX_CLIENT_CERT``/``FELIX_CLIENT_KEY`` if set, else no certificate.
    client_cert: tuple[PathLike, PathLike] | None = None
    #: QUIC connections.
    pool_size: int = 1
    #: Control streams per connection, each authenticated separately.
    control_streams: int = 2
    #: Concurrent requests; further calls wait for a slot.
    max_in_flight: int = 256
    #: Seconds for a connection's handshake plus auth.
    connect_timeout: float = 10.0
    #: Seconds for one call (after its in-flight slot), including waiting for a
    #: connection while reconnecting.
    request_timeout: float = 10.0
    #: Seconds of silence after which a PING is sent.
    keepalive: float = 10.0
    #: (base, cap) seconds of the full-jitter reconnect backoff.
    reconnect_backoff: tuple[float, float] = (0.1, 10.0)
    #: QUIC engine: "qh3", "aioquic" or a QuicEngine; None: ``FELIX_QUIC_ENGINE``.
    engine: QuicEngine | str | None = None
    #: A listener for connection events (see ``Client.add_listener``).
    on_event: EventListener | None = None
    #: Floats in [0, 1) for the backoff jitter (tests).
    random_source: Callable[[], float] = field(default=random.random)
    #: End-to-end encryption (docs/api.md): payloads this client publishes and cache
    #: values it sets are encrypted with these keys before they leave it, and records
    #: and values it receives are decrypted (refused when not encrypted, unless the keys
    #: say ``require=False``). None: payloads pass as they are (an encrypted record is
    #: delivered as stored, ``e2e == "encrypted"``).
    e2e: E2EKeys | None = None
    #: Hosts a cluster's REDIRECTs and shard map may send this client to (it connects
    #: there and presents its token): ``"*.peers.example.com"`` (names under it),
    #: ``"10.0.0.0/8"`` (IP literals in it), an exact host or IP, ``"*"`` (any: tests
    #: only); ports are not checked. The host the client was given is always allowed.
    #: None: names under that host's parent domain (``felix.prod.example.com``:
    #: ``*.prod.example.com``; none for a name of fewer than three labels); for an IP
    #: literal, other IP literals only when ``ca`` is set, else none; over shared memory,
    #: loopback hosts. A node elsewhere is not connected to: the call fails with
    #: ConfigError naming the host (docs/api.md, "Clusters").
    cluster_hosts: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.cluster_hosts is not None:
            parse_host_patterns(self.cluster_hosts)  # ConfigError for a bad one
            object.__setattr__(self, "cluster_hosts", tuple(self.cluster_hosts))
        if self.token is not None and self.token_provider is not None:
            raise ConfigError("pass token or token_provider, not both")
        if self.e2e is not None and not isinstance(self.e2e, E2EKeys):
            raise ConfigError(f"e2e must be felix.E2EKeys (or None), got {type(self.e2e).__name__}")
        validate_name("tenant", self.tenant)
        validate_name("namespace", self.namespace)
        for name, value in (
            ("pool_size", self.pool_size),
            ("control_streams", self.control_streams),
            ("max_in_flight", self.max_in_flight),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name, seconds in (
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive", self.keepalive),
        ):
            if not isinstance(seconds, int | float) or not seconds > 0:
                raise ConfigError(f"{name} must be positive seconds, got {seconds!r}")
        try:
            base, cap = self.reconnect_backoff
            Backoff(base=base, cap=cap)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"reconnect_backoff: {exc}") from None

    @classmethod
    def build(cls, base: ClientOptions | None, changes: Mapping[str, Any]) -> ClientOptions:
        """``base`` (default: all defaults) with ``changes`` applied; ConfigError names
        an unknown option."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown client option(s): {', '.join(unknown)}")
        return dataclasses.replace(base or cls(), **changes)
