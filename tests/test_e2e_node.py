"""End-to-end encryption through a real `felix up` process tree over QUIC: the broker
stores, routes and dead-letters only ciphertext (its durable files hold no plaintext), a
subscriber with the key reads plaintext, one without it sees ciphertext marked as such,
and every record a hostile broker (or writer) changed, moved or made up by hand is
refused by the receiving client; queue consumers, dead letters and their replay, the
cache and key rotation included."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import felix
from felix.client import E2EKeys, E2EState, Message
from felix.client._convert import StartSpec
from tests.aio import run
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(120)

ARGS = ("--durable-streams", "--fsync", "commit")
K1 = bytes(range(32))
K2 = bytes(range(100, 132))
KX = bytes(32)
OLD = E2EKeys({"k1": K1}, "k1")
ROTATED = E2EKeys({"k1": K1, "k2": K2}, "k2")
STRANGER = E2EKeys({"kx": KX}, "kx")


def url(node: NodeProcess) -> str:
    return f"felix://{node.host}:{node.port}"


def connect(node: NodeProcess, e2e: E2EKeys | None = None) -> felix.client.Connect:
    return felix.connect(url(node), ca=node.ca_file, e2e=e2e)


async def read(
    client: felix.Client, stream: str, n: int, start: StartSpec = "earliest"
) -> list[Message]:
    async with client.subscribe(stream, start=start) as sub:
        return [await sub.next(timeout=10) for _ in range(n)]


def flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0x01
    return bytes(out)


def test_subscribers_brokers_files_tampering_bridged_copies_and_rotation(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=1)
    n = 50

    async def main() -> None:
        async with (
            connect(node, OLD) as alice,
            connect(node) as plain,
            connect(node, STRANGER) as stranger,
            connect(node, ROTATED) as rotated,
        ):
            acks = await alice.publish_batch(
                "orders", [b"SECRET-ORDER-%04d" % i for i in range(n - 10)], headers={"kind": "o"}
            )
            for i in range(n - 10, n):  # single publishes too, acked and (the last) not
                await alice.publish(
                    "orders", b"SECRET-ORDER-%04d" % i, headers={"kind": "o"}, ack=i < n - 1
                )
            await alice.ping()
            assert acks[0].offset == 0

            # With the key: the plaintext, authenticated for this stream.
            got = await read(alice, "orders", n)
            assert [m.data for m in got] == [b"SECRET-ORDER-%04d" % i for i in range(n)]
            assert {m.e2e for m in got} == {E2EState.DECRYPTED}
            assert {m.e2e_stream for m in got} == {"default/default/orders"}
            assert got[0].headers == {
                "kind": "o",
                "felix-e2e-key": "k1",
                "felix-e2e-alg": "A256GCM",
            }
            # Rotation: a client holding both keys reads the old key's records.
            assert [m.data for m in await read(rotated, "orders", n)] == [m.data for m in got]

            # Without keys: the ciphertext as stored, flagged; nothing of the plaintext.
            raw = await read(plain, "orders", n)
            assert {m.e2e for m in raw} == {E2EState.ENCRYPTED}
            assert [m.data for m in raw] == [m.raw for m in got]
            assert not any(b"SECRET" in m.data for m in raw)
            assert raw[0].headers["felix-e2e-key"] == "k1"
            # With other keys: refused, never garbage.
            for m in await read(stranger, "orders", 3):
                assert m.e2e is E2EState.FAILED and m.e2e_error is not None
                assert m.e2e_error.reason == "unknown_key"
                with pytest.raises(felix.E2EError, match="unknown key 'k1'"):
                    m.data  # noqa: B018

            # A writer with stream access (or the broker) forges records by hand.
            sealed, headers = raw[0].data, dict(raw[0].headers)
            forged = [
                (flip(sealed, 30), headers),  # ciphertext changed
                (flip(sealed, 2), headers),  # nonce changed
                (sealed, {**headers, "kind": "refund"}),  # a bound header changed
                (sealed, {**headers, "felix-e2e-key": "k2"}),  # claims another key
                (b"PLAIN-INJECTED", {"kind": "o"}),  # not encrypted at all
            ]
            for payload, hdrs in forged:
                await plain.publish("orders", payload, headers=hdrs)
            await plain.publish("refunds", sealed, headers=headers)  # moved to another stream
            reasons = []
            for m in await read(rotated, "orders", len(forged), start=n):
                assert m.e2e is E2EState.FAILED and m.e2e_error is not None
                with pytest.raises(felix.E2EError):
                    m.data  # noqa: B018
                reasons.append(m.e2e_error.reason)
            assert reasons == ["tampered", "tampered", "tampered", "tampered", "not_encrypted"]
            (moved,) = await read(alice, "refunds", 1)
            assert moved.e2e_error is not None and moved.e2e_error.reason == "tampered"
            # A client that does not require e2e takes the plaintext record as plain.
            async with connect(node, E2EKeys({"k1": K1}, "k1", require=False)) as lax:
                (injected,) = await read(lax, "orders", 1, start=n + 4)
                assert injected.e2e is E2EState.PLAIN and injected.data == b"PLAIN-INJECTED"

            # A bridge (or any copier) keeps the payload and the e2e and user headers and
            # adds felix-* provenance: the copy, even under another name, still opens.
            copy_headers = {
                **headers,
                "felix-msg-id": "bridge:eu-1/default/default/orders@0",
                "felix-source-region": "eu-1",
                "felix-source-stream": "default/default/orders",
                "felix-source-offset": "0",
            }
            await plain.publish("orders-copy", sealed, headers=copy_headers)
            (copied,) = await read(alice, "orders-copy", 1)
            assert copied.data == b"SECRET-ORDER-0000"
            assert copied.e2e_stream == "default/default/orders"

            # After rotation new records use k2: old-only readers cannot open them.
            ack = await rotated.publish("orders", b"SECRET-ORDER-NEW", headers={"kind": "o"})
            assert ack is not None
            (new,) = await read(rotated, "orders", 1, start=ack.offset)
            assert new.data == b"SECRET-ORDER-NEW" and new.headers["felix-e2e-key"] == "k2"
            (old_reader,) = await read(alice, "orders", 1, start=ack.offset)
            assert old_reader.e2e_error is not None
            assert old_reader.e2e_error.reason == "unknown_key"

    try:
        run(main, timeout=90)
    finally:
        assert node.stop() == 0
    # The broker's files: the durable segments hold the records, none of the plaintext.
    segments = list((tmp_path / "node").rglob("*.seg"))
    assert segments
    stored = sum(p.stat().st_size for p in segments)
    assert stored >= n * (len(b"SECRET-ORDER-0000") + 28)
    for path in [*(tmp_path / "node").rglob("*"), node.log_path]:
        if path.is_file():
            assert b"SECRET" not in path.read_bytes(), path


def test_queue_consumers_dead_letters_and_their_replay(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", *ARGS, gateways=1, shards=2)

    async def main() -> None:
        async with connect(node, OLD) as alice, connect(node) as plain:
            for i in range(3):
                await alice.publish("jobs", b"JOB-SECRET-%d" % i, headers={"i": str(i)})
            (first,) = await read(plain, "jobs", 1)
            await plain.publish("jobs", flip(first.raw, 20), headers=dict(first.headers))

            async with alice.consume("jobs", "workers") as jobs:
                batch = await jobs.fetch(4, timeout=5)
                batch += await jobs.fetch(4 - len(batch), timeout=5) if len(batch) < 4 else []
                assert [j.offset for j in batch] == [0, 1, 2, 3]
                for job in batch:
                    if job.e2e is E2EState.FAILED:
                        # Undecryptable: data raises; process() naks it with the error.
                        assert job.offset == 3 and job.e2e_error is not None
                        with pytest.raises(felix.E2EError, match="failed authentication"):
                            async with job.process():
                                job.data  # noqa: B018
                        assert job.settled
                    elif job.data == b"JOB-SECRET-1":
                        assert job.e2e is E2EState.DECRYPTED
                        await job.term("poison")
                    else:
                        assert job.data == b"JOB-SECRET-%d" % job.offset
                        await job.ack()
                # Redelivered with one failure; this time the consumer dead-letters it.
                (again,) = await jobs.fetch(1, timeout=10)
                assert again.offset == 3 and again.failures == 1
                assert again.e2e_error is not None
                await again.term(f"e2e: {again.e2e_error.reason}")

            # The dead-letter stream holds the ciphertext with its e2e headers: a reader
            # with the key opens it (bound to the source stream, not the DLQ's name).
            letters = await read(alice, "jobs.dlq", 2)
            by_offset = {m.headers["felix-dlq-offset"]: m for m in letters}
            good, bad = by_offset["1"], by_offset["3"]
            assert good.data == b"JOB-SECRET-1" and good.headers["i"] == "1"
            assert good.e2e_stream == "default/default/jobs"
            assert (
                good.headers["felix-e2e-key"] == "k1" and good.headers["felix-e2e-alg"] == "A256GCM"
            )
            assert bad.e2e is E2EState.FAILED
            assert bad.headers["felix-dlq-detail"] == "e2e: tampered"
            assert not any(b"JOB-SECRET" in m.data for m in await read(plain, "jobs.dlq", 2))

        # `felix dlq replay` (a client without keys) moves the ciphertext back untouched.
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "felix.cli",
                "dlq",
                "replay",
                "jobs",
                "--url",
                url(node),
                "--ca",
                str(node.ca_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stderr
        async with connect(node, ROTATED) as bob, bob.consume("jobs", "workers") as jobs:
            back = await jobs.fetch(2, timeout=5)
            back += await jobs.fetch(1, timeout=2)
            assert len(back) == 2
            for job in back:
                assert job.headers["felix-replayed-from"].startswith("default/default/jobs.dlq@")
                await job.ack()
            states = sorted((j.e2e.value, j.raw if j.e2e_error else j.data) for j in back)
            assert states[0] == ("decrypted", b"JOB-SECRET-1")
            assert states[1][0] == "failed"

    try:
        run(main, timeout=90)
    finally:
        assert node.stop() == 0
    for path in (tmp_path / "node").rglob("*"):
        if path.is_file():
            assert b"JOB-SECRET" not in path.read_bytes(), path


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node without durable streams for the cache and CLI tests (caches of their own)."""
    node = NodeProcess(tmp_path_factory.mktemp("plain") / "node", gateways=1, shards=1)
    yield node
    assert node.stop() == 0


