"""Role-based access control: policies, role bindings, and what an identity is granted.

A :class:`Policy` is a named list of permissions in one tenant. A :class:`RoleBinding`
gives a subject (a user, by the ``sub`` its identity provider issued, or a group) one
or more policies by name. :func:`grant` collects, for one identity, the permissions of
every policy bound to the user or to any of its groups. Anything not bound is denied:
no bindings, no policies, or a binding to a policy that does not exist all grant
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from felix.auth.perms import MAX_PERMISSIONS, Permission, PermissionSet
from felix.errors import BadRequest
from felix.names import validate_name

__all__ = [
    "MAX_SUBJECT_CHARS",
    "Policy",
    "RoleBinding",
    "check_principal",
    "grant",
]

#: Longest user ``sub``, group name or issuer accepted anywhere in felix.auth.
MAX_SUBJECT_CHARS = 256

# A binding lists at most this many policies.
_MAX_BINDING_POLICIES = 64


def check_principal(what: str, value: object) -> str:
    """Return ``value`` if it is a usable user ``sub``, group name or issuer, else raise.

    Identity providers choose these strings (``auth0|42``, ``alice@example.com``,
    ``/admins``), so :func:`felix.names.validate_name` would be too strict; they only
    have to be non-empty, at most :data:`MAX_SUBJECT_CHARS` characters, and printable
    (no control characters, so they are safe in logs and error messages).

    Raises:
        BadRequest: ``value`` is not such a string; the message says ``what`` it was.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest(f"invalid {what}: must be a non-empty string")
    if len(value) > MAX_SUBJECT_CHARS:
        raise BadRequest(f"invalid {what}: longer than {MAX_SUBJECT_CHARS} characters")
    if not value.isprintable():
        raise BadRequest(f"invalid {what}: contains control characters")
    return value


