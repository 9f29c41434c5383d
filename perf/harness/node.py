"""A `felix up` process tree on ephemeral ports in a temporary data dir (as tests/nodeproc.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from perf.harness import cpu


class FelixNode:
    """``felix up`` with ``gateways`` x ``shards`` (None: felix's defaults, one per core).

    ``extra_args``: more ``felix up`` options (the durable benchmark's fsync policies).
    ``env``: variables added to the node's environment (the fanout benchmark's
    ``FELIX_UDP_BATCH``). ``ca_dir``: a directory holding ``ca-cert.pem`` and
    ``ca-key.pem``, copied into the data dir first so the node's certificate comes from
    that CA (the nodes of one cluster, which a client follows redirects between).
    """

    def __init__(
        self,
        gateways: int | None = None,
        shards: int | None = None,
        embedded: bool = False,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        ca_dir: Path | None = None,
    ) -> None:
        self.gateways, self.shards, self.embedded = gateways, shards, embedded
        self.dir = Path(tempfile.mkdtemp(prefix="felix-perf-"))
        data = self.dir / "data"
        if ca_dir is not None:
            (data / "tls").mkdir(parents=True)
            for name in ("ca-cert.pem", "ca-key.pem"):
                shutil.copy(ca_dir / name, data / "tls" / name)
        args = [
            sys.executable,
            "-m",
            "felix.cli",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--data-dir",
            str(data),
            "--memory-budget",
            "512MiB",
        ]
        if gateways is not None:
            args += ["--gateways", str(gateways)]
        if shards is not None:
            args += ["--shards", str(shards)]
        if embedded:
            args.append("--embedded-shards")
        args += extra_args or []
        # As shown in reports: the temporary data dir is not worth printing.
        self.problems: list[str] = []
        self._stopped = False
        self.args = [("DATA_DIR" if a == str(data) else a) for a in args[4:]]
        self._log = (self.dir / "node.log").open("wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
        deadline = time.monotonic() + 60
        while not (data / "node.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"felix up did not start: {self.log()[-2000:]}")
            time.sleep(0.05)
        self.info: dict[str, Any] = json.loads((data / "node.json").read_text())
        self.url = f"felix://{self.info['quic']}"
        self.ca = self.info["ca"]

    @property
    def label(self) -> str:
        """``GxS`` as running (the topology in node.json), e.g. ``2x2``."""
        topology = self.info["topology"]
        g, s, embedded = topology["gateways"], topology["shards"], topology["embedded_shards"]
        default = " (felix up defaults)" if self.gateways is None and self.shards is None else ""
        return f"{g}x{s}{' embedded shards' if embedded else ''}{default}"

    def pids(self) -> list[int]:
        """The supervisor and its children (gateways, shards) as node.json lists them now."""
        info = json.loads((self.dir / "data" / "node.json").read_text())
        return [self.proc.pid, *(int(p) for p in info["processes"].values())]

    def cpu(self) -> float:
        return cpu.total_cpu(self.pids())

    def log(self) -> str:
        return (self.dir / "node.log").read_text(errors="replace")

    def stop(self) -> None:
        """Stop the node, keep its logged problems, remove its directory; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        # Keep what the node complained about (the data dir goes away) for the report.
        self.problems = [
            line
            for line in self.log().splitlines()
            if "Traceback" in line or "ERROR" in line or "Error:" in line
        ][:20]
        shutil.rmtree(self.dir, ignore_errors=True)
