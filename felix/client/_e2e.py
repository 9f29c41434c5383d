"""End-to-end encryption of payloads and cache values: keys the broker never sees.

How it works (docs/api.md, "End-to-end encryption"): a client made with
``e2e=E2EKeys(...)`` seals every payload it publishes with AES-256-GCM under the
current key, and opens every record it receives. A sealed record is
``nonce (12 bytes) || ciphertext || tag (16 bytes)`` with the headers
``felix-e2e-key`` (the key id) and ``felix-e2e-alg`` (``A256GCM``). The associated
data binds what a receiver can check and what survives the broker, a dead-letter
copy, a DLQ replay and a bridge: the algorithm, the key id, the stream the
publisher wrote to (``tenant/namespace/stream``) and the record's headers except the
``felix-*`` ones (felix adds and rewrites those: ``felix-msg-id``,
``felix-source-*``, ``felix-dlq-*``, ``felix-replayed-from``).

A receiver learns the publisher's stream from where it reads the record, or, for a
copy, from the provenance header felix put on it (``felix-source-stream`` of a
bridged record, ``felix-dlq-stream`` of a dead letter); it tries those (at most
three) and reports the one that authenticated as ``e2e_stream``. A record that
authenticates under none of them, or names a key this client does not hold, is
never handed out as plaintext: reading its ``data`` raises :class:`E2EError`.

A cache value is sealed as ``FXE1 || key id length (1 byte) || key id || nonce ||
ciphertext || tag``, bound to the cache (``tenant/namespace/cache``) and the key.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from felix.errors import ConfigError, E2EError, LocalProtocolError

__all__ = [
    "ALG",
    "ALG_HEADER",
    "KEY_HEADER",
    "E2EKeys",
    "E2EReceived",
    "E2EState",
    "Opened",
    "e2e_state",
    "open_record",
    "open_value",
    "seal_record",
    "seal_value",
]

#: The one algorithm: AES-256-GCM with a 96-bit random nonce (named as in JOSE).
ALG = "A256GCM"
KEY_HEADER = "felix-e2e-key"
ALG_HEADER = "felix-e2e-alg"
#: Headers felix sets or rewrites on the way (bridges, dead letters, replay): not bound.
_FELIX_PREFIX = "felix-"
#: Headers naming the stream a copied record was first published to, in the order tried.
_PROVENANCE = ("felix-source-stream", "felix-dlq-stream")
_NONCE = 12
_TAG = 16
_KEY_BYTES = 32
#: A key ring holds at most this many keys (rotation keeps a few old ones).
MAX_KEYS = 256
#: A key file is read whole: refuse anything larger than this.
MAX_KEY_FILE = 1 << 20
_KEY_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_VALUE_MAGIC = b"FXE1"
_RECORD_AAD = b"felix-e2e/1 record"
_VALUE_AAD = b"felix-e2e/1 cache"
_RECORD_AAD_ALG = _RECORD_AAD + len(ALG).to_bytes(4, "big") + ALG.encode()


class E2EState(enum.StrEnum):
    """What end-to-end encryption did with a received record (``Message.e2e``)."""

    #: The record is not end-to-end encrypted; ``data`` is its payload.
    PLAIN = "plain"
    #: It was encrypted and authenticated; ``data`` is the plaintext.
    DECRYPTED = "decrypted"
    #: It is encrypted and this client has no e2e keys: ``data`` is the ciphertext as
    #: stored (what tools that copy records, such as ``felix dlq replay``, pass on).
    ENCRYPTED = "encrypted"
    #: It could not be opened (unknown key, tampered) or is plaintext that this client
    #: refuses (``require``): reading ``data`` raises the ``e2e_error``.
    FAILED = "failed"


class E2EKeys:
    """The keys of end-to-end encryption: key id -> 32-byte AES-256 key, and the id of
    the current one (what this client encrypts with); every key decrypts.

    ``require`` (default True): a received record (or cache value) that is not
    end-to-end encrypted is refused (its ``data`` raises :class:`~felix.E2EError`);
    anyone able to write to the stream, the broker included, could have put it there.
    False: such records are delivered as they are, marked ``e2e == "plain"``.

    Raises ConfigError for an unknown current id, a key that is not 32 bytes, or a key
    id that is not 1-64 characters of ``A-Z a-z 0-9 . _ : -``. The keys never appear in
    ``repr``.
    """

    __slots__ = ("_ciphers", "current", "require")

    def __init__(self, keys: Mapping[str, bytes], current: str, *, require: bool = True) -> None:
        if not isinstance(keys, Mapping) or not keys:
            raise ConfigError("e2e keys: give a non-empty mapping of key id -> 32-byte key")
        if len(keys) > MAX_KEYS:
            raise ConfigError(f"e2e keys: at most {MAX_KEYS} keys, got {len(keys)}")
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if not isinstance(key, bytes | bytearray) or len(key) != _KEY_BYTES:
                size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
                raise ConfigError(f"e2e key {key_id!r}: AES-256 needs exactly 32 bytes, got {size}")
            ciphers[key_id] = AESGCM(bytes(key))
        if current not in ciphers:
            raise ConfigError(f"e2e keys: the current key id {current!r} is not among the keys")
        if not isinstance(require, bool):
            raise ConfigError(f"e2e require must be a bool, got {require!r}")
        #: The key id new records and values are encrypted with.
        self.current = current
        #: Refuse received records and values that are not end-to-end encrypted.
        self.require = require
        self._ciphers = ciphers

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, require: bool = True) -> E2EKeys:
        """Keys from a JSON file ``{"current": ID, "keys": {ID: base64 of 32 bytes, ...}}``.

        The file must be readable by its owner only (mode 0600 or stricter, as ssh asks
        of private keys): ConfigError otherwise, as for a missing, oversized or
        malformed file or a bad key.
        """
        where = Path(path)
        try:
            # O_NONBLOCK: a FIFO in the key file's place must not hang the caller.
            with os.fdopen(os.open(where, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ConfigError(f"e2e key file {where}: not a regular file")
                mode = stat.S_IMODE(info.st_mode)
                if mode & 0o077:
                    raise ConfigError(
                        f"e2e key file {where}: readable or writable by group or others "
                        f"(mode {mode:04o}); run chmod 600 {where}"
                    )
                raw = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"e2e key file {where}: {exc.strerror or exc}") from None
        if len(raw) > MAX_KEY_FILE:
            raise ConfigError(f"e2e key file {where}: larger than {MAX_KEY_FILE} bytes")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"e2e key file {where}: not JSON ({exc})") from None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("current"), str)
            or not isinstance(doc.get("keys"), dict)
        ):
            raise ConfigError(
                f'e2e key file {where}: expected {{"current": ID, "keys": {{ID: BASE64, ...}}}}'
            )
        keys: dict[str, bytes] = {}
        for key_id, text in doc["keys"].items():
            if not isinstance(text, str):
                raise ConfigError(f"e2e key file {where}: key {key_id!r} is not a base64 string")
            try:
                keys[key_id] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"e2e key file {where}: key {key_id!r} is not base64") from None
        try:
            return cls(keys, doc["current"], require=require)
        except ConfigError as exc:
            raise ConfigError(f"e2e key file {where}: {exc}") from None

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every key this client can decrypt with."""
        return frozenset(self._ciphers)

    def __repr__(self) -> str:
        return (
            f"<E2EKeys current={self.current!r} ids={sorted(self._ciphers)} require={self.require}>"
        )


