"""``felix stream info NAME --node URL`` against a small fake node health endpoint: the
URL it asks, how it prints the status, and how it maps the node's refusals. (The real
status route is tested with real nodes in tests/test_node_durable.py.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from felix.cli import main
from felix.control.nodestatus import MAX_STATUS_BYTES, status_rows, stream_status_url
from felix.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

DURABLE = {
    "stream": "acme/prod/orders",
    "durable": True,
    "fsync": "commit",
    "fsync_interval_ms": 100,
    "retention_age_s": None,
    "retention_bytes": 1048576,
    "damaged": None,
    "waiting_acks": 0,
    "first_offset": 0,
    "next_offset": 42,
    "synced_offset": 42,
    "disk_bytes": 4096,
    "segments": 1,
    "recovery": {"torn_bytes_cut": 17, "segments": 1, "records": 41, "rebuilt_indexes": 0},
    "memory": {"earliest": 10, "next_offset": 42},
}


class FakeNode:
    """Answers every GET with ``answer`` (status, content type, body); records the paths."""

    def __init__(self) -> None:
        body = json.dumps(DURABLE).encode()
        self.answer: tuple[int, str, bytes] = (200, "application/json", body)
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.paths.append(self.path)
                status, ctype, body = fake.answer
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNode]:
    monkeypatch.delenv("FELIX_NODE_URL", raising=False)
    fake = FakeNode()
    try:
        yield fake
    finally:
        fake.close()


INFO = ["stream", "info", "orders", "--tenant", "acme", "--namespace", "prod", "--interval", "0"]


def test_table_of_a_durable_stream(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*INFO, "--node", node.url]) == 0
    assert node.paths == ["/streams/acme/prod/orders"]
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert lines[0].split() == ["stream", "acme/prod/orders"]
    assert [line.split()[0] for line in lines[1:4]] == ["durable", "fsync", "damaged"]
    assert rows["durable"] == "yes" and rows["fsync"] == "commit" and rows["damaged"] == "-"
    assert rows["synced_offset"] == "42" and rows["disk_bytes"] == "4096"
    assert rows["recovery.torn_bytes_cut"] == "17" and rows["memory.earliest"] == "10"
    assert rows["retention_age_s"] == "-"


def test_json_is_the_node_answer_and_env_names_the_node(
    node: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FELIX_NODE_URL", node.url.removeprefix("http://"))
    argv = ["stream", "info", "billing/orders", "--tenant", "acme", "--json", "--interval", "0"]
    assert main(argv) == 0
    assert node.paths == ["/streams/acme/billing/orders"]
    assert json.loads(capsys.readouterr().out) == DURABLE


def test_in_memory_stream(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    status = {"stream": "acme/prod/orders", "durable": False, "fsync": "none", "memory": {}}
    node.answer = (200, "application/json", json.dumps(status).encode())
    assert main([*INFO, "--node", node.url]) == 0
    assert capsys.readouterr().out.split() == [
        "stream",
        "acme/prod/orders",
        "durable",
        "no",
        "fsync",
        "none",
    ]


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ((404, "text/plain", b"stream acme/prod/orders is not held by this node\n"), "not held"),
        ((503, "text/plain", b"the shard owning acme/prod/orders did not answer\n"), "503"),
        ((400, "text/plain", b"bad request\n"), "400"),
        ((200, "application/json", b"[1, 2]"), "not a JSON object"),
        ((200, "text/html", b"<html>"), "not a JSON object"),
        ((200, "application/json", b" " * (MAX_STATUS_BYTES + 1)), "larger than"),
        ((500, "text/plain", b""), "500"),
    ],
)
def test_refusals_exit_1_with_the_reason(
    node: FakeNode, capsys: pytest.CaptureFixture[str], answer: tuple[int, str, bytes], words: str
) -> None:
    node.answer = answer
    assert main([*INFO, "--node", node.url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert words in captured.err


def test_unreachable_node_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNode()
    url = fake.url
    fake.close()  # nothing listens there any more
    assert main([*INFO, "--node", url, "--timeout", "2"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_bad_node_urls() -> None:
    assert stream_status_url("127.0.0.1:9090", ("a", "b", "c")) == (
        "http://127.0.0.1:9090/streams/a/b/c"
    )
    assert stream_status_url("http://[::1]:9090/", ("a", "b", "c")) == (
        "http://[::1]:9090/streams/a/b/c"
    )
    for bad in ("ftp://h:1", "http://h:1/metrics", "http://u:p@h:1", "http://:1", "h:99999"):
        with pytest.raises(ConfigError):
            stream_status_url(bad, ("a", "b", "c"))
    assert main([*INFO, "--node", "ftp://h:1"]) == 2


def test_status_rows_flatten_in_order() -> None:
    rows = status_rows({"memory": {"a": 1}, "fsync": "interval", "stream": "t/n/s", "x": False})
    assert rows == [
        ("stream", "t/n/s"),
        ("fsync", "interval"),
        ("memory.a", "1"),
        ("x", "no"),
    ]


# -- felix group info STREAM GROUP --node URL -------------------------------------------------

GROUP_INFO = ["group", "info", "orders", "workers", "--tenant", "acme", "--namespace", "prod"]


def test_group_info_prints_the_nodes_entry_for_the_group(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = {"start": "earliest", "lease_ms": 30000, "backoff_ms": [1000, 2000]}
    # Whatever keys the node reports (figures the shard adds later included) are printed.
    entry = {"settings": settings, "floor": 7, "next": 9, "leased": 2, "stalled": False}
    status = {**DURABLE, "groups": {"workers": entry, "other": {"settings": {}}}}
    node.answer = (200, "application/json", json.dumps(status).encode())
    assert main([*GROUP_INFO, "--node", node.url]) == 0
    assert node.paths == ["/streams/acme/prod/orders"]
    assert capsys.readouterr().out.splitlines() == [
        "group acme/prod/orders/workers",
        "settings.start: earliest",
        "settings.lease_ms: 30000",
        "settings.backoff_ms: [1000, 2000]",
        "floor: 7",
        "next: 9",
        "leased: 2",
        "stalled: no",
    ]
    assert main([*GROUP_INFO, "--node", node.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == entry


def test_group_info_of_a_group_the_node_does_not_hold(
    node: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status = {**DURABLE, "groups": {"other": {"settings": {}}}}
    node.answer = (200, "application/json", json.dumps(status).encode())
    monkeypatch.setenv("FELIX_NODE_URL", node.url)
    assert main(GROUP_INFO) == 1
    assert "no queue group 'workers'" in capsys.readouterr().err
    # An in-memory stream has no groups entry at all.
    node.answer = (200, "application/json", json.dumps({"durable": False}).encode())
    assert main(GROUP_INFO) == 1
    assert "no queue groups" in capsys.readouterr().err
    node.answer = (404, "text/plain", b"stream acme/prod/orders is not held by this node\n")
    assert main(GROUP_INFO) == 1
    assert "not held" in capsys.readouterr().err
