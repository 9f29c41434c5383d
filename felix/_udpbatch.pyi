"""Types of the compiled felix._udpbatch module (see felix/_udpbatch.pyx for how it works)."""

from typing import Any, Final, final

DEFAULT_CAPACITY: Final[int]
MAX_CAPACITY: Final[int]

@final
class UdpSender:
    """Sends lists of ``(bytes, address)`` datagrams with sendmmsg(2)."""

    def __init__(self, capacity: int = ..., gso: bool = ...) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def gso(self) -> bool: ...
    @property
    def gso_datagrams(self) -> int: ...
    @property
    def syscalls(self) -> int: ...
    @property
    def datagrams(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def last_error(self) -> int: ...
    def send(self, fd: int, datagrams: list[tuple[bytes, Any]], start: int = 0) -> int:
        """Send ``datagrams[start:]`` on ``fd``; the index of the first one not handled."""

def gso_supported(fd: int) -> bool:
    """Whether the kernel knows UDP_SEGMENT on this UDP socket."""

def send_batch(fd: int, datagrams: list[tuple[bytes, Any]], start: int = 0) -> int:
    """``UdpSender().send(fd, datagrams, start)`` with one shared sender."""
