"""The TTL cache API: ``client.cache(name)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from felix import wire
from felix.client._convert import resolve_name, ttl_from_wire, ttl_to_ms
from felix.client._e2e import E2EKeys, open_value, seal_value
from felix.errors import BadRequest, ConfigError

if TYPE_CHECKING:
    from felix.client._client import BytesLike
    from felix.client._links import ClientLink

__all__ = ["Cache"]


def _check_key(key: str) -> str:
    # The broker validates keys too (length limits are its configuration); this
    # only catches what is certainly wrong before a round trip.
    if not isinstance(key, str) or not key:
        raise BadRequest(f"invalid cache key {key!r}: must be a non-empty string")
    return key


class Cache:
    """A named cache of the client's tenant; create it with ``client.cache(name)``.

    Keys are non-empty strings, values bytes-like, times seconds (float).
    Every method raises the broker's error (``NotFound``, ``PermissionDenied``,
    ``TooLarge``, ``Overloaded``, ...), ``FelixTimeoutError`` after the client's
    request timeout and ``ConnectionLost`` if the connection drops first.
    ``get`` and ``ttl`` are read-only, so a call whose connection drops is
    retried once on another (or the re-established) connection; ``set`` and
    ``delete`` are never resent (ConnectionLost means: may or may not have
    happened).
    """

    def __init__(self, client: ClientLink, name: str, e2e: E2EKeys | None = None) -> None:
        self._client = client
        #: The cache name as given to ``client.cache()``.
        self.name = name
        self._namespace, self._cache = resolve_name("cache", name, client.namespace)
        self._e2e = e2e
        # End-to-end encryption binds a value to its cache (and key).
        self._path = "" if e2e is None else f"{client.tenant}/{self._namespace}/{self._cache}"

    def __repr__(self) -> str:
        return f"<Cache {self._namespace}/{self._cache}>"

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if it is missing or expired.

        With end-to-end encryption the plaintext; raises E2EError for a value that
        cannot be opened (unknown key, tampered, or stored for another key or cache) or,
        when the keys require it, is not encrypted."""
        _check_key(key)
        t, ns, c = self._client.tenant, self._namespace, self._cache
        reply = await self._client._request(
            lambda rid: wire.encode_cache_get(rid, t, ns, c, key),
            wire.CacheValue,
            wire.OP_CACHE_VALUE,
            idempotent=True,
            route=(ns, c, key),
        )
        if self._e2e is None or reply.value is None:
            return reply.value
        return open_value(self._e2e, self.name, self._path, key, reply.value)

    async def set(
        self,
        key: str,
        value: BytesLike,
        *,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        """Store ``value`` under ``key``; True if it was stored.

        ``ttl``: seconds until the key expires (rounded up to whole
        milliseconds, so never earlier than asked); None or ``math.inf``: no
        expiry. ``nx``: store only if the key is absent; ``xx``: only if it is
        present (a False result means the condition failed). Setting a key
        replaces its TTL. With end-to-end encryption the value is encrypted first (33
        bytes plus the key id longer at the broker). Raises ConfigError for ``nx`` and
        ``xx`` together or a TTL that is not positive.
        """
        _check_key(key)
        if nx and xx:
            raise ConfigError("nx and xx exclude each other")
        mode = wire.SET_IF_ABSENT if nx else wire.SET_IF_PRESENT if xx else wire.SET_ALWAYS
        ttl_ms = ttl_to_ms(ttl)
        t, ns, c = self._client.tenant, self._namespace, self._cache
        if self._e2e is not None:
            # Sealed for this cache and key: the broker stores only the ciphertext.
            value = seal_value(self._e2e, self._path, key, value)
        reply = await self._client._request(
            lambda rid: wire.encode_cache_set(rid, t, ns, c, key, value, ttl_ms=ttl_ms, mode=mode),
            wire.CacheResult,
            wire.OP_CACHE_STORED,
            route=(ns, c, key),
        )
        return reply.result

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed (and had not expired)."""
        _check_key(key)
        t, ns, c = self._client.tenant, self._namespace, self._cache
        reply = await self._client._request(
            lambda rid: wire.encode_cache_delete(rid, t, ns, c, key),
            wire.CacheResult,
            wire.OP_CACHE_DELETED,
            route=(ns, c, key),
        )
        return reply.result

    async def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires; ``math.inf`` if it never does; None if it is missing."""
        _check_key(key)
        t, ns, c = self._client.tenant, self._namespace, self._cache
        reply = await self._client._request(
            lambda rid: wire.encode_cache_ttl(rid, t, ns, c, key),
            wire.CacheTtlReply,
            wire.OP_CACHE_TTL_REPLY,
            idempotent=True,
            route=(ns, c, key),
        )
        return ttl_from_wire(reply.state, reply.ttl_ms)
