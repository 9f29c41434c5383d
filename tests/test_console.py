"""The web console (/ui, felix/control/api/console.py) and the API routes it reads
(felix/control/api/observe.py).

In-process: the page and its files carry strict security headers and no data, and the
observe routes proxy the node's health port behind the API's auth. With a real node
(`felix up --auth`, tests/nodeproc.py) and some traffic: the Debian Chromium, driven
through the Debian chromedriver by selenium, signs in (a wrong token is refused, the
admin token and a tenant's token are accepted), every page shows the numbers the API
answers, and a screenshot of it is written. Chromium missing is a failure, not a skip:
CI installs it (.ci/run).
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

import felix
from felix.control.api import create_app
from felix.control.api.console import ASSETS, SECURITY_HEADERS
from felix.control.api.context import ControlContext
from felix.control.api.observe import health_address
from felix.control.model import ResourceKind
from felix.control.stores.memory import MemoryStore
from felix.errors import Unavailable
from tests.aio import run
from tests.nodeproc import NodeProcess
from tests.test_control_api_auth import ADMIN, Keys, bearer

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "felix" / "control" / "api" / "static"


# -- in-process: the page, its headers, the observe routes ----------------------------------


@asynccontextmanager
async def console_api(
    keys: Keys | None = None, *, node_http: str | None = None, require_auth: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    store = MemoryStore()
    await store.open()
    await store.create(ResourceKind.TENANT, ("acme",), {"description": "secret-ish"})
    await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {})
    app = create_app(
        store,
        keys_dir=keys.directory if keys else None,
        admin_token=ADMIN,
        require_auth=require_auth,
        node_info={"http": node_http} if node_http else {},
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as http:
        yield http
    await store.close()


def assert_secure(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    csp = dict(
        part.strip().split(" ", 1)
        for part in response.headers["Content-Security-Policy"].split(";")
    )
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'"  # no inline script, no eval, no other origin
    assert csp["frame-ancestors"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert "unsafe" not in response.headers["Content-Security-Policy"]


def test_the_page_and_its_files_are_served_without_data_with_strict_headers() -> None:
    async def main() -> None:
        async with console_api() as http:
            r = await http.get("/ui")
            assert r.status_code == 308 and r.headers["location"] == "ui/"
            assert_secure(r)
            # No credentials needed, and no data in what is served: the script fetches it.
            page = await http.get("/ui/")
            assert page.status_code == 200, page.text
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert_secure(page)
            for name, media_type in ASSETS.items():
                r = await http.get(f"/ui/{name}")
                assert r.status_code == 200 and r.headers["content-type"] == media_type
                assert_secure(r)
                assert r.content == (STATIC / name).read_bytes()
                assert "acme" not in r.text and ADMIN not in r.text
            for missing in ("/ui/secrets.json", "/ui/..%2Fapp.py", "/ui/console.py"):
                assert (await http.get(missing)).status_code == 404, missing
            # Not part of the API's OpenAPI document.
            paths = (await http.get("/v1/openapi.json")).json()["paths"]
            assert not [p for p in paths if p.startswith("/ui")]
            assert "/v1/whoami" in paths and "/v1/node/status" in paths

    run(main)


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.forms: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.inline += [name for name in attributes if name.startswith("on") or name == "style"]
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        elif tag == "form":
            self.forms.append(attributes)
        elif tag == "input":
            self.inputs.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


def test_the_page_has_no_inline_code_and_cannot_leak_the_token() -> None:
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    assert markup.inline == []  # the CSP would block them: none are needed
    assert [s.get("src") for s in markup.scripts] == ["console.js"]
    # The sign-in form cannot submit the token anywhere (no action, a nameless field,
    # and form-action 'none'), and the script keeps it in sessionStorage only.
    assert markup.forms and all("action" not in form for form in markup.forms)
    assert all("name" not in field for field in markup.inputs)
    script = (STATIC / "console.js").read_text()
    assert "localStorage" not in script and "document.cookie" not in script
    assert not re.search(r"\beval\(|new Function\(|innerHTML|https?://(?!www\.w3\.org)", script)
    assert len(script.splitlines()) < 500  # small and readable


def test_package_data_ships_the_console_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["felix.control.api"]
    shipped = sorted(p.name for p in STATIC.iterdir())
    assert shipped == sorted(ASSETS)
    tracked = subprocess.run(
        ["git", "ls-files", str(STATIC)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(Path(name).name for name in tracked) == shipped  # none left out by .gitignore
    for name in shipped:
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), name


def test_whoami_tells_the_admin_a_tenant_and_dev_mode_apart(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "auth")

    async def main() -> None:
        async with console_api(keys) as http:
            r = await http.get("/v1/whoami")
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
            assert (await http.get("/v1/whoami", headers=bearer(ADMIN + "x"))).status_code == 401
            r = await http.get("/v1/whoami", headers=bearer(ADMIN))
            assert r.json() == {
                "admin": True,
                "tenant": None,
                "subject": "admin",
                "auth_required": True,
            }
            token = keys.token("acme", "stream.subscribe:stream:acme/prod/*")
            r = await http.get("/v1/whoami", headers=bearer(token))
            assert r.json() == {
                "admin": False,
                "tenant": "acme",
                "subject": "svc",
                "auth_required": True,
            }
            assert token not in r.text
        async with console_api(require_auth=False) as http:
            r = await http.get("/v1/whoami")
            assert r.json()["admin"] is True and r.json()["auth_required"] is False

    run(main)


@asynccontextmanager
async def fake_health(answers: dict[str, tuple[int, bytes]]) -> AsyncIterator[str]:
    """A health port answering ``path -> (status, body)`` (404 otherwise), as the node's does."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1].decode()
        status, body = answers.get(path, (404, b"not found\n"))
        answer = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(answer.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"0.0.0.0:{port}"  # as node.json says of a health port on every address
    finally:
        server.close()


def test_node_routes_proxy_the_health_port_behind_the_api_auth(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "auth")
    status = {"ready": True, "totals": {"connections": 3}}
    stream = {"stream": "acme/prod/orders", "memory": {"next_offset": 7}, "groups": {}}
    answers = {
        "/status": (200, json.dumps(status).encode()),
        "/streams/acme/prod/orders": (200, json.dumps(stream).encode()),
        "/streams/acme/prod/broken": (200, b"[1, 2]"),
        "/caches/acme/prod/sessions": (503, b"the shard did not answer\n"),
    }
    admin = bearer(ADMIN)
    acme = bearer(keys.token("acme", "stream.manage:stream:acme/prod/*"))

    async def main() -> None:
        async with fake_health(answers) as address, console_api(keys, node_http=address) as http:
            r = await http.get("/v1/node/status", headers=admin)
            assert r.status_code == 200 and r.json() == status
            assert (await http.get("/v1/node/status")).status_code == 401
            # The whole node's counters: the admin token's only.
            assert (await http.get("/v1/node/status", headers=acme)).status_code == 403
            url = "/v1/node/streams/acme/prod/orders"
            for headers in (admin, acme):
                r = await http.get(url, headers=headers)
                assert r.status_code == 200 and r.json() == stream
            # Another tenant's, or a resource the token does not cover: refused.
            r = await http.get("/v1/node/streams/globex/prod/orders", headers=acme)
            assert r.status_code == 403
            r = await http.get("/v1/node/caches/acme/prod/sessions", headers=acme)
            assert r.status_code == 403
            # The node's answers as problems: 404 not held, 503 unavailable or not JSON.
            r = await http.get("/v1/node/streams/acme/prod/missing", headers=admin)
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
            r = await http.get("/v1/node/streams/acme/prod/broken", headers=admin)
            assert r.status_code == 503, r.text
            r = await http.get("/v1/node/caches/acme/prod/sessions", headers=admin)
            assert r.status_code == 503 and "did not answer" in r.json()["detail"]
            r = await http.get("/v1/node/streams/acme/prod/BAD%20NAME", headers=admin)
            assert r.status_code == 400, r.text
        # No node behind this control plane (felix control), or one that is down: 503.
        async with console_api(keys) as http:
            r = await http.get("/v1/node/status", headers=admin)
            assert r.status_code == 503 and "serves no node" in r.json()["detail"]
        async with console_api(keys, node_http="127.0.0.1:1") as http:
            r = await http.get("/v1/node/status", headers=admin)
            assert r.status_code == 503 and "unreachable" in r.json()["detail"]

    run(main)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:8080", ("127.0.0.1", 8080)),
        ("[::]:8080", ("::1", 8080)),
        ("[::1]:9", ("::1", 9)),
        ("node.internal:8080", ("node.internal", 8080)),
        (None, None),
        ("", None),
        ("127.0.0.1:http", None),
    ],
)
def test_the_health_address_comes_from_the_node_info(
    address: str | None, expected: tuple[str, int] | None
) -> None:
    ctx = ControlContext(MemoryStore(), "local", {"http": address} if address is not None else {})
    if expected is None:
        with pytest.raises(Unavailable):
            health_address(ctx)
    else:
        assert health_address(ctx) == expected


