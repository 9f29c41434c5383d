"""Run `felix up` as a real process tree for tests, on ephemeral ports."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

_NOFILE = resource.RLIMIT_NOFILE


class NodeProcess:
    def __init__(
        self,
        data_dir: Path,
        *args: str,
        gateways: int = 2,
        shards: int = 2,
        nofile: tuple[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        """``nofile``: the (soft, hard) RLIMIT_NOFILE the node starts with; ``env``:
        variables added to this process's environment; ``log_path``: where its output
        goes (default: ``<data_dir>.log`` beside the data dir, overwritten)."""
        self.data_dir = data_dir
        if os.environ.get("FELIX_TEST_TOPOLOGY") == "embedded" and "--embedded-shards" not in args:
            # The same tests on the topology `felix up` picks on small machines.
            gateways, args = 1, ("--topology", "embedded", *args)
        cmd = [
            sys.executable,
            "-m",
            "felix.cli",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--gateways",
            str(gateways),
            "--shards",
            str(shards),
            "--data-dir",
            str(data_dir),
            "--memory-budget",
            "512MiB",
            *([] if "--control" in args else ["--control", "127.0.0.1:0"]),
            *args,
        ]
        # A node.json left by an earlier node on this data dir is not this node's.
        (data_dir / "node.json").unlink(missing_ok=True)
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(_NOFILE, nofile),
            env=None if env is None else {**os.environ, **env},
        )
        deadline = time.monotonic() + 30
        while not (data_dir / "node.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"felix up did not start:\n{self.log()}")
            time.sleep(0.05)
        self.info: dict[str, Any] = json.loads((data_dir / "node.json").read_text())
        host, port = self.info["quic"].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ca_file = Path(self.info["ca"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def refresh(self) -> dict[str, Any]:
        self.info = json.loads((self.data_dir / "node.json").read_text())
        return self.info

    def http(self, path: str, *, token: str | None = "admin") -> tuple[int, str]:
        """GET ``path`` from the health port, as the operator: with the data dir's admin
        token when there is one (``token="admin"``), else ``token`` (None: without)."""
        headers = {}
        if token == "admin":
            admin = self.data_dir / "admin-token"
            token = admin.read_text().strip() if admin.is_file() else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"http://{self.info['http']}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill_child(self, role: str) -> int:
        pid = int(self.info["processes"][role])
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, role: str, old_pid: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.refresh()["processes"][role] != old_pid:
                return
            time.sleep(0.05)
        raise AssertionError(f"{role} was not restarted:\n{self.log()}")

    def kill_all(self, timeout: float = 20) -> None:
        """SIGKILL every process of the node at once (its process group), as a power
        cut or an OOM kill of the whole tree would; returns once all are gone."""
        pids = [self.proc.pid, *(int(p) for p in self.refresh()["processes"].values())]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
                if time.monotonic() > deadline:
                    raise AssertionError(f"process {pid} survived SIGKILL of the node")
                time.sleep(0.02)
        self._log.close()

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def free_port() -> int:
    """A TCP port free on loopback right now (for servers that need it up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def control_process(
    log_path: Path, *args: str, scheme: str = "http", http: httpx.Client | None = None
) -> Iterator[str]:
    """`felix control --listen 127.0.0.1:PORT ARGS...` running; yields its URL.

    Ready once ``GET /v1/system/health`` answers 200 through ``http`` (default: a
    plain client; pass one with the CA/client certificate for https). Stopped with
    SIGTERM (then SIGKILL of its process group) on exit; output goes to ``log_path``.
    """
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "felix.cli", "control", "--listen", f"127.0.0.1:{port}", *args]
    with log_path.open("wb") as log, contextlib.ExitStack() as stack:
        probe = http if http is not None else stack.enter_context(httpx.Client(timeout=1))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if probe.get(f"{url}/v1/system/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(
                        f"felix control did not start:\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.1)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
