"""Types of the compiled durable-log scanner (see felix/_logscan.pyx)."""

from collections.abc import Callable, Sequence
from typing import Any

def header_crc(data: bytes, rel: int = 0) -> int:
    """CRC-32 of the 24 bytes at ``data[rel:]``."""

def scan(
    buf: bytes,
    rel: int,
    last_offset: int,
    max_payload: int,
    min_offset: int,
    max_records: int,
    max_bytes: int,
    have_some: bool,
    factory: Callable[[int, int, bytes], Any],
    out: list[Any] | None,
    entries: list[tuple[int, int, int]] | None,
    index_mark: int,
    index_interval: int,
    buf_pos: int,
    max_ts: int,
) -> tuple[int, int, int, int, int, int, int, int, str | None]:
    """Check and collect the whole records in ``buf[rel:]`` (see the .pyx)."""

def encode_batch(
    records: Sequence[tuple[int, int, bytes]],
    next_offset: int,
    start_pos: int,
    index_mark: int,
    index_interval: int,
    max_ts: int,
    max_payload: int,
) -> tuple[bytes, list[tuple[int, int, int]], int, int]:
    """Frame records into one bytes object (see felix.shard.log_format.encode_batch)."""

def find_record(buf: bytes, rel: int, after_offset: int, max_payload: int) -> int:
    """The first position > ``rel`` where a whole valid record starts, or -1."""
