"""`felix up --topology auto|split|embedded`: which processes a node runs, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from felix.cli import _node_config, apply_config_file, build_parser
from felix.errors import ConfigError
from felix.node import config as node_config
from felix.node.config import NodeConfig, resolve_topology, usable_cpus


def node(tmp_path: Path, *argv: str) -> NodeConfig:
    full = ["up", "--data-dir", str(tmp_path), *argv]
    args = build_parser().parse_args(full)
    if args.config is not None:
        apply_config_file(args.parser, args, full)
    return _node_config(args)


@pytest.mark.parametrize(
    ("topology", "gateways", "shards", "cpus", "expected"),
    [
        # auto: small machines host the shards in the one gateway...
        ("auto", None, None, 1, (1, 1, True)),
        ("auto", None, None, 2, (1, 2, True)),
        ("auto", None, 4, 2, (1, 4, True)),
        # ...bigger ones split, and asking for gateway processes means split anywhere.
        ("auto", 1, None, 2, (1, 2, False)),
        ("auto", 1, 1, 1, (1, 1, False)),
        ("auto", None, None, 3, (3, 3, False)),
        ("auto", None, None, 16, (16, 16, False)),
        ("auto", 2, None, 2, (2, 2, False)),
        ("auto", 1, 8, 16, (1, 8, False)),
        ("split", None, None, 2, (2, 2, False)),
        ("split", 1, 1, 2, (1, 1, False)),
        ("embedded", None, None, 16, (1, 16, True)),
        ("embedded", 1, 3, 16, (1, 3, True)),
    ],
)
def test_resolve(
    topology: str,
    gateways: int | None,
    shards: int | None,
    cpus: int,
    expected: tuple[int, int, bool],
) -> None:
    assert resolve_topology(topology, gateways, shards, cpus) == expected


def test_embedded_with_several_gateways_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs --gateways 1"):
        resolve_topology("embedded", 2, None, 4)
    with pytest.raises(ConfigError, match="--topology must be one of"):
        resolve_topology("hybrid", None, None, 4)


def test_cli_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("felix.cli.usable_cpus", lambda: 2)
    c = node(tmp_path)
    assert (c.gateways, c.shards, c.embedded_shards) == (1, 2, True)
    c = node(tmp_path, "--topology", "split")
    assert (c.gateways, c.shards, c.embedded_shards) == (2, 2, False)
    c = node(tmp_path, "--gateways", "2", "--shards", "3")
    assert (c.gateways, c.shards, c.embedded_shards) == (2, 3, False)
    c = node(tmp_path, "--embedded-shards", "--shards", "4")  # the older flag
    assert (c.gateways, c.shards, c.embedded_shards) == (1, 4, True)
    monkeypatch.setattr("felix.cli.usable_cpus", lambda: 8)
    c = node(tmp_path)
    assert (c.gateways, c.shards, c.embedded_shards) == (8, 8, False)


def test_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("felix.cli.usable_cpus", lambda: 8)
    toml = tmp_path / "felix.toml"
    toml.write_text('topology = "embedded"\nshards = 3\n')
    c = node(tmp_path, "--config", str(toml))
    assert (c.gateways, c.shards, c.embedded_shards) == (1, 3, True)


def test_usable_cpus_follows_the_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod limited to 1.5 CPUs on a big host runs 2 processes, not one per host CPU."""
    real_path = Path
    cpu_max = tmp_path / "cpu.max"

    def fake_path(p: str) -> Path:
        return cpu_max if p == "/sys/fs/cgroup/cpu.max" else real_path(p)

    monkeypatch.setattr(node_config, "Path", fake_path)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    cpu_max.write_text("150000 100000\n")
    assert usable_cpus() == 2
    cpu_max.write_text("max 100000\n")
    assert usable_cpus() == 64
    cpu_max.write_text("20000 100000\n")
    assert usable_cpus() == 1
    cpu_max.unlink()
    assert usable_cpus() == 64
