"""The client's host policy (felix/client/_hosts.py): which hosts a cluster's REDIRECTs
and shard map may send it to, with its token."""

from __future__ import annotations

import pytest

from felix import wire
from felix.client import ClientOptions
from felix.client._cluster import Router
from felix.client._convert import Endpoint, ShmEndpoint
from felix.client._hosts import HostPolicy, parse_host_patterns
from felix.errors import ConfigError


def policy(host: str, patterns: list[str] | None = None, ca: bool = False) -> HostPolicy:
    return HostPolicy(Endpoint(host, 5000), patterns, pinned_ca=ca)


def test_the_bootstrap_host_is_always_allowed_on_any_port() -> None:
    for p in (policy("felix"), policy("10.0.0.1"), policy("a.b.c", ["10.0.0.0/8"])):
        assert p.allows(p._bootstrap_name or str(p._bootstrap_ip))
    assert policy("Felix.Example.COM.").allows("felix.example.com")
    assert policy("::1").allows("0:0::1")


def test_a_dns_bootstrap_allows_its_parent_domain() -> None:
    p = policy("felix.prod.example.com")
    assert p.allows("felix-1.prod.example.com")
    assert p.allows("FELIX-1.prod.example.com.")
    assert p.allows("a.b.prod.example.com")
    assert not p.allows("prod.example.com")
    assert not p.allows("evil.example.com")
    assert not p.allows("felix-1.prod.example.com.evil.net")
    assert not p.allows("xprod.example.com")
    assert not p.allows("10.0.0.1")
    assert "'*.prod.example.com'" in p.described


@pytest.mark.parametrize("host", ["felix", "felix.com", "felix-0.felix-peers"])
def test_a_short_dns_bootstrap_allows_only_itself(host: str) -> None:
    # Two labels: the parent would be a top-level domain (or a bare service name).
    p = policy(host)
    assert p.allows(host)
    assert not p.allows("evil.com") and not p.allows("felix-1.felix-peers")
    assert not p.allows("127.0.0.1")


def test_an_ip_bootstrap_allows_ip_literals_only_with_a_pinned_ca() -> None:
    bare = policy("10.0.0.1")
    assert not bare.allows("10.0.0.2") and not bare.allows("node.example.com")
    pinned = policy("10.0.0.1", ca=True)
    assert pinned.allows("10.0.0.2") and pinned.allows("192.168.1.1") and pinned.allows("fd00::1")
    assert not pinned.allows("node.example.com") and not pinned.allows("localhost")


def test_shared_memory_allows_loopback_hosts() -> None:
    p = HostPolicy(ShmEndpoint("/run/felix.sock"), None, pinned_ca=False)
    assert p.allows("127.0.0.1") and p.allows("127.0.0.2") and p.allows("::1")
    assert p.allows("localhost")
    assert not p.allows("10.0.0.1") and not p.allows("felix.example.com")


def test_cluster_hosts_replace_the_default() -> None:
    p = policy(
        "felix.prod.example.com",
        ["*.felix-peers.prod.svc.cluster.local", "10.0.0.0/8", "node-9.example.net", "fd00::7"],
    )
    assert p.allows("felix-0.felix-peers.prod.svc.cluster.local")
    assert not p.allows("felix-peers.prod.svc.cluster.local")
    assert p.allows("10.255.0.1") and not p.allows("11.0.0.1")
    assert p.allows("NODE-9.example.net") and not p.allows("node-10.example.net")
    assert p.allows("fd00::7") and not p.allows("fd00::8")
    assert not p.allows("felix-1.prod.example.com")  # the default is replaced
    assert p.allows("felix.prod.example.com")  # the bootstrap host stays
    assert policy("10.0.0.1", ["*"]).allows("anything.example")
    assert not policy("10.0.0.1", []).allows("10.0.0.2")


@pytest.mark.parametrize(
    "bad",
    ["", "  ", "*.com", "*.", "a.*.com", "host:5000", "10.0.0.0/33", "fe80::/200", "a b", 5],
)
def test_bad_patterns_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="cluster_hosts"):
        parse_host_patterns([bad])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="cluster_hosts"):
        ClientOptions(cluster_hosts=[bad])  # type: ignore[list-item]


def test_the_option_is_checked_and_kept_as_a_tuple() -> None:
    with pytest.raises(ConfigError, match="not one string"):
        ClientOptions(cluster_hosts="*.example.com")
    options = ClientOptions(cluster_hosts=["*.example.com", "10.0.0.0/8"])
    assert options.cluster_hosts == ("*.example.com", "10.0.0.0/8")
    assert ClientOptions().cluster_hosts is None
    hash(options)


def test_the_refusal_names_the_host_and_the_option() -> None:
    message = policy("10.0.0.1").refusal("evil.example:5000")
    assert "evil.example:5000" in message and "cluster_hosts" in message


# -- the router applies it ---------------------------------------------------------------------


def checked_router() -> Router:
    p = policy("node-0.felix.example.com")

    def check(address: str) -> str | None:
        host = address.rpartition(":")[0]
        return None if p.allows(host) else p.refusal(address)

    return Router(check)


def redirect(shard: int, epoch: int, owner: str) -> wire.Redirect:
    msg = wire.decode_ext(
        wire.decode_frame(wire.encode_redirect(9, shard, epoch, owner), extensions=True)
    )
    assert isinstance(msg, wire.Redirect)
    return msg


def shard_map(addresses: list[str], owners: list[int], epochs: list[int]) -> wire.ShardMap:
    frame = wire.encode_shard_map(1, len(owners), 1, addresses, owners, epochs)
    msg = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    assert isinstance(msg, wire.ShardMap)
    return msg


GOOD, EVIL = "node-1.felix.example.com:5000", "evil.example.net:5000"


def test_a_redirect_to_a_refused_host_fails_the_call_and_teaches_nothing() -> None:
    router = checked_router()
    with pytest.raises(ConfigError, match=r"shard 3: .*evil\.example\.net:5000.*cluster_hosts"):
        router.redirected(redirect(3, 1, EVIL), 0)
    assert router.redirects == 0
    assert router.learn(redirect(3, 1, EVIL)) is False
    assert router._early == {}
    assert router.redirected(redirect(3, 1, GOOD), 0) == GOOD


def test_map_entries_naming_refused_hosts_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    router = checked_router()
    router.learn(redirect(0, 1, GOOD))
    assert router.should_fetch(0.0)
    router.fetched(shard_map([GOOD, EVIL], [0, 1, 1, 0], [1, 1, 1, 1]), 0.0)
    assert router.map is not None
    assert router.map.owners == [GOOD, None, None, GOOD]
    assert router.map.epochs == [1, 0, 0, 1]
    assert EVIL not in router.map.addresses
    # A later map cannot put it back either, whatever its epochs; a good entry still wins.
    router.map.replace(shard_map([GOOD, EVIL], [1, 0, 1, 1], [9, 9, 9, 1]), router.allowed)
    assert router.map.owners == [GOOD, GOOD, None, GOOD]
    assert router.map.epochs == [1, 9, 0, 1]
    assert sum("evil.example.net:5000" in r.message for r in caplog.records) == 1  # once
