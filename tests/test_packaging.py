"""Packaging: the base install is a working client; servers need their extras.

The client-only test builds a fresh virtual environment holding exactly the
base dependencies of pyproject.toml (pip, from its cache or PyPI) and the felix
package tree, then connects from it to a real node started from the dev
environment. It copies the package tree rather than building a wheel: a wheel
build compiles the Cython extensions again (minutes on a small machine), while
the tree already holds the ones ``make build`` compiled in place, which is also
what a fresh clone has once ``make test`` has run ``make build``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from felix.errors import ConfigError
from felix.extras import EXTRAS, missing_modules, require_extra
from tests.nodeproc import NodeProcess

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: What a client-only install must not have (the server, postgres and perf extras).
NOT_IN_BASE = sorted({m for extra in ("server", "postgres", "perf") for m in EXTRAS[extra]})

CLIENT_SCRIPT = """
import asyncio, importlib.util, json, sys

url, ca, forbidden = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
present = [name for name in forbidden if importlib.util.find_spec(name) is not None]

import felix


async def main():
    async with felix.connect(url, ca=ca) as client:
        async with client.subscribe("pkg-orders", start="earliest") as sub:
            ack = await client.publish("pkg-orders", b"hello")
            message = await sub.next(timeout=20)
        cache = client.cache("pkg-sessions")
        stored = await cache.set("user:1", b"alice", ttl=60)
        value = await cache.get("user:1")
    return {
        "offset": ack.offset,
        "received": [message.offset, message.data.decode()],
        "stored": stored,
        "value": value.decode(),
    }


result = asyncio.run(main())
result["present"] = present
server_side = tuple(f"felix.{p}" for p in ("auth", "control", "gateway", "node", "shard"))
result["server_side"] = sorted(name for name in sys.modules if name.startswith(server_side))
print(json.dumps(result))
"""


def _import_names(distribution: str) -> set[str]:
    wanted = distribution.lower().replace("_", "-")
    return {
        module
        for module, dists in packages_distributions().items()
        if any(d.lower().replace("_", "-") == wanted for d in dists) and not module.startswith("_")
    }


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_extras_table_matches_pyproject(extra: str) -> None:
    """felix.extras.EXTRAS names exactly the modules pyproject's extra installs."""
    declared = PROJECT["optional-dependencies"][extra]
    modules: set[str] = set()
    for line in declared:
        modules |= _import_names(Requirement(line).name)
    assert modules >= set(EXTRAS[extra]), (extra, modules)
    # Every distribution of the extra is represented by at least one module.
    for line in declared:
        assert _import_names(Requirement(line).name) & set(EXTRAS[extra]), line


def test_base_dependencies_exclude_the_server_side() -> None:
    base = {Requirement(line).name.lower() for line in PROJECT["dependencies"]}
    for name in ("fastapi", "uvicorn", "asyncpg", "aiosqlite", "prometheus-client", "numpy"):
        assert name not in base
    assert "msgpack" not in base  # imported nowhere
    dev = [Requirement(line) for line in PROJECT["optional-dependencies"]["dev"]]
    assert any(r.name == "felix" and r.extras == {"server", "postgres", "perf"} for r in dev)


def test_require_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    require_extra("server", "felix up")  # the dev environment has everything
    monkeypatch.setitem(EXTRAS, "server", ("no_such_module_felix",))
    assert missing_modules("server") == ["no_such_module_felix"]
    with pytest.raises(ConfigError, match=r"felix up needs .*pip install 'felix\[server\]'"):
        require_extra("server", "felix up")


@pytest.mark.timeout(240)
def test_client_only_install_connects_publishes_subscribes_and_caches(tmp_path: Path) -> None:
    extensions = [p.name for p in (ROOT / "felix").glob("_codec*.so")]
    assert extensions, "felix/_codec is not compiled: run `make build` first"
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--disable-pip-version-check",
            *PROJECT["dependencies"],
        ],
        check=True,
        timeout=180,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.copytree(
        ROOT / "felix",
        Path(site) / "felix",
        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html"),
    )

    def felix(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "felix.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    node = NodeProcess(tmp_path / "node", gateways=1, shards=1)
    try:
        url, ca = f"felix://{node.host}:{node.port}", str(node.ca_file)
        script = tmp_path / "client.py"
        script.write_text(CLIENT_SCRIPT)
        run = subprocess.run(
            [python, str(script), url, ca, ",".join(NOT_IN_BASE)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["present"] == []
        assert result["received"] == [result["offset"], "hello"]
        assert result["stored"] is True and result["value"] == "alice"
        assert result["server_side"] == []  # the client imports nothing server-side

        published = felix("pub", "pkg-orders", "from the cli", "--url", url, "--ca", ca)
        assert published.returncode == 0, published.stderr
        got = felix("cache", "get", "pkg-sessions", "user:1", "--url", url, "--ca", ca)
        assert (got.returncode, got.stdout) == (0, "alice\n"), got.stderr
        # Same host over shared memory: the client-only install has no posix_ipc and
        # needs none (memfd rings).
        shm = f"felix+shm://{node.info['shm']}"
        got = felix("cache", "get", "pkg-sessions", "user:1", "--url", shm)
        assert (got.returncode, got.stdout) == (0, "alice\n"), got.stderr
    finally:
        node.stop()

    up = felix("up", "--data-dir", str(tmp_path / "unused"))
    assert up.returncode == 2
    assert "felix up needs the felix[server] extra" in up.stderr
    assert "pip install 'felix[server]'" in up.stderr
    assert not (tmp_path / "unused").exists()
