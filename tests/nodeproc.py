"""Run `felix up` as a real process tree for tests, on ephemeral ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


class NodeProcess:
    def __init__(self, data_dir: Path, *args: str, gateways: int = 2, shards: int = 2) -> None:
        self.data_dir = data_dir
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
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
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

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.info['http']}{path}", timeout=5) as r:
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
