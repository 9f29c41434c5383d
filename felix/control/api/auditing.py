"""The control plane's lines in the audit log (:mod:`felix.audit`).

Every create, update and delete (refused ones too), every token exchange and every
401/403 is one line: who, tenant, action, object, result; never a token or a body.
:func:`authenticate <felix.control.api.security.authenticate>` records the caller
of each request in a :class:`Caller`; the routes and the error handlers write the
lines, at most one per request.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from fastapi import Request

from felix import audit
from felix.control.api.access import Permission, route_rule
from felix.control.api.problems import problem_type
from felix.control.model import Path, ResourceKind
from felix.errors import FelixError, PermissionDenied, Unauthenticated

__all__ = [
    "Caller",
    "audit_change",
    "audit_exchange",
    "audit_refused",
    "caller_of",
    "current_caller",
    "start_request",
]


@dataclass
class Caller:
    """Who sent the request being served (set by authentication)."""

    who: str = "anonymous"  # a token's subject, "admin", or "anonymous"
    tenant: str | None = None  # the Felix token's tenant
    source: str | None = None
    #: The admin token (or no authentication required): may see everything.
    admin: bool = False
    audited: bool = False  # a line was written for this request's outcome


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "felix_control_caller", default=None
)
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DENIALS = (Unauthenticated, PermissionDenied)


def start_request(request: Request) -> Caller:
    """A fresh, anonymous caller for ``request`` (filled in once it authenticates)."""
    caller = Caller(source=request.client.host if request.client else None)
    request.state.audit_caller = caller
    _caller.set(caller)
    return caller


def caller_of(request: Request) -> Caller:
    """Who sent ``request`` (anonymous if it was not authenticated)."""
    caller: Caller | None = getattr(request.state, "audit_caller", None)
    return caller if caller is not None else Caller()


def current_caller() -> Caller:
    """Who sent the request being served (anonymous outside one)."""
    caller = _caller.get()
    if caller is None:
        caller = Caller()
        _caller.set(caller)
    return caller


def audit_change(
    op: str, kind: ResourceKind, path: Path, exc: BaseException | None, detail: str | None = None
) -> None:
    """A management change through the API (``op``: create, update or delete)."""
    caller = current_caller()
    caller.audited = True
    audit.emit(
        "management",
        who=caller.who,
        who_tenant=caller.tenant,
        source=caller.source,
        tenant=path[0] if path else None,
        action=f"{kind}.{op}",
        object=f"{kind}:{'/'.join(path)}",
        result="ok" if exc is None else "failed",
        reason=None if exc is None else problem_type(exc).slug,
        detail=detail if exc is None else str(exc),
    )


def audit_exchange(tenant: str, who: str, issuer: str, exc: BaseException | None) -> None:
    caller = current_caller()
    caller.audited = True
    audit.emit(
        "auth",
        who=who,
        source=caller.source,
        tenant=tenant,
        action="token.exchange",
        object=f"issuer:{issuer}" if issuer else "issuer:?",
        result="ok" if exc is None else "denied" if isinstance(exc, _DENIALS) else "failed",
        reason=None if exc is None else problem_type(exc).slug,
        detail=None if exc is None else str(exc),
    )


def audit_refused(request: Request, exc: BaseException, reason: str) -> None:
    """A request answered with an error: 401/403 always, other errors of changes.

    Nothing is logged twice (the route's own line wins) and never a header or body.
    """
    caller: Caller | None = getattr(request.state, "audit_caller", None)
    if caller is None:
        caller = Caller(source=request.client.host if request.client else None)
    if caller.audited:
        return
    route = request.scope.get("route")
    route_path: str | None = getattr(route, "path", None)
    if route_path is None:
        return  # no such route: not an operation on anything
    if isinstance(exc, _DENIALS):
        event: audit.Event = "auth" if isinstance(exc, Unauthenticated) else "permission"
        result: audit.Result = "denied"
    elif request.method in _MUTATING:
        event = "auth" if route_path.endswith("/token/exchange") else "management"
        result = "failed"
    else:
        return
    caller.audited = True
    params = request.path_params
    obj = request.url.path
    rule = route_rule(request.scope)
    if isinstance(rule, Permission):
        with contextlib.suppress(KeyError, IndexError, ValueError):
            obj = rule.object_for(params)
    audit.emit(
        event,
        who="anonymous" if isinstance(exc, Unauthenticated) else caller.who,
        who_tenant=None if isinstance(exc, Unauthenticated) else caller.tenant,
        source=caller.source,
        tenant=params.get("tenant"),
        action=f"{request.method} {route_path}",
        object=obj,
        result=result,
        reason=reason,
        # An unexpected error's message may hold anything: its type only.
        detail=str(exc) if isinstance(exc, FelixError) else type(exc).__name__,
    )
