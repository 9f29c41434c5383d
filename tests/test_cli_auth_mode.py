"""`--auth jwt|none`: jwt by default as soon as a port leaves loopback; none beyond
loopback only with --insecure (or mTLS on the QUIC port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from felix.cli import _auth_mode, _node_config, apply_config_file, build_parser
from felix.errors import ConfigError
from felix.node.config import NodeConfig


def node(tmp_path: Path, *argv: str) -> NodeConfig:
    full = ["up", "--data-dir", str(tmp_path), *argv]
    args = build_parser().parse_args(full)
    if args.config is not None:
        apply_config_file(args.parser, args, full)
    return _node_config(args)


def test_loopback_defaults_to_no_tokens(tmp_path: Path) -> None:
    assert node(tmp_path).auth is False
    assert node(tmp_path, "--listen", "127.0.0.1:0", "--control", "[::1]:0").auth is False


def test_a_port_beyond_loopback_defaults_to_jwt(tmp_path: Path) -> None:
    eu = ("--region", "eu-1")  # beyond loopback a node names its region
    assert node(tmp_path, "--listen", "0.0.0.0:5000", *eu).auth is True
    assert node(tmp_path, "--control", "10.0.0.7:8443", *eu).auth is True


def test_explicit_modes(tmp_path: Path) -> None:
    assert node(tmp_path, "--auth").auth is True  # bare --auth is jwt
    assert node(tmp_path, "--auth", "jwt").auth is True
    assert node(tmp_path, "--auth", "none").auth is False
    config = node(
        tmp_path, "--listen", "0.0.0.0:5000", "--auth", "none", "--insecure", "--region", "eu-1"
    )
    assert config.auth is False and config.insecure


def test_no_tokens_beyond_loopback_needs_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--auth none.*--insecure"):
        node(tmp_path, "--listen", "0.0.0.0:5000", "--auth", "none")
    with pytest.raises(ConfigError, match="--insecure"):
        node(tmp_path, "--control", "0.0.0.0:8443", "--auth", "none")
    # --insecure alone does not switch tokens off: jwt stays the default.
    assert node(tmp_path, "--listen", "0.0.0.0:5000", "--insecure", "--region", "x").auth is True


def test_bad_mode_is_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--auth", "basic"])


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("auth = true", True),
        ("auth = false", False),
        ('auth = "jwt"', True),
        ('auth = "none"', False),
    ],
)
def test_config_file_auth(tmp_path: Path, setting: str, expected: bool) -> None:
    config_file = tmp_path / "felix.toml"
    config_file.write_text(setting + "\n")
    assert node(tmp_path, "--config", str(config_file)).auth is expected


def test_config_file_refuses_other_modes(tmp_path: Path) -> None:
    config_file = tmp_path / "felix.toml"
    config_file.write_text('auth = "basic"\n')
    with pytest.raises(ConfigError, match="auth must be one of"):
        node(tmp_path, "--config", str(config_file))


def test_control_plane_mode() -> None:
    assert _auth_mode(None, "127.0.0.1") is False
    assert _auth_mode(None, "0.0.0.0") is True
    assert _auth_mode("none", "0.0.0.0") is False
    assert _auth_mode("jwt", "127.0.0.1") is True
