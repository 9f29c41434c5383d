"""The `felix` commands find their node without flags: contexts (felix ctx) and a local
node's node.json (felix/context.py), end to end with a real node."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import felix.context
from felix.cli import main as felix_main
from felix.context import Context, load_context, resolve, save_context
from felix.errors import BadRequest, ConfigError
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.timeout(180)


def test_contexts_round_trip_with_private_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    assert (
        felix_main(
            [
                "ctx",
                "add",
                "prod",
                "--url",
                "felix://prod:5000",
                "--ca",
                str(ca),
                "--token-file",
                str(token),
                "--tenant",
                "acme",
                "--use",
            ]
        )
        == 0
    )
    assert felix_main(["ctx", "add", "dev", "--url", "felix://127.0.0.1:5000"]) == 0
    capsys.readouterr()
    assert felix_main(["ctx", "ls"]) == 0
    assert capsys.readouterr().out == "  dev\n* prod\n"
    path = felix.context.config_dir() / "contexts" / "prod.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "tok-123" not in path.read_text()  # the secret stays in its own file
    found = resolve()
    assert (found.url, found.ca, found.token, found.tenant) == (
        "felix://prod:5000",
        str(ca),
        "tok-123",
        "acme",
    )
    assert found.source == "context prod"
    assert resolve("dev").url == "felix://127.0.0.1:5000"  # --context wins over current
    assert felix_main(["ctx", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["token"] == "(set)" and shown["url"] == "felix://prod:5000"
    assert felix_main(["ctx", "use", "dev"]) == 0
    assert resolve().source == "context dev"
    assert felix_main(["ctx", "rm", "dev"]) == 0
    assert resolve().source == "built-in defaults"  # the current one was removed
    assert felix_main(["ctx", "use", "--none"]) == 0
    capsys.readouterr()
    assert felix_main(["ctx", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": None, "contexts": ["prod"]}


def test_bad_contexts_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadRequest):
        save_context(Context(name="../etc"))
    with pytest.raises(ConfigError, match="no context 'nope'"):
        load_context("nope")
    monkeypatch.setenv("FELIX_CONTEXT", "nope")
    with pytest.raises(ConfigError, match="no context 'nope'"):
        resolve()
    monkeypatch.delenv("FELIX_CONTEXT")
    save_context(Context(name="bad"))
    (felix.context.config_dir() / "contexts" / "bad.json").write_text('{"password": "x"}')
    with pytest.raises(ConfigError, match="expected an object with keys"):
        load_context("bad")
    assert felix_main(["ctx", "add", "x", "--token-file", str(tmp_path / "missing")]) == 2
    assert felix_main(["ctx", "use", "nope"]) == 2


def test_a_local_node_json_and_its_admin_token_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    info = {
        "quic": "0.0.0.0:7000",
        "control": "https://h:8443",
        "http": "127.0.0.1:8080",
        "ca": "/d/ca.pem",
        "pid": os.getpid(),
    }
    (data / "node.json").write_text(json.dumps(info))
    (data / "admin-token").write_text("admin-secret\n")
    monkeypatch.setattr(felix.context, "LOCAL_DATA_DIR", data)
    found = resolve()
    assert (found.url, found.control_url, found.ca, found.control_token) == (
        "felix://127.0.0.1:7000",
        "https://h:8443",
        "/d/ca.pem",
        "admin-secret",
    )
    assert found.warning is None
    # The admin token goes with that node's own health port (its per-tenant routes).
    assert (found.http, found.http_token) == ("http://127.0.0.1:8080", "admin-secret")
    # ... and is never shown (review finding: ctx show printed it).
    assert felix_main(["ctx", "show", "--json"]) == 0
    shown = capsys.readouterr().out
    assert "admin-secret" not in shown and json.loads(shown)["http_token"] == "(set)"
    other = tmp_path / "other"
    other.mkdir()
    (other / "node.json").write_text(
        json.dumps({**info, "quic": "127.0.0.1:7001", "pid": 2**22 + 1})
    )
    monkeypatch.setenv("FELIX_DATA_DIR", str(other))  # wins over ./data
    found = resolve()
    assert found.url == "felix://127.0.0.1:7001" and found.control_token is None
    assert found.warning is not None and "not running" in found.warning
    save_context(Context(name="local", data_dir=str(data), tenant="acme"))
    found = resolve("local")  # a context with a data dir: its node.json fills the rest
    assert (found.url, found.tenant, found.control_token) == (
        "felix://127.0.0.1:7000",
        "acme",
        "admin-secret",
    )
    assert found.http_token == "admin-secret"
    # A context naming a health port of its own never gets the data dir's admin token.
    save_context(Context(name="elsewhere", data_dir=str(data), http="http://h2:8080"))
    found = resolve("elsewhere")
    assert (found.http, found.http_token) == ("http://h2:8080", None)


@pytest.fixture
def local_node(tmp_path: Path) -> Iterator[tuple[NodeProcess, Path]]:
    """A node whose data dir is ./data of the returned working directory."""
    work = tmp_path / "work"
    work.mkdir()
    node = NodeProcess(work / "data")
    yield node, work
    node.stop()


def _cli(work: Path, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Nothing but the working directory says where the node is.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIX_")}
    env["FELIX_CONFIG_DIR"] = str(work / "config")  # no contexts
    return subprocess.run(
        [sys.executable, "-m", "felix.cli", *argv],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def test_a_new_user_needs_no_flags_next_to_a_node(local_node: tuple[NodeProcess, Path]) -> None:
    node, work = local_node
    published = _cli(work, "-v", "pub", "orders", "hello")
    assert published.returncode == 0, published.stderr
    assert f"url felix://127.0.0.1:{node.port} from data/node.json" in published.stderr
    assert "ca " in published.stderr and "from data/node.json" in published.stderr
    got = _cli(work, "sub", "orders", "--start", "earliest", "--count", "1", "--idle", "10")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "hello\n"
    assert _cli(work, "cache", "set", "sessions", "k", "v").returncode == 0
    assert _cli(work, "cache", "get", "sessions", "k").stdout == "v\n"
    created = _cli(work, "stream", "create", "defined")
    assert created.returncode == 0, created.stderr
    listed = _cli(work, "-v", "stream", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "url http://127.0.0.1:" in listed.stderr and "from data/node.json" in listed.stderr
    assert "defined" in listed.stdout
    status = _cli(work, "status", "--json", "--interval", "0.2")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ready"] is True


def test_a_stopped_node_is_named_in_a_warning(local_node: tuple[NodeProcess, Path]) -> None:
    node, work = local_node
    node.stop()
    failed = _cli(work, "cache", "get", "sessions", "k", "--timeout", "1")
    assert failed.returncode != 0
    assert "which is not running: is the node up?" in failed.stderr


def test_environment_tokens_go_only_where_the_user_pointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ./data/node.json (a cloned repository's, say) or a context names its own node:
    $FELIX_TOKEN and $FELIX_CONTROL_TOKEN are not sent there."""
    from felix.cli import build_parser
    from felix.client.cli import _settings
    from felix.control.cliargs import open_client

    data = tmp_path / "data"
    data.mkdir()
    info = {"quic": "10.9.9.9:5000", "control": "http://10.9.9.9:8443", "pid": os.getpid()}
    (data / "node.json").write_text(json.dumps(info))
    monkeypatch.setattr(felix.context, "LOCAL_DATA_DIR", data)
    monkeypatch.setenv("FELIX_TOKEN", "user-token")
    monkeypatch.setenv("FELIX_CONTROL_TOKEN", "user-admin-token")
    parser = build_parser()
    found = _settings(parser.parse_args(["cache", "get", "c", "k"]))
    assert found["url"][0] == "felix://10.9.9.9:5000" and found["token"][0] is None
    pointed = _settings(parser.parse_args(["cache", "get", "c", "k", "--url", "felix://h:1"]))
    assert pointed["token"] == ("user-token", "$FELIX_TOKEN")
    with open_client(parser.parse_args(["stream", "ls"])) as client:
        assert client.url == "http://10.9.9.9:8443"
        assert "authorization" not in client._http.headers
    with open_client(parser.parse_args(["stream", "ls", "--url", "http://h:1"])) as client:
        assert client._http.headers["authorization"] == "Bearer user-admin-token"
    # A huge pid in a node.json is no crash.
    (data / "node.json").write_text(json.dumps({**info, "pid": 10**30}))
    assert felix.context.resolve().warning is not None


def test_a_health_token_goes_only_where_the_user_pointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: $FELIX_NODE_TOKEN went to whatever health address a node.json in
    the working directory named. Now: only to a node named by --node/$FELIX_NODE_URL;
    a discovered node gets its own data dir's admin token, no other node anything."""
    import argparse

    from felix.control.cli import _node_token

    data = tmp_path / "data"
    data.mkdir()
    (data / "node.json").write_text(json.dumps({"http": "127.0.0.1:8080", "pid": os.getpid()}))
    (data / "admin-token").write_text("admin-secret\n")
    monkeypatch.setattr(felix.context, "LOCAL_DATA_DIR", data)
    monkeypatch.setenv("FELIX_NODE_TOKEN", "env-secret")
    args = argparse.Namespace(context=None)
    assert _node_token("http://127.0.0.1:8080", args, explicit=False) == "admin-secret"
    assert _node_token("http://elsewhere:8080", args, explicit=False) is None
    assert _node_token("http://elsewhere:8080", args, explicit=True) == "env-secret"
    monkeypatch.delenv("FELIX_NODE_TOKEN")
    assert _node_token("http://elsewhere:8080", args, explicit=True) is None
