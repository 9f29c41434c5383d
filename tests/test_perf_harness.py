"""Smoke test of the latency harness (perf/): it runs and its output is sane.

Runs ``python -m perf`` in a reduced mode (two repetitions, tiny counts, no knob
sweep) against a real felix node and whichever local peers answer, then checks the
JSON shape, monotonic percentiles, positive counts, the Markdown table and the PNGs.
It does not check that felix is fast: no timed assertions.

The reduced runs of ``python -m perf durable`` and ``python -m perf queue`` (about a
minute and a half together, most of it per-run set-up the counts do not shrink) are
marked ``soak``: ``make slow`` runs them, ``make test`` does not.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The harness runs are module fixtures: a loaded machine slows them (never their
# results), and their time counts against the first test that uses them.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"redis": 6379, "nats": 4222, "rabbitmq": 5672}


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("perf")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf",
            "--only",
            "floor,cache,pubsub,queue",
            "--reps",
            "2",
            "--scale",
            "0.05",
            "--rate",
            "1000",
            "--timeout",
            "20",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # generous: a loaded machine slows the harness, not its results
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_json_shape(run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = run
    assert set(data) >= {"meta", "workloads", "targets"}
    meta = data["meta"]
    assert meta["machine"]["cpus"] >= 1 and meta["versions"]["felix"]
    families = {w["family"] for w in data["workloads"]}
    assert {"floor", "cache", "pubsub"} <= families
    for w in data["workloads"]:
        assert w["id"] and w["title"] and w["systems"]
    reachable = {name for name, port in PEERS.items() if _reachable(port)}
    for name in PEERS:
        if name not in reachable:
            assert name in meta["unavailable"]
    labels = [t["target"] for t in data["targets"]]
    assert any("queue" in label for label in labels) and len(labels) == 12
    # The shared-memory transport beside Redis over its Unix socket (a private
    # redis-server when the machine's has none).
    by_id = {w["id"]: w for w in data["workloads"]}
    cache_systems = set(by_id["cache.get.64B.if1"]["systems"])
    assert "felix-shm" in cache_systems
    # Unless the main node already hosts its shards (felix up's choice on small machines).
    assert "felix-shm 1x1e" in cache_systems or "felix-shm 1x1e" in data["meta"]["unavailable"]
    if shutil.which("redis-server"):
        assert "redis-unix" in cache_systems
        assert by_id["cache.get.64B.if1"]["ratios"]["felix-shm/redis-unix"]["p50"] > 0
    assert "felix-shm" in by_id["pubsub.closed.f1.64B"]["systems"]
    assert "felix-shm" not in by_id["pubsub.closed.f16.64B"]["systems"]


def test_percentiles_monotonic_and_counts_positive(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, _ = run
    measured = 0
    for w in data["workloads"]:
        for name, s in w["systems"].items():
            assert not s["errors"], (w["id"], name, s["errors"])
            assert s["reps"] == 2
            for r in s["runs"]:
                assert r["ops"] > 0 and r["throughput"] > 0
                lat = [r[k] for k in ("p50", "p90", "p99", "p99.9", "max")]
                assert all(v >= 0 for v in lat) and lat == sorted(lat), (w["id"], name, lat)
                assert r["cpu_client_us"] > 0
            for fig, sp in s["summary"].items():
                if sp is not None:
                    assert sp["min"] <= sp["median"] <= sp["max"], (w["id"], name, fig)
            measured += 1
    assert measured >= 10


def test_ratios_and_targets(run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = run
    by_id = {w["id"]: w for w in data["workloads"]}
    cache = by_id["cache.get.64B.if1"]
    if "redis" in cache["systems"]:
        assert cache["ratios"]["redis"]["p50"] > 0
        target = next(t for t in data["targets"] if t["workload"] == "cache.get.64B.if1")
        assert target["ratio"] == cache["ratios"]["redis"]["p50"]
        assert target["met"] in (True, False)
    queue = next(t for t in data["targets"] if "queue" in t["target"])
    assert queue["met"] is None and "python -m perf queue" in queue["note"]


def test_markdown_lists_felix_and_reachable_peers(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, stdout = run
    md = (out / "results.md").read_text()
    assert "| felix |" in md and "### Targets" in md
    assert "transient references only" in md and "python -m perf queue" in md
    for name, port in PEERS.items():
        if _reachable(port):
            assert f"| {name} |" in md, name
            if name != "rabbitmq":
                assert f"felix/{name}" in md
        else:
            assert f"**{name}**: not reachable" in md
    assert "### Targets" in stdout  # the table is printed too


def test_plots_and_raw_samples_written(run: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = run
    for name in ("latency_floor", "latency_cache", "latency_pubsub", "throughput_vs_inflight"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    import numpy as np

    with np.load(out / "raw.npz") as raw:
        assert raw.files and all(raw[k].dtype == np.int64 and len(raw[k]) for k in raw.files)


# --- python -m perf durable ---------------------------------------------------------------

DURABLE_PEERS = {"jetstream": 4222, "rabbitmq": 5672}
_ACK_LEVEL = {
    "felix commit": "synced",
    "felix interval": "written",
    "felix none": "written",
    "felix memory": "memory",
}


def _run_benchmark(
    command: str, args: list[str], out: Path, json_name: str, timeout: float
) -> tuple[Path, dict[str, Any], str]:
    """``python -m perf COMMAND ARGS --out OUT``; its JSON and stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "perf", command, *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark then stops its felix nodes and deletes its
        # streams and queues on the shared peers (SIGKILL would leave them behind).
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=25)
        pytest.fail(
            f"python -m perf {command} took over {timeout} s:\n" + stdout[-3000:] + stderr[-3000:]
        )
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return out, json.loads((out / json_name).read_text()), stdout


