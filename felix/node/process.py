"""A child process started synchronously and awaited from asyncio.

The supervisor starts children with :class:`subprocess.Popen` rather than
``asyncio.create_subprocess_exec`` so the whole start (socket pair, descriptor
copies, fork and exec) runs without yielding to the event loop: the descriptors
it frees from its reserve for the start cannot be taken by anything else in
between (felix/node/fds.py). Exit is awaited through a pidfd (Linux 5.3+; a
short poll elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence

#: Poll interval when pidfds are not available.
_POLL = 0.05


class ChildProcess:
    def __init__(
        self, args: Sequence[str], *, env: dict[str, str], pass_fds: Sequence[int]
    ) -> None:
        self._popen = subprocess.Popen(list(args), env=env, pass_fds=tuple(pass_fds))
        self.pid = self._popen.pid
        self._pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(self.pid)
        self._exited: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal); reaps the process."""
        code = self._popen.poll()
        if code is not None:
            self._close_pidfd()
            return code
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            if self._pidfd >= 0:
                loop.add_reader(self._pidfd, self._on_exit)
            else:
                loop.call_later(_POLL, self._poll)
        return await asyncio.shield(self._exited)

    def _on_exit(self) -> None:
        code = self._popen.poll()
        if code is None:  # pragma: no cover - a pidfd is readable only once it exited
            return
        self._close_pidfd()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(code)

    def _poll(self) -> None:
        if self._popen.poll() is None:
            asyncio.get_running_loop().call_later(_POLL, self._poll)
        else:
            self._on_exit()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
