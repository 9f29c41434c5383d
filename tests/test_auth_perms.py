"""Tests for felix.auth.perms and felix.auth.rbac: parsing, implications, narrowing, grants.

The implication tests restate the rules of issue 5 independently of the code (the
``SPEC_*`` tables below) and compare every (grant, check) pair against them; the
property tests compare against a brute-force model over a small universe of names.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix.auth.perms import (
    ACTIONS,
    MAX_PERMISSION_CHARS,
    MAX_PERMISSIONS,
    Permission,
    PermissionSet,
    narrow,
    parse_object,
)
from felix.auth.rbac import Policy, RoleBinding, grant
from felix.errors import BadRequest, PermissionDenied

# -- the rules, restated from the issue ------------------------------------------------

STREAM = ["stream.publish", "stream.subscribe", "stream.consume", "stream.manage"]
CACHE = ["cache.read", "cache.write", "cache.manage"]
ALL_ACTIONS = [*STREAM, *CACHE, "ns.manage", "tenant.manage", "rbac.manage", "bridge.manage"]

SPEC_IMPLIES = {
    **{a: {a} for a in ALL_ACTIONS},
    "stream.manage": set(STREAM),
    "cache.manage": set(CACHE),
    "ns.manage": {*STREAM, *CACHE, "ns.manage"},
    # Data leaving the region is granted explicitly: tenant.manage does not imply it.
    "tenant.manage": set(ALL_ACTIONS) - {"rbac.manage", "bridge.manage"},
}
SPEC_TARGET = {
    **{a: "stream" for a in STREAM},
    **{a: "cache" for a in CACHE},
    "ns.manage": "namespace",
    "tenant.manage": "tenant",
    "rbac.manage": "tenant",
    "bridge.manage": "bridge",
}
# The object kinds a permission for an action may name: its target and its containers.
SPEC_GRANTABLE_KINDS = {
    "stream": {"stream", "namespace", "tenant"},
    "cache": {"cache", "namespace", "tenant"},
    "namespace": {"namespace", "tenant"},
    "tenant": {"tenant"},
    "bridge": {"bridge"},
}


def obj_parts(obj: str) -> tuple[str, list[str]]:
    kind, _, path = obj.partition(":")
    return kind, path.split("/")


def spec_covers(pattern: str, obj: str) -> bool:
    """Does object ``pattern`` (maybe with a trailing ``*``) contain concrete ``obj``?"""
    pkind, pseg = obj_parts(pattern)
    okind, oseg = obj_parts(obj)
    if pseg[0] != oseg[0]:
        return False  # another tenant: never
    if pkind == "tenant":
        return True
    if pkind == "bridge":
        return okind == "bridge" and pseg[1] in ("*", oseg[1])
    if pkind == "namespace":
        return okind not in ("tenant", "bridge") and pseg[1] in ("*", oseg[1])
    return pkind == okind and pseg[1] == oseg[1] and pseg[2] in ("*", oseg[2])


def spec_valid(action: str, obj: str) -> bool:
    return obj_parts(obj)[0] in SPEC_GRANTABLE_KINDS[SPEC_TARGET[action]]


def spec_allows(grants: list[tuple[str, str]], action: str, obj: str) -> bool:
    """Concrete check: some grant implies ``action`` and covers ``obj``."""
    assert obj_parts(obj)[0] == SPEC_TARGET[action]
    return any(action in SPEC_IMPLIES[ga] and spec_covers(go, obj) for ga, go in grants)


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "stream.publish:stream:acme/orders/eu",
        "stream.publish:stream:acme/orders/*",
        "stream.subscribe:namespace:acme/orders",
        "stream.consume:namespace:acme/*",
        "stream.manage:tenant:acme",
        "cache.read:cache:acme/ns/sessions",
        "cache.write:cache:acme/ns/*",
        "cache.manage:namespace:acme/ns",
        "ns.manage:namespace:acme/ns",
        "ns.manage:namespace:acme/*",
        "ns.manage:tenant:acme",
        "tenant.manage:tenant:acme",
        "rbac.manage:tenant:acme",
        "stream.publish:stream:a.b/c-d/e_f",
    ],
)
def test_valid_permissions_round_trip(text: str) -> None:
    perm = Permission.parse(text)
    assert str(perm) == text
    assert Permission.parse(str(perm)) == perm
    assert perm.object == text.split(":", 1)[1]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "ACTION:KIND:PATH"),
        ("stream.publish", "ACTION:KIND:PATH"),
        ("stream.publish:", "must start with"),
        ("stream.publish:stream", "must start with"),
        ("bogus:stream:acme/ns/s", "unknown action"),
        ("Stream.Publish:stream:acme/ns/s", "unknown action"),
        ("stream.*:stream:acme/ns/s", "unknown action"),
        ("*:stream:acme/ns/s", "unknown action"),
        ("stream.publish:queue:acme/ns/s", "must start with"),
        ("stream.publish:stream:acme/ns", "3 segment"),
        ("stream.publish:stream:acme/ns/s/x", "3 segment"),
        ("stream.publish:stream:acme", "3 segment"),
        ("tenant.manage:tenant:acme/ns", "1 segment"),
        ("stream.publish:stream:*/ns/s", "'*' is only allowed"),
        ("stream.publish:stream:acme/*/s", "'*' is only allowed"),
        ("stream.publish:stream:*/*/*", "'*' is only allowed"),
        ("tenant.manage:tenant:*", "'*' is only allowed"),
        ("ns.manage:namespace:*/*", "'*' is only allowed"),
        ("stream.publish:stream:acme/ns/s*", "bad character '*'"),
        ("stream.publish:stream:acme/ns/**", "bad first character '*'"),
        ("stream.publish:stream:acme/../s", "bad first character '.'"),
        ("stream.publish:stream:acme/ns/", "empty"),
        ("stream.publish:stream:acme//s", "empty"),
        ("stream.publish:stream:acme/ns/a b", "bad character ' '"),
        ("stream.publish:stream:acme/ns/s\n", "bad character"),
        ("stream.publish:stream:acme/ns/caf\u00e9", "bad character"),
        ("stream.publish:stream: acme/ns/s", "bad first character"),
        ("ns.manage:stream:acme/ns/s", "applies to namespace or tenant"),
        ("rbac.manage:namespace:acme/ns", "applies to tenant"),
        ("tenant.manage:namespace:acme/*", "applies to tenant"),
        ("cache.read:stream:acme/ns/s", "applies to cache or namespace or tenant"),
        ("stream.publish:cache:acme/ns/c", "applies to stream or namespace or tenant"),
        ("stream.publish:stream:acme/ns/" + "s" * 65, "too long"),
        ("stream.publish:stream:acme/ns/" + "s" * MAX_PERMISSION_CHARS, "too long"),
    ],
)
def test_invalid_permissions_are_refused(text: str, problem: str) -> None:
    with pytest.raises(BadRequest, match="invalid") as info:
        Permission.parse(text)
    assert problem in str(info.value)


def test_non_string_permission_is_refused() -> None:
    with pytest.raises(BadRequest, match="of type int"):
        Permission.parse(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        ("stream.publish", "stream", "acme", "", "s"),  # missing namespace
        ("stream.publish", "stream", "acme", "ns", ""),  # missing name
        ("stream.publish", "stream", "acme", "*", "s"),  # wildcard not last
        ("tenant.manage", "tenant", "acme", "ns", ""),  # extra segment
        ("tenant.manage", "tenant", "*", "", ""),  # wildcard tenant
        ("stream.publish", "stream", "acme", "n/s", "x"),  # separator inside a name
        ("nope", "stream", "acme", "ns", "s"),
    ],
)
def test_constructor_validates_like_parse(fields: tuple[str, str, str, str, str]) -> None:
    with pytest.raises(BadRequest):
        Permission(*fields)


@given(st.text(max_size=300))
def test_parse_returns_a_permission_or_raises_bad_request(text: str) -> None:
    try:
        perm = Permission.parse(text)
    except BadRequest:
        return
    assert str(perm) == text


def test_parse_object() -> None:
    assert parse_object("tenant:acme") == ("tenant", "acme", "", "")
    assert parse_object("namespace:acme/*") == ("namespace", "acme", "*", "")
    assert parse_object("cache:acme/ns/c") == ("cache", "acme", "ns", "c")
    with pytest.raises(BadRequest):
        parse_object("cache:acme/ns")


# -- implications, table-driven --------------------------------------------------------

T = "acme"
GRANT_OBJECTS = [
    "tenant:acme",
    "namespace:acme/ns1",
    "namespace:acme/*",
    "stream:acme/ns1/s1",
    "stream:acme/ns1/*",
    "cache:acme/ns1/c1",
    "cache:acme/ns1/*",
    "bridge:acme/b1",
    "bridge:acme/*",
]
# Concrete objects checks are made on: in and out of the granted namespace and name.
CHECK_OBJECTS = [
    "tenant:acme",
    "namespace:acme/ns1",
    "namespace:acme/ns2",
    "stream:acme/ns1/s1",
    "stream:acme/ns1/s2",
    "stream:acme/ns2/s1",
    "cache:acme/ns1/c1",
    "cache:acme/ns1/c2",
    "cache:acme/ns2/c1",
    "bridge:acme/b1",
    "bridge:acme/b2",
]
GRANTS = [(a, o) for a in ALL_ACTIONS for o in GRANT_OBJECTS]
CHECKS = [(a, o) for a in ALL_ACTIONS for o in CHECK_OBJECTS if obj_parts(o)[0] == SPEC_TARGET[a]]


@pytest.mark.parametrize(("action", "obj"), GRANTS, ids=[f"{a}:{o}" for a, o in GRANTS])
def test_every_grant_against_every_check(action: str, obj: str) -> None:
    text = f"{action}:{obj}"
    if not spec_valid(action, obj):
        with pytest.raises(BadRequest):
            Permission.parse(text)
        return
    perms = PermissionSet(T, [text])
    for check_action, check_obj in CHECKS:
        expected = spec_allows([(action, obj)], check_action, check_obj)
        assert perms.allows(check_action, check_obj) is expected, (text, check_action, check_obj)
        kind, tenant, ns, name = parse_object(check_obj)
        if kind == "stream":
            assert perms.allows_stream(check_action, tenant, ns, name) is expected
        if kind == "cache":
            assert perms.allows_cache(check_action, tenant, ns, name) is expected


# A few rows written out in full, so the table above is not the only statement.
@pytest.mark.parametrize(
    ("granted", "allowed", "denied"),
    [
        (
            "tenant.manage:tenant:acme",
            [
                ("tenant.manage", "tenant:acme"),
                ("ns.manage", "namespace:acme/any"),
                ("stream.manage", "stream:acme/any/s"),
                ("stream.consume", "stream:acme/x/y"),
                ("cache.manage", "cache:acme/any/c"),
                ("cache.read", "cache:acme/x/y"),
            ],
            [("rbac.manage", "tenant:acme"), ("stream.publish", "stream:other/x/y")],
        ),
        (
            "ns.manage:namespace:acme/orders",
            [
                ("ns.manage", "namespace:acme/orders"),
                ("stream.publish", "stream:acme/orders/eu"),
                ("stream.manage", "stream:acme/orders/eu"),
                ("cache.write", "cache:acme/orders/c"),
                ("cache.manage", "cache:acme/orders/c"),
            ],
            [
                ("ns.manage", "namespace:acme/billing"),
                ("stream.publish", "stream:acme/billing/eu"),
                ("tenant.manage", "tenant:acme"),
                ("rbac.manage", "tenant:acme"),
            ],
        ),
        (
            "stream.manage:namespace:acme/orders",
            [
                ("stream.publish", "stream:acme/orders/eu"),
                ("stream.subscribe", "stream:acme/orders/eu"),
                ("stream.consume", "stream:acme/orders/eu"),
                ("stream.manage", "stream:acme/orders/us"),
            ],
            [
                ("cache.read", "cache:acme/orders/c"),
                ("ns.manage", "namespace:acme/orders"),
                ("stream.publish", "stream:acme/billing/eu"),
            ],
        ),
        (
            "cache.manage:cache:acme/ns/c",
            [("cache.read", "cache:acme/ns/c"), ("cache.write", "cache:acme/ns/c")],
            [("cache.read", "cache:acme/ns/d"), ("stream.publish", "stream:acme/ns/c")],
        ),
        (
            "stream.publish:stream:acme/orders/eu",
            [("stream.publish", "stream:acme/orders/eu")],
            [
                ("stream.subscribe", "stream:acme/orders/eu"),
                ("stream.consume", "stream:acme/orders/eu"),
                ("stream.manage", "stream:acme/orders/eu"),
                ("stream.publish", "stream:acme/orders/us"),
                ("stream.publish", "stream:acme/orders/*"),
            ],
        ),
        (
            "rbac.manage:tenant:acme",
            [("rbac.manage", "tenant:acme")],
            [("tenant.manage", "tenant:acme"), ("ns.manage", "namespace:acme/ns")],
        ),
    ],
)
def test_implication_rows(
    granted: str, allowed: list[tuple[str, str]], denied: list[tuple[str, str]]
) -> None:
    perms = PermissionSet(T, [granted])
    for action, obj in allowed:
        assert perms.allows(action, obj), (granted, action, obj)
    for action, obj in denied:
        assert not perms.allows(action, obj), (granted, action, obj)


def test_wildcards_cover_every_name_and_only_that_level() -> None:
    perms = PermissionSet(T, ["stream.subscribe:stream:acme/orders/*"])
    assert perms.allows("stream.subscribe", "stream:acme/orders/any-name.0")
    assert perms.allows("stream.subscribe", "stream:acme/orders/*")  # the pattern itself
    assert perms.allows("stream.subscribe", "namespace:acme/orders")  # same streams
    assert not perms.allows("stream.subscribe", "namespace:acme/*")
    assert not perms.allows("stream.subscribe", "stream:acme/orders2/x")
    assert not perms.allows("stream.subscribe", "tenant:acme")

    every_ns = PermissionSet(T, ["stream.publish:namespace:acme/*"])
    assert every_ns.allows("stream.publish", "stream:acme/n9/s")
    assert every_ns.allows("stream.publish", "tenant:acme")  # every stream of the tenant
    assert not every_ns.allows("stream.subscribe", "stream:acme/n9/s")

    ns_admin = PermissionSet(T, ["ns.manage:namespace:acme/*"])
    assert ns_admin.allows("ns.manage", "tenant:acme")  # every namespace
    assert ns_admin.allows("cache.write", "cache:acme/n/c")
    assert not ns_admin.allows("tenant.manage", "tenant:acme")


def test_union_of_grants_can_imply_a_wider_request() -> None:
    perms = PermissionSet(T, ["stream.publish:namespace:acme/a", "stream.publish:namespace:acme/b"])
    assert perms.allows("stream.publish", "stream:acme/a/x")
    assert not perms.allows("stream.publish", "namespace:acme/*")


@pytest.mark.parametrize(
    "granted",
    [
        "tenant.manage:tenant:acme",
        "rbac.manage:tenant:acme",
        "ns.manage:namespace:acme/*",
        "stream.manage:tenant:acme",
        "cache.manage:tenant:acme",
    ],
)
def test_cross_tenant_is_always_denied(granted: str) -> None:
    perms = PermissionSet(T, [granted])
    for action, obj in CHECKS:
        for other in ("zeta", "acme2", "acm", "Acme", "acme.", "acme-"):
            foreign = obj.replace("acme", other, 1)
            assert not perms.allows(action, foreign), (granted, action, foreign)
    assert not perms.allows_stream("stream.publish", "zeta", "ns", "s")
    assert not perms.allows_cache("cache.read", "zeta", "ns", "c")
    assert not perms.allows("tenant.manage", "tenant:zeta")


def test_a_set_cannot_hold_another_tenants_permission() -> None:
    with pytest.raises(BadRequest, match="names tenant 'zeta', not 'acme'"):
        PermissionSet(T, ["stream.publish:stream:acme/a/b", "stream.publish:stream:zeta/a/b"])
    with pytest.raises(BadRequest):
        PermissionSet("*", [])
    with pytest.raises(BadRequest):
        PermissionSet("../x", [])


def test_checks_refuse_nonsense_instead_of_answering() -> None:
    perms = PermissionSet(T, ["tenant.manage:tenant:acme"])
    with pytest.raises(BadRequest):
        perms.allows("ns.manage", "stream:acme/a/b")
    with pytest.raises(BadRequest):
        perms.allows("stream.destroy", "stream:acme/a/b")
    with pytest.raises(BadRequest):
        perms.allows("stream.publish", "stream:acme/a")
    with pytest.raises(BadRequest):
        perms.allows_stream("cache.read", T, "a", "b")
    with pytest.raises(BadRequest):
        perms.allows_cache("stream.publish", T, "a", "b")


def test_fast_path_wildcard_arguments_never_loosen() -> None:
    # The broker passes validated names, but a stray '*' must not match more.
    perms = PermissionSet(T, ["stream.publish:stream:acme/a/x"])
    assert not perms.allows_stream("stream.publish", T, "a", "*")
    assert not perms.allows_stream("stream.publish", T, "*", "x")
    assert not perms.allows_stream("stream.publish", T, "*", "*")
    assert not perms.allows_stream("stream.publish", "*", "a", "x")


def test_check_raises_permission_denied() -> None:
    perms = PermissionSet(T, ["cache.read:cache:acme/ns/c"])
    perms.check("cache.read", "cache:acme/ns/c")
    with pytest.raises(PermissionDenied, match=r"cache\.write on cache:acme/ns/c"):
        perms.check("cache.write", "cache:acme/ns/c")


def test_empty_set_denies_everything() -> None:
    perms = PermissionSet(T)
    assert len(perms) == 0
    assert not any(perms.allows(a, o) for a, o in CHECKS)


def test_set_value_semantics_and_strings() -> None:
    a = PermissionSet(T, ["stream.publish:stream:acme/a/b", "cache.read:cache:acme/a/c"])
    b = PermissionSet(T, ["cache.read:cache:acme/a/c", "stream.publish:stream:acme/a/b"] * 2)
    assert a == b and hash(a) == hash(b) and len(b) == 2
    assert a.to_strings() == ["cache.read:cache:acme/a/c", "stream.publish:stream:acme/a/b"]
    assert PermissionSet(T, a) == a
    assert a != PermissionSet("zeta", [])


def test_limits() -> None:
    many = [f"stream.publish:stream:acme/ns/s{i}" for i in range(MAX_PERMISSIONS + 1)]
    assert len(PermissionSet(T, many[:MAX_PERMISSIONS])) == MAX_PERMISSIONS
    with pytest.raises(BadRequest, match="too many"):
        PermissionSet(T, many)
    granted = PermissionSet(T, ["tenant.manage:tenant:acme"])
    with pytest.raises(BadRequest, match="too many"):
        narrow(many, granted)


def test_memoised_answers_stay_correct() -> None:
    perms = PermissionSet(T, ["stream.publish:stream:acme/ns/*"])
    for _ in range(2):
        for i in range(5000):  # more than the memo holds, so it is cleared on the way
            assert perms.allows("stream.publish", f"stream:acme/ns/s{i}")
            assert not perms.allows("stream.publish", f"stream:acme/other/s{i}")


def test_hot_path_is_cheap() -> None:
    perms = PermissionSet(
        T, [f"stream.publish:stream:acme/ns{i}/*" for i in range(200)] + ["cache.read:tenant:acme"]
    )
    start = time.perf_counter()
    for _ in range(100_000):
        perms.allows_stream("stream.publish", T, "ns150", "orders")
    elapsed = time.perf_counter() - start
    # ~0.2 us per check on a laptop; the bound only catches an accidental linear scan.
    assert elapsed < 1.0, elapsed


# -- narrowing -------------------------------------------------------------------------


def test_narrow_keeps_only_what_the_grant_implies() -> None:
    granted = PermissionSet(T, ["stream.manage:namespace:acme/orders", "cache.read:tenant:acme"])
    requested = [
        "stream.publish:stream:acme/orders/eu",  # kept: implied by stream.manage
        "stream.manage:stream:acme/orders/*",  # kept: the same streams
        "stream.publish:namespace:acme/*",  # dropped: wider than orders
        "cache.write:cache:acme/ns/c",  # dropped: only read was granted
        "cache.read:cache:acme/ns/c",  # kept
        "ns.manage:namespace:acme/orders",  # dropped: stream.manage does not imply it
        "stream.publish:stream:zeta/orders/eu",  # dropped: another tenant
        "rbac.manage:tenant:acme",  # dropped
    ]
    narrowed = narrow(requested, granted)
    assert narrowed.to_strings() == [
        "cache.read:cache:acme/ns/c",
        "stream.manage:stream:acme/orders/*",
        "stream.publish:stream:acme/orders/eu",
    ]
    assert narrowed.tenant == T
    assert narrow([], granted) == PermissionSet(T)
    assert narrow(granted, granted) == granted


def test_narrow_refuses_malformed_requests() -> None:
    with pytest.raises(BadRequest):
        narrow(["stream.publish:stream:acme/*/x"], PermissionSet(T, ["tenant.manage:tenant:acme"]))


# The universe for the model: names permissions may use, and a fresh name nobody
# mentions, which stands for every other name (wildcards must cover it).
U_TENANTS = ["acme", "zeta"]
U_NAMESPACES = ["n1", "n2"]
U_NAMES = ["x", "y"]
FRESH = "fresh"


def _all_permissions() -> list[str]:
    out = []
    for action, tenant in itertools.product(ALL_ACTIONS, U_TENANTS):
        objs = [f"tenant:{tenant}"]
        objs += [f"namespace:{tenant}/{ns}" for ns in [*U_NAMESPACES, "*"]]
        for kind in ("stream", "cache"):
            objs += [f"{kind}:{tenant}/{ns}/{n}" for ns in U_NAMESPACES for n in [*U_NAMES, "*"]]
        objs += [f"bridge:{tenant}/{n}" for n in [*U_NAMES, "*"]]
        out += [f"{action}:{o}" for o in objs if spec_valid(action, o)]
    return out


def _concrete_objects() -> list[str]:
    out = []
    for tenant in U_TENANTS:
        out.append(f"tenant:{tenant}")
        for ns in [*U_NAMESPACES, FRESH]:
            out.append(f"namespace:{tenant}/{ns}")
            for kind in ("stream", "cache"):
                out += [f"{kind}:{tenant}/{ns}/{n}" for n in [*U_NAMES, FRESH]]
        out += [f"bridge:{tenant}/{n}" for n in [*U_NAMES, FRESH]]
    return out


ALL_PERMS = _all_permissions()
ACME_PERMS = [p for p in ALL_PERMS if ":acme" in p]
CONCRETE = [
    (a, o) for a in ALL_ACTIONS for o in _concrete_objects() if obj_parts(o)[0] == SPEC_TARGET[a]
]


def _spec_concrete(perm: str) -> frozenset[tuple[str, str]]:
    """Every concrete (action, object) of the universe that ``perm`` allows."""
    action, _, obj = perm.partition(":")
    return frozenset(
        (a, o) for a, o in CONCRETE if a in SPEC_IMPLIES[action] and spec_covers(obj, o)
    )


SPEC_CONCRETE = {p: _spec_concrete(p) for p in ALL_PERMS}


def test_model_universe_is_complete() -> None:
    assert len(ALL_PERMS) == 2 * len(ACME_PERMS)
    assert {p.partition(":")[0] for p in ALL_PERMS} == ACTIONS
    for p in ALL_PERMS:
        Permission.parse(p)


@settings(max_examples=300, deadline=None)
@given(
    granted=st.lists(st.sampled_from(ACME_PERMS), max_size=6),
    requested=st.lists(st.sampled_from(ALL_PERMS), max_size=8),
)
def test_narrow_never_widens_and_matches_the_model(
    granted: list[str], requested: list[str]
) -> None:
    grant_set = PermissionSet(T, granted)
    narrowed = narrow(requested, grant_set)
    allowed_by_grant = frozenset().union(*(SPEC_CONCRETE[g] for g in granted))
    # Soundness: whatever the narrowed set allows, the grant allows.
    for perm in ALL_PERMS:
        action, _, obj = perm.partition(":")
        if narrowed.allows(action, obj):
            assert grant_set.allows(action, obj), perm
    for action, obj in CONCRETE:
        if narrowed.allows(action, obj):
            assert (action, obj) in allowed_by_grant
        # And the set answers concrete checks exactly as the model does.
        assert grant_set.allows(action, obj) is ((action, obj) in allowed_by_grant)
    # Exactness: a requested permission is kept iff everything it allows is granted.
    kept = set(narrowed.to_strings())
    for perm in requested:
        assert (perm in kept) is (SPEC_CONCRETE[perm] <= allowed_by_grant), perm
    assert kept <= set(requested)


# -- RBAC ------------------------------------------------------------------------------

POLICIES = [
    Policy.create(T, "readers", ["stream.subscribe:namespace:acme/*", "cache.read:tenant:acme"]),
    Policy.create(T, "orders-writers", ["stream.publish:namespace:acme/orders"]),
    Policy.create(T, "admin", ["tenant.manage:tenant:acme", "rbac.manage:tenant:acme"]),
    Policy.create("zeta", "readers", ["tenant.manage:tenant:zeta"]),
]


def test_policy_validation() -> None:
    with pytest.raises(BadRequest, match="names tenant 'zeta'"):
        Policy.create(T, "p", ["stream.publish:stream:zeta/a/b"])
    with pytest.raises(BadRequest):
        Policy.create(T, "bad name", [])
    with pytest.raises(BadRequest):
        Policy.create("*", "p", [])
    with pytest.raises(BadRequest, match="must be a list"):
        Policy(T, "p", "stream.publish:stream:acme/a/b")  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        Policy.create(T, "p", ["stream.publish:stream:acme/*/b"])
    policy = POLICIES[0]
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(BadRequest, match="missing permissions"):
        Policy.from_dict({"tenant": T, "name": "p"})
    with pytest.raises(BadRequest, match="unknown field"):
        Policy.from_dict({"tenant": T, "name": "p", "permissions": [], "extra": 1})
    with pytest.raises(BadRequest):
        Policy.from_dict({"tenant": T, "name": "p", "permissions": [7]})


def test_role_binding_subjects() -> None:
    assert (
        RoleBinding("group:eng", ("readers",)).kind,
        RoleBinding("group:eng", ("r",)).principal,
    ) == (
        "group",
        "eng",
    )
    assert RoleBinding("auth0|42", ("readers",)).kind == "user"
    assert RoleBinding("user:group:x", ("readers",)).principal == "group:x"
    assert RoleBinding("mailto:a@b", ("readers",)).principal == "mailto:a@b"
    for subject in ("", "group:", "user:", "a\nb", "x" * 257):
        with pytest.raises(BadRequest):
            RoleBinding(subject, ("readers",))
    with pytest.raises(BadRequest):
        RoleBinding("alice", ())
    with pytest.raises(BadRequest):
        RoleBinding("alice", ("no such/name",))
    with pytest.raises(BadRequest):
        RoleBinding("alice", "readers")  # type: ignore[arg-type]
    binding = RoleBinding("group:eng", ("readers", "admin"), issuer="https://idp")
    assert RoleBinding.from_dict(binding.to_dict()) == binding
    assert RoleBinding.from_dict({"subject": "bob", "policies": ["readers"]}).issuer is None


def test_grant_unions_user_and_group_policies() -> None:
    bindings = [
        RoleBinding("group:eng", ("readers",)),
        RoleBinding("alice", ("orders-writers",)),
        RoleBinding("group:root", ("admin",)),
    ]
    alice = grant(bindings, POLICIES, "alice", ["eng"], T)
    assert alice.to_strings() == sorted(
        [
            "stream.subscribe:namespace:acme/*",
            "cache.read:tenant:acme",
            "stream.publish:namespace:acme/orders",
        ]
    )
    bob = grant(bindings, POLICIES, "bob", ["eng"], T)
    assert not bob.allows("stream.publish", "stream:acme/orders/eu")
    assert bob.allows("stream.subscribe", "stream:acme/orders/eu")
    root = grant(bindings, POLICIES, "carol", ["root"], T)
    assert root.allows("rbac.manage", "tenant:acme")


def test_grant_denies_by_default() -> None:
    bindings = [RoleBinding("group:eng", ("readers", "missing-policy"))]
    assert len(grant([], POLICIES, "alice", ["eng"], T)) == 0
    assert len(grant(bindings, [], "alice", ["eng"], T)) == 0
    assert len(grant(bindings, POLICIES, "alice", ["other"], T)) == 0
    # A missing policy grants nothing; the rest of the binding still applies.
    assert len(grant(bindings, POLICIES, "alice", ["eng"], T)) == 2


def test_grant_never_crosses_tenants() -> None:
    # zeta's "readers" policy grants tenant.manage in zeta; binding "readers" in acme
    # must pick acme's policy only, and a zeta grant cannot come out of it.
    bindings = [RoleBinding("group:eng", ("readers",))]
    perms = grant(bindings, POLICIES, "alice", ["eng"], T)
    assert perms.tenant == T
    assert not perms.allows("tenant.manage", "tenant:zeta")
    assert grant(bindings, POLICIES, "alice", ["eng"], "zeta").to_strings() == [
        "tenant.manage:tenant:zeta"
    ]


def test_group_named_subjects_do_not_confuse_users_and_groups() -> None:
    bindings = [RoleBinding("group:admins", ("admin",))]
    # A user whose sub is literally "group:admins" is not in the admins group.
    assert len(grant(bindings, POLICIES, "group:admins", [], T)) == 0
    # And a group called "alice" does not make you the user alice.
    assert len(grant([RoleBinding("alice", ("admin",))], POLICIES, "bob", ["alice"], T)) == 0


def test_grant_with_issuer_pinned_bindings() -> None:
    bindings = [RoleBinding("alice", ("admin",), issuer="https://idp-a")]
    assert len(grant(bindings, POLICIES, "alice", [], T, issuer="https://idp-a")) == 2
    assert len(grant(bindings, POLICIES, "alice", [], T, issuer="https://idp-b")) == 0
    assert len(grant(bindings, POLICIES, "alice", [], T)) == 0


def test_grant_refuses_duplicate_policy_names() -> None:
    dup = [*POLICIES, Policy.create(T, "admin", [])]
    with pytest.raises(BadRequest, match="two policies named 'admin'"):
        grant([RoleBinding("alice", ("admin",))], dup, "alice", [], T)
