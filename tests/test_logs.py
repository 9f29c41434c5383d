"""Log output (felix/logs.py): text or JSON lines, levels per component, credentials
redacted, in every process of a real node."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from felix.cli import main as felix_main
from felix.errors import ConfigError
from felix.logs import configure, parse_levels
from tests.nodeproc import NodeProcess

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in ("FELIX_LOG_FORMAT", "FELIX_LOG_LEVEL", "FELIX_LOG_LEVELS"):
        monkeypatch.setenv(name, "")  # restored (and unset) by monkeypatch
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("felix.gateway", "felix.shard"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_json_lines_levels_per_component_and_redaction(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(
        "gateway-0", log_format="json", level="warning", levels="felix.gateway=debug", export=True
    )
    logging.getLogger("felix.gateway").debug("token %s accepted", TOKEN)
    logging.getLogger("felix.shard").info("not shown: below warning")
    logging.getLogger("felix.shard").warning("Authorization: Bearer abcdefgh12345678 refused")
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        logging.getLogger("felix.shard").exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["level"], x["logger"], x["process"]) for x in lines] == [
        ("debug", "felix.gateway", "gateway-0"),
        ("warning", "felix.shard", "gateway-0"),
        ("error", "felix.shard", "gateway-0"),
    ]
    assert lines[0]["msg"] == "token [redacted] accepted"
    assert lines[1]["msg"] == "Authorization: [redacted] refused"
    assert "ValueError: bad token [redacted]" in lines[2]["exc"] and TOKEN not in lines[2]["exc"]
    assert lines[0]["ts"].endswith("Z")
    assert os.environ["FELIX_LOG_FORMAT"] == "json"  # what child processes inherit
    assert os.environ["FELIX_LOG_LEVELS"] == "felix.gateway=debug"


def test_text_lines_name_the_process(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("shard-1", export=True)
    logging.getLogger("felix.shard").info("hello %s", TOKEN)
    line = capsys.readouterr().err.strip()
    assert line.endswith(" shard-1 felix.shard INFO hello [redacted]")


def test_bad_settings_are_refused(restore_logging: None) -> None:
    assert parse_levels("felix.gateway=DEBUG, felix.shard=error") == {
        "felix.gateway": logging.DEBUG,
        "felix.shard": logging.ERROR,
    }
    for bad in ("felix.gateway", "felix.gateway=loud", "=debug", "a b=info"):
        with pytest.raises(ConfigError):
            parse_levels(bad)
    with pytest.raises(ConfigError, match="unknown level"):
        configure("x", level="verbose")
    with pytest.raises(ConfigError, match="--log-format"):
        configure("x", log_format="xml")
    assert felix_main(["up", "--log-levels", "felix.gateway", "--data-dir", "/nonexistent"]) == 2


def test_every_process_of_a_node_logs_json(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "--log-format", "json", gateways=1, shards=1)
    node.stop()
    lines = [x for x in node.log().splitlines() if x and not x.startswith("felix ready ")]
    records = [json.loads(line) for line in lines]  # every other line is a JSON object
    processes = {r["process"] for r in records}
    assert "supervisor" in processes
    assert processes & {"gateway-0", "control-0", "shard-0"}, processes
    assert all(set(r) >= {"ts", "level", "logger", "process", "msg"} for r in records)


# -- felix config show ------------------------------------------------------------------------


def test_config_show_names_each_settings_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "felix.toml"
    config.write_text('shards = 3\nreplay-bytes = "128MiB"\ngateways = 1\n')
    monkeypatch.setenv("FELIX_QUIC_ENGINE", "aioquic")
    monkeypatch.setenv("FELIX_CONTROL_TOKEN", "secret-admin-token")
    argv = ["config", "show", "--json", "--config", str(config), "--gateways", "2",
            "--data-dir", str(tmp_path / "d")]  # fmt: skip
    assert felix_main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert rows["shards"] == {"value": 3, "source": f"file {config}"}
    assert rows["replay-bytes"] == {"value": "128MiB", "source": f"file {config}"}
    assert rows["gateways"] == {"value": 2, "source": "flag"}  # the flag wins over the file
    assert rows["engine"] == {"value": "aioquic", "source": "environment $FELIX_QUIC_ENGINE"}
    assert rows["control-token"]["value"] == "(set)" and "secret-admin-token" not in out
    assert rows["memory-budget"] == {"value": "1GiB", "source": "default"}
    assert rows["topology"] == {"value": "split", "source": "derived from auto (default)"}
    assert rows["auth"]["value"] == "none"
    assert not (tmp_path / "d").exists()  # nothing started, nothing created
    assert felix_main(["config", "show", "--data-dir", str(tmp_path / "d")]) == 0
    assert "memory-budget" in capsys.readouterr().out


def test_config_show_refuses_what_felix_up_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "felix.toml"
    config.write_text("shardz = 3\n")
    assert felix_main(["config", "show", "--config", str(config)]) == 2
    assert "unknown setting 'shardz'" in capsys.readouterr().err
    assert felix_main(["config", "show", "--replay-bytes", "lots"]) == 2