@dataclass(frozen=True, slots=True)
class Policy:
    """A named set of permissions in one tenant.

    ``permissions`` may be given as strings or :class:`Permission` objects and is
    stored as a tuple of :class:`Permission`.

    Raises:
        BadRequest: the tenant or policy name breaks the name rule, a permission is
            malformed or names another tenant, or there are more than
            :data:`~felix.auth.perms.MAX_PERMISSIONS`.
    """

    tenant: str
    name: str
    permissions: tuple[Permission, ...]

    def __post_init__(self) -> None:
        validate_name("tenant", self.tenant)
        validate_name("policy", self.name)
        if isinstance(self.permissions, str):  # a lone string would iterate by character
            raise BadRequest(f"policy {self.name!r}: permissions must be a list")
        # PermissionSet does the checks: syntax, same tenant, count.
        perms = tuple(PermissionSet(self.tenant, self.permissions))
        object.__setattr__(self, "permissions", perms)

    @classmethod
    def create(cls, tenant: str, name: str, permissions: Iterable[Permission | str]) -> Policy:
        """Build a policy from permission strings or objects (validated as above)."""
        return cls(tenant, name, tuple(PermissionSet(tenant, permissions)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"tenant", "name", "permissions": [str, ...]}``."""
        return {
            "tenant": self.tenant,
            "name": self.name,
            "permissions": [str(p) for p in self.permissions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from :meth:`to_dict`'s form.

        Raises:
            BadRequest: a field is missing, of the wrong type, or invalid.
        """
        _expect_keys(data, "policy", {"tenant", "name", "permissions"})
        perms = data["permissions"]
        if not isinstance(perms, list) or len(perms) > MAX_PERMISSIONS:
            raise BadRequest(f"policy permissions must be a list of at most {MAX_PERMISSIONS}")
        return cls(data["tenant"], data["name"], tuple(perms))


@dataclass(frozen=True, slots=True)
class RoleBinding:
    """Binds a subject to policies (by name) in the tenant whose config holds it.

    ``subject`` is ``group:NAME`` for everyone whose identity lists group ``NAME``,
    ``user:SUB`` or a bare ``SUB`` for the user whose ``sub`` is ``SUB``. A ``sub`` that
    itself starts with ``group:`` or ``user:`` must be written with the ``user:``
    prefix. If ``issuer`` is set the binding only applies to identities from that
    issuer: ``sub`` and group names are only unique per issuer, so a tenant that
    trusts several issuers should set it.

    Raises:
        BadRequest: the subject, a policy name or the issuer is invalid, or the
            binding names no policies or more than 64.
    """

    subject: str
    policies: tuple[str, ...]
    issuer: str | None = None

    def __post_init__(self) -> None:
        check_principal("role binding subject", self.subject)
        self._split()  # validates the part after a prefix
        if isinstance(self.policies, str):
            raise BadRequest("role binding policies must be a list of policy names")
        policies = tuple(self.policies)
        if not policies or len(policies) > _MAX_BINDING_POLICIES:
            raise BadRequest(f"a role binding names 1 to {_MAX_BINDING_POLICIES} policies")
        for name in policies:
            validate_name("policy", name)
        object.__setattr__(self, "policies", policies)
        if self.issuer is not None:
            check_principal("role binding issuer", self.issuer)

    def _split(self) -> tuple[str, str]:
        prefix, sep, rest = self.subject.partition(":")
        if sep and prefix in ("user", "group"):
            check_principal(f"role binding {prefix}", rest)
            return prefix, rest
        return "user", self.subject

    @property
    def kind(self) -> str:
        """``"user"`` or ``"group"``."""
        return self._split()[0]

    @property
    def principal(self) -> str:
        """The user ``sub`` or group name, without prefix."""
        return self._split()[1]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"subject", "policies": [str, ...], "issuer": str | None}``."""
        return {"subject": self.subject, "policies": list(self.policies), "issuer": self.issuer}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoleBinding:
        """Build a binding from :meth:`to_dict`'s form (``issuer`` may be left out).

        Raises:
            BadRequest: a field is missing, of the wrong type, or invalid.
        """
        _expect_keys(data, "role binding", {"subject", "policies"}, optional=frozenset({"issuer"}))
        policies = data["policies"]
        if not isinstance(policies, list):
            raise BadRequest("role binding policies must be a list of policy names")
        return cls(data["subject"], tuple(policies), data.get("issuer"))


def grant(
    bindings: Iterable[RoleBinding],
    policies: Iterable[Policy],
    sub: str,
    groups: Iterable[str],
    tenant: str,
    *,
    issuer: str | None = None,
) -> PermissionSet:
    """Everything ``tenant``'s RBAC config grants the identity ``sub`` with ``groups``.

    ``bindings`` and ``policies`` are the tenant's config. A binding applies if its
    subject is this user or one of ``groups``, and, when it names an issuer, if that
    is ``issuer``. The result is the union of the permissions of the policies the
    applying bindings name. Policies that belong to another tenant, and names that
    match no policy, grant nothing (missing config means deny).

    Raises:
        BadRequest: ``tenant`` is not a valid name, or two policies of ``tenant``
            share a name (the config is corrupt; better refused than guessed).
    """
    validate_name("tenant", tenant)
    by_name: dict[str, Policy] = {}
    for policy in policies:
        if policy.tenant != tenant:
            continue
        if policy.name in by_name:
            raise BadRequest(f"tenant {tenant!r} has two policies named {policy.name!r}")
        by_name[policy.name] = policy
    group_set = frozenset(groups)
    names: set[str] = set()
    for binding in bindings:
        if binding.issuer is not None and binding.issuer != issuer:
            continue
        kind, principal = binding._split()
        if (kind == "user" and principal == sub) or (kind == "group" and principal in group_set):
            names.update(binding.policies)
    perms = [p for name in sorted(names) if name in by_name for p in by_name[name].permissions]
    return PermissionSet(tenant, perms)


def _expect_keys(
    data: object, what: str, required: set[str], *, optional: frozenset[str] = frozenset()
) -> None:
    if not isinstance(data, Mapping):
        raise BadRequest(f"{what} must be a JSON object")
    missing = required - data.keys()
    if missing:
        raise BadRequest(f"{what} is missing {', '.join(sorted(missing))}")
    unknown = data.keys() - required - optional
    if unknown:
        raise BadRequest(f"{what} has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
