"""Durable streams in the shard core against a model: random publishes, fsync rounds,
kill -9 (files intact) and power losses (each segment cut back to what was fsynced,
or anywhere past it), then a restart on the same directory. Checked every time:
every record acked SYNCED is back, every record acked WRITTEN is back after a kill,
no offset is ever issued twice, and a reader sees exactly the surviving records in
offset order (lost or never-assigned offsets only as gaps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix import wire
from felix.shard.core import ShardCore
from felix.shard.stream_log import StreamSettings
from tests.test_shard_durable import KEY, NS, T, _request, consume, make, replies, send, store_of

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 4)),
        st.tuples(st.just("sync"), st.just(0)),
        st.tuples(st.just("kill"), st.just(0)),
        st.tuples(st.just("power"), st.integers(0, 100)),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("fsync", ["none", "interval", "commit"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_acked_records_survive_what_their_ack_promised(
    tmp_path_factory: pytest.TempPathFactory, fsync: str, ops: list[tuple[str, int]]
) -> None:
    tmp: Path = tmp_path_factory.mktemp("model")
    hot = StreamSettings(replay_max_records=3)  # most reads come from disk

    def open_core() -> ShardCore:
        return make(tmp, fsync=fsync, stream_defaults=hot, segment_bytes=1 << 20)

    c = open_core()
    issued: set[int] = set()  # every offset any ack ever carried
    must_keep: dict[int, bytes] = {}  # records whose ack promised to survive the next fault
    written: dict[int, bytes] = {}  # acked WRITTEN, not yet known synced
    pending: dict[int, tuple[int, bytes]] = {}  # commit publishes waiting: token -> record
    synced_size = 0  # bytes of the segment covered by the last fsync round
    counter = 0
    token = 0
    for op, arg in ops:
        if op == "publish":
            for _ in range(arg):
                token += 1
                counter += 1
                payload = b"p%d" % counter
                send(c, wire.encode_publish(token, T, NS, "s", [payload]), token=token)
                pending[token] = (-1, payload)
            for tok, ack in replies(c):
                _, payload = pending.pop(tok)
                assert ack.base_offset not in issued  # never reused
                issued.add(ack.base_offset)
                if ack.durability == wire.DURABILITY_SYNCED:
                    must_keep[ack.base_offset] = payload
                else:
                    assert ack.durability == wire.DURABILITY_WRITTEN and fsync != "commit"
                    written[ack.base_offset] = payload
        elif op == "sync":
            store = store_of(c)
            store.due(float("inf"))  # interval: whatever is due
            for s in store.take_syncs():
                c.sync_done(s, s.log.sync(), 0.001)
            for tok, ack in replies(c):
                _, payload = pending.pop(tok)
                assert ack.base_offset not in issued
                issued.add(ack.base_offset)
                assert ack.durability == wire.DURABILITY_SYNCED
                must_keep[ack.base_offset] = payload
            if KEY in store.streams:
                disk = store.streams[KEY]
                synced_size = _segment(tmp).stat().st_size
                for offset in [o for o in written if o < disk.log.synced_offset]:
                    must_keep[offset] = written.pop(offset)
        else:
            seg = _segment(tmp) if (tmp / "streams").exists() else None
            if op == "power" and seg is not None:
                # Every byte past the last fsync may or may not have reached the disk.
                size = seg.stat().st_size
                os.truncate(seg, synced_size + (size - synced_size) * arg // 100)
            else:  # kill -9: what was written is in the page cache, it all survives
                must_keep.update(written)
            written.clear()
            pending.clear()  # their publishers got Unavailable (never acked)
            c = open_core()
            if seg is not None:
                synced_size = _segment(tmp).stat().st_size  # open syncs what it recovered
            _check(c, must_keep, issued)
    _check(c, must_keep, issued)


def _segment(tmp: Path) -> Path:
    (seg,) = (tmp / "streams" / T / NS / "s").glob("*.seg")
    return seg


def _check(c: ShardCore, must_keep: dict[int, bytes], issued: set[int]) -> None:
    if KEY not in store_of(c).streams:
        assert not must_keep
        return
    # From where a subscription at "earliest" starts, as a gateway would read.
    frame = _request(c, wire.encode_subscribe(99, T, NS, "s", 1, start="earliest"))
    sub = wire.decode_ext(wire.decode_frame(frame, extensions=True))
    assert isinstance(sub, wire.Subscribed)
    assert all(sub.start_offset <= o for o in must_keep)
    offsets, payloads, _ = consume(c, sub.start_offset)
    assert offsets == sorted(set(offsets))  # increasing, each once
    got = dict(zip(offsets, payloads, strict=True))
    for offset, payload in must_keep.items():
        assert got.get(offset) == payload, (offset, sorted(got))
    assert set(got) <= issued | set(got)  # nothing but what was written
    assert all(payload.startswith(b"p") for payload in got.values())
    # The next offset is above everything ever issued.
    mem = c.stream_log(KEY)
    assert mem is not None and mem.next_offset > max(issued, default=-1)
