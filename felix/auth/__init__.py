"""felix's security core: permissions, RBAC, Felix tokens, signing keys, OIDC verification.

Sans-IO: nothing here opens sockets or reads the clock. Callers pass ``now`` (Unix
seconds) and inject the one I/O step, fetching an identity provider's JWK set.

Token exchange, as the control plane wires it::

    identity = await verify_idp_token(idp_token, tenant_issuers, cache=jwks_cache,
                                      now=now, leeway=30)
    granted = grant(bindings, policies, identity.sub, identity.groups, tenant,
                    issuer=identity.issuer)
    perms = narrow(requested, granted) if requested is not None else granted
    token = key_ring.mint(now, issuer=..., audience=..., sub=identity.sub, perms=perms)

and the gateway, once per session::

    claims = verify_felix_token(token, key_ring.jwks(now), issuer=..., audience=...,
                                now=now, leeway=30)
    # the session's tenant is claims.tid; close it at claims.deadline(leeway);
    # check each operation with claims.perms.allows_stream / allows_cache / allows.
"""

from felix.auth.keys import KeyState, KeyTimes, TenantKeyRing
from felix.auth.oidc import Identity, IssuerConfig, JwksCache, verify_idp_token
from felix.auth.perms import Permission, PermissionSet, narrow, parse_object
from felix.auth.rbac import Policy, RoleBinding, grant
from felix.auth.tokens import Claims, TokenSigner, verify_felix_token

__all__ = [
    "Claims",
    "Identity",
    "IssuerConfig",
    "JwksCache",
    "KeyState",
    "KeyTimes",
    "Permission",
    "PermissionSet",
    "Policy",
    "RoleBinding",
    "TenantKeyRing",
    "TokenSigner",
    "grant",
    "narrow",
    "parse_object",
    "verify_felix_token",
    "verify_idp_token",
]
