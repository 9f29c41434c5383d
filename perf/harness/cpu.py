"""CPU time (user + system) of processes, read from /proc, and finding servers' pids."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def process_cpu(pid: int) -> float | None:
    """Seconds of CPU used by ``pid`` (all its threads); None if it is gone.

    The sum of the threads' ``/proc/PID/task/TID/schedstat`` run time (nanoseconds),
    because ``utime + stime`` in ``/proc/PID/stat`` counts 10 ms ticks, too coarse
    for runs of a second; ``stat`` is the fallback where schedstat is missing.
    """
    total = 0
    try:
        for task in (_PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        pass
    if total:
        return total / 1e9
    return _stat_cpu(pid)


def _stat_cpu(pid: int) -> float | None:
    """utime + stime of ``pid`` from /proc/PID/stat (clock ticks)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def total_cpu(pids: Iterable[int]) -> float:
    return sum(process_cpu(pid) or 0.0 for pid in pids)


def client_cpu() -> float:
    """CPU seconds of this process (the client side: all workloads run in it)."""
    return time.process_time()


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            # TCP LISTEN is state 0A; UDP sockets are 07 (unconnected).
            if int(local.rsplit(":", 1)[1], 16) == port and state in ("0A", "07"):
                inodes.add(inode)
    return inodes


def pids_listening(port: int) -> list[int]:
    """Processes holding a socket that listens on ``port`` (needs the right to read their fds)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    found: list[int] = []
    if not wanted:
        return found
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        found.append(int(entry.name))
                        break
    return found


def pids_named(name: str) -> list[int]:
    """Processes whose command name (/proc/PID/comm) is ``name``."""
    found = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def server_pids(host: str, port: int, name: str) -> list[int]:
    """The local server process(es) behind ``host:port``: by port, else by name; [] if remote."""
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return []
    return pids_listening(port) or pids_named(name)
