"""Types of the compiled felix._ring module (see felix/_ring.pyx for how it works)."""

from collections.abc import Iterable
from types import TracebackType
from typing import Final, Self, final

from _typeshed import ReadableBuffer

HEADER_SIZE: Final[int]
LAYOUT_VERSION: Final[int]
MIN_CAPACITY: Final[int]
MAX_CAPACITY: Final[int]
DEFAULT_CAPACITY: Final[int]
DEFAULT_MAX_RECORDS: Final[int]
DEFAULT_MAX_BYTES: Final[int]

def record_footprint(size: int) -> int:
    """Bytes a record with a payload of ``size`` bytes takes in the data area (no wrap)."""

@final
class Ring:
    """One SPSC ring of variable-length records in a POSIX shared-memory segment."""

    @property
    def name(self) -> str: ...
    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        capacity: int = 1048576,
        doorbell_fd: int = -1,
    ) -> Ring:
        """Create and map a new segment; ValueError for a bad capacity, RingError if it exists."""
    @classmethod
    def attach(cls, name: str, *, doorbell_fd: int = -1) -> Ring:
        """Map an existing segment after validating its header; RingError if missing or bad."""
    @classmethod
    def create_memfd(cls, *, capacity: int = 1048576, doorbell_fd: int = -1) -> Ring:
        """Create a ring in a new sealed memfd (owned: ``fd``, closed by close())."""
    @classmethod
    def attach_fd(cls, fd: int, *, doorbell_fd: int = -1) -> Ring:
        """Map a sealed memfd ring; owns ``fd`` on success. RingError if it is no ring."""
    @property
    def fd(self) -> int:
        """The memfd of a memfd ring, -1 for a named one."""
    def close(self) -> None:
        """Unmap this side (idempotent); live record views keep the mapping until released."""
    def unlink(self) -> None:
        """Remove the segment's name (idempotent)."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """close(), then unlink() if this object created the segment."""

    # Introspection and counters (cheap: a few loads from shared memory).
    @property
    def closed(self) -> bool: ...
    @property
    def doorbell_fd(self) -> int: ...
    @doorbell_fd.setter
    def doorbell_fd(self, fd: int) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_record_size(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def free_bytes(self) -> int: ...
    @property
    def records_written(self) -> int: ...
    @property
    def records_read(self) -> int: ...
    @property
    def full_events(self) -> int: ...
    @property
    def doorbells_rung(self) -> int: ...
    @property
    def sleeps(self) -> int: ...

    # Producer side.
    def write(self, record: ReadableBuffer, *, publish: bool = True) -> bool:
        """Append one record; False (nothing written) when the ring is full."""
    def write_batch(self, records: Iterable[ReadableBuffer], *, publish: bool = True) -> int:
        """Append records until one does not fit; return how many were written."""
    def publish(self) -> None:
        """Make written records visible; ring the doorbell if the consumer sleeps."""

    # Consumer side.
    def read_batch(self, max_records: int = 1024, max_bytes: int = ...) -> list[memoryview]:
        """Read-only views of the next records, valid until commit()."""
    def next_batch(
        self, max_records: int = 1024, max_bytes: int = ..., spin_ns: int = 0
    ) -> list[memoryview]:
        """commit(), read_batch(), and prepare_sleep() when empty: [] means asleep."""
    def read(self) -> bytes | None:
        """Copy out the next record and commit, or None when empty."""
    def commit(self) -> None:
        """Release the space of every record read so far to the producer."""
    def prepare_sleep(self, spin_ns: int = 0) -> bool:
        """True: wait for the doorbell now. False: data is there, read it."""
    def drain_doorbell(self) -> int:
        """Reset the doorbell eventfd and return its counter (0 if it was not rung)."""
