"""felix.control.cli and felix.control.client against a real uvicorn server in a thread."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from felix.client.cli import add_commands as add_client_commands
from felix.control.api import create_app
from felix.control.cli import add_commands, parse_settings
from felix.control.client import DEFAULT_URL, ControlClient, error_from_response
from felix.control.model import ResourceKind
from felix.control.store import AlreadyExists, CursorTooOld, HasChildren, VersionConflict
from felix.control.stores.memory import MemoryStore
from felix.errors import (
    BadRequest,
    ConfigError,
    FelixTimeoutError,
    NotFound,
    Overloaded,
    ServerError,
    SettingConflict,
    Unavailable,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Server:
    url: str
    store: MemoryStore


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The API on a MemoryStore, served by uvicorn on an ephemeral port in a thread."""
    store = MemoryStore(**getattr(request, "param", {}))
    app = create_app(store, region="eu-1", node_info={"pid": 7})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Server(f"http://127.0.0.1:{port}", store)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def parser() -> argparse.ArgumentParser:
    """The felix command line as felix.cli builds it: the client's commands, then ours."""
    root = argparse.ArgumentParser(prog="felix")
    commands = root.add_subparsers(dest="command", required=True)
    add_client_commands(commands)
    add_commands(commands)
    return root


def felix(server: Server, *argv: str) -> int:
    args = parser().parse_args([*argv, "--url", server.url])
    code: int = args.func(args)
    return code


