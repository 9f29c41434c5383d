"""What one fdatasync costs on this disk: the floor under every commit ack.

Appends ``size`` bytes to a file and ``fdatasync``s it, ``n`` times, in a temporary
directory on the same filesystem as the felix nodes' data dirs (``tempfile``'s
directory). The latency samples are the fdatasync calls alone; the write is timed
separately. A commit ack can never be cheaper than one of these; group commit
spreads one of them over every publish waiting.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from perf.harness.stats import RunResult
from perf.harness.workloads import Meter


class DiskProbe:
    """The pseudo-system the fdatasync workloads run on (no server)."""

    name = "fdatasync"
    server = "this process: os.write + os.fdatasync on a temporary file"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="perfdur-disk-"))

    def server_cpu(self) -> float | None:
        return None

    def filesystem(self) -> dict[str, str]:
        """The mount the probe (and the nodes' data dirs) live on, from /proc/mounts."""
        best: dict[str, str] = {}
        try:
            lines = Path("/proc/mounts").read_text().splitlines()
        except OSError:
            return best
        path = str(self.dir.resolve())
        for line in lines:
            dev, mnt, fstype, opts = [*line.split(), "", "", "", ""][:4]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best.get("mount", "")
            ):
                best = {"device": dev, "mount": mnt, "fstype": fstype, "options": opts}
        return best

    def stop(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def device_counters(directory: Path) -> dict[str, int]:
    """Flushes and writes completed so far by the block device under ``directory``.

    From /proc/diskstats (flushes are fields 16-17 since Linux 5.5). Machine-wide:
    every process writing to that device counts, so read it as an upper bound.
    """
    st = os.stat(directory)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 20 and (int(parts[0]), int(parts[1])) == (major, minor):
            stats = [int(x) for x in parts[3:]]
            return {"dev_writes": stats[4], "dev_flushes": stats[15], "dev_flush_ms": stats[16]}
    return {}


def _probe(path: Path, size: int, n: int, prealloc: bool) -> tuple[list[int], list[int]]:
    data = b"d" * size
    writes, syncs = [], []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if prealloc:
            # Blocks allocated up front (as a log could do per segment): the fdatasync
            # then has no file size or extent change to journal.
            os.posix_fallocate(fd, 0, size * n)
            os.fsync(fd)
        for i in range(n):
            t0 = time.perf_counter_ns()
            os.pwrite(fd, data, i * size)
            t1 = time.perf_counter_ns()
            os.fdatasync(fd)
            t2 = time.perf_counter_ns()
            writes.append(t1 - t0)
            syncs.append(t2 - t1)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return writes, syncs


async def fdatasync_run(
    probe: DiskProbe, size: int, n: int, warmup: int, meter: Meter, prealloc: bool = False
) -> Any:
    """``n`` appends of ``size`` bytes each followed by fdatasync (in a thread).

    ``prealloc``: into a file whose blocks were allocated (posix_fallocate) first.
    """
    path = probe.dir / f"probe-{size}"
    await asyncio.to_thread(_probe, path, size, warmup, prealloc)
    meter.start()
    writes, syncs = await asyncio.to_thread(_probe, path, size, n, prealloc)
    result: RunResult = meter.stop(syncs, len(syncs))
    result.extra["write_p50_us"] = float(np.percentile(writes, 50)) / 1000
    result.extra["write_p99_us"] = float(np.percentile(writes, 99)) / 1000
    return result


async def idle_flushes(probe: DiskProbe, seconds: float, meter: Meter) -> Any:
    """Device flushes by everything else on the machine while this benchmark sleeps.

    The background the per-run device counters of the publish workloads sit on.
    """
    d0 = device_counters(probe.dir)
    meter.start()
    await asyncio.sleep(seconds)
    d1 = device_counters(probe.dir)
    flushes = d1.get("dev_flushes", 0) - d0.get("dev_flushes", 0)
    # ops = flushes: throughput is flushes/s; no latency samples. At least 1 so the
    # run's figures exist on a quiet machine (recorded as is in extra).
    result: RunResult = meter.stop([], max(1, flushes))
    result.extra.update(
        dev_flushes=flushes,
        dev_writes=d1.get("dev_writes", 0) - d0.get("dev_writes", 0),
        elapsed_s=result.elapsed_s,
    )
    return result