def test_cache_values_are_encrypted_and_bound_to_cache_and_key(plain_node: NodeProcess) -> None:
    node = plain_node

    async def main() -> None:
        async with connect(node, OLD) as alice, connect(node) as plain:
            sessions = alice.cache("sessions")
            assert await sessions.set("user:1", b"SECRET-SESSION", ttl=60)
            assert await sessions.get("user:1") == b"SECRET-SESSION"
            assert await sessions.get("missing") is None
            assert await sessions.set("user:1", b"again", nx=True) is False
            # The broker holds only the envelope.
            stored = await plain.cache("sessions").get("user:1")
            assert stored is not None and stored.startswith(b"FXE1") and b"SECRET" not in stored
            # Moved to another key or cache by hand: refused.
            await plain.cache("sessions").set("user:2", stored)
            await plain.cache("other").set("user:1", stored)
            for cache, key in (("sessions", "user:2"), ("other", "user:1")):
                with pytest.raises(felix.E2EError, match="failed authentication") as info:
                    await alice.cache(cache).get(key)
                assert info.value.reason == "tampered"
            await plain.cache("sessions").set("user:3", b"plain value")
            with pytest.raises(felix.E2EError, match="not end-to-end encrypted"):
                await sessions.get("user:3")
            # Rotation: the old key's value still opens; new values use the new key.
            async with connect(node, ROTATED) as bob:
                assert await bob.cache("sessions").get("user:1") == b"SECRET-SESSION"
                await bob.cache("sessions").set("user:4", b"new")
            with pytest.raises(felix.E2EError, match="unknown key 'k2'"):
                await sessions.get("user:4")

    run(main, timeout=60)