def _check_key_id(key_id: object) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"e2e key id {key_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ : -")


def _lp(data: bytes) -> bytes:
    """Length-prefixed: the associated data is unambiguous whatever the values hold."""
    return len(data).to_bytes(4, "big") + data


def _record_aad(key_id: str, stream: str, headers: Mapping[str, str] | None) -> bytes:
    # Every record's path: kept to a few bytes operations (sorting by str is sorting by
    # UTF-8 bytes: both follow code points).
    aad = b"%s%s%s" % (_RECORD_AAD_ALG, _lp(key_id.encode()), _lp(stream.encode()))
    bound = (
        sorted(item for item in headers.items() if not item[0].startswith(_FELIX_PREFIX))
        if headers
        else None
    )
    if not bound:
        return aad + b"\0\0\0\0"
    parts = [aad, len(bound).to_bytes(4, "big")]
    for name, value in bound:
        parts += (_lp(name.encode()), _lp(value.encode()))
    return b"".join(parts)


def _value_aad(key_id: str, cache: str, key: str) -> bytes:
    return b"".join(
        (
            _VALUE_AAD,
            _lp(ALG.encode()),
            _lp(key_id.encode()),
            _lp(cache.encode()),
            _lp(key.encode()),
        )
    )


def seal_record(
    keys: E2EKeys,
    stream: str,
    payload: bytes | bytearray | memoryview,
    headers: dict[str, str] | None,
) -> tuple[bytes, dict[str, str]]:
    """``payload`` sealed for ``stream`` (``tenant/ns/name``) with the current key, and the
    headers to publish it with (the caller's plus the two e2e headers)."""
    out = dict(headers) if headers else {}
    for name in out:
        if name.startswith("felix-e2e-"):
            raise ConfigError(f"header {name!r} is set by end-to-end encryption, not by the caller")
    key_id = keys.current
    out[KEY_HEADER] = key_id
    out[ALG_HEADER] = ALG
    try:
        aad = _record_aad(key_id, stream, out)
    except UnicodeEncodeError as exc:  # as the wire encoder would refuse it
        raise LocalProtocolError(f"a header is not encodable as UTF-8: {exc}") from None
    nonce = os.urandom(_NONCE)
    sealed = keys._ciphers[key_id].encrypt(nonce, payload, aad)
    return nonce + sealed, out


