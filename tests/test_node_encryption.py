"""Encryption at rest with real `felix up` process trees, the real client and the files
on disk read by tests/segfiles.py (an independent reader of docs/log-format.md):

* a durable segment holds no plaintext payload or header value, and `felix log dump`
  shows ciphertext unless given the key;
* a node restarted with the wrong region key refuses the stream with a clear error,
  and serves it again with the right one;
* region-key rotation (node stopped) and tenant data-key rotation (node running) keep
  old and new records readable across restarts, without rewriting a segment;
* queue group state files are encrypted;
* `--encryption off` writes plaintext, and a log mixing both kinds reads fine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import felix
from felix.errors import Unavailable
from tests import segfiles
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(180)

ARGS = ("--durable-streams", "--fsync", "commit", "--replay-records", "4")
SECRET = b"SECRET-PAYLOAD-"
HEADER_VALUE = "SECRET-HEADER-VALUE"


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


def stream_dir(data: Path, stream: str) -> Path:
    return data / "streams" / "default" / "default" / stream


def felix_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )


def key_file(path: Path) -> Path:
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


async def publish(node: NodeProcess, stream: str, first: int, n: int) -> list[int]:
    async with felix.connect(url(node), ca=node.ca_file) as client:
        offsets = []
        for i in range(first, first + n):
            ack = await client.publish(
                stream, SECRET + b"%d" % i, headers={"secret-header": HEADER_VALUE, "i": str(i)}
            )
            assert ack is not None and ack.durability == "synced"
            offsets.append(ack.offset)
        return offsets


async def read_all(node: NodeProcess, stream: str, n: int) -> list[tuple[int, bytes, str]]:
    """The first ``n`` records from earliest (most of them paged from disk)."""
    async with (
        felix.connect(url(node), ca=node.ca_file) as client,
        client.subscribe(stream, start="earliest") as sub,
    ):
        got = [await sub.next(timeout=10) for _ in range(n)]
    return [(m.offset, bytes(m.data), dict(m.headers)["i"]) for m in got]


def expected(n: int) -> list[tuple[int, bytes, str]]:
    return [(i, SECRET + b"%d" % i, str(i)) for i in range(n)]


def no_plaintext(data: Path) -> None:
    """No file under the data dir's streams and groups holds a payload or header value."""
    for sub in ("streams", "groups"):
        for path in (data / sub).rglob("*"):
            if path.is_file():
                raw = path.read_bytes()
                assert SECRET not in raw and HEADER_VALUE.encode() not in raw, path


def test_segments_hold_no_plaintext_and_a_wrong_region_key_refuses_the_stream(
    tmp_path: Path,
) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data, *ARGS, gateways=1, shards=2)
    try:
        assert run(lambda: publish(node, "orders", 0, 20), timeout=60) == list(range(20))
        _status, info = node.http("/streams/default/default/orders")
        assert json.loads(info)["encryption"] == {"on": True, "key_id": 1, "problem": None}
    finally:
        assert node.stop() == 0
    assert "generated a region key" in node.log()
    no_plaintext(data)
    recs = segfiles.read_stream(stream_dir(data, "orders"))  # CRCs over the stored bytes
    assert [r.offset for r in recs] == list(range(20))
    keys = segfiles.data_keys(data)  # the dev-mode key in the data dir, by the spec
    for r in recs:
        kind, headers, body = segfiles.decode_record(r, "default/default/orders", keys)
        assert (kind, body, headers["secret-header"]) == (
            1,
            SECRET + b"%d" % r.offset,
            HEADER_VALUE,
        )
    # `felix log dump` verifies the CRCs and shows ciphertext without the key...
    dump = felix_cli("log", "dump", str(stream_dir(data, "orders")), "--check")
    assert dump.returncode == 0 and "check: OK" in dump.stdout, dump.stdout + dump.stderr
    assert "encrypted (data key 1" in dump.stdout and "SECRET" not in dump.stdout
    # ... and the records with it.
    dump = felix_cli("log", "dump", str(stream_dir(data, "orders")), "--check", "--decrypt")
    assert dump.returncode == 0 and "SECRET-PAYLOAD-0" in dump.stdout, dump.stdout

    # Restarted with another region key: the stream is refused, naming the key problem.
    wrong = key_file(tmp_path / "wrong.key")
    node = NodeProcess(data, *ARGS, "--region-key", str(wrong), gateways=1, shards=2)

    async def refused() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            with pytest.raises(
                Unavailable, match=r"wrapped by region key \w+, but this node's region key"
            ):
                await client.publish("orders", b"never written")
            with pytest.raises(Unavailable, match="region key"):
                async with client.subscribe("orders", start="earliest") as sub:
                    await sub.next(timeout=10)

    digest = segfiles.tree_digest(stream_dir(data, "orders"))
    try:
        run(refused, timeout=60)
        _status, info = node.http("/streams/default/default/orders")
        assert "region key" in json.loads(info)["encryption"]["problem"]
        assert "region key mismatch" in node.log()
    finally:
        assert node.stop() == 0
    assert segfiles.tree_digest(stream_dir(data, "orders")) == digest  # nothing written
    bad = felix_cli(
        "log",
        "dump",
        str(stream_dir(data, "orders")),
        "--check",
        "--decrypt",
        "--region-key",
        str(wrong),
    )
    assert bad.returncode == 1 and "NOT DECRYPTED" in bad.stdout, bad.stdout
    keys_status = felix_cli("keys", "status", "--data-dir", str(data), "--region-key", str(wrong))
    assert keys_status.returncode == 1, keys_status.stdout
    assert "region key mismatch" in keys_status.stdout

    # The right key again (dev mode): everything reads, publishing goes on.
    node = NodeProcess(data, *ARGS, gateways=1, shards=2)
    try:
        run(lambda: publish(node, "orders", 20, 5), timeout=60)
        assert run(lambda: read_all(node, "orders", 25), timeout=60) == expected(25)
    finally:
        assert node.stop() == 0


