"""Reading a JWT without verifying it: the header and claims, for choices only.

Both sides need this and nothing more from a token they cannot (or need not yet)
verify: the client schedules a token's refresh from its ``iat`` and ``exp``; the
broker and the control plane pick the issuer and key to verify it with from its
``iss``, ``tid`` and ``kid`` (felix/auth/tokens.py then verifies it with PyJWT).
This module depends on nothing but the standard library, so the client does
not import the server's token code.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from felix.errors import Unauthenticated

__all__ = ["MAX_TOKEN_CHARS", "b64url_decode", "read_header", "read_unverified_claims"]

#: Longest token accepted, checked before anything is decoded.
MAX_TOKEN_CHARS = 16 * 1024


def _segments(token: object) -> list[str]:
    if not isinstance(token, str) or not token:
        raise Unauthenticated("missing token")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated(f"token longer than {MAX_TOKEN_CHARS} characters")
    segments = token.split(".")
    if len(segments) != 3:
        raise Unauthenticated("malformed token")
    return segments


def b64url_decode(text: str) -> bytes:
    """Bytes of unpadded base64url ``text`` (JOSE's encoding); raises binascii.Error
    or ValueError for text that is not."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decode(segment: str) -> bytes:
    try:
        return b64url_decode(segment)
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed token") from None


def _json_object(segment: str) -> Any:
    try:
        return json.loads(_decode(segment))
    except (ValueError, RecursionError):
        raise Unauthenticated("malformed token") from None


def read_header(token: object) -> dict[str, Any]:
    """The JOSE header of ``token``, unverified: only use it to pick the key.

    Raises:
        Unauthenticated: ``token`` is not a string, too long, or not a JWS.
    """
    header_segment, _, signature = _segments(token)
    header = _json_object(header_segment)
    _decode(signature)
    if not isinstance(header, dict):
        raise Unauthenticated("malformed token")
    if "kid" in header and not isinstance(header["kid"], str):
        raise Unauthenticated("malformed token")
    return header


def read_unverified_claims(token: str) -> dict[str, Any]:
    """The claims of ``token`` without checking its signature: only use them to choose
    which issuer's keys to verify it with, or when to ask for a fresh token.

    Raises:
        Unauthenticated: ``token`` is not a JWS or its payload is not a JSON object.
    """
    read_header(token)  # the size, type and header checks
    claims = _json_object(_segments(token)[1])
    if not isinstance(claims, dict):
        raise Unauthenticated("token payload is not a JSON object")
    return claims