# -- in a real browser, on a real node --------------------------------------------------------


def chromium() -> Any:
    """Headless Chromium driven through the Debian chromedriver (no Selenium Manager)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver is None or browser is None:
        pytest.fail(
            "the console test needs Chromium and its driver from Debian: "
            "apt-get install -y chromium chromium-driver (.ci/run installs them)"
        )
    options = Options()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the page is between renders: try again
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def felix_cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "felix.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def traffic_node(tmp_path: Path) -> Iterator[tuple[NodeProcess, str, str]]:
    """A node with --auth and: tenant acme/prod with a durable stream ``orders`` (25
    records; queue group ``workers``: 6 acked, 2 dead-lettered), a stream ``events`` (7
    records) and a cache ``sessions``. Yields (node, admin token, acme's token)."""
    data = tmp_path / "node"
    data.mkdir()
    felix_cli("token", "keygen", "--tenant", "acme", "--dir", str(data / "auth"))
    acme = felix_cli(
        "token", "mint", "--tenant", "acme", "--sub", "console", "--dir", str(data / "auth"),
        "--perm", "tenant.manage:tenant:acme",
    )  # fmt: skip
    node = NodeProcess(data, "--auth", "--durable-streams", gateways=1, shards=1)
    admin = (data / "admin-token").read_text().strip()
    api = node.info["control"]
    try:
        with httpx.Client(base_url=f"{api}/v1", headers=bearer(admin), timeout=10) as http:
            for path, body in (
                ("/tenants", {"name": "acme"}),
                ("/tenants/acme/namespaces", {"name": "prod"}),
                ("/tenants/acme/namespaces/prod/streams", {"name": "orders", "durable": True}),
                ("/tenants/acme/namespaces/prod/streams", {"name": "events"}),
                ("/tenants/acme/namespaces/prod/streams/orders/groups", {"name": "workers"}),
                ("/tenants/acme/namespaces/prod/caches", {"name": "sessions"}),
            ):
                r = http.post(path, json=body)
                assert r.status_code == 201, r.text

        async def send() -> None:
            url = f"felix://{node.host}:{node.port}"
            async with felix.connect(
                url, ca=node.ca_file, tenant="acme", namespace="prod", token=acme
            ) as client:
                deadline = time.monotonic() + 20
                while True:  # the definitions reach the node through its feed
                    try:
                        await client.publish("orders", b"first")
                        break
                    except felix.NotFound:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.2)
                for i in range(24):
                    await client.publish("orders", b"order %d" % i)
                for i in range(7):
                    await client.publish("events", b"event %d" % i)
                async with client.consume("orders", "workers", prefetch=8) as jobs:
                    batch: list[Any] = []
                    while len(batch) < 8:
                        batch += await jobs.fetch(8 - len(batch), timeout=5)
                    for job in batch[:6]:
                        await job.ack()
                    for job in batch[6:]:
                        await job.term("poison")
                sessions = client.cache("sessions")
                for key in ("a", "b", "c"):
                    await sessions.set(key, b"v")
                for key in ("a", "b", "zz"):
                    await sessions.get(key)

        run(send, timeout=60)
        yield node, admin, acme
    finally:
        node.stop()