def test_key_rotations_keep_every_record_readable_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "node"
    first_key = key_file(tmp_path / "region-1.key")
    env = {"FELIX_REGION_KEY_FILE": str(first_key)}  # the key from a secret, by env
    node = NodeProcess(data, *ARGS, gateways=1, shards=2, env=env)
    try:
        run(lambda: publish(node, "orders", 0, 10), timeout=60)
        # A tenant rotation while the node runs: new records use key 2 within ~1 s.
        out = felix_cli("keys", "rotate", "--tenant", "default", "--data-dir", str(data), env=env)
        assert out.returncode == 0 and "data key 2 is current" in out.stdout, out.stderr
        for _ in range(50):
            _status, body = node.http("/streams/default/default/orders")
            if json.loads(body)["encryption"]["key_id"] == 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the rotation was not seen: {body}")
        run(lambda: publish(node, "orders", 10, 10), timeout=60)
        assert run(lambda: read_all(node, "orders", 20), timeout=60) == expected(20)
    finally:
        assert node.stop() == 0
    keys = segfiles.data_keys(data, segfiles.region_key(data, first_key))
    used = {
        int.from_bytes(r.payload[1:5], "big")
        for r in segfiles.read_stream(stream_dir(data, "orders"))
    }
    assert used == {1, 2} and set(keys) == {("default", 1), ("default", 2)}

    # Region key rotation: refused while the node runs, then rewraps with it stopped.
    node = NodeProcess(data, *ARGS, gateways=1, shards=2, env=env)
    second_key = key_file(tmp_path / "region-2.key")
    try:
        busy = felix_cli(
            "keys", "rotate", "--new-region-key", str(second_key), "--data-dir", str(data), env=env
        )
        assert busy.returncode == 2 and "in use by another felix node" in busy.stderr
    finally:
        assert node.stop() == 0
    segments = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in stream_dir(data, "orders").glob("*.seg")
    }
    out = felix_cli(
        "keys", "rotate", "--new-region-key", str(second_key), "--data-dir", str(data), env=env
    )
    assert out.returncode == 0 and "rewrapped the data keys of 1 tenant" in out.stdout, out
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in segments} == segments
    # The old key no longer opens anything; the new one opens old and new records.
    node = NodeProcess(data, *ARGS, gateways=1, shards=2, env=env)
    try:
        with pytest.raises(Unavailable, match="region key"):
            run(lambda: read_all(node, "orders", 1), timeout=60)
    finally:
        assert node.stop() == 0
    node = NodeProcess(data, *ARGS, "--region-key", str(second_key), gateways=1, shards=2)
    try:
        run(lambda: publish(node, "orders", 20, 5), timeout=60)
        assert run(lambda: read_all(node, "orders", 25), timeout=60) == expected(25)
    finally:
        assert node.stop() == 0
    keys_status = felix_cli(
        "keys", "status", "--data-dir", str(data), "--region-key", str(second_key)
    )
    assert keys_status.returncode == 0, keys_status.stdout
    assert "tenant default: current key 2 (keys 1, 2)" in keys_status.stdout


def test_queue_group_state_is_encrypted(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = NodeProcess(data, *ARGS, gateways=1, shards=1)
    reason = "SECRET-PAYLOAD-in-a-failure-reason for customer 4711"

    async def work() -> None:
        async with felix.connect(url(node), ca=node.ca_file) as client:
            await publish(node, "jobs", 0, 6)
            async with client.consume("jobs", "workers", prefetch=8) as jobs:
                got = await jobs.fetch(6, timeout=10)
                assert len(got) == 6
                await got[0].nak(60, detail=reason)  # kept in the group state file
                await got[1].term(reason)
                for job in got[2:]:
                    await job.ack()

    try:
        run(work, timeout=60)
    finally:
        assert node.stop() == 0
    (glog,) = (data / "groups").rglob("workers.glog")
    raw = glog.read_bytes()
    assert b"customer 4711" not in raw and SECRET not in raw
    no_plaintext(data)
    # The state is all there after a restart.
    node = NodeProcess(data, *ARGS, gateways=1, shards=1)
    try:
        _status, body = node.http("/streams/default/default/jobs")
        group = json.loads(body)["groups"]["workers"]
        assert group["acked"] == 4, group
    finally:
        assert node.stop() == 0


def test_encryption_off_writes_plaintext_and_mixed_logs_read_fine(tmp_path: Path) -> None:
    data = tmp_path / "node"
    # Written before encryption (off), then on, then off again: one log, both kinds.
    for n, (first, mode) in enumerate(((0, "off"), (5, "on"), (10, "off"))):
        node = NodeProcess(
            data, *ARGS, "--encryption", mode, gateways=1, shards=2, log_path=tmp_path / f"{n}.log"
        )
        try:
            run(functools.partial(publish, node, "orders", first, 5), timeout=60)
        finally:
            assert node.stop() == 0
    recs = segfiles.read_stream(stream_dir(data, "orders"))
    assert [r.payload[0] for r in recs] == [0] * 5 + [1] * 5 + [0] * 5
    assert SECRET + b"0" in recs[0].payload  # kind 0: plaintext, as before encryption
    node = NodeProcess(data, *ARGS, gateways=1, shards=2)
    try:
        assert run(lambda: read_all(node, "orders", 15), timeout=60) == expected(15)
    finally:
        assert node.stop() == 0
