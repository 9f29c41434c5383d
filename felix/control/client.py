"""A small synchronous client of the control-plane REST API, for the CLI and broker followers.

::

    with ControlClient("http://127.0.0.1:8443") as api:
        api.create(ResourceKind.TENANT, ("acme",))
        api.create(ResourceKind.NAMESPACE, ("acme", "prod"))
        api.create(ResourceKind.STREAM, ("acme", "prod", "orders"), {"durable": True})
        api.create(ResourceKind.GROUP, ("acme", "prod", "orders", "workers"), {"lease_ms": 60000})
        position, resources = api.snapshot()
        changes, position = api.changes(position, wait=30)  # as soon as one is committed

It speaks the vocabulary of :class:`felix.control.store.Store` (a kind and a
path of names) and returns :mod:`felix.control.model` objects, so a follower
can read from either. Names are checked here with the shared rule before any
request is sent.

Errors are felix errors, mapped back from the API's problem answers by
:data:`felix.control.schemas.PROBLEM_TYPES`: BadRequest (400, 422), NotFound,
AlreadyExists / HasChildren (409), VersionConflict (412), CursorTooOld (410:
re-snapshot), Overloaded / Unavailable (503). A server that cannot be reached
raises Unavailable; one that does not answer in time, FelixTimeoutError; an
answer that is not what the API documents, ServerError.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from felix.control.model import PARENT, Change, Path, Resource, ResourceKind, check_path
from felix.control.schemas import PROBLEM_BASE, PROBLEM_TYPES, collection_url, resource_url
from felix.control.store import CursorTooOld
from felix.errors import (
    BadRequest,
    ConfigError,
    FelixError,
    FelixTimeoutError,
    NotFound,
    PermissionDenied,
    ServerError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "DEFAULT_URL",
    "ControlClient",
    "default_ca",
    "default_cert",
    "default_token",
    "default_url",
    "error_from_response",
]

DEFAULT_URL = "http://127.0.0.1:8443"

_M = TypeVar("_M", bound=BaseModel)


def default_url() -> str:
    """``$FELIX_CONTROL_URL``, else :data:`DEFAULT_URL`."""
    return os.environ.get("FELIX_CONTROL_URL") or DEFAULT_URL


def default_token() -> str | None:
    """``$FELIX_CONTROL_TOKEN``, else None (no credentials)."""
    return os.environ.get("FELIX_CONTROL_TOKEN") or None


def default_ca() -> str | None:
    """``$FELIX_CONTROL_CA``, else None (the system trust store)."""
    return os.environ.get("FELIX_CONTROL_CA") or None


def default_cert() -> tuple[str, str] | None:
    """``($FELIX_CONTROL_CERT, $FELIX_CONTROL_KEY)`` when both are set, else None.

    Raises ConfigError when only one is set.
    """
    cert = os.environ.get("FELIX_CONTROL_CERT") or None
    key = os.environ.get("FELIX_CONTROL_KEY") or None
    if (cert is None) != (key is None):
        raise ConfigError("FELIX_CONTROL_CERT and FELIX_CONTROL_KEY must be set together")
    return (cert, key) if cert is not None and key is not None else None


def _tls_context(
    ca: str | os.PathLike[str] | None,
    cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None,
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=os.fspath(ca) if ca is not None else None)
        if cert is not None:
            context.load_cert_chain(os.fspath(cert[0]), os.fspath(cert[1]))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files for the control plane: {exc}") from None
    return context


class _FeedPage(BaseModel):
    changes: list[Change]
    next: int
    position: int


class _Snapshot(BaseModel):
    position: int
    resources: list[Resource]


class _Items(BaseModel):
    items: list[Resource]


class _Ref(BaseModel):
    kind: ResourceKind
    path: Path


class _Deleted(BaseModel):
    deleted: list[_Ref]


class ControlClient:
    """The control plane at ``url`` (``http://HOST:PORT``).

    ``url`` defaults to :func:`default_url`. ``timeout`` bounds each request, in
    seconds; a long-poll of :meth:`changes` gets its ``wait`` on top. ``ca`` is
    a PEM file of CA certificates to trust for ``https`` (default
    :func:`default_ca`, else the system store). ``cert`` is (certificate chain,
    private key) PEM files presented to a control plane that requires client
    certificates (mTLS; default :func:`default_cert`). Missing or unreadable
    files raise ConfigError. ``token`` (default :func:`default_token`) is sent as ``Authorization:
    Bearer`` on every request: a Felix token or the control plane's admin token.
    ``transport`` replaces the network (for tests). Use it as a context
    manager, or call :meth:`close`. Not thread-safe: one thread at a time.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 10.0,
        ca: str | os.PathLike[str] | None = None,
        token: str | None = None,
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        transport: httpx.BaseTransport | None = None,
        env_token: bool = True,
    ) -> None:
        """``env_token``: without ``token``, send ``$FELIX_CONTROL_TOKEN`` (False: the
        caller already decided, e.g. the CLI, which sends it only where it points)."""
        self.url = (url or default_url()).rstrip("/")
        self.timeout = timeout
        ca = ca if ca is not None else default_ca()
        cert = cert if cert is not None else default_cert()
        verify: ssl.SSLContext | bool = True
        if ca is not None or cert is not None:
            verify = _tls_context(ca, cert)
        token = token or (default_token() if env_token else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, verify=verify, transport=transport, headers=headers
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- resources ------------------------------------------------------------------------

    def list_resources(self, kind: ResourceKind, parent: Path = ()) -> list[Resource]:
        """Resources of ``kind`` directly under ``parent`` (``()`` for tenants), by name."""
        parent = tuple(parent)
        parent_kind = PARENT[kind]
        if parent_kind is not None:
            check_path(parent_kind, parent)
        return self._call("GET", collection_url(kind, parent), _Items).items

    def get(self, kind: ResourceKind, path: Path) -> Resource:
        """The resource at ``path``; NotFound if there is none."""
        return self._call("GET", resource_url(kind, check_path(kind, tuple(path))), Resource)

    def create(
        self, kind: ResourceKind, path: Path, spec: Mapping[str, Any] | None = None
    ) -> Resource:
        """Create ``path`` with ``spec`` (defaults for the rest); AlreadyExists if taken."""
        path = check_path(kind, tuple(path))
        body = {**(spec or {}), "name": path[-1]}
        return self._call("POST", collection_url(kind, path[:-1]), Resource, json=body)

    def update(
        self,
        kind: ResourceKind,
        path: Path,
        patch: Mapping[str, Any],
        *,
        if_version: int | None = None,
    ) -> Resource:
        """Change the settings in ``patch``; VersionConflict if ``if_version`` is not current."""
        url = resource_url(kind, check_path(kind, tuple(path)))
        headers = _if_match(if_version)
        return self._call("PATCH", url, Resource, json=dict(patch), headers=headers)

    def delete(
        self,
        kind: ResourceKind,
        path: Path,
        *,
        cascade: bool = False,
        if_version: int | None = None,
    ) -> list[tuple[ResourceKind, Path]]:
        """Delete ``path`` (with ``cascade``, everything under it); what was removed, in order.

        HasChildren if it has resources under it and not ``cascade``.
        """
        url = resource_url(kind, check_path(kind, tuple(path)))
        params = {"cascade": "true"} if cascade else None
        headers = _if_match(if_version)
        done = self._call("DELETE", url, _Deleted, params=params, headers=headers)
        return [(ref.kind, ref.path) for ref in done.deleted]

    # -- feed -----------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, list[Resource]]:
        """Every resource and the feed position the state reflects (as Store.snapshot)."""
        snap = self._call("GET", "/v1/snapshot", _Snapshot)
        return snap.position, snap.resources

    def changes(self, since: int, limit: int = 100, wait: float = 0.0) -> tuple[list[Change], int]:
        """Changes after ``since`` in order, at most ``limit`` (1..1000), and the position
        to ask from next (as Store.changes).

        With ``wait`` (0..30 seconds) and no change after ``since`` yet, the
        server holds the request until one is committed or ``wait`` passes.
        CursorTooOld: the feed cannot continue from ``since``; re-snapshot.
        """
        params = {"since": since, "limit": limit, "wait": wait}
        timeout = self.timeout + wait
        page = self._call("GET", "/v1/changes", _FeedPage, params=params, timeout=timeout)
        return page.changes, page.next

    def register(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``POST /v1/registrations``: register streams and caches a node created on first
        use (``{"kind", "path", "spec", "since"}`` each, at most 500); one result each
        (felix/control/registration.py). Admin only."""
        body = self._json("POST", "/v1/registrations", json={"resources": items})
        results = body.get("results")
        if not isinstance(results, list) or len(results) != len(items):
            raise ServerError(f"unexpected answer to POST /v1/registrations from {self.url}")
        return results

    # -- system ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /v1/system/info``: version, region, node."""
        return self._json("GET", "/v1/system/info")

    def health(self) -> dict[str, Any]:
        """``GET /v1/system/health`` (also when it answers 503: ``status`` says which)."""
        response = self._send("GET", "/v1/system/health")
        if response.status_code not in (200, 503):
            raise error_from_response(response)
        return _decode(response)

    def regions(self) -> list[str]:
        """The region names streams may name (for now only the node's own)."""
        body = self._json("GET", "/v1/regions")
        return [str(region["name"]) for region in body["regions"]]

    def exchange_token(self, tenant: str, permissions: list[str] | None = None) -> dict[str, Any]:
        """``POST /v1/tenants/{tenant}/token/exchange`` with this client's token (an IdP JWT).

        ``permissions`` narrows the grant (never widens it). Returns the answer:
        ``access_token``, ``token_type``, ``expires_in``.
        """
        body = {"permissions": permissions} if permissions else None
        answer = self._json("POST", f"/v1/tenants/{tenant}/token/exchange", json=body)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ServerError(f"the control plane at {self.url} answered without an access_token")
        return answer

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise FelixTimeoutError(f"{method} {self.url}{url} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"control plane at {self.url} unreachable: {exc}") from exc

    def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, url, **kwargs)
        if not response.is_success:
            raise error_from_response(response)
        return _decode(response)

    def _call(self, method: str, url: str, model: type[_M], **kwargs: Any) -> _M:
        body = self._json(method, url, **kwargs)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ServerError(f"unexpected answer to {method} {url}: {exc}") from None


def _if_match(version: int | None) -> dict[str, str] | None:
    return None if version is None else {"If-Match": f'"{version}"'}


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServerError(
            f"unexpected answer to {response.request.method} {response.request.url}: "
            f"HTTP {response.status_code}, not a JSON object"
        )
    return body


#: The error for a status without a known problem type.
_BY_STATUS: dict[int, type[FelixError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    410: CursorTooOld,
    412: VersionConflict,
    413: TooLarge,
    422: BadRequest,
    429: Unavailable,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_from_response(response: httpx.Response) -> FelixError:
    """The felix error for a failed answer: by its problem ``type``, else by its status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    type_ = problem.get("type")
    known = PROBLEM_TYPES.get(type_.removeprefix(PROBLEM_BASE)) if isinstance(type_, str) else None
    status = response.status_code
    if known is not None:
        cls = known.error
    else:
        cls = _BY_STATUS.get(status, BadRequest if status < 500 else ServerError)
    detail = problem.get("detail") or problem.get("title")
    if not isinstance(detail, str) or not detail:
        text = response.text[:200] if response.text else response.reason_phrase
        detail = f"HTTP {status} from {response.request.method} {response.request.url}: {text}"
    if cls is CursorTooOld:
        since, oldest = problem.get("since"), problem.get("oldest")
        err: FelixError = CursorTooOld(
            since if isinstance(since, int) else -1, oldest if isinstance(oldest, int) else -1
        )
        err.args = (detail,)
        return err
    return cls(detail)