def api_get(node: NodeProcess, token: str, path: str) -> Any:
    r = httpx.get(f"{node.info['control']}/v1{path}", headers=bearer(token), timeout=10)
    return r.json() if r.status_code == 200 else None


# The page re-renders its tables every refresh: each read below runs as one script in
# the page, so it never holds an element that a re-render replaced.
_CELLS = """
const row = document.querySelector(`#${arguments[0]} tr[data-key="${arguments[1]}"]`);
if (!row) throw new Error("no row " + arguments[1]);
return Object.fromEntries(Array.from(row.cells, (td) => [td.dataset.col, td.textContent]));
"""


def cells(driver: Any, table: str, key: str) -> dict[str, str]:
    """A table row's cells by column, found by the row's data-key."""
    found: dict[str, str] = driver.execute_script(_CELLS, table, key)
    return found


def fact(driver: Any, name: str) -> str:
    script = "return document.querySelector(`[data-fact='${arguments[0]}'] dd`).textContent"
    return str(driver.execute_script(script, name))


def wait_fact(driver: Any, name: str, expected: str) -> None:
    wait_for(lambda: fact(driver, name) == expected, f"{name} shown as {expected}")


def wait_cell(driver: Any, table: str, key: str, column: str, expected: str) -> dict[str, str]:
    """Wait until the row's ``column`` shows ``expected``; the row's cells."""

    def check() -> dict[str, str] | None:
        row = cells(driver, table, key)
        return row if row[column] == expected else None

    found: dict[str, str] = wait_for(check, f"{key}'s {column} shown as {expected}")
    return found


