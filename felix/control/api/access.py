"""Who may call a route, declared at the route itself.

Every endpoint carries its rule (set by :func:`requires`); the route class
(:class:`felix.control.api.guard.GuardedRoute`) refuses to build a route whose
endpoint has none, so a new route cannot be left unprotected by
forgetting a table entry. :func:`felix.control.api.security.authenticate` reads the
rule of the route it serves, and the OpenAPI document declares the bearer scheme from
the same rules.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Access",
    "Permission",
    "Rule",
    "access_of",
    "endpoint_rule",
    "requires",
    "route_rule",
]


class Access(enum.StrEnum):
    """The rules that need no permission."""

    #: Anyone, without credentials.
    PUBLIC = "public"
    #: Any valid credential (the admin token, or a Felix token of any tenant).
    ANY = "any"
    #: Only the bootstrap admin token.
    ADMIN = "admin"


@dataclass(frozen=True)
class Permission:
    """The admin token, or a Felix token of the route's tenant allowing ``action`` on
    ``object``: a template whose ``{tenant}``, ``{ns}``, ... are the route's path
    parameters (``stream:{tenant}/{ns}/{stream}``)."""

    action: str
    object: str

    def object_for(self, params: Mapping[str, str]) -> str:
        return self.object.format(**params)


Rule = Access | Permission

_ATTRIBUTE = "felix_access"
_F = TypeVar("_F", bound=Callable[..., Any])


def requires(rule: Rule) -> Callable[[_F], _F]:
    """Declare what calling the decorated endpoint needs (put it under ``@router.get``...)."""

    def declare(endpoint: _F) -> _F:
        setattr(endpoint, _ATTRIBUTE, rule)
        return endpoint

    return declare


def access_of(endpoint: Callable[..., Any]) -> Rule:
    """The rule ``endpoint`` was declared with (see :func:`requires`).

    Raises:
        TypeError: it declares none.
    """
    rule = endpoint_rule(endpoint)
    if rule is None:
        raise TypeError(f"endpoint {endpoint.__qualname__} declares no access rule (@requires)")
    return rule


def endpoint_rule(endpoint: object) -> Rule | None:
    """The rule ``endpoint`` declares, or None (such as Starlette's own docs routes)."""
    rule = getattr(endpoint, _ATTRIBUTE, None)
    return rule if isinstance(rule, Access | Permission) else None


def route_rule(scope: Mapping[str, Any]) -> Rule | None:
    """The rule of the endpoint a request was routed to (None: not a guarded route)."""
    return endpoint_rule(scope.get("endpoint"))
