"""The one outbound I/O step of felix/auth: fetching an identity provider's JWK set.

:class:`felix.auth.oidc.JwksCache` takes the fetch as a function so the cache stays
sans-IO; :func:`fetch_jwks` is the one the control plane gives it. httpx is imported
when the first fetch runs, so the rest of felix/auth loads without it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

__all__ = ["JWKS_FETCH_TIMEOUT", "MAX_JWKS_BYTES", "fetch_jwks"]

#: Largest JWK set :func:`fetch_jwks` accepts, in bytes.
MAX_JWKS_BYTES = 256 * 1024
#: Longest a fetch may take in all, in seconds.
JWKS_FETCH_TIMEOUT = 10.0


async def fetch_jwks(url: str) -> dict[str, Any]:
    """GET the JWK set at ``url``: no redirects, at most :data:`MAX_JWKS_BYTES` of body
    and :data:`JWKS_FETCH_TIMEOUT` seconds in all.

    Raises:
        httpx.HTTPError, TimeoutError, ValueError: the fetch failed, or the answer
            is too large or not a JSON object (the JWKS cache turns any of these into
            Unavailable).
    """
    import httpx

    body = bytearray()
    async with asyncio.timeout(JWKS_FETCH_TIMEOUT):
        async with (
            httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the JWK set at {url} is larger than {MAX_JWKS_BYTES} bytes")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"the JWK set at {url} is not a JSON object")
    return data