def out_json(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# -- CLI ---------------------------------------------------------------------------------------


def test_tenant_commands(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert felix(server, "tenant", "ls") == 0
    assert capsys.readouterr().out == ""
    assert felix(server, "tenant", "create", "acme", "--set", "description=team a") == 0
    assert capsys.readouterr().out == "created tenant acme in region eu-1 (version 1)\n"
    assert felix(server, "tenant", "create", "beta", "--json") == 0
    [beta] = out_json(capsys)
    assert beta["kind"] == "tenant" and beta["path"] == ["beta"] and beta["name"] == "beta"
    assert beta["version"] == 1 and beta["spec"] == {
        "description": "",
        "memory_quota_bytes": None,
        "disk_quota_bytes": None,
        "max_resources_per_shard": None,
        "region": "eu-1",
        "auto_created": False,
    }

    assert felix(server, "tenant", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    # ORIGIN: defined through the API, or auto (created by a node on first use).
    assert lines[0].split() == ["NAME", "REGION", "VERSION", "UPDATED", "ORIGIN"]
    assert [line.split()[4] for line in lines[1:]] == ["defined", "defined"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["acme", "eu-1", "1"],
        ["beta", "eu-1", "1"],
    ]
    assert felix(server, "tenant", "ls", "--json") == 0
    assert [t["name"] for t in out_json(capsys)] == ["acme", "beta"]

    assert felix(server, "tenant", "info", "acme") == 0
    info = capsys.readouterr().out.splitlines()
    assert info[0] == "tenant acme"
    assert [line.split() for line in info[1:2] + info[4:5]] == [
        ["version", "1"],
        ["description", "team", "a"],
    ]

    with pytest.raises(ConfigError, match="--yes"):
        felix(server, "tenant", "rm", "beta")
    assert felix(server, "tenant", "rm", "beta", "--yes") == 0
    assert capsys.readouterr().out == "deleted tenant beta\n"
    with pytest.raises(NotFound, match="beta"):
        felix(server, "tenant", "info", "beta")


def test_namespace_stream_and_cache_commands(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert felix(server, "tenant", "create", "acme") == 0
    assert felix(server, "ns", "create", "prod", "--tenant", "acme") == 0
    assert felix(server, "ns", "create", "dev", "--tenant", "acme") == 0
    capsys.readouterr()
    where = ["--tenant", "acme", "--namespace", "prod"]
    settings = ["--set", "replay_max_records=9", "--set", "queue.max_deliveries=3"]
    assert felix(server, "stream", "create", "orders", *where, *settings, "--json") == 0
    [orders] = out_json(capsys)
    assert orders["path"] == ["acme", "prod", "orders"]
    assert orders["spec"]["replay_max_records"] == 9 and orders["spec"]["fsync"] == "none"
    assert orders["spec"]["queue"] == {
        "max_deliveries": 3,
        "ack_deadline_s": 30.0,
        "dead_letter": True,
    }
    # ns/name names another namespace of the tenant.
    assert felix(server, "stream", "create", "dev/events", "--tenant", "acme") == 0
    assert capsys.readouterr().out == "created stream acme/dev/events in region eu-1 (version 1)\n"

    assert felix(server, "stream", "info", "orders", *where) == 0
    info = capsys.readouterr().out.splitlines()
    assert info[0] == "stream acme/prod/orders"
    assert any(line.split() == ["queue.max_deliveries", "3"] for line in info)
    assert any(line.split() == ["retention_bytes", "null"] for line in info)

    assert felix(server, "ns", "ls", "--tenant", "acme", "--json") == 0
    assert [n["path"] for n in out_json(capsys)] == [["acme", "dev"], ["acme", "prod"]]
    assert felix(server, "stream", "ls", *where, "--json") == 0
    assert [s["name"] for s in out_json(capsys)] == ["orders"]

    # cache: the same group as the data commands (get/set/del), which still parse.
    assert felix(server, "cache", "create", "sessions", *where, "--set", "budget_bytes=8192") == 0
    assert (
        capsys.readouterr().out == "created cache acme/prod/sessions in region eu-1 (version 1)\n"
    )
    assert felix(server, "cache", "info", "prod/sessions", "--tenant", "acme", "--json") == 0
    assert out_json(capsys)[0]["spec"]["budget_bytes"] == 8192
    data_get = parser().parse_args(["cache", "get", "sessions", "k"])
    assert data_get.cache_command == "get" and data_get.key == "k"

    assert felix(server, "stream", "rm", "orders", *where, "--json") == 0
    assert out_json(capsys) == [
        {"kind": "stream", "path": ["acme", "prod", "orders"], "deleted": True}
    ]
    assert felix(server, "stream", "ls", *where) == 0
    assert capsys.readouterr().out == ""


def test_group_commands(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert felix(server, "tenant", "create", "acme") == 0
    assert felix(server, "ns", "create", "prod", "--tenant", "acme") == 0
    where = ["--tenant", "acme", "--namespace", "prod"]
    assert felix(server, "stream", "create", "orders", *where, "--set", "durable=true") == 0
    assert felix(server, "stream", "create", "memory", *where) == 0
    capsys.readouterr()

    options = [
        "--lease-ms",
        "60000",
        "--max-deliveries",
        "3",
        "--backoff-ms",
        "100,200",
        "--max-ack-pending",
        "50",
        "--max-span",
        "500",
        "--dead-letter",
        "failed",
        "--exclusive",
        "--start",
        "12",
    ]
    assert felix(server, "group", "create", "orders", "workers", *where, *options) == 0
    assert capsys.readouterr().out == "created group acme/prod/orders/workers (version 1)\n"
    # Left out: the defaults. ns/name names the stream's namespace.
    assert felix(server, "group", "create", "prod/orders", "audit", "--tenant", "acme") == 0
    capsys.readouterr()
    workers = server.store._resources[(ResourceKind.GROUP, ("acme", "prod", "orders", "workers"))]
    assert workers.spec == {
        "start": {"offset": 12},
        "lease_ms": 60000,
        "max_deliveries": 3,
        "backoff_ms": [100, 200],
        "max_ack_pending": 50,
        "max_span": 500,
        "dead_letter": "failed",
        "exclusive": True,
    }

    assert felix(server, "group", "ls", "orders", *where) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "VERSION",
        "START",
        "LEASE_MS",
        "MAX_DELIVERIES",
        "DEAD_LETTER",
    ]
    assert lines[1].split() == ["audit", "1", "earliest", "30000", "5", "orders.dlq"]
    assert lines[2].split() == ["workers", "1", '{"offset":', "12}", "60000", "3", "failed"]
    assert felix(server, "group", "ls", "orders", *where, "--json") == 0
    assert [g["name"] for g in out_json(capsys)] == ["audit", "workers"]

    assert felix(server, "group", "info", "orders", "workers", *where) == 0
    info = capsys.readouterr().out.splitlines()
    assert info[0] == "group acme/prod/orders/workers"
    assert any(line.split() == ["backoff_ms", "[100,", "200]"] for line in info)
    assert any(line.split() == ["start.offset", "12"] for line in info)
    assert felix(server, "group", "info", "orders", "audit", *where, "--json") == 0
    assert out_json(capsys)[0]["spec"]["start"] == "earliest"

    # Refusals: the shard's rules, a stream that is not durable, a stream with groups.
    with pytest.raises(BadRequest, match="lease_ms"):
        felix(server, "group", "create", "orders", "x", *where, "--lease-ms", "1")
    with pytest.raises(SettingConflict, match="durable"):
        felix(server, "group", "create", "memory", "x", *where)
    with pytest.raises(NotFound):
        felix(server, "group", "create", "nope", "x", *where)
    with pytest.raises(SystemExit):
        parser().parse_args(["group", "create", "orders", "x", "--start", "soon"])
    with pytest.raises(SystemExit):
        parser().parse_args(["group", "create", "orders", "x", "--backoff-ms", "1,a"])
    with pytest.raises(HasChildren):
        felix(server, "stream", "rm", "orders", *where)

    assert felix(server, "group", "rm", "orders", "audit", *where) == 0
    assert capsys.readouterr().out == "deleted group acme/prod/orders/audit\n"
    assert felix(server, "stream", "rm", "orders", *where, "--cascade", "--json") == 0
    assert out_json(capsys) == [
        {"kind": "group", "path": ["acme", "prod", "orders", "workers"], "deleted": True},
        {"kind": "stream", "path": ["acme", "prod", "orders"], "deleted": True},
    ]
    with pytest.raises(NotFound):
        felix(server, "group", "ls", "orders", *where)


def test_rm_of_a_namespace_with_resources_needs_cascade(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    felix(server, "tenant", "create", "acme")
    felix(server, "ns", "create", "prod", "--tenant", "acme")
    felix(server, "stream", "create", "orders", "--tenant", "acme", "--namespace", "prod")
    capsys.readouterr()
    with pytest.raises(HasChildren, match="cascade"):
        felix(server, "ns", "rm", "prod", "--tenant", "acme", "--yes")
    with pytest.raises(ConfigError, match="--yes"):
        felix(server, "ns", "rm", "prod", "--tenant", "acme", "--cascade")
    assert felix(server, "tenant", "rm", "acme", "--cascade", "--yes") == 0
    assert capsys.readouterr().out.splitlines() == [
        "deleted stream acme/prod/orders",
        "deleted namespace acme/prod",
        "deleted tenant acme",
    ]


_ISSUER_SETTINGS = [
    "--set",
    "issuer=https://idp.example",
    "--set",
    "audience=felix",
    "--set",
    'algorithms=["RS256"]',
    "--set",
    "jwks_url=https://idp.example/jwks",
]
_POLICY_SETTINGS = ["--set", 'permissions=["stream.publish:stream:acme/prod/*"]']
_BINDING_SETTINGS = ["--set", "subject=group:eng", "--set", 'policies=["publishers"]']


@pytest.mark.parametrize(
    ("group", "kind", "name", "settings", "spec", "info_row"),
    [
        (
            "issuer",
            "issuer",
            "okta",
            _ISSUER_SETTINGS,
            {
                "issuer": "https://idp.example",
                "audience": "felix",
                "algorithms": ["RS256"],
                "jwks_url": "https://idp.example/jwks",
                "jwks": None,
                "groups_claim": "groups",
            },
            ["algorithms", '["RS256"]'],
        ),
        (
            "policy",
            "policy",
            "publishers",
            _POLICY_SETTINGS,
            {"permissions": ["stream.publish:stream:acme/prod/*"], "description": ""},
            ["permissions", '["stream.publish:stream:acme/prod/*"]'],
        ),
        (
            "binding",
            "binding",
            "eng",
            _BINDING_SETTINGS,
            {"subject": "group:eng", "policies": ["publishers"], "issuer": None},
            ["subject", "group:eng"],
        ),
    ],
)
def test_security_resource_commands(
    server: Server,
    capsys: pytest.CaptureFixture[str],
    group: str,
    kind: str,
    name: str,
    settings: list[str],
    spec: dict[str, Any],
    info_row: list[str],
) -> None:
    assert felix(server, "tenant", "create", "acme") == 0
    capsys.readouterr()
    assert felix(server, group, "ls", "--tenant", "acme") == 0
    assert capsys.readouterr().out == ""

    assert felix(server, group, "create", name, "--tenant", "acme", *settings) == 0
    assert capsys.readouterr().out == f"created {kind} acme/{name} (version 1)\n"
    assert felix(server, group, "create", "other", "--tenant", "acme", *settings, "--json") == 0
    [other] = out_json(capsys)
    assert other["kind"] == kind and other["path"] == ["acme", "other"]
    assert other["name"] == "other" and other["version"] == 1 and other["spec"] == spec

    assert felix(server, group, "ls", "--tenant", "acme") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "UPDATED"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted([name, "other"])
    assert felix(server, group, "ls", "--tenant", "acme", "--json") == 0
    assert sorted(r["name"] for r in out_json(capsys)) == sorted([name, "other"])

    assert felix(server, group, "info", name, "--tenant", "acme") == 0
    info = capsys.readouterr().out.splitlines()
    assert info[0] == f"{kind} acme/{name}"
    assert any(line.split() == info_row for line in info)
    assert felix(server, group, "info", name, "--tenant", "acme", "--json") == 0
    assert out_json(capsys)[0]["spec"] == spec

    with pytest.raises(AlreadyExists):
        felix(server, group, "create", name, "--tenant", "acme", *settings)
    # No --yes needed, as for streams and caches.
    assert felix(server, group, "rm", name, "--tenant", "acme") == 0
    assert capsys.readouterr().out == f"deleted {kind} acme/{name}\n"
    assert felix(server, group, "rm", "other", "--tenant", "acme", "--json") == 0
    assert out_json(capsys) == [{"kind": kind, "path": ["acme", "other"], "deleted": True}]
    with pytest.raises(NotFound, match=name):
        felix(server, group, "info", name, "--tenant", "acme")
    assert felix(server, group, "ls", "--tenant", "acme", "--json") == 0
    assert out_json(capsys) == []


def test_security_resources_default_to_the_default_tenant(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    felix(server, "tenant", "create", "default")
    capsys.readouterr()
    policy = ["--set", 'permissions=["stream.publish:stream:default/prod/*"]']
    assert felix(server, "policy", "create", "publishers", *policy) == 0
    assert capsys.readouterr().out == "created policy default/publishers (version 1)\n"
    assert felix(server, "binding", "create", "eng", *_BINDING_SETTINGS, "--json") == 0
    assert out_json(capsys)[0]["path"] == ["default", "eng"]
    # A tenant's issuers, policies and bindings go with it.
    assert felix(server, "tenant", "rm", "default", "--cascade", "--yes") == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [
        "deleted binding default/eng",
        "deleted policy default/publishers",
        "deleted tenant default",
    ]


def test_security_resource_validation_errors(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    from felix.cli import main

    url = ["--url", server.url]
    assert main(["tenant", "create", "acme", *url]) == 0
    capsys.readouterr()
    with pytest.raises(NotFound):
        felix(server, "binding", "create", "b", "--tenant", "nope", *_BINDING_SETTINGS)
    with pytest.raises(BadRequest, match="names tenant 'acme', not 'beta'"):
        felix(server, "policy", "create", "p", "--tenant", "beta", *_POLICY_SETTINGS)
    with pytest.raises(BadRequest, match="permissions"):
        felix(server, "policy", "create", "p", "--tenant", "acme")  # required
    with pytest.raises(BadRequest):
        felix(server, "policy", "create", "p", "--tenant", "acme", "--set", 'permissions=["x"]')
    with pytest.raises(BadRequest, match="colour: Extra inputs are not permitted"):
        felix(
            server,
            "binding",
            "create",
            "b",
            "--tenant",
            "acme",
            *_BINDING_SETTINGS,
            "--set",
            "colour=blue",
        )
    with pytest.raises(BadRequest):
        felix(
            server,
            "issuer",
            "create",
            "i",
            "--tenant",
            "acme",
            *_ISSUER_SETTINGS,
            "--set",
            'algorithms=["HS256"]',
        )
    # Exit statuses: 1 for a refused setting, 2 for bad usage.
    bad = ["--set", 'permissions=["not a permission"]']
    assert main(["policy", "create", "p", "--tenant", "acme", *bad, *url]) == 1
    assert "permission" in capsys.readouterr().err
    assert main(["binding", "create", "b", "--tenant", "acme", "--set", "subject", *url]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["issuer", "ls", "--tenant", "acme", *url]) == 0
    assert capsys.readouterr().out == ""


def test_command_errors(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    felix(server, "tenant", "create", "acme")
    with pytest.raises(AlreadyExists):
        felix(server, "tenant", "create", "acme")
    with pytest.raises(NotFound, match="namespace"):
        felix(server, "stream", "create", "orders", "--tenant", "acme")  # no namespace default
    with pytest.raises(BadRequest, match="1 to 64 characters"):
        felix(server, "tenant", "create", "a*b")
    with pytest.raises(BadRequest, match="colour: Extra inputs are not permitted"):
        felix(server, "tenant", "create", "beta", "--set", "colour=blue")
    with pytest.raises(BadRequest, match="region"):
        felix(server, "stream", "create", "s", "--tenant", "acme", "--set", "region=mars")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        felix(server, "tenant", "create", "beta", "--set", "novalue")
    # Where the API is: $FELIX_CONTROL_URL when --url is not given.
    monkeypatch.setenv("FELIX_CONTROL_URL", server.url)
    args = parser().parse_args(["tenant", "ls", "--json"])
    assert args.func(args) == 0
    monkeypatch.setenv("FELIX_CONTROL_URL", "http://127.0.0.1:9")  # discard: nothing listens
    with pytest.raises(Unavailable, match="unreachable"):
        args.func(args)


def test_exit_statuses_through_felix_main(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    from felix.cli import main

    assert main(["tenant", "create", "acme", "--url", server.url]) == 0
    assert main(["tenant", "info", "nope", "--url", server.url]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["tenant", "rm", "acme", "--url", server.url]) == 2  # no --yes
    assert main(["tenant", "rm", "acme", "--yes", "--url", server.url]) == 0


@pytest.mark.parametrize(
    ("pairs", "settings"),
    [
        ([], {}),
        (["durable=true", "fsync=commit"], {"durable": True, "fsync": "commit"}),
        (
            ["retention_bytes=1024", "retention_age_s=null"],
            {"retention_bytes": 1024, "retention_age_s": None},
        ),
        (["region=eu-1", "description="], {"region": "eu-1", "description": ""}),
        (['region="7"', "x=1.5", "y=NaN"], {"region": "7", "x": 1.5, "y": "NaN"}),
        (
            ["queue.max_deliveries=3", "queue.dead_letter=false"],
            {"queue": {"max_deliveries": 3, "dead_letter": False}},
        ),
        (['queue={"max_deliveries": 2}'], {"queue": {"max_deliveries": 2}}),
        (["a=b=c"], {"a": "b=c"}),
    ],
)
def test_parse_settings(pairs: list[str], settings: dict[str, Any]) -> None:
    assert parse_settings(pairs) == settings


@pytest.mark.parametrize(
    "pairs", [["x"], ["=1"], ["a.=1"], [".a=1"], ["queue=1", "queue.x=2"], ["q.x=1", "q=2"]]
)
def test_parse_settings_refuses(pairs: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_settings(pairs)


# -- client ------------------------------------------------------------------------------------


def test_client_resources(server: Server) -> None:
    with ControlClient(server.url) as api:
        assert api.list_resources(ResourceKind.TENANT) == []
        tenant = api.create(ResourceKind.TENANT, ("acme",), {"description": "a"})
        assert tenant.path == ("acme",) and tenant.version == 1
        assert tenant.spec["description"] == "a" and tenant.spec["memory_quota_bytes"] is None
        api.create(ResourceKind.NAMESPACE, ("acme", "prod"))
        stream = api.create(
            ResourceKind.STREAM, ("acme", "prod", "orders"), {"replay_max_records": 9}
        )
        assert stream.spec["replay_max_records"] == 9 and stream.spec["fsync"] == "none"
        assert api.get(ResourceKind.STREAM, ("acme", "prod", "orders")) == stream
        assert api.list_resources(ResourceKind.STREAM, ("acme", "prod")) == [stream]
        assert api.list_resources(ResourceKind.CACHE, ("acme", "prod")) == []

        updated = api.update(
            ResourceKind.STREAM,
            ("acme", "prod", "orders"),
            {"queue": {"dead_letter": False}},
            if_version=1,
        )
        assert updated.version == 2 and updated.spec["queue"]["dead_letter"] is False
        with pytest.raises(VersionConflict, match="version 2"):
            api.update(ResourceKind.STREAM, ("acme", "prod", "orders"), {}, if_version=1)
        with pytest.raises(VersionConflict):
            api.delete(ResourceKind.STREAM, ("acme", "prod", "orders"), if_version=1)
        with pytest.raises(AlreadyExists):
            api.create(ResourceKind.TENANT, ("acme",))
        with pytest.raises(HasChildren):
            api.delete(ResourceKind.TENANT, ("acme",))
        with pytest.raises(BadRequest, match="fsync"):
            api.update(ResourceKind.STREAM, ("acme", "prod", "orders"), {"fsync": "never"})
        assert api.delete(ResourceKind.TENANT, ("acme",), cascade=True) == [
            (ResourceKind.STREAM, ("acme", "prod", "orders")),
            (ResourceKind.NAMESPACE, ("acme", "prod")),
            (ResourceKind.TENANT, ("acme",)),
        ]
        with pytest.raises(NotFound):
            api.get(ResourceKind.TENANT, ("acme",))
        with pytest.raises(NotFound):
            api.list_resources(ResourceKind.NAMESPACE, ("acme",))


def test_client_checks_names_before_sending() -> None:
    def no_network(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"sent {request.url}")

    with ControlClient("http://control", transport=httpx.MockTransport(no_network)) as api:
        with pytest.raises(BadRequest, match="1 to 64"):
            api.get(ResourceKind.TENANT, ("../admin",))
        with pytest.raises(BadRequest, match="names"):
            api.create(ResourceKind.STREAM, ("acme", "orders"))
        with pytest.raises(BadRequest):
            api.list_resources(ResourceKind.STREAM, ("acme", "a/b"))
        with pytest.raises(BadRequest):
            api.list_resources(ResourceKind.STREAM, ("acme",))


def test_client_system(server: Server) -> None:
    with ControlClient(server.url) as api:
        info = api.info()
        assert info["region"] == "eu-1" and info["node"] == {"pid": 7}
        assert api.health() == {
            "status": "ok",
            "store": {"reachable": True, "position": 0, "error": None},
        }
        assert api.regions() == ["eu-1"]


def test_client_follows_the_feed(server: Server) -> None:
    with ControlClient(server.url) as api, ControlClient(server.url) as writer:
        writer.create(ResourceKind.TENANT, ("acme",))
        writer.create(ResourceKind.NAMESPACE, ("acme", "prod"))
        position, resources = api.snapshot()
        assert position == 2 and [r.path for r in resources] == [("acme",), ("acme", "prod")]
        assert api.changes(position) == ([], position)

        # A long-poll answers as soon as another client commits a change.
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(api.changes, position, 100, 20.0)
            time.sleep(0.3)
            assert not poll.done()
            started = time.monotonic()
            writer.create(ResourceKind.CACHE, ("acme", "prod", "sessions"))
            changes, position = poll.result(timeout=10)
            assert time.monotonic() - started < 3
        assert position == 3
        assert [(c.position, c.op.value, c.resource.path) for c in changes] == [
            (3, "create", ("acme", "prod", "sessions"))
        ]
        started = time.monotonic()
        assert api.changes(position, wait=0.3) == ([], 3)
        assert time.monotonic() - started >= 0.25

        writer.delete(ResourceKind.TENANT, ("acme",), cascade=True)
        changes, nxt = api.changes(0, limit=4)
        assert [c.position for c in changes] == [1, 2, 3, 4] and nxt == 4
        changes, nxt = api.changes(nxt)
        assert [c.op.value for c in changes] == ["delete", "delete"] and nxt == 6
        with pytest.raises(CursorTooOld, match="re-snapshot") as gone:
            api.changes(50)
        assert gone.value.since == 50 and gone.value.oldest == 1
        with pytest.raises(BadRequest, match="limit"):
            api.changes(0, limit=5000)


@pytest.mark.parametrize("server", [{"feed_retention": 2}], indirect=True)
def test_client_raises_cursor_too_old_for_trimmed_history(server: Server) -> None:
    with ControlClient(server.url) as api:
        for name in ("a", "b", "c", "d"):
            api.create(ResourceKind.TENANT, (name,))
        with pytest.raises(CursorTooOld) as gone:
            api.changes(1)
        assert (gone.value.since, gone.value.oldest) == (1, 3)
        changes, _ = api.changes(2)
        assert [c.resource.path for c in changes] == [("c",), ("d",)]


@pytest.mark.parametrize("server", [{"max_children": 1}], indirect=True)
def test_client_raises_overloaded(server: Server) -> None:
    with ControlClient(server.url) as api:
        api.create(ResourceKind.TENANT, ("a",))
        with pytest.raises(Overloaded):
            api.create(ResourceKind.TENANT, ("b",))


def test_client_timeout() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with (
        ControlClient("http://control", transport=httpx.MockTransport(slow)) as api,
        pytest.raises(FelixTimeoutError),
    ):
        api.info()


P = "/v1/problems/"


def _answer(status: int, body: Any = None, *, text: str | None = None) -> httpx.Response:
    request = httpx.Request("GET", "http://control/v1/x")
    if text is not None:
        return httpx.Response(status, text=text, request=request)
    return httpx.Response(status, json=body, request=request)


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (_answer(409, {"type": P + "has-children", "detail": "d1"}), HasChildren, "d1"),
        (_answer(409, {"type": P + "already-exists", "detail": "d2"}), AlreadyExists, "d2"),
        (_answer(422, {"type": P + "validation-error", "detail": "x"}), BadRequest, "x"),
        (_answer(503, {"type": P + "overloaded", "title": "Busy"}), Overloaded, "Busy"),
        (_answer(404, {"type": "about:blank", "detail": "no route"}), NotFound, "no route"),
        (_answer(412, {"detail": "stale"}), VersionConflict, "stale"),
        (_answer(418, {}), BadRequest, "HTTP 418"),
        (_answer(502, text="<html>bad gateway</html>"), Unavailable, "bad gateway"),
        (_answer(500, text=""), ServerError, "HTTP 500"),
    ],
)
def test_error_from_response(
    response: httpx.Response, error: type[Exception], message: str
) -> None:
    err = error_from_response(response)
    assert type(err) is error
    assert message in str(err)


def test_error_from_response_keeps_cursor_positions() -> None:
    body = {"type": "/v1/problems/cursor-too-old", "detail": "gone", "since": 3, "oldest": 9}
    err = error_from_response(_answer(410, body))
    assert isinstance(err, CursorTooOld) and (err.since, err.oldest) == (3, 9)
    assert str(err) == "gone"


def test_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FELIX_CONTROL_URL", raising=False)
    assert ControlClient().url == DEFAULT_URL == "http://127.0.0.1:8443"
    monkeypatch.setenv("FELIX_CONTROL_URL", "http://elsewhere:1/")
    assert ControlClient().url == "http://elsewhere:1"