@dataclass(frozen=True, slots=True)
class Opened:
    """What opening one record gave: the plaintext, or why not."""

    plaintext: bytes | None = None
    error: E2EError | None = None
    #: The stream the publisher encrypted for (``tenant/ns/name``), once authenticated.
    stream: str | None = None


#: Plain records at a client that does not require e2e: nothing to open.
PLAIN = Opened()


def open_record(
    keys: E2EKeys,
    where: str,
    offset: int,
    received: str,
    payload: bytes,
    headers: Mapping[str, str],
) -> Opened:
    """Open a record read from stream ``received`` (``tenant/ns/name``); ``where`` names it
    in errors (the stream as the application gave it)."""
    key_id = headers.get(KEY_HEADER)
    if key_id is None:
        if not keys.require:
            return PLAIN
        return _failed("not_encrypted", where, offset, "is not end-to-end encrypted")
    alg = headers.get(ALG_HEADER)
    if alg != ALG:
        return _failed("unsupported", where, offset, f"uses e2e algorithm {_clip(alg)}, not {ALG}")
    cipher = keys._ciphers.get(key_id)
    if cipher is None:
        return _failed(
            "unknown_key", where, offset, f"is encrypted with unknown key {_clip(key_id)}"
        )
    if len(payload) < _NONCE + _TAG:
        return _failed("tampered", where, offset, "is shorter than a nonce and a tag")
    nonce, sealed = payload[:_NONCE], payload[_NONCE:]
    candidates = [received]
    for name in _PROVENANCE:
        origin = headers.get(name)
        if origin is not None and origin not in candidates:
            candidates.append(origin)
    for stream in candidates:
        try:
            plaintext = cipher.decrypt(nonce, sealed, _record_aad(key_id, stream, headers))
        except InvalidTag:
            continue
        return Opened(plaintext, None, stream)
    return _failed(
        "tampered",
        where,
        offset,
        f"failed authentication under key {key_id!r}: its ciphertext, nonce or headers were "
        "changed, or it was encrypted for another stream",
    )


