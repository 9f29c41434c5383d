"""Per-tenant signing keys for Felix tokens, with rotation driven by the time passed in.

How it works
------------
A :class:`TenantKeyRing` holds a tenant's Ed25519 keys in the order they were made.
Each key has an activation time; a key stops signing when the next key activates,
and is kept (published, for verification) until every token it can have signed has
expired: ``max_token_ttl`` plus ``leeway`` later. So a key's state at time ``now``
is a pure function of the activation times, and there is no transition to forget::

    rotate(t)        t + publish_ahead          successor activates     + max_token_ttl + leeway
      |--- NEXT ---------|--- ACTIVE ----------------|--- RETIRED -------------|--- DROPPED
      published,         published, signs            published, does          gone from the
      does not sign                                  not sign                 JWK set

``rotate(now)`` adds a key that activates ``publish_ahead`` seconds later, so every
verifier whose copy of the JWK set is younger than ``publish_ahead`` already knows
the key before the first token signed with it arrives. Set ``publish_ahead`` to at
least the longest time a verifier caches the JWK set. The first key of a new ring
activates at once: nobody can hold a stale copy of a set that did not exist.

Exactly one key is ACTIVE at any time from the first activation on. Only one
rotation can be pending: :meth:`TenantKeyRing.rotate` refuses while a key is NEXT.
Nothing here reads the clock; the caller passes ``now`` (Unix seconds) to each call
and stores :meth:`TenantKeyRing.to_json` after :meth:`~TenantKeyRing.rotate` and
:meth:`~TenantKeyRing.prune`. The stored form holds private keys.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from felix.auth.perms import PermissionSet
from felix.auth.tokens import TokenSigner, check_leeway, ed25519_jwk
from felix.errors import BadRequest, ConfigError, Unavailable
from felix.names import validate_name
from felix.unverified_jwt import b64url_decode

__all__ = ["MAX_TOKEN_TTL", "KeyState", "KeyTimes", "TenantKeyRing", "ed25519_kid"]

#: Longest token lifetime a ring may be configured with (Felix tokens are short-lived).
MAX_TOKEN_TTL = 24 * 3600

_FORMAT_VERSION = 1


class KeyState(enum.Enum):
    """Where a key is in its life (see the module docstring)."""

    NEXT = "next"  # published, not signing yet
    ACTIVE = "active"  # published and signing
    RETIRED = "retired"  # published until tokens it signed have expired
    DROPPED = "dropped"  # no longer published; removed by prune()


@dataclass(frozen=True, slots=True)
class KeyTimes:
    """One key's timeline. ``retire_at``/``drop_at`` are None until a successor exists."""

    kid: str
    published_at: float
    activate_at: float
    retire_at: float | None
    drop_at: float | None

    def state(self, now: float) -> KeyState:
        """The key's state at ``now``: the one place the states are decided."""
        if now < self.activate_at:
            return KeyState.NEXT
        if self.retire_at is None or now < self.retire_at:
            return KeyState.ACTIVE
        if self.drop_at is None or now < self.drop_at:
            return KeyState.RETIRED
        return KeyState.DROPPED


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    private_key: Ed25519PrivateKey
    published_at: float
    activate_at: float


def ed25519_kid(private_key: Ed25519PrivateKey) -> str:
    """The key's RFC 7638 JWK thumbprint (SHA-256, base64url): a stable, unique ``kid``."""
    raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    # RFC 7638: the required members only, sorted, no whitespace.
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _number(name: str, value: object, *, positive: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'positive' if positive else 'non-negative'}")
    return float(value)


