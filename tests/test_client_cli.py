"""felix.client.cli: pub, sub and cache commands against a node running in a thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvloop

from felix.client.cli import (
    DEFAULT_URL,
    EXIT_NOTHING,
    _start,
    add_commands,
    connection_settings,
)
from felix.errors import ConfigError
from felix.node.local import LocalNode

pytestmark = pytest.mark.timeout(60)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="felix")
    add_commands(root.add_subparsers(dest="command", required=True))
    return root


def felix(*argv: str) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalNode]:
    """A LocalNode on its own loop in a thread, so commands can run their own loop here."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started = asyncio.run_coroutine_threadsafe(LocalNode.open(tmp_path / "node"), loop).result(10)
    try:
        yield started
    finally:
        asyncio.run_coroutine_threadsafe(started.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def at(node: LocalNode) -> list[str]:
    return ["--url", node.url, "--ca", str(node.ca_file)]


def test_cache_commands(node: LocalNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert felix("cache", "get", "c", "k", *at(node)) == EXIT_NOTHING
    assert capsys.readouterr().out == ""
    assert felix("cache", "set", "c", "k", "héllo", *at(node)) == 0
    assert felix("cache", "get", "c", "k", *at(node)) == 0
    assert capsys.readouterr().out == "héllo\n"
    assert felix("cache", "set", "c", "k", "x", "--nx", *at(node)) == EXIT_NOTHING
    assert felix("cache", "get", "c", "k", "--json", *at(node)) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "cache": "c",
        "key": "k",
        "found": True,
        "data": "héllo",
        "encoding": "utf-8",
    }
    assert felix("cache", "del", "c", "k", "--json", *at(node)) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] is True
    assert felix("cache", "del", "c", "k", *at(node)) == EXIT_NOTHING
    assert felix("cache", "set", "c", "t", "v", "--ttl", "30.5", *at(node)) == 0
    assert felix("cache", "get", "c", "t", *at(node)) == 0


def test_pub_and_sub(node: LocalNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert felix("pub", "orders", "one", *at(node)) == 0
    first = int(capsys.readouterr().out)
    assert felix("pub", "orders", "two", "--header", "k=v", "--json", *at(node)) == 0
    assert json.loads(capsys.readouterr().out) == {
        "stream": "orders",
        "offset": first + 1,
        "durability": "memory",  # an in-memory stream
    }
    assert felix("pub", "orders", "three", "--no-ack", *at(node)) == 0
    assert capsys.readouterr().out == ""
    assert felix("sub", "orders", "--start", "earliest", "--count", "3", "--json", *at(node)) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(m["offset"], m["data"]) for m in lines] == [
        (first, "one"),
        (first + 1, "two"),
        (first + 2, "three"),
    ]
    assert lines[1]["headers"] == {"k": "v"}
    # Plain output is the raw payload; --idle ends a quiet subscription.
    assert felix("sub", "orders", "--start", str(first + 2), "--idle", "0.2", *at(node)) == 0
    assert capsys.readouterr().out == "three\n"


def test_node_json_supplies_url_and_ca(
    node: LocalNode,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FELIX_URL", raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    info = {"quic": f"127.0.0.1:{node.port}", "ca": str(node.ca_file)}
    (data_dir / "node.json").write_text(json.dumps(info))
    assert felix("cache", "set", "c", "k", "v", "--data-dir", str(data_dir)) == 0
    assert felix("cache", "get", "c", "k", "--node-json", str(data_dir / "node.json")) == 0
    assert capsys.readouterr().out == "v\n"


def test_connection_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node_json = tmp_path / "node.json"
    node_json.write_text(json.dumps({"quic": "0.0.0.0:7000", "ca": "/node/ca.pem"}))
    monkeypatch.delenv("FELIX_URL", raising=False)

    def settings(*argv: str) -> tuple[str, str | None]:
        return connection_settings(parser().parse_args(["cache", "get", "c", "k", *argv]))

    assert settings() == (DEFAULT_URL, None)
    assert settings("--node-json", str(node_json)) == ("felix://127.0.0.1:7000", "/node/ca.pem")
    assert settings("--data-dir", str(tmp_path)) == ("felix://127.0.0.1:7000", "/node/ca.pem")
    monkeypatch.setenv("FELIX_URL", "felix://env:1")
    assert settings("--node-json", str(node_json))[0] == "felix://env:1"
    assert settings("--url", "felix://flag:2", "--ca", "x.pem") == ("felix://flag:2", "x.pem")
    node_json.write_text(json.dumps({"quic": "[::]:7001", "ca": None}))
    monkeypatch.delenv("FELIX_URL")
    assert settings("--node-json", str(node_json)) == ("felix://[::1]:7001", None)
    with pytest.raises(ConfigError):
        settings("--node-json", str(tmp_path / "missing.json"))


def test_start_option() -> None:
    assert _start("latest") == "latest" and _start("earliest") == "earliest"
    assert _start("17") == 17
    assert _start("2026-01-01T09:30:00Z") == {"time": datetime(2026, 1, 1, 9, 30, tzinfo=UTC)}
    east = _start("2026-01-01T11:30:00.5+02:00")
    assert isinstance(east, dict)
    assert east["time"] == datetime(2026, 1, 1, 9, 30, 0, 500000, tzinfo=UTC)
    for bad in ("first", "2026-01-01T09:30:00", "2026-01-01", "2026-13-01T00:00Z", "1969-12-31Z"):
        with pytest.raises(ConfigError):
            _start(bad)
    with pytest.raises(ConfigError, match="zone"):
        _start("2026-01-01T09:30:00")


def test_usage_errors(node: LocalNode) -> None:
    with pytest.raises(ConfigError):
        felix("sub", "orders", "--start", "first", *at(node))
    with pytest.raises(ConfigError, match="zone"):
        felix("sub", "orders", "--start", "2026-01-01T09:30:00", *at(node))
    with pytest.raises(ConfigError):
        felix("pub", "orders", "x", "--header", "novalue", *at(node))
    with pytest.raises(SystemExit):
        felix("cache", "set", "c", "k", "v", "--nx", "--xx", *at(node))
