"""Permissions: parsing, the implication rules, fast checks and narrowing.

A permission is ``ACTION:KIND:PATH``, for example ``stream.publish:stream:acme/orders/eu``.
Objects (``KIND:PATH``) are ``tenant:T``, ``namespace:T/NS``, ``stream:T/NS/S``,
``cache:T/NS/C`` and ``bridge:T/NAME`` (docs/operations.md, "Bridges"). Every segment
follows :func:`felix.names.validate_name`; the last segment of a namespace, stream,
cache or bridge object may instead be ``*`` (every name).
The tenant segment is never a wildcard, so no permission can reach another tenant.

How it works
------------
Each action acts on one *target kind*: stream actions on streams, cache actions on
caches, ``ns.manage`` on namespaces, ``tenant.manage`` and ``rbac.manage`` on the
tenant. A permission may name its target kind or a container of it (``stream.publish``
on ``namespace:acme/orders`` covers every stream in that namespace), and implies the
actions below it:

=================  ==========================================================
granted action     implies
=================  ==========================================================
``tenant.manage``  everything in the tenant except ``rbac.manage`` and ``bridge.manage``
``ns.manage``      ``ns.manage`` and every stream and cache action
``stream.manage``  every stream action
``cache.manage``   every cache action
``rbac.manage``    only itself
``bridge.manage``  only itself (data leaving the region is granted explicitly)
others             only themselves
=================  ==========================================================

A permission is expanded once, at construction, into *atoms*: (action, namespace,
name) triples, one per implied action, naming the target objects it covers, where a
namespace or name may be ``*``. A check then looks up at most three atoms in a set
(the exact object, every name in its namespace, every name in the tenant), so the
broker's per-message check costs a few hash lookups and no parsing.

"Does the set allow ACTION on OBJECT" accepts wildcard objects too, and means "does
the set imply the permission ``ACTION:OBJECT``", that is, allow every concrete
operation that permission would allow. :func:`narrow` keeps exactly the requested
permissions for which that holds, so it can never widen a grant.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from felix.errors import BadRequest, PermissionDenied
from felix.names import validate_name

__all__ = [
    "ACTIONS",
    "BRIDGE_MANAGE",
    "CACHE_ACTIONS",
    "KINDS",
    "MAX_PERMISSIONS",
    "MAX_PERMISSION_CHARS",
    "STREAM_ACTIONS",
    "WILDCARD",
    "Permission",
    "PermissionSet",
    "narrow",
    "parse_object",
]

WILDCARD = "*"

#: Longest permission string accepted, checked before parsing (the longest valid one,
#: ``stream.subscribe:stream:`` plus three 64-character names, is 218 characters).
MAX_PERMISSION_CHARS = 256

#: Most permissions one :class:`PermissionSet` (a policy, a grant, a token) may hold.
MAX_PERMISSIONS = 1024

STREAM_ACTIONS = frozenset(
    {"stream.publish", "stream.subscribe", "stream.consume", "stream.manage"}
)
CACHE_ACTIONS = frozenset({"cache.read", "cache.write", "cache.manage"})
#: Managing a bridge: the only way a tenant's data leaves the region, so neither
#: ``tenant.manage`` nor anything else implies it (like ``rbac.manage``).
BRIDGE_MANAGE = "bridge.manage"
ACTIONS = STREAM_ACTIONS | CACHE_ACTIONS | {"ns.manage", "tenant.manage", "rbac.manage"}
ACTIONS |= {BRIDGE_MANAGE}

#: Object kinds and how many path segments each has (the tenant is the first).
KINDS = {"tenant": 1, "namespace": 2, "stream": 3, "cache": 3, "bridge": 2}

# The kind of object each action is performed on.
_TARGET = {
    **{a: "stream" for a in STREAM_ACTIONS},
    **{a: "cache" for a in CACHE_ACTIONS},
    "ns.manage": "namespace",
    "tenant.manage": "tenant",
    "rbac.manage": "tenant",
    BRIDGE_MANAGE: "bridge",
}

# Every action an action implies, itself included: the implication table above.
_IMPLIES: dict[str, frozenset[str]] = {a: frozenset({a}) for a in ACTIONS}
_IMPLIES["stream.manage"] = STREAM_ACTIONS
_IMPLIES["cache.manage"] = CACHE_ACTIONS
_IMPLIES["ns.manage"] = STREAM_ACTIONS | CACHE_ACTIONS | {"ns.manage"}
_IMPLIES["tenant.manage"] = ACTIONS - {"rbac.manage", BRIDGE_MANAGE}

# Which object kinds a permission with a given action may name: its target kind and
# the kinds that contain it. ``ns.manage:stream:...`` would mean nothing, so it is
# refused instead of silently granting nothing.
_CONTAINERS = {
    "stream": ("stream", "namespace", "tenant"),
    "cache": ("cache", "namespace", "tenant"),
    "namespace": ("namespace", "tenant"),
    "tenant": ("tenant",),
    # Only bridge objects: bridge.manage on the tenant would read as "every bridge",
    # which bridge:T/* already says without looking like tenant.manage.
    "bridge": ("bridge",),
}

# An atom is (action, namespace, name); unused positions hold "".
_Atom = tuple[str, str, str]

# allows() remembers this many answers per set (a set lives as long as a session, so
# this bounds per-session memory; the broker hot path uses allows_stream/allows_cache).
_MEMO_MAX = 256


def _preview(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:80]) + f"... ({len(text)} characters)"


def parse_object(text: str) -> tuple[str, str, str, str]:
    """Parse an object ``KIND:PATH`` into ``(kind, tenant, namespace, name)``.

    Unused parts are ``""``: ``tenant:acme`` gives ``("tenant", "acme", "", "")``.
    The last segment of a namespace, stream or cache object may be ``*``; every other
    segment must pass :func:`felix.names.validate_name`.

    Raises:
        BadRequest: ``text`` is not a ``str``, is too long, names an unknown kind, has
            the wrong number of segments, a bad name or a misplaced ``*``.
    """
    if not isinstance(text, str):
        raise BadRequest(f"invalid object of type {type(text).__name__}")
    if len(text) > MAX_PERMISSION_CHARS:
        raise BadRequest(f"invalid object {_preview(text)}: too long")
    kind, sep, path = text.partition(":")
    if not sep or kind not in KINDS:
        raise BadRequest(
            f"invalid object {_preview(text)}: must start with one of "
            f"{', '.join(k + ':' for k in KINDS)}"
        )
    segments = path.split("/")
    if len(segments) != KINDS[kind]:
        raise BadRequest(
            f"invalid object {_preview(text)}: a {kind} object has "
            f"{KINDS[kind]} segment(s) separated by '/'"
        )
    last = len(segments) - 1
    labels = ("tenant", "bridge") if kind == "bridge" else ("tenant", "namespace", kind)
    for i, (seg_kind, seg) in enumerate(zip(labels, segments, strict=False)):
        # The tenant segment (i == 0) is never a wildcard: that would cross tenants.
        if seg == WILDCARD and i == last and i > 0:
            continue
        if seg == WILDCARD:
            raise BadRequest(
                f"invalid object {_preview(text)}: '*' is only allowed as the last segment "
                "of a namespace, stream, cache or bridge object"
            )
        validate_name(seg_kind, seg)
    segments += [""] * (3 - len(segments))
    return kind, segments[0], segments[1], segments[2]


@dataclass(frozen=True, slots=True)
class Permission:
    """One permission: ``action`` on an object of ``kind`` in ``tenant``.

    ``namespace`` and ``name`` are ``""`` where the kind has no such segment, and may
    be ``*`` when they are the last segment. Build one with :meth:`parse`; the
    constructor validates the same way, so an invalid ``Permission`` cannot exist.

    Raises:
        BadRequest: unknown action, invalid object, or an action that cannot apply to
            the object's kind (``ns.manage`` on a stream, ``rbac.manage`` on a namespace).
    """

    action: str
    kind: str
    tenant: str
    namespace: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise BadRequest(
                f"invalid permission: unknown action {_preview(str(self.action))}; "
                f"actions are {', '.join(sorted(ACTIONS))}"
            )
        # Re-parse the object so a hand-built Permission obeys the same rules.
        parsed = parse_object(self.object)
        if parsed != (self.kind, self.tenant, self.namespace, self.name):
            raise BadRequest(f"invalid permission object {_preview(self.object)}")
        if self.kind not in _CONTAINERS[_TARGET[self.action]]:
            raise BadRequest(
                f"invalid permission {_preview(str(self))}: {self.action} applies to "
                f"{' or '.join(_CONTAINERS[_TARGET[self.action]])} objects"
            )

    @classmethod
    def parse(cls, text: str) -> Permission:
        """Parse ``ACTION:KIND:PATH`` (see the module docstring).

        Raises:
            BadRequest: ``text`` is not a valid permission; the message says why.
        """
        if not isinstance(text, str):
            raise BadRequest(f"invalid permission of type {type(text).__name__}")
        if len(text) > MAX_PERMISSION_CHARS:
            raise BadRequest(f"invalid permission {_preview(text)}: too long")
        action, sep, obj = text.partition(":")
        if not sep:
            raise BadRequest(f"invalid permission {_preview(text)}: must be ACTION:KIND:PATH")
        if action not in ACTIONS:
            raise BadRequest(f"invalid permission {_preview(text)}: unknown action")
        kind, tenant, namespace, name = parse_object(obj)
        return cls(action, kind, tenant, namespace, name)

    @property
    def object(self) -> str:
        """The object as text: ``stream:acme/orders/*``."""
        path = "/".join(s for s in (self.tenant, self.namespace, self.name) if s)
        return f"{self.kind}:{path}"

    def __str__(self) -> str:
        return f"{self.action}:{self.object}"


def _atoms(action: str, kind: str, namespace: str, name: str) -> list[_Atom]:
    """The atoms of a valid permission (tenant already checked by the caller)."""
    out: list[_Atom] = []
    for implied in _IMPLIES[action]:
        target = _TARGET[implied]
        if target == "tenant":
            # Only tenant.manage and rbac.manage target the tenant; both can only be
            # granted on tenant objects, so the object is the tenant itself here.
            out.append((implied, "", ""))
        elif target == "bridge":
            # bridge:T/NAME is held like a namespace: (action, NAME, ""), so bridge:T/*
            # is (action, "*", "") and _covering's namespace rule applies unchanged.
            out.append((implied, namespace, ""))
        elif kind == "tenant":
            out.append((implied, WILDCARD, WILDCARD if target != "namespace" else ""))
        elif kind == "namespace":
            # namespace:T/NS covers the namespace and everything in it; namespace:T/*
            # covers every namespace, so every name in every namespace.
            out.append((implied, namespace, "" if target == "namespace" else WILDCARD))
        else:
            # A stream or cache object: only stream or cache actions of the same kind
            # get here (Permission refuses the rest).
            out.append((implied, namespace, name))
    return out


def _covering(atom: _Atom) -> tuple[_Atom, ...]:
    """The atoms that would cover ``atom``: itself and its wildcard containers."""
    action, namespace, name = atom
    if namespace == "":  # a tenant-level action
        return (atom,)
    if name == "":  # ns.manage, bridge.manage
        return (atom, (action, WILDCARD, ""))
    return (atom, (action, namespace, WILDCARD), (action, WILDCARD, WILDCARD))


class PermissionSet:
    """The permissions one subject holds in one tenant, compiled for fast checks.

    Immutable after construction. Every permission must be in ``tenant``; a check on
    an object in any other tenant is always false.

    Raises:
        BadRequest: ``tenant`` is not a valid tenant name, a permission is malformed
            or in another tenant, or there are more than :data:`MAX_PERMISSIONS`.
    """

    __slots__ = ("_atoms", "_memo", "_perms", "tenant")

    def __init__(self, tenant: str, permissions: Iterable[Permission | str] = ()) -> None:
        self.tenant = validate_name("tenant", tenant)
        if isinstance(permissions, str):  # would iterate by character
            raise BadRequest("permissions must be a list, not one string")
        perms: dict[Permission, None] = {}  # a dict keeps first-seen order for to_strings
        for p in permissions:
            perm = p if isinstance(p, Permission) else Permission.parse(p)
            if perm.tenant != tenant:
                raise BadRequest(
                    f"permission {_preview(str(perm))} names tenant {perm.tenant!r}, not {tenant!r}"
                )
            perms[perm] = None
            if len(perms) > MAX_PERMISSIONS:
                raise BadRequest(f"too many permissions: at most {MAX_PERMISSIONS}")
        self._perms = tuple(perms)
        self._atoms = frozenset(
            a for p in self._perms for a in _atoms(p.action, p.kind, p.namespace, p.name)
        )
        self._memo: dict[tuple[str, str], bool] = {}

    def allows(self, action: str, obj: str) -> bool:
        """True if this set allows ``action`` on object ``obj`` (``KIND:PATH``).

        ``obj`` may be a wildcard pattern: then the answer is whether the set allows
        ``action`` on every object the pattern covers. Objects in another tenant are
        always refused. Answers are memoised per set (bounded).

        Raises:
            BadRequest: unknown ``action``, malformed ``obj``, or an action that cannot
                apply to ``obj``'s kind.
        """
        key = (action, obj)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        kind, tenant, namespace, name = parse_object(obj)
        perm = Permission(action, kind, tenant, namespace, name)
        answer = self.implies(perm)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = answer
        return answer

    def implies(self, perm: Permission) -> bool:
        """True if everything ``perm`` allows, this set allows too."""
        if perm.tenant != self.tenant:
            return False
        atoms = self._atoms
        return all(
            any(c in atoms for c in _covering(a))
            for a in _atoms(perm.action, perm.kind, perm.namespace, perm.name)
        )

    def allows_stream(self, action: str, tenant: str, namespace: str, stream: str) -> bool:
        """Fast path for the broker: ``allows(action, f"stream:{tenant}/{namespace}/{stream}")``.

        The names are not validated (the frame decoder already did); a ``*`` passed
        here can only make the answer stricter, never looser.

        Raises:
            BadRequest: ``action`` is not a stream action.
        """
        if action not in STREAM_ACTIONS:
            raise BadRequest(f"{action!r} is not a stream action")
        if tenant != self.tenant:
            return False
        atoms = self._atoms
        return (
            (action, namespace, stream) in atoms
            or (action, namespace, WILDCARD) in atoms
            or (action, WILDCARD, WILDCARD) in atoms
        )

    def allows_cache(self, action: str, tenant: str, namespace: str, cache: str) -> bool:
        """Fast path for the broker: ``allows(action, f"cache:{tenant}/{namespace}/{cache}")``.

        Raises:
            BadRequest: ``action`` is not a cache action.
        """
        if action not in CACHE_ACTIONS:
            raise BadRequest(f"{action!r} is not a cache action")
        if tenant != self.tenant:
            return False
        atoms = self._atoms
        return (
            (action, namespace, cache) in atoms
            or (action, namespace, WILDCARD) in atoms
            or (action, WILDCARD, WILDCARD) in atoms
        )

    def check(self, action: str, obj: str) -> None:
        """Return if :meth:`allows`, else raise.

        Raises:
            PermissionDenied: the set does not allow ``action`` on ``obj``.
            BadRequest: as for :meth:`allows`.
        """
        if not self.allows(action, obj):
            raise PermissionDenied(f"permission denied: {action} on {obj}")

    def to_strings(self) -> list[str]:
        """The permissions as strings, sorted (the form carried in a token's ``perms``)."""
        return sorted(str(p) for p in self._perms)

    def __iter__(self) -> Iterator[Permission]:
        return iter(self._perms)

    def __len__(self) -> int:
        return len(self._perms)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermissionSet):
            return NotImplemented
        return self.tenant == other.tenant and set(self._perms) == set(other._perms)

    def __hash__(self) -> int:
        return hash((self.tenant, frozenset(self._perms)))

    def __repr__(self) -> str:
        return f"PermissionSet({self.tenant!r}, {self.to_strings()!r})"


def narrow(requested: Iterable[Permission | str], granted: PermissionSet) -> PermissionSet:
    """The requested permissions that ``granted`` implies, as a set in its tenant.

    A requested permission is kept whole if ``granted`` allows everything it allows,
    and dropped otherwise (also when it names another tenant); it is never cut down
    or replaced. So whatever the result allows, ``granted`` allows.

    Raises:
        BadRequest: a requested permission is malformed, or more than
            :data:`MAX_PERMISSIONS` were requested.
    """
    if isinstance(requested, str):
        raise BadRequest("requested permissions must be a list, not one string")
    kept: list[Permission] = []
    for count, p in enumerate(requested, 1):
        if count > MAX_PERMISSIONS:
            raise BadRequest(f"too many permissions requested: at most {MAX_PERMISSIONS}")
        perm = p if isinstance(p, Permission) else Permission.parse(p)
        if granted.implies(perm):
            kept.append(perm)
    return PermissionSet(granted.tenant, kept)