class TenantKeyRing:
    """A tenant's token signing keys, their rotation, and the JWK set that publishes them.

    Args:
        tenant: the tenant whose tokens the keys sign.
        max_token_ttl: longest lifetime of a token minted from this ring, in seconds
            (1 to :data:`MAX_TOKEN_TTL`); decides how long a retired key stays published.
        publish_ahead: seconds between publishing a new key and signing with it.
        leeway: the clock leeway verifiers allow after ``exp`` (0 to 300 s).

    Build a new ring with :meth:`create`, or a stored one with :meth:`from_json`.
    """

    def __init__(
        self,
        tenant: str,
        *,
        max_token_ttl: int,
        publish_ahead: float,
        leeway: float,
        keys: list[_Key],
    ) -> None:
        self.tenant = validate_name("tenant", tenant)
        if (
            not isinstance(max_token_ttl, int)
            or isinstance(max_token_ttl, bool)
            or not 0 < max_token_ttl <= MAX_TOKEN_TTL
        ):
            raise ConfigError(f"max_token_ttl must be whole seconds in 1..{MAX_TOKEN_TTL}")
        self.max_token_ttl = max_token_ttl
        self.publish_ahead = _number("publish_ahead", publish_ahead)
        self.leeway = check_leeway(leeway)
        if not keys:
            raise ConfigError("a key ring needs at least one key")
        for before, after in itertools.pairwise(keys):
            if not before.activate_at < after.activate_at:
                raise ConfigError("key ring keys must activate in strictly increasing order")
        self._keys = list(keys)

    @classmethod
    def create(
        cls,
        tenant: str,
        now: float,
        *,
        max_token_ttl: int = 900,
        publish_ahead: float = 300.0,
        leeway: float = 30.0,
    ) -> TenantKeyRing:
        """A ring with one fresh key, ACTIVE from ``now``.

        Raises:
            BadRequest: ``tenant`` breaks the name rule.
            ConfigError: a parameter is out of range.
        """
        key = Ed25519PrivateKey.generate()
        now = _number("now", now)
        first = _Key(ed25519_kid(key), key, published_at=now, activate_at=now)
        return cls(
            tenant,
            max_token_ttl=max_token_ttl,
            publish_ahead=publish_ahead,
            leeway=leeway,
            keys=[first],
        )

    # -- the timeline -------------------------------------------------------------------

    def schedule(self) -> list[KeyTimes]:
        """Every key still held (including any not yet pruned), oldest first."""
        retain = self.max_token_ttl + self.leeway
        out = []
        for i, key in enumerate(self._keys):
            succ = self._keys[i + 1].activate_at if i + 1 < len(self._keys) else None
            out.append(
                KeyTimes(
                    kid=key.kid,
                    published_at=key.published_at,
                    activate_at=key.activate_at,
                    retire_at=succ,
                    drop_at=None if succ is None else succ + retain,
                )
            )
        return out

    def state(self, kid: str, now: float) -> KeyState:
        """The state of key ``kid`` at ``now`` (DROPPED for a kid the ring does not hold)."""
        for times in self.schedule():
            if times.kid == kid:
                return times.state(now)
        return KeyState.DROPPED

    def next_change(self, now: float) -> float | None:
        """The earliest time after ``now`` at which some key changes state, or None."""
        times = [
            t
            for k in self.schedule()
            for t in (k.activate_at, k.retire_at, k.drop_at)
            if t is not None and t > now
        ]
        return min(times, default=None)

    def rotate(self, now: float, *, publish_ahead: float | None = None) -> str:
        """Publish a new key now; it becomes ACTIVE at ``now + publish_ahead``.

        ``publish_ahead`` defaults to the ring's (a scheduled rotation passes its own
        lead time). The key ACTIVE until then becomes RETIRED at that moment. Returns
        the new kid.

        Raises:
            BadRequest: a rotation is already pending (the newest key is still NEXT).
            ConfigError: ``publish_ahead`` is negative or not a finite number.
        """
        now = _number("now", now)
        ahead = self.publish_ahead
        if publish_ahead is not None:
            ahead = _number("publish_ahead", publish_ahead)
        last = self._keys[-1]
        if now < last.activate_at:
            raise BadRequest(
                f"tenant {self.tenant!r}: a key rotation is already pending "
                f"(key {last.kid} becomes active at {last.activate_at})"
            )
        key = Ed25519PrivateKey.generate()
        new = _Key(ed25519_kid(key), key, published_at=now, activate_at=now + ahead)
        if new.activate_at <= last.activate_at:
            # publish_ahead == 0 and now == last.activate_at: two keys cannot activate
            # at the same instant, or "the" active key would be ambiguous.
            raise BadRequest(f"tenant {self.tenant!r}: rotated too soon after the last rotation")
        self._keys.append(new)
        return new.kid

    def prune(self, now: float) -> list[str]:
        """Forget keys that are DROPPED at ``now``; return their kids (store the ring after)."""
        dropped = [t.kid for t in self.schedule() if t.state(now) is KeyState.DROPPED]
        self._keys = [k for k in self._keys if k.kid not in dropped]
        return dropped

    # -- signing and publishing ------------------------------------------------------------

    def signer(self, now: float) -> TokenSigner:
        """A signer for the key ACTIVE at ``now``.

        Raises:
            Unavailable: no key is active at ``now`` (``now`` is before the ring's
                first activation: the clock went back).
        """
        for times, key in zip(self.schedule(), self._keys, strict=True):
            if times.state(now) is KeyState.ACTIVE:
                return TokenSigner(key.kid, key.private_key)
        raise Unavailable(f"tenant {self.tenant!r} has no active signing key at {now}")

    def mint(
        self,
        now: float,
        *,
        issuer: str,
        audience: str,
        sub: str,
        perms: PermissionSet,
        ttl: int | None = None,
        region: str | None = None,
    ) -> str:
        """A Felix token signed by the key ACTIVE at ``now`` (see :meth:`TokenSigner.mint`).

        ``ttl`` defaults to, and may not exceed, ``max_token_ttl``: a longer-lived token
        could outlive its key's time in the JWK set.

        Raises:
            BadRequest: ``perms`` belongs to another tenant, or a claim is invalid.
            ConfigError: ``ttl`` is out of range.
            Unavailable: no key is active at ``now``.
        """
        if perms.tenant != self.tenant:
            raise BadRequest(
                f"cannot mint a token for tenant {perms.tenant!r} with the keys of {self.tenant!r}"
            )
        if ttl is None:
            ttl = self.max_token_ttl
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= self.max_token_ttl:
            raise ConfigError(f"token ttl must be 1..{self.max_token_ttl} seconds, got {ttl!r}")
        return self.signer(now).mint(
            issuer=issuer, audience=audience, sub=sub, perms=perms, now=now, ttl=ttl, region=region
        )

    def jwks(self, now: float) -> dict[str, list[dict[str, str]]]:
        """The public JWK set to serve at ``now``: every NEXT, ACTIVE and RETIRED key."""
        published = (KeyState.NEXT, KeyState.ACTIVE, KeyState.RETIRED)
        return {
            "keys": [
                ed25519_jwk(key.private_key.public_key(), key.kid)
                for times, key in zip(self.schedule(), self._keys, strict=True)
                if times.state(now) in published
            ]
        }

    # -- storage ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON-ready). It contains the private keys: store it as a secret."""
        return {
            "version": _FORMAT_VERSION,
            "tenant": self.tenant,
            "max_token_ttl": self.max_token_ttl,
            "publish_ahead": self.publish_ahead,
            "leeway": self.leeway,
            "keys": [
                {
                    "kid": k.kid,
                    "private_key": _b64(
                        k.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                    ),
                    "published_at": k.published_at,
                    "activate_at": k.activate_at,
                }
                for k in self._keys
            ],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantKeyRing:
        """Rebuild a ring from :meth:`to_dict`'s form.

        Each ``kid`` must be its key's thumbprint, so a kid can never be paired with
        the wrong key.

        Raises:
            ConfigError: the data is malformed, of another version, or inconsistent.
            BadRequest: the tenant breaks the name rule.
        """
        if not isinstance(data, Mapping) or data.get("version") != _FORMAT_VERSION:
            raise ConfigError(f"stored key ring is not version {_FORMAT_VERSION}")
        raw_keys = data.get("keys")
        if not isinstance(raw_keys, list):
            raise ConfigError("stored key ring has no key list")
        keys = [_key_from_dict(k) for k in raw_keys]
        missing = {"tenant", "max_token_ttl", "publish_ahead", "leeway"} - data.keys()
        if missing:
            raise ConfigError(f"stored key ring is missing {', '.join(sorted(missing))}")
        # __init__ validates the values.
        return cls(
            data["tenant"],
            max_token_ttl=data["max_token_ttl"],
            publish_ahead=data["publish_ahead"],
            leeway=data["leeway"],
            keys=keys,
        )

    @classmethod
    def from_json(cls, text: str) -> TenantKeyRing:
        """:meth:`from_dict` from a JSON string.

        Raises:
            ConfigError: not JSON, or as for :meth:`from_dict`.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ConfigError("stored key ring is not valid JSON") from None
        return cls.from_dict(data)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _key_from_dict(data: object) -> _Key:
    if not isinstance(data, Mapping):
        raise ConfigError("stored key is not an object")
    encoded = data.get("private_key")
    try:
        if not isinstance(encoded, str):
            raise ValueError
        raw = b64url_decode(encoded)
        key = Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, binascii.Error):
        raise ConfigError("stored key has no valid Ed25519 private_key") from None
    if data.get("kid") != ed25519_kid(key):
        raise ConfigError("stored key's kid is not its thumbprint")
    published_at = _number("published_at", data.get("published_at"))
    activate_at = _number("activate_at", data.get("activate_at"))
    if published_at > activate_at:
        raise ConfigError("stored key activates before it was published")
    return _Key(ed25519_kid(key), key, published_at, activate_at)