def row_keys(driver: Any, table: str) -> set[str]:
    script = "return Array.from(document.querySelectorAll(arguments[0]), (r) => r.dataset.key)"
    return set(driver.execute_script(script, f"#{table} tbody tr[data-key]"))


def publish_meanwhile(node: NodeProcess, token: str, stream: str, count: int) -> threading.Thread:
    """Publish ``count`` records to acme/prod/``stream``, spread over about 4 s, in a thread."""

    async def send() -> None:
        url = f"felix://{node.host}:{node.port}"
        async with felix.connect(
            url, ca=node.ca_file, tenant="acme", namespace="prod", token=token
        ) as client:
            for i in range(count):
                await client.publish(stream, b"live %d" % i)
                await asyncio.sleep(4 / count)

    thread = threading.Thread(target=lambda: asyncio.run(send()), daemon=True)
    thread.start()
    return thread


def screenshot(driver: Any, path: Path) -> None:
    """Write the page as a PNG to ``path`` (kept in pytest's tmp dir), and check it is one."""
    assert driver.save_screenshot(str(path))
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, path


def shown(value: Any) -> str:
    """A number as the console shows it."""
    return f"{value:,}" if isinstance(value, int) else "—"


def sign_in(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.ID, "token").is_displayed(), "the sign-in form")
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()


