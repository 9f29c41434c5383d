"""What runs before every route's handler: authentication, then the body, within its limits.

FastAPI reads (and parses) a request's whole body before it resolves any dependency,
so authentication as a dependency came too late: an unauthenticated client could
make the server buffer a body of any size. :class:`GuardedRoute` runs first:

1. :func:`~felix.control.api.security.authenticate`, from the headers alone (401/403
   before a byte of the body is read);
2. the body, read as it streams in: a declared ``Content-Length`` over
   ``max_body_bytes`` is refused at once, and a body (chunked or not) is refused as
   soon as what arrived passes the limit (413 ``too-large``), so at most the limit
   plus one chunk is ever read; it must arrive within ``body_timeout`` (400);
3. a JSON body with a duplicate key or a non-finite number (``NaN``, ``Infinity``) is
   refused (400), as the wire protocol refuses them.

The handler then gets the body from memory. Nothing of the body is read for a
request refused in step 1, and a request refused in step 1 or 2 is answered with
``Connection: close``, so the server closes the connection instead of reading (and
discarding) the rest of the body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from felix.control.api.access import access_of
from felix.control.api.context import context
from felix.control.api.security import authenticate
from felix.errors import BadRequest, FelixError, TooLarge

__all__ = ["GuardedRoute", "check_json", "read_body"]

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _may_have_body(request: Request) -> bool:
    return bool(_declared_length(request)) or "transfer-encoding" in request.headers


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request's body, read as it arrives and refused once it passes ``limit`` bytes.

    Raises:
        TooLarge: (413) the body is, or is declared to be, larger than ``limit``.
        BadRequest: (400) it did not arrive within ``timeout`` seconds.
    """
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise TooLarge(f"the request body ({declared} bytes) is larger than {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise TooLarge(f"the request body is larger than {limit} bytes")
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise BadRequest("the client went away before its body arrived") from None
    return bytes(body)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"duplicate key {key[:80]!r} in the JSON body")
        obj[key] = value
    return obj


def _finite_only(name: str) -> Any:
    raise BadRequest(f"invalid JSON number {name} in the body")


_strict_json = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_finite_only)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def check_json(body: bytes, content_type: str | None) -> None:
    """Refuse a JSON body the wire would refuse: a duplicate key or a non-finite number.

    A body that is not JSON at all is left to the schema validation (422).

    Raises:
        BadRequest: (400) it has a duplicate key or a non-finite number.
    """
    if not body or not _is_json(content_type):
        return
    try:
        _strict_json.decode(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return  # not JSON: FastAPI answers 422 json_invalid, as before


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` in one message, then whatever ``receive`` gives
    (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class GuardedRoute(APIRoute):
    """A route whose endpoint declares its access rule (checked when the route is built),
    authenticating and reading the body within its limits before the handler runs."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self.access = access_of(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            limits = context(request).limits
            try:
                await authenticate(request)
                body = await read_body(request, limits.max_body_bytes, limits.body_timeout)
            except FelixError:
                if _may_have_body(request):
                    # Its body was not (all) read: answer, then close rather than read on.
                    request.state.close_connection = True
                raise
            check_json(body, request.headers.get("content-type"))
            return await handler(Request(request.scope, _replay(body, request.receive)))

        return guarded
