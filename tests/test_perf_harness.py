"""Smoke test of the latency harness (perf/): it runs and its output is sane.

Runs ``python -m perf`` in a reduced mode (two repetitions, tiny counts, no knob
sweep) against a real felix node and whichever local peers answer, then checks the
JSON shape, monotonic percentiles, positive counts, the Markdown table and the PNGs.
It does not check that felix is fast: no timed assertions.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
        timeout=55,
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
    assert any("queue" in label for label in labels) and len(labels) == 10


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
    assert queue["met"] is None and "not available in felix yet" in queue["note"]


def test_markdown_lists_felix_and_reachable_peers(
    run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, stdout = run
    md = (out / "results.md").read_text()
    assert "| felix |" in md and "### Targets" in md
    assert "not available in felix yet" in md
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
