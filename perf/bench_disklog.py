"""Benchmark felix's DiskLog beside plain file I/O of the same bytes, in one run.

    .venv/bin/python perf/bench_disklog.py [--quick] [--repeat N] [--dir DIR]

Measures, each repeated N times (min / median / max printed, compare within one run):
  * append, 64 B and 1 KiB payloads, one record per call and batches of 64: DiskLog.append
    (framing + CRCs + one os.write + bookkeeping) beside os.write of the same,
    already framed, bytes (the floor: the syscall and the page cache);
  * replay: reading the whole log from offset 0 in pages of 1000 records / 1 MiB
    (DiskLog.read: pread, both CRCs, DiskRecord objects) beside a plain sequential
    os.read of the segment files in 1 MiB chunks (page cache warm for both);
  * open/recovery of a log whose active segment is big (the scan checks every record)
    beside a sequential read of that file with zlib.crc32 over it;
  * fdatasync: latency of append(1 record of 64 B) + sync() beside os.write +
    os.fdatasync on a plain file (this disk's flush cost dominates both).
DIR (default: the current directory) must be on the disk you care about: /tmp may be
tmpfs, where fdatasync costs nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import encode_batch

BIG = DiskLogSettings(segment_bytes=1 << 30)


def framed(records: list[tuple[int, int, bytes]]) -> bytes:
    return encode_batch(records, 0, 32, 1 << 62, 4096, 0)[0]


def stats(samples: list[float]) -> str:
    return f"{min(samples):>12,.0f} {statistics.median(samples):>12,.0f} {max(samples):>12,.0f}"


def row(name: str, unit: str, felix: list[float], base: list[float], higher_better: bool) -> None:
    ratio = statistics.median(felix) / statistics.median(base)
    rel = f"{ratio:5.2f}x of baseline" if higher_better else f"{ratio:5.2f}x baseline time"
    print(f"  {name:<34} {unit:<10} felix   {stats(felix)}")
    print(f"  {'':<34} {'':<10} plain   {stats(base)}   ({rel})")


def bench_append(root: Path, size: int, batch: int, total: int) -> tuple[float, float]:
    """Records/s for DiskLog.append and for os.write of the same framed bytes."""
    payload = os.urandom(size)
    batches = [
        [(b * batch + i, 1_000_000 + b, payload) for i in range(batch)]
        for b in range(total // batch)
    ]
    d = Path(tempfile.mkdtemp(dir=root))
    log = DiskLog.open(d / "log", BIG, first_offset=0)
    t0 = time.perf_counter()
    for records in batches:
        log.append(records)
    felix = total / (time.perf_counter() - t0)
    log.close()
    blobs = [framed(records) for records in batches]  # framing is not the floor's cost
    fd = os.open(d / "plain", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    t0 = time.perf_counter()
    for blob in blobs:
        os.write(fd, blob)
    plain = total / (time.perf_counter() - t0)
    os.close(fd)
    shutil.rmtree(d)
    return felix, plain


def make_log(root: Path, size: int, count: int, segment_bytes: int) -> DiskLog:
    payload = os.urandom(size)
    log = DiskLog.open(root, DiskLogSettings(segment_bytes=segment_bytes), first_offset=0)
    for b in range(0, count, 256):
        log.append([(o, 1_000_000 + o, payload) for o in range(b, min(b + 256, count))])
    return log


def bench_replay(root: Path, size: int, count: int) -> tuple[float, float]:
    """MB/s of payload+framing: DiskLog.read pages beside os.read of the files."""
    d = Path(tempfile.mkdtemp(dir=root))
    log = make_log(d / "log", size, count, 64 << 20)
    total = log.size_bytes
    at, n = 0, 0
    t0 = time.perf_counter()
    while True:
        page = log.read(at, 1000, 1 << 20)
        if not page:
            break
        n += len(page)
        at = page[-1].offset + 1
    felix = total / (time.perf_counter() - t0) / 1e6
    assert n == count
    log.close()
    t0 = time.perf_counter()
    for seg in sorted((d / "log").glob("*.seg")):
        fd = os.open(seg, os.O_RDONLY)
        while os.read(fd, 1 << 20):
            pass
        os.close(fd)
    plain = total / (time.perf_counter() - t0) / 1e6
    shutil.rmtree(d)
    return felix, plain


def bench_open(root: Path, mbytes: int) -> tuple[float, float]:
    """Milliseconds to open (recover) a log with one big active segment, and to read +
    CRC the same file."""
    d = Path(tempfile.mkdtemp(dir=root))
    size = 1024
    log = make_log(d / "log", size, mbytes * 2**20 // (size + 28), 1 << 40)
    log.close()
    t0 = time.perf_counter()
    DiskLog.open(d / "log", BIG, first_offset=0).close()
    felix = (time.perf_counter() - t0) * 1e3
    seg = next((d / "log").glob("*.seg"))
    t0 = time.perf_counter()
    fd = os.open(seg, os.O_RDONLY)
    crc = 0
    while chunk := os.read(fd, 1 << 20):
        crc = zlib.crc32(chunk, crc)
    os.close(fd)
    plain = (time.perf_counter() - t0) * 1e3
    shutil.rmtree(d)
    return felix, plain


def bench_sync(root: Path, count: int) -> tuple[list[float], list[float]]:
    """Microseconds per append+sync, and per os.write+os.fdatasync."""
    d = Path(tempfile.mkdtemp(dir=root))
    log = DiskLog.open(d / "log", BIG, first_offset=0)
    payload = os.urandom(64)
    felix = []
    for i in range(count):
        t0 = time.perf_counter_ns()
        log.append([(i, i, payload)])
        log.sync()
        felix.append((time.perf_counter_ns() - t0) / 1e3)
    log.close()
    blob = framed([(0, 0, payload)])
    fd = os.open(d / "plain", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    plain = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        os.write(fd, blob)
        os.fdatasync(fd)
        plain.append((time.perf_counter_ns() - t0) / 1e3)
    os.close(fd)
    shutil.rmtree(d)
    return felix, plain


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def repeat(n: int, fn: Callable[[], tuple[float, float]]) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(n):
        x, y = fn()
        a.append(x)
        b.append(y)
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (~20 s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the logs go (.)")
    args = parser.parse_args()
    scale = 1 if args.quick else 4
    root = Path(tempfile.mkdtemp(prefix="bench-disklog-", dir=args.dir))
    try:
        print(f"DiskLog benchmark in {root} (min / median / max of {args.repeat} runs)")
        print("append (records/s, page cache; no fsync)")
        for size in (64, 1024):
            for batch, total in ((1, 20_000 * scale), (64, 200_000 * scale)):
                f, p = repeat(args.repeat, partial(bench_append, root, size, batch, total))
                row(f"{size} B, {batch} per call", "records/s", f, p, True)
        print("replay from disk (MB/s, page cache warm)")
        for size, count in ((64, 200_000 * scale), (1024, 50_000 * scale)):
            f, p = repeat(args.repeat, partial(bench_replay, root, size, count))
            row(f"{size} B records, {count} records", "MB/s", f, p, True)
        print("open/recovery of a big active segment (milliseconds, page cache warm)")
        mb = 64 * scale
        f, p = repeat(args.repeat, lambda: bench_open(root, mb))
        row(f"{mb} MiB active segment", "ms", f, p, False)
        print("append 1 x 64 B + fdatasync (microseconds)")
        felix, plain = bench_sync(root, 100 * scale)
        for name, s in (("felix", felix), ("plain", plain)):
            print(
                f"  {name:<6} p50 {pct(s, 0.5):>9,.0f}  p99 {pct(s, 0.99):>9,.0f}  "
                f"max {max(s):>9,.0f}  ({len(s)} samples)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