def test_cli_encrypts_and_decrypts_with_a_key_file(plain_node: NodeProcess, tmp_path: Path) -> None:
    node = plain_node
    keys = tmp_path / "e2e.json"
    keys.write_text(json.dumps({"current": "k1", "keys": {"k1": base64.b64encode(K1).decode()}}))
    keys.chmod(0o600)
    conn = ["--url", url(node), "--ca", str(node.ca_file)]

    def felix_cli(
        *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "felix.cli", *args, *conn],
            capture_output=True,
            text=True,
            timeout=60,
            env=None if env is None else {**os.environ, **env},
        )

    done = felix_cli("cache", "set", "cli-sessions", "u1", "SECRET-CLI", "--e2e-keys", str(keys))
    assert done.returncode == 0, done.stderr
    got = felix_cli("cache", "get", "cli-sessions", "u1", env={"FELIX_E2E_KEYS": str(keys)})
    assert got.returncode == 0 and got.stdout == "SECRET-CLI\n", got.stderr
    raw = felix_cli("cache", "get", "cli-sessions", "u1", "--json")
    assert raw.returncode == 0 and "SECRET" not in raw.stdout
    assert json.loads(raw.stdout)["encoding"] == "base64"
    pub = felix_cli("pub", "notes", "SECRET-NOTE", "--header", "a=b", "--e2e-keys", str(keys))
    assert pub.returncode == 0, pub.stderr
    assert felix_cli("pub", "notes", "PLAIN-NOTE").returncode == 0
    sub = felix_cli("sub", "notes", "--start", "earliest", "--count", "2", "--e2e-keys", str(keys))
    # The plaintext record is refused (require): on stderr, never as a payload.
    assert sub.returncode == 0 and sub.stdout == "SECRET-NOTE\n", sub.stderr
    assert "record 1 of 'notes' is not end-to-end encrypted" in sub.stderr
    keys.chmod(0o644)
    refused = felix_cli("sub", "notes", "--count", "1", "--e2e-keys", str(keys))
    assert refused.returncode == 2 and "chmod 600" in refused.stderr


def test_the_e2e_benchmark_runs_reduced(tmp_path: Path) -> None:
    """perf/bench_e2e.py end to end, reduced: its output is sane (not that e2e is fast)."""
    out = tmp_path / "e2e.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf.bench_e2e",
            *("--reps", "2", "--sizes", "64", "--closed", "20", "--batches", "3"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Same-run ratios e2e/plain" in done.stdout
    doc = json.loads(out.read_text())
    size = doc["sizes"]["64"]
    for mode in ("plain", "headers", "e2e"):
        assert len(size[mode]) == 2
        for sample in size[mode]:
            assert 0 < sample["p50_us"] <= sample["p99_us"] and sample["rate"] > 0
    for base in ("plain", "headers"):
        ratios = size[f"ratios_e2e_{base}"]
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in ratios.values())
    assert size["seal_us"] > 0 and size["open_us"] > 0