@pytest.fixture(scope="module")
def durable_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    args = ["--reps", "2", "--scale", "0.05", "--replay-bytes", "2MiB"]
    args += ["--durable-replay-bytes", "512KiB", "--topology", "1x1", "--timeout", "20"]
    args += ["--replay-timeout", "30"]
    out = tmp_path_factory.mktemp("perfdur")
    return _run_benchmark("durable", args, out, "durable.json", 300)


@pytest.mark.soak
def test_durable_runs_every_reachable_system(
    durable_run: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, _ = durable_run
    meta, by_id = data["meta"], {w["id"]: w for w in data["workloads"]}
    expected = {f"durable.publish.{s}.if{i}" for s in ("64B", "1KiB") for i in (1, 64)}
    assert expected <= set(by_id)
    for wid in expected:
        systems = set(by_id[wid]["systems"])
        assert "felix memory" in systems
        for name in ("felix commit", "felix interval", "felix none"):
            # Either measured, or said why not (a felix without durable streams).
            assert name in systems or "no durable streams" in meta["unavailable"][name]
        for name, port in DURABLE_PEERS.items():
            assert (name in systems) == _reachable(port), (wid, name)
    assert "jetstream sync" in meta["unavailable"] or any(
        "jetstream sync" in w["systems"] for w in data["workloads"]
    )
    for name in meta["unavailable"]:
        assert meta["unavailable"][name]  # a reason, not an empty note


@pytest.mark.soak
def test_durable_figures_sane(durable_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = durable_run
    for w in data["workloads"]:
        for name, s in w["systems"].items():
            assert not s["errors"], (w["id"], name, s["errors"])
            assert s["reps"] == 2
            for r in s["runs"]:
                assert r["ops"] > 0 and r["throughput"] > 0
                if w["family"] == "replay":
                    assert r["ops"] == r["records"] and r["mib_per_s"] > 0
                    if name == "felix commit":  # 2 MiB beyond a 512 KiB hot tail
                        assert r["disk_reads"] >= 1
                    continue
                if w["id"] == "disk.idle":
                    assert r["dev_flushes"] >= 0 and r["elapsed_s"] >= 0.9
                    continue
                lat = [r[k] for k in ("p50", "p90", "p99", "p99.9", "max")]
                assert all(v > 0 for v in lat) and lat == sorted(lat), (w["id"], name, lat)
                if w["family"] == "publish":
                    assert (
                        r["ops"]
                        == w["params"]["n"] // w["params"]["in_flight"] * (w["params"]["in_flight"])
                    )
                    if name in _ACK_LEVEL:
                        # Every ack said what it promises, and the policy's level.
                        levels = set(r["ack_durability"])
                        assert levels == {_ACK_LEVEL[name]}, (w["id"], name, levels)
                    if name == "felix commit":
                        # Every commit ack waited for an fsync: at least one per run,
                        # and each fsync released at least one ack.
                        assert r["fsyncs"] >= 1 and r["acks_per_fsync"] >= 1
        for f, others in w["ratios"].items():
            for other, figs in others.items():
                thr = figs["throughput"]
                assert thr is None or thr["min"] <= thr["median"] <= thr["max"], (f, other)
    assert {w["family"] for w in data["workloads"]} == {"publish", "replay", "disk"}


@pytest.mark.soak
def test_durable_targets_and_markdown(durable_run: tuple[Path, dict[str, Any], str]) -> None:
    out, data, stdout = durable_run
    targets = data["targets"]
    assert len(targets) == 6
    for t in targets:
        if t["met"] is None:
            assert t["note"]  # why it could not be judged
        else:
            assert t["ratio"]["median"] > 0
    md = (out / "durable.md").read_text()
    for heading in ("### Targets", "### Durable publish with acks", "fdatasync on this disk"):
        assert heading in md
    assert "| felix memory |" in md or "| publish 64B with ack, 1 in flight | felix memory |" in md
    assert "### Targets" in stdout
    assert (out / "durable_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fsync_metrics_parsing() -> None:
    from perf.durable.cli import parse_bytes
    from perf.durable.felix import parse_fsync_metrics

    text = "\n".join(
        [
            "# HELP felix_fsync_seconds fsync time",
            'felix_fsync_seconds_bucket{shard="0",le="0.001"} 3',
            'felix_fsync_seconds_count{shard="0"} 4',
            'felix_fsync_seconds_sum{shard="0"} 0.004',
            'felix_fsync_seconds_count{shard="1"} 6',
            'felix_fsync_seconds_sum{shard="1"} 0.002',
            'felix_fsync_acks_total{shard="1"} 25',
        ]
    )
    assert parse_fsync_metrics(text) == pytest.approx(
        {"fsyncs": 10.0, "fsync_seconds": 0.006, "fsync_acks": 25.0}
    )
    assert parse_fsync_metrics("felix_other 1\n") == {}
    assert parse_bytes("16MiB") == 16 * 2**20 and parse_bytes("1GiB") == 2**30
    assert parse_bytes("512") == 512
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("12XB")


# --- python -m perf queue -----------------------------------------------------------------

QUEUE_FELIX = ("felix commit", "felix interval")


@pytest.fixture(scope="module")
def queue_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    args = ["--reps", "2", "--scale", "0.05", "--topology", "1x1", "--timeout", "20"]
    return _run_benchmark("queue", args, tmp_path_factory.mktemp("perfq"), "queue.json", 300)


@pytest.mark.soak
def test_queue_runs_felix_and_every_reachable_peer(
    queue_run: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, stdout = queue_run
    meta, by_id = data["meta"], {w["id"]: w for w in data["workloads"]}
    expected = {f"queue.e2e.{s}.if{i}" for s in ("64B", "1KiB") for i in (1, 32)}
    assert set(by_id) == expected
    for wid in expected:
        systems = set(by_id[wid]["systems"])
        assert set(QUEUE_FELIX) <= systems, (wid, systems)  # felix always runs
        for name, port in DURABLE_PEERS.items():
            assert (name in systems) == _reachable(port), (wid, name)
            if name not in systems:  # skipped with a clear message
                assert "not reachable" in meta["unavailable"][name]
                assert f"note: {name} not reachable" in stdout
    assert (
        "jetstream sync" in meta["unavailable"]
        or "jetstream sync" in by_id["queue.e2e.64B.if1"]["systems"]
    )
    assert set(meta["promises"]) >= set(QUEUE_FELIX)


@pytest.mark.soak
def test_queue_figures_sane(queue_run: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = queue_run
    levels = {"felix commit": {"synced"}, "felix interval": {"written"}}
    for w in data["workloads"]:
        inf = w["params"]["in_flight"]
        for name, s in w["systems"].items():
            assert not s["errors"], (w["id"], name, s["errors"])
            assert s["reps"] == 2
            for r in s["runs"]:
                # Every record published was consumed once and acked without an error.
                assert r["ops"] == w["params"]["n"] // inf * inf, (w["id"], name)
                assert r["consumed"] >= r["ops"] and r["ack_errors"] == 0, (w["id"], name)
                assert r["redelivered"] == 0, (w["id"], name)
                assert r["throughput"] > 0 and r["cpu_client_us"] > 0
                lat = [r[k] for k in ("p50", "p90", "p99", "p99.9", "max")]
                assert all(v > 0 for v in lat) and lat == sorted(lat), (w["id"], name, lat)
                if name in levels:
                    assert set(r["ack_durability"]) == levels[name], (w["id"], name)
                if name == "felix commit":
                    assert r["fsyncs"] >= 1
            for fig, sp in s["summary"].items():
                if sp is not None:
                    assert sp["min"] <= sp["median"] <= sp["max"], (w["id"], name, fig)
        for felix in QUEUE_FELIX:
            for other, figs in w["ratios"][felix].items():
                thr = figs["throughput"]
                assert thr["min"] <= thr["median"] <= thr["max"] and thr["median"] > 0, other


@pytest.mark.soak
def test_queue_targets_markdown_and_files(queue_run: tuple[Path, dict[str, Any], str]) -> None:
    out, data, stdout = queue_run
    targets = data["targets"]
    assert len(targets) == 24  # 6 goals x 2 sizes x felix commit / interval
    for t in targets:
        assert t["felix"] in QUEUE_FELIX and t["peer"] in DURABLE_PEERS
        if t["met"] is None:
            assert t["note"] and not _reachable(DURABLE_PEERS[t["peer"]])
        else:
            assert t["ratio"]["median"] > 0
    md = (out / "queue.md").read_text()
    for heading in ("### Targets (issue #13", "### Queue end to end", "### Same-run ratios"):
        assert heading in md and heading in stdout
    assert "| queue 64B, 32 in flight | felix commit |" in md
    assert (out / "queue_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import numpy as np

    with np.load(out / "queue_raw.npz") as raw:
        assert len(raw.files) >= 4 * 2 * 2  # workloads x felix systems x repetitions
        assert all(raw[k].dtype == np.int64 and len(raw[k]) for k in raw.files)
