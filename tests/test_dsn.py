"""DSNs never leave the supervisor with their password (felix/dsn.py; issue #16):
one redaction for display and logs, no DSN in a child's config or environment, the
control process's store through a pipe of its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from felix.dsn import redact_dsn
from felix.node.config import CHILD_ENV_DROPPED, CONTROL_STORE_REDACTED, NodeConfig
from felix.node.worker import ChildSpec

SECRET = "s3cr%40t"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (f"postgresql://felix:{SECRET}@db:5432/felix", "postgresql://felix:***@db:5432/felix"),
        (
            f"postgresql://felix@db/felix?sslmode=require&password={SECRET}",
            "postgresql://felix@db/felix?sslmode=require&password=***",
        ),
        (
            f"postgres://db/felix?sslpassword={SECRET}&user=u",
            "postgres://db/felix?sslpassword=***&user=u",
        ),
        (f"host=db password={SECRET} dbname=felix", "host=db password=*** dbname=felix"),
        ("host=db password = 'a \\' b' user=u", "host=db password = *** user=u"),
        (f"postgresql://u:{SECRET}@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u:p@ss/w@db/felix", "postgresql://u:***@db/felix"),
        ("postgresql://u:p?w@db/felix", "postgresql://u:***@db/felix"),
        (
            "postgresql://u:pw@db/felix?application_name=a@b",
            "postgresql://u:***@db/felix?application_name=a@b",
        ),
        ("postgresql://felix@db/felix", "postgresql://felix@db/felix"),
        (
            "postgresql://db:5432/x?application_name=a@b",
            "postgresql://db:5432/x?application_name=a@b",
        ),
        ("memory://", "memory://"),
        ("sqlite:///var/lib/felix/control.db", "sqlite:///var/lib/felix/control.db"),
    ],
)
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert redact_dsn(shown) == shown


def test_children_get_no_dsn(tmp_path: Path) -> None:
    dsn = f"postgresql://felix:{SECRET}@db:5432/felix"
    config = NodeConfig(data_dir=tmp_path, cluster=dsn, control_store=dsn, node_id="n1")
    text = config.to_json()
    assert SECRET not in text and "db:5432" not in text
    child = NodeConfig.from_json(text)
    assert child.clustered and child.control_store == CONTROL_STORE_REDACTED
    assert SECRET not in repr(config)
    # Without a store the child's config says so.
    assert NodeConfig.from_json(NodeConfig(data_dir=tmp_path).to_json()).control_store is None


def test_the_control_process_reads_its_store_from_a_pipe(tmp_path: Path) -> None:
    from felix.node.supervisor import secret_pipe

    dsn = f"host=db password={SECRET} dbname=felix"
    config = NodeConfig(data_dir=tmp_path, control_store=dsn)
    fd = secret_pipe(dsn)
    spec = ChildSpec("control", 0, 1, config, [], [], control_fd=-1, secret_fd=fd)
    text = spec.to_json()
    assert SECRET not in text
    got = ChildSpec.from_json(text)
    assert got.read_secret() == dsn
    with pytest.raises(OSError):
        os.fstat(fd)  # read once, closed
    assert ChildSpec("gateway", 0, 1, config, [], [], control_fd=-1).read_secret() is None


def test_the_control_process_never_falls_back_to_another_store(tmp_path: Path) -> None:
    from felix.node.control_process import run_control
    from tests.aio import run

    config = NodeConfig.from_json(
        NodeConfig(data_dir=tmp_path, control_store="memory://").to_json()
    )
    spec = ChildSpec("control", 0, 1, config, [], [], control_fd=-1)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="no store DSN"):
            await run_control(spec, None)  # type: ignore[arg-type]

    run(main)
    assert not (tmp_path / "control.db").exists()


def test_child_environments_drop_the_cluster_dsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from felix.node.supervisor import Supervisor, child_environment

    dsn = f"postgresql://felix:{SECRET}@db/felix"
    monkeypatch.setenv("FELIX_CLUSTER", dsn)
    monkeypatch.setenv("FELIX_CONTROL_STORE", dsn)
    monkeypatch.setenv("FELIX_CONTROL_TOKEN", "tok")
    assert "FELIX_CLUSTER" in CHILD_ENV_DROPPED
    env = child_environment({"FELIX_CHILD_SPEC": "{}"})
    assert "FELIX_CLUSTER" not in env and env["FELIX_CHILD_SPEC"] == "{}"
    assert "FELIX_CONTROL_STORE" not in env
    assert SECRET not in json.dumps(env)
    # The bridges runner too.
    config = NodeConfig(data_dir=tmp_path, cluster=dsn, control_store=dsn, node_id="n1")
    supervisor = Supervisor(config)
    supervisor.port = 5000
    supervisor._control_url = lambda: "http://127.0.0.1:8180"  # type: ignore[method-assign]
    cmd, env = supervisor._bridges_command()
    assert "FELIX_CLUSTER" not in env and "FELIX_CONTROL_TOKEN" not in env
    assert SECRET not in json.dumps(env) + " ".join(cmd)