class E2EReceived:
    """What a received record (a subscription's Message, a consumer's QueueMessage) says
    of end-to-end encryption, from its ``raw``, ``headers`` and ``_opened``."""

    __slots__ = ()
    raw: bytes
    headers: Mapping[str, str]
    _opened: Opened | None

    @property
    def data(self) -> bytes:
        """The payload: the plaintext of an end-to-end encrypted record. Raises E2EError
        for one that could not be opened (unknown key, tampered, or plaintext where e2e
        is required); a queue record can be settled anyway (``term`` to dead-letter it,
        ``nak`` to retry)."""
        opened = self._opened
        if opened is None:
            return self.raw
        if opened.error is not None:
            raise opened.error
        return self.raw if opened.plaintext is None else opened.plaintext

    @property
    def e2e(self) -> E2EState:
        """What end-to-end encryption did with this record (see :class:`E2EState`)."""
        return e2e_state(self._opened, self.headers)

    @property
    def e2e_error(self) -> E2EError | None:
        """Why the record could not be opened (what ``data`` raises), else None."""
        return None if self._opened is None else self._opened.error

    @property
    def e2e_stream(self) -> str | None:
        """The stream the publisher encrypted for (``tenant/ns/name``; authenticated):
        the one read from, or for a dead letter or bridged copy the original."""
        return None if self._opened is None else self._opened.stream


def e2e_state(opened: Opened | None, headers: Mapping[str, str]) -> E2EState:
    """The state of a received record: ``opened`` is None at a client without e2e keys."""
    if opened is None:
        return E2EState.ENCRYPTED if KEY_HEADER in headers else E2EState.PLAIN
    if opened.error is not None:
        return E2EState.FAILED
    return E2EState.PLAIN if opened.plaintext is None else E2EState.DECRYPTED


def _clip(text: str | None) -> str:
    """A header value for an error message: whoever wrote the record chose it."""
    return repr(text) if text is None or len(text) <= 64 else repr(text[:64]) + "..."


def _failed(reason: str, where: str, offset: int, text: str) -> Opened:
    return Opened(None, E2EError(reason, f"record {offset} of {where!r} {text}"))


def seal_value(keys: E2EKeys, cache: str, key: str, value: bytes | bytearray | memoryview) -> bytes:
    """``value`` sealed for ``key`` of ``cache`` (``tenant/ns/name``) with the current key."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"a cache value must be bytes-like, not {type(value).__name__}")
    key_id = keys.current
    try:
        aad = _value_aad(key_id, cache, key)
    except UnicodeEncodeError as exc:  # as the wire encoder would refuse it
        raise LocalProtocolError(f"key is not encodable as UTF-8: {exc}") from None
    nonce = os.urandom(_NONCE)
    sealed = keys._ciphers[key_id].encrypt(nonce, value, aad)
    kid = key_id.encode()
    return b"".join((_VALUE_MAGIC, bytes((len(kid),)), kid, nonce, sealed))


def open_value(keys: E2EKeys, where: str, cache: str, key: str, value: bytes) -> bytes:
    """The plaintext of a value read from ``key`` of ``cache``; E2EError if it cannot be
    opened (or is plaintext and ``require`` is set)."""
    if not value.startswith(_VALUE_MAGIC):
        if not keys.require:
            return value
        raise E2EError(
            "not_encrypted", f"cache {where!r} key {key!r}: value is not end-to-end encrypted"
        )
    head = len(_VALUE_MAGIC)
    size = value[head] if len(value) > head else 0
    key_id = value[head + 1 : head + 1 + size].decode("ascii", errors="replace")
    body = value[head + 1 + size :]
    cipher = keys._ciphers.get(key_id) if size else None
    if cipher is None:
        raise E2EError(
            "unknown_key",
            f"cache {where!r} key {key!r}: value is encrypted with unknown key {key_id!r}",
        )
    if len(body) < _NONCE + _TAG:
        raise E2EError("tampered", f"cache {where!r} key {key!r}: value is truncated")
    try:
        return cipher.decrypt(body[:_NONCE], body[_NONCE:], _value_aad(key_id, cache, key))
    except InvalidTag:
        raise E2EError(
            "tampered",
            f"cache {where!r} key {key!r}: value failed authentication under key {key_id!r} "
            "(changed, or stored under another key or cache)",
        ) from None
