"""What every route of the control-plane API shares: the store and the app's settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from felix.auth.minting import TenantKeys
from felix.auth.oidc import JwksCache
from felix.control.limits import HttpLimits
from felix.control.quotas import NodeQuotas
from felix.control.store import Store
from felix.errors import Unavailable

__all__ = ["ContextDep", "ControlContext", "NodeInfo", "StoreDep", "TokenAuth", "context"]

NodeInfo = dict[str, Any] | Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class TokenAuth:
    """What the token routes need: the tenants' keys on disk and fetched IdP keys."""

    keys: TenantKeys
    idp_keys: JwksCache


@dataclass(frozen=True)
class ControlContext:
    """The app's settings, kept on ``app.state.control`` (see :func:`create_app`)."""

    store: Store
    region: str
    node_info: NodeInfo
    auth: TokenAuth | None = None
    clock: Callable[[], float] = time.time
    admin_token: str | None = None
    require_auth: bool = False
    limits: HttpLimits = field(default_factory=HttpLimits)
    quotas: NodeQuotas = field(default_factory=NodeQuotas)

    def node(self) -> dict[str, Any]:
        return self.node_info() if callable(self.node_info) else dict(self.node_info)

    def token_auth(self) -> TokenAuth:
        """The auth settings; Unavailable (503) when the app has none."""
        if self.auth is None:
            raise Unavailable(
                "authentication is not configured: this control plane has no key directory"
            )
        return self.auth


def context(request: Request) -> ControlContext:
    ctx: ControlContext = request.app.state.control
    return ctx


def _store(request: Request) -> Store:
    return context(request).store


StoreDep = Annotated[Store, Depends(_store)]
ContextDep = Annotated[ControlContext, Depends(context)]