def test_console_in_chromium_shows_what_the_api_answers(
    traffic_node: tuple[NodeProcess, str, str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    node, admin, acme = traffic_node
    api = node.info["control"]
    driver = chromium()
    try:
        driver.get(f"{api}/ui")
        assert driver.current_url == f"{api}/ui/"
        wait_for(lambda: driver.find_element(By.ID, "signin").is_displayed(), "the sign-in page")
        # Before signing in the page holds no data.
        assert "acme" not in driver.page_source
        assert not driver.find_element(By.ID, "nav").is_displayed()

        # A wrong token: refused, said so, nothing kept.
        sign_in(driver, admin + "x")
        error = wait_for(lambda: driver.find_element(By.ID, "signin-error").text, "an error")
        assert "401" in error and "Unauthenticated" in error
        assert driver.execute_script("return sessionStorage.length") == 0
        assert not driver.find_element(By.ID, "nav").is_displayed()

        # The admin token: everything.
        sign_in(driver, admin)
        wait_for(lambda: driver.find_element(By.ID, "nav").is_displayed(), "the console")
        assert driver.find_element(By.ID, "who").text == "admin"
        assert admin not in driver.current_url and admin not in driver.page_source

        # Overview: the node's status as /v1/node/status says, and live charts.
        status = api_get(node, admin, "/node/status")
        assert status["ready"] is True
        wait_fact(driver, "Ready", "ready")
        assert fact(driver, "Version") == status["version"]
        assert fact(driver, "Region") == status["region"]
        totals = status["totals"]
        for name, value in (
            ("Connections", totals["connections"]),
            ("Streams held", totals["streams"]),
            ("Caches held", totals["caches"]),
            ("Queue groups", totals["queue_groups"]),
        ):
            wait_fact(driver, name, shown(value))
        procs = row_keys(driver, "processes")
        assert procs == {child["name"] for child in status["children"]}
        # Live: records published while the page watches show as a rate and on the chart.
        live = publish_meanwhile(node, acme, "events", 40)
        wait_for(lambda: float(fact(driver, "Published / s")) > 0, "a publish rate")
        chart = driver.find_element(By.ID, "chart-published")
        wait_for(lambda: chart.find_elements(By.CSS_SELECTOR, "polyline"), "a line charted")
        assert int(chart.get_attribute("data-points")) >= 2
        live.join(30)
        assert not live.is_alive()

        # Tenants and namespaces: the API's lists.
        driver.get(f"{api}/ui/#tenants")
        expected = {
            f"{t['name']}/{ns['name']}"
            for t in api_get(node, admin, "/tenants")["items"]
            for ns in api_get(node, admin, f"/tenants/{t['name']}/namespaces")["items"]
        }
        assert {"acme/prod", "default/default"} <= expected
        wait_for(lambda: row_keys(driver, "tenants") == expected, "the namespaces")

        # As many as the API lists (auto-created ones included, once registered).
        def count_matches(kind: str, column: str) -> bool:
            listed = api_get(node, admin, f"/tenants/acme/namespaces/prod/{kind}")["items"]
            return bool(cells(driver, "tenants", "acme/prod")[column] == str(len(listed)))

        for kind, column in (("streams", "Streams"), ("caches", "Caches")):
            wait_for(functools.partial(count_matches, kind, column), f"the {kind} count")

        # Streams: records as the node holds them, and their rate charts.
        driver.find_element(By.CSS_SELECTOR, 'nav a[href="#streams"]').click()
        for name, records in (("orders", 25), ("events", 47)):
            held = api_get(node, admin, f"/node/streams/acme/prod/{name}")
            assert held["memory"]["next_offset"] == records
            wait_cell(driver, "streams", f"acme/prod/{name}", "Records", shown(records))
        orders = cells(driver, "streams", "acme/prod/orders")
        assert orders["Durable"] == "yes" and orders["Queue groups"] == "1"
        watching = api_get(node, admin, "/node/streams/acme/prod/orders")["gateways_watching"]
        assert orders["Subscribers"] == f"{watching} gateway(s)"
        assert cells(driver, "streams", "acme/prod/events")["Durable"] == "no"
        screenshot(driver, tmp_path / "console-streams.png")

        # Queue groups: lag and dead letters as the node reports them.
        driver.find_element(By.CSS_SELECTOR, 'nav a[href="#groups"]').click()
        group = api_get(node, admin, "/node/streams/acme/prod/orders")["groups"]["workers"]
        assert group["acked"] == 6 and group["dead"] == 2, group
        row = wait_cell(driver, "groups", "acme/prod/orders/workers", "Lag", shown(group["lag"]))
        assert row["Acked"] == "6" and row["Dead-lettered"] == "2" and row["Defined"] == "yes"
        assert row["Dead-letter stream"] == group["dead_letter"]
        screenshot(driver, tmp_path / "console-groups.png")

        # Caches: settings from the API, counters from the node.
        driver.find_element(By.CSS_SELECTOR, 'nav a[href="#caches"]').click()
        spec = api_get(node, admin, "/tenants/acme/namespaces/prod/caches/sessions")["spec"]
        row = wait_for(lambda: cells(driver, "caches", "acme/prod/sessions"), "the cache")
        assert row["Budget"] == f"{spec['budget_bytes'] / 1048576:.1f} MiB"
        held = api_get(node, admin, "/node/caches/acme/prod/sessions")
        assert (held["hits"], held["misses"], held["entries"]) == (2, 1, 3), held
        row = wait_cell(driver, "caches", "acme/prod/sessions", "Hit rate", "66.7 %")
        assert (row["Hits"], row["Misses"], row["Entries"]) == ("2", "1", "3")

        screenshot(driver, tmp_path / "console-caches.png")

        # A screenshot of the overview, as a user sees it.
        driver.find_element(By.CSS_SELECTOR, 'nav a[href="#overview"]').click()
        wait_fact(driver, "Ready", "ready")
        screenshot(driver, tmp_path / "console.png")

        # Signing out forgets the token.
        driver.find_element(By.ID, "signout").click()
        wait_for(lambda: driver.find_element(By.ID, "signin").is_displayed(), "signed out")
        assert driver.execute_script("return sessionStorage.length") == 0

        # A tenant's token: its tenant only, and no node-wide status.
        sign_in(driver, acme)
        wait_for(lambda: driver.find_element(By.ID, "who").text == "tenant acme (console)", "acme")
        wait_for(
            lambda: "admin token only" in driver.find_element(By.ID, "node-note").text, "the note"
        )
        driver.get(f"{api}/ui/#tenants")  # a reload keeps the session (sessionStorage)
        wait_for(lambda: row_keys(driver, "tenants") == {"acme/prod"}, "acme's namespaces only")
        driver.find_element(By.CSS_SELECTOR, 'nav a[href="#streams"]').click()
        wait_cell(driver, "streams", "acme/prod/orders", "Records", "25")
        assert acme not in driver.current_url and acme not in driver.page_source

        # Nothing the page did broke its Content-Security-Policy or failed in the script.
        logs = [entry["message"] for entry in driver.get_log("browser")]
        assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs
    finally:
        driver.quit()


@contextmanager
def served_api(**options: Any) -> Iterator[str]:
    """The API (over a MemoryStore holding acme/prod/orders) served by uvicorn in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    store = MemoryStore()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store, **options), log_level="warning", lifespan="off")
    )

    async def serve() -> None:
        await store.open()
        await store.create(ResourceKind.TENANT, ("acme",), {})
        await store.create(ResourceKind.NAMESPACE, ("acme", "prod"), {})
        await store.create(ResourceKind.STREAM, ("acme", "prod", "orders"), {})
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the API to serve")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_console_without_auth_asks_for_no_token_and_says_what_it_cannot_show() -> None:
    """Loopback dev mode (no --auth), and a control plane that serves no node
    (`felix control`): the resources, and a note instead of the node's status."""
    from selenium.webdriver.common.by import By

    with served_api(require_auth=False) as api:
        driver = chromium()
        try:
            driver.get(f"{api}/ui/#streams")
            wait_for(lambda: driver.find_element(By.ID, "nav").is_displayed(), "the console")
            assert not driver.find_element(By.ID, "signin").is_displayed()
            assert not driver.find_element(By.ID, "signout").is_displayed()
            assert driver.find_element(By.ID, "who").text == "no authentication (loopback)"
            row = wait_cell(driver, "streams", "acme/prod/orders", "Durable", "no")
            assert row["Records"] == "—"  # the node's figure: there is no node
            driver.find_element(By.CSS_SELECTOR, 'nav a[href="#overview"]').click()
            note = wait_for(lambda: driver.find_element(By.ID, "node-note").text, "the note")
            assert "not available" in note and "serves no node" in note
            assert fact(driver, "Ready") == "—"
        finally:
            driver.quit()
