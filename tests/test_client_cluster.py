"""The client's cluster routing, sans-IO (felix/client/_cluster.py): the shard map, where a
request goes, what a REDIRECT does, when the map is fetched."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest

from felix import wire
from felix.client._cluster import (
    MAP_INTERVAL,
    MAP_RETRY,
    MAX_EARLY,
    MAX_EPOCH_JUMP,
    MAX_REDIRECTS,
    Redirected,
    Router,
    ShardMap,
    logical_shard,
    parse_address,
)
from felix.client._connection import expect_reply
from felix.client._convert import Endpoint
from felix.cluster.ownership import logical_shard as node_logical_shard
from felix.errors import ConnectionLost, NotFound, RemoteProtocolError, Unavailable

A, B, C = "10.0.0.1:5000", "10.0.0.2:5000", "node-2.felix:5000"
NO = wire.SHARD_NO_OWNER


def reply_map(
    logical: int, version: int, addresses: list[str], owners: list[int], epochs: list[int]
) -> wire.ShardMap:
    frame = wire.encode_shard_map(1, logical, version, addresses, owners, epochs)
    msg = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    assert isinstance(msg, wire.ShardMap)
    return msg


def redirect(shard: int, epoch: int, owner: str) -> wire.Redirect:
    msg = wire.decode_ext(
        wire.decode_frame(wire.encode_redirect(9, shard, epoch, owner), extensions=True)
    )
    assert isinstance(msg, wire.Redirect)
    return msg


def key_in(shard: int, logical: int, prefix: str = "acme/prod/s") -> str:
    """A routing key whose logical shard is ``shard``."""
    for i in range(100_000):
        key = f"{prefix}{i}"
        if zlib.crc32(key.encode()) % logical == shard:
            return key
    raise AssertionError("no key found")


# -- the pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["acme/prod/orders", "t/n/cache/k", "é/ü/ß", ""])
@pytest.mark.parametrize("logical", [1, 7, 256, 4096])
def test_logical_shard_is_the_nodes(key: str, logical: int) -> None:
    assert logical_shard(key, logical) == node_logical_shard(key, logical)
    assert logical_shard(key, logical) == zlib.crc32(key.encode()) % logical


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:5000") == Endpoint("10.0.0.1", 5000)
    assert parse_address("node-0.felix.svc:7000") == Endpoint("node-0.felix.svc", 7000)
    assert parse_address("[::1]:5000") == Endpoint("::1", 5000)
    assert parse_address("localhost:65535") == Endpoint("localhost", 65535)


@pytest.mark.parametrize(
    "bad", ["", "host", "host:", ":5000", "::1:5000", "[]:5000", "h:0", "h:65536", "h:x", "h:-1"]
)
def test_parse_address_refuses(bad: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_address(bad)


def test_expect_reply_raises_redirected_an_unavailable() -> None:
    with pytest.raises(Redirected) as info:
        expect_reply(redirect(3, 17, B), wire.PublishOffsets, wire.OP_PUBLISH_OFFSETS)
    assert isinstance(info.value, Unavailable) and info.value.retryable
    assert info.value.redirect.owner == B and info.value.redirect.shard == 3
    assert "redirected to 10.0.0.2:5000 (shard 3, epoch 17)" in str(info.value)


# -- ShardMap --------------------------------------------------------------------------------


def test_map_from_reply_and_route() -> None:
    m = ShardMap.from_reply(reply_map(4, 7, [A, B], [0, 1, NO, 1], [1, 2, 3, 4]))
    assert (m.logical_shards, m.version) == (4, 7)
    assert m.owners == [A, B, None, B] and m.epochs == [1, 2, 3, 4]
    assert m.addresses == {A, B}
    for shard, owner in enumerate([A, B, None, B]):
        key = key_in(shard, 4)
        assert m.shard(key) == shard and m.route(key) == owner


def test_learn_takes_an_equal_or_newer_epoch() -> None:
    m = ShardMap.from_reply(reply_map(2, 1, [A, B], [0, 1], [5, 5]))
    assert not m.learn(redirect(0, 4, B))  # older: ignored
    assert m.owners[0] == A and m.epochs[0] == 5
    assert m.learn(redirect(0, 5, C))  # equal epoch: the redirect is the fresher word
    assert m.owners[0] == C
    assert not m.learn(redirect(0, 5, C))  # nothing new
    assert m.learn(redirect(0, 6, B)) and (m.owners[0], m.epochs[0]) == (B, 6)
    assert not m.learn(redirect(2, 9, A))  # not a shard of this map
    assert m.owners == [B, B]


def test_replace_merges_by_epoch_then_version() -> None:
    m = ShardMap.from_reply(reply_map(3, 10, [A, B], [0, 1, 0], [4, 4, 4]))
    # Another node's map, older version: a higher epoch still wins, a lower one never,
    # an equal one only from a map at least as new.
    assert m.replace(reply_map(3, 2, [C, B], [0, 0, NO], [5, 3, 4]))
    assert m.owners == [C, B, A] and m.epochs == [5, 4, 4] and m.version == 10
    assert m.replace(reply_map(3, 11, [B], [0, 0, NO], [5, 4, 4]))
    assert m.owners == [B, B, None] and m.version == 11
    assert not m.replace(reply_map(3, 11, [B], [0, 0, NO], [5, 4, 4]))
    # Another number of logical shards: another cluster's map, taken whole.
    assert m.replace(reply_map(2, 1, [A], [0, 0], [1, 1]))
    assert (m.logical_shards, m.owners, m.epochs, m.version) == (2, [A, A], [1, 1], 1)


# -- Router ----------------------------------------------------------------------------------


def test_a_router_without_redirects_routes_nothing_and_fetches_nothing() -> None:
    r = Router()
    assert r.map is None and not r.clustered
    assert r.route("acme/prod/orders") is None
    assert not r.should_fetch(0.0)
    assert not r.reroutes(Unavailable("shard 1 restarting"))
    assert not r.reroutes(NotFound("gone"))


def test_redirects_are_followed_four_times_in_a_row() -> None:
    r = Router()
    assert r.redirected(redirect(3, 1, B), 0) == B
    assert r.clustered and r.redirects == 1
    for followed in range(1, MAX_REDIRECTS):
        assert r.redirected(redirect(3, 1 + followed, A if followed % 2 else B), followed)
    assert r.redirects == MAX_REDIRECTS
    with pytest.raises(Unavailable) as info:
        r.redirected(redirect(3, 9, C), MAX_REDIRECTS)
    assert "shard 3" in str(info.value) and C in str(info.value)
    assert r.redirects == MAX_REDIRECTS


def test_the_map_is_fetched_once_after_the_first_redirect() -> None:
    r = Router()
    r.redirected(redirect(1, 3, B), 0)
    r.redirected(redirect(2, 1, A), 0)
    assert r.should_fetch(0.0)
    assert not r.should_fetch(0.0)  # one in flight
    # Redirects that came before the map are applied to it (a newer epoch wins).
    r.redirected(redirect(1, 4, C), 0)
    assert r.fetched(reply_map(4, 1, [A, B], [0, 0, 0, 1], [1, 3, 0, 2]), 0.5)
    assert r.map is not None and r.maps == 1
    assert r.map.owners == [A, C, A, B] and r.map.epochs == [1, 4, 1, 2]
    assert r.route(key_in(3, 4)) == B and r.route(key_in(1, 4)) == C
    assert not r.should_fetch(100.0)  # the map is current: REDIRECTs keep it so
    r.learn(redirect(3, 3, A))
    assert r.route(key_in(3, 4)) == A
    assert not r.should_fetch(100.0)
    # A REDIRECT for a shard the map does not have: the map is stale, fetch it again.
    r.learn(redirect(7, 1, A))
    assert r.should_fetch(100.0)
    assert r.fetched(reply_map(8, 2, [A], [0] * 8, [1] * 8), 100.0)
    assert r.map.logical_shards == 8 and not r.should_fetch(200.0)


def test_a_failed_fetch_is_retried_later() -> None:
    r = Router()
    r.redirected(redirect(0, 1, B), 0)
    assert r.should_fetch(10.0)
    r.fetch_failed(10.0)
    assert not r.should_fetch(10.0 + MAP_RETRY - 0.1)
    assert r.should_fetch(10.0 + MAP_RETRY)
    # A node that is not in a cluster answers L = 0: no map, redirects still followed.
    assert not r.fetched(reply_map(0, 0, [], [], []), 20.0)
    assert r.map is None and r.route("acme/prod/x") is None
    assert not r.should_fetch(20.0 + MAP_RETRY - 0.1)
    assert r.should_fetch(20.0 + MAP_RETRY)


def test_stray_redirects_put_the_router_in_cluster_mode() -> None:
    r = Router()
    r.learn(redirect(0, 1, B))  # e.g. the answer to a publish with ack=False
    assert r.clustered and r.redirects == 0 and r.should_fetch(0.0)


def test_which_ends_reroute() -> None:
    r = Router()
    assert not r.reroutes(Unavailable("group g was removed"))
    assert r.reroutes(Unavailable("shard 3 moved to node-1"))  # says so: a cluster
    assert r.clustered
    assert r.reroutes(Unavailable("the broker reset the event stream (code 0)"))
    assert not r.reroutes(NotFound("stream deleted"))
    assert not r.reroutes(ConnectionLost("gone"))
    assert not r.reroutes(None)


def test_a_call_converges_on_the_owner() -> None:
    """The client's loop, played against a cluster's verdicts: the first call is redirected
    once; after the map arrives calls go straight to their owners; an ownership change
    costs one REDIRECT, and a ping-pong between stale nodes ends with Unavailable."""
    logical = 16
    nodes = [A, B, C]
    owners = [nodes[s % 3] for s in range(logical)]
    epochs = [1] * logical
    bootstrap = A

    def node_answer(at: str, key: str) -> wire.Redirect | None:
        shard = logical_shard(key, logical)
        return None if owners[shard] == at else redirect(shard, epochs[shard], owners[shard])

    def call(
        r: Router, key: str, answer_of: Callable[[str, str], wire.Redirect | None]
    ) -> tuple[str, int]:
        at = r.route(key) or bootstrap
        followed = 0
        while (answer := answer_of(at, key)) is not None:
            at = r.redirected(answer, followed)
            followed += 1
        return at, followed

    r = Router()
    key = key_in(1, logical)  # owned by B
    assert call(r, key, node_answer) == (B, 1)
    assert r.should_fetch(0.0)
    r.fetched(reply_map(logical, 1, nodes, [nodes.index(o) for o in owners], epochs), 0.0)
    for shard in range(logical):
        assert call(r, key_in(shard, logical), node_answer) == (owners[shard], 0)
    # Shard 1 moves to C (epoch 2): one REDIRECT from B, then straight to C.
    owners[1], epochs[1] = C, 2
    assert call(r, key, node_answer) == (C, 1)
    assert call(r, key, node_answer) == (C, 0)
    # Nodes that disagree forever: the call gives up after MAX_REDIRECTS.
    flip = iter(range(100))

    def confused(at: str, key: str) -> wire.Redirect | None:
        return redirect(1, 2, A if next(flip) % 2 else B)

    with pytest.raises(Unavailable, match="shard 1"):
        call(r, key, confused)


def test_redirects_before_the_map_are_bounded() -> None:
    router = Router()
    router.learn(redirect(2**32 - 1, 1, A))  # fits no map: not kept
    router.learn(redirect(MAX_EARLY, 1, A))
    assert router._early == {} and router.clustered
    for shard in range(0, 2**32, 100_000):  # a node naming every shard it can
        router.learn(redirect(shard, 1, A))
    assert len(router._early) <= MAX_EARLY
    router.learn(redirect(0, 2, B))  # renewed: the newest now
    assert list(router._early)[-1] == 0
    router.learn(redirect(0, 1, C))  # older than what is kept: ignored
    assert router._early[0].owner == B


def test_an_epoch_far_above_the_known_one_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    shard_map = ShardMap.from_reply(reply_map(2, 1, [A, B], [0, 1], [3, 3]))
    assert not shard_map.learn(redirect(0, 3 + MAX_EPOCH_JUMP + 1, B))
    assert not shard_map.learn(redirect(0, 2**64 - 1, B))
    assert shard_map.owners == [A, B] and shard_map.refused_epochs == 2
    assert shard_map.learn(redirect(0, 3 + MAX_EPOCH_JUMP, B))
    assert shard_map.owners == [B, B]
    assert not shard_map.replace(reply_map(2, 9, [C], [0, 0], [2**64 - 1, 2**40]))
    assert shard_map.owners == [B, B] and shard_map.refused_epochs == 4
    assert sum("more than" in r.message for r in caplog.records) == 1  # logged once


def test_a_redirect_loop_takes_the_bootstrap_nodes_map_whole() -> None:
    router = Router()
    router.learn(redirect(0, 1, A))
    assert router.should_fetch(0.0)
    router.fetched(reply_map(2, 1, [A, B], [0, 1], [1, 1]), 0.0)
    # A bad entry within the bound: a newer epoch always wins, so it would stay.
    router.learn(redirect(1, 500, C))
    assert router.map is not None and router.map.owners == [A, C]
    assert not router.should_fetch(1.0, bootstrap=True)  # nothing asks for a map
    router.looped()  # a call went A -> B -> A
    assert router.reset_wanted
    assert not router.should_fetch(1.0)  # only the bootstrap node's map is taken whole
    assert router.should_fetch(1.0, bootstrap=True)
    assert router.fetched(reply_map(2, 1, [A, B], [0, 1], [1, 1]), 1.0, bootstrap=True)
    assert router.map.owners == [A, B] and router.map.epochs == [1, 1]
    assert router.resets == 1 and not router.reset_wanted


def test_a_redirect_at_an_older_epoch_than_the_maps_asks_for_the_map_whole() -> None:
    router = Router()
    router.learn(redirect(0, 1, A))
    assert router.should_fetch(0.0)
    router.fetched(reply_map(2, 1, [A, B], [0, 1], [1, 1]), 0.0)
    router.learn(redirect(1, 500, C))  # the bad entry
    # C says it is not the owner, A is, at epoch 1: followed, not learned.
    assert router.redirected(redirect(1, 1, A), 0) == A
    assert router.map is not None and router.map.owners == [A, C]
    assert router.reset_wanted


def test_map_fetches_are_one_in_flight_and_one_a_second_per_node() -> None:
    r = Router()
    r.learn(redirect(0, 1, A))
    assert r.fetch_wait(0.0, node=A) == 0.0
    assert r.fetch_wait(0.0, node=A) is None  # in flight there
    assert r.fetch_wait(0.0, node=B) == 0.0  # another node may be asked meanwhile
    r.fetch_failed(0.1, A)  # (fails: every node waits MAP_RETRY)
    assert r.fetch_wait(0.2, node=C) is None
    assert r.fetch_wait(MAP_RETRY + 0.1, node=A) == 0.0
    # A map that keeps going stale (REDIRECTs naming shards beyond it): at most one
    # fetch a second from a node, however many REDIRECTs come.
    r = Router()
    r.learn(redirect(0, 1, A))
    now = 100.0
    assert r.should_fetch(now, node=A)
    r.fetched(reply_map(2, 1, [A], [0, 0], [1, 1]), now + 0.01, node=A)
    asked = 1
    for step in range(1, 300):
        t = now + step * 0.01
        r.learn(redirect(5, 1, A))  # beyond the map: stale
        wait = r.fetch_wait(t, node=A)
        if wait == 0.0:
            asked += 1
            r.fetched(reply_map(2, 1, [A], [0, 0], [1, 1]), t, node=A)
        else:
            assert wait is not None and 0.0 < wait <= MAP_INTERVAL
    assert asked == 3  # at 100, 101 and 102 (300 REDIRECTs over 3 s)
