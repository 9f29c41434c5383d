"""Shared-memory hygiene for ring tests: every test leaves /dev/shm as it found it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import posix_ipc
import pytest

#: Rings created without a name in this process start with this (felix/_ring.pyx).
SHM_PREFIX = f"felix-ring-{os.getpid()}-"


def _our_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


@pytest.fixture(autouse=True)
def no_stale_segments() -> Iterator[None]:
    """Fail a test that leaked a segment (and remove the leak)."""
    before = _our_segments()
    yield
    leaked = _our_segments() - before
    for name in leaked:
        posix_ipc.unlink_shared_memory("/" + name)
    assert not leaked, f"stale shared-memory segments: {sorted(leaked)}"
