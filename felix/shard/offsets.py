"""Offset reservations: stream offsets stay monotonic across shard restarts.

How it works
------------
In-memory streams lose their records when a shard restarts, but their offsets must
never go backward: a subscriber holding offset 41 must not later receive a different
record 41. Writing the tail offset to disk on every publish would cost an fsync per
publish, so offsets are *reserved in blocks* instead:

* The file records a **floor**: no stream *without an entry* has issued an offset at
  or above it. Opening starts every stream the file does not know at the old floor
  and writes the floor one block higher, so a new stream costs no write at all
  (constant cost, off the request path) until it has issued a block of offsets.
* A stream that reaches the floor gets an entry, a **mark**: no offset at or above
  it has been issued. Before a shard issues offsets below ``end`` it calls
  :meth:`OffsetReservations.ensure`; when ``end`` is above the stream's mark (or the
  floor, for a stream without an entry) the file is rewritten with a new mark
  ``block`` offsets ahead (rounded to a multiple of ``block``), fsynced, and only
  then does ``ensure`` return. Most calls are a dict lookup and a comparison.
* On start, every known stream continues from its mark
  (:meth:`OffsetReservations.start_offset`), every other stream from the old floor;
  subscribers see the offsets between the last one really issued and where the
  stream continues as a gap (offsets never assigned). Opening reserves one more
  block for every known stream in the same single write.
* Deleting a stream (:meth:`OffsetReservations.remove`) drops its entry and moves
  the start of new streams above everything it issued (raising the floor when
  needed), so a stream re-created under the same key never reuses an offset.
* The table holds at most ``max_entries`` entries. When it is full, the entry of a
  stream that is not in memory (``in_use``) is folded into the floor, the one with
  the lowest mark first: that stream, if it comes back, starts above its old mark
  like any new stream. So the table never fills up for good: after a restart no
  stream is in memory and every old entry can be reclaimed.

File format (ASCII, one item per line, ``\\n`` endings)::

    felix-offsets 1
    generation <n>        # +1 per write
    block <n>             # block size of the writer
    floor <n>             # start offset of streams without an entry
    entries <n>
    <mark> <key>          # n lines, keys sorted
    crc32 <8 hex digits>  # CRC-32 of every byte above

A write goes: write ``<path>.tmp`` and fsync it; hard-link the current file to
``<path>.bak`` (the previous generation); rename the temporary file over ``<path>``;
fsync the directory. ``<path>`` is therefore always a complete file, old or new.

Recovery (chosen: never start lower, refuse when that cannot be guaranteed):

* ``<path>`` valid: it is used (taking, per key, the higher mark of it and a valid
  ``.bak``, which can only raise marks). A leftover ``.tmp`` is ignored: its write
  never completed, so no offset under it was issued.
* ``<path>`` corrupt or missing, ``.bak`` valid: the lost file was exactly one write
  newer than ``.bak``, and one write raises any mark by at most two blocks
  (``ensure`` refuses larger jumps), and the floor to at most the highest mark or
  floor of ``.bak`` plus two blocks. So the shard restarts from the ``.bak`` marks
  plus ``2 * block`` and from that floor: safe, with a bigger gap. The corrupt file
  is kept as ``<path>.corrupt`` for inspection and :attr:`recovered` is set.
* Some file exists but none is valid: :class:`~felix.errors.FelixError` is raised
  and the shard must not start; an operator decides (restore a copy, or delete the
  files and accept that offsets restart at 0).
* No file at all: a fresh start, every stream at offset 0.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from felix.errors import BadRequest, FelixError, Overloaded, Unavailable

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MAX_ENTRIES",
    "MAX_KEY_CHARS",
    "MAX_OFFSET",
    "OffsetReservations",
    "start_offsets",
]

#: Offsets reserved per file rewrite and stream.
DEFAULT_BLOCK: Final = 1 << 20
#: Most stream keys one file tracks (``felix up --max-streams-per-shard``).
DEFAULT_MAX_ENTRIES: Final = 65_536
#: Longest stream key, in characters (printable ASCII without spaces).
MAX_KEY_CHARS: Final = 512
#: Highest mark (offsets travel as signed 64-bit integers).
MAX_OFFSET: Final = 2**63 - 1

_MAGIC: Final = "felix-offsets 1"
# Reading a file bigger than this is refused as corrupt instead of allocating for it.
_MAX_FILE_BYTES: Final = 1 << 28


class _Corrupt(Exception):
    """A reservation file failed to parse or verify (internal)."""


@dataclass(slots=True)
class _Snapshot:
    generation: int
    block: int
    floor: int
    marks: dict[str, int]


def _check_key(key: str) -> None:
    if (
        not isinstance(key, str)
        or not 0 < len(key) <= MAX_KEY_CHARS
        or not key.isascii()
        or not key.isprintable()
        or " " in key
    ):
        raise BadRequest(
            f"invalid stream key {key!r}: must be 1 to {MAX_KEY_CHARS} printable ASCII "
            "characters without spaces"
        )


def _encode(generation: int, block: int, floor: int, marks: Mapping[str, int]) -> bytes:
    lines = [
        _MAGIC,
        f"generation {generation}",
        f"block {block}",
        f"floor {floor}",
        f"entries {len(marks)}",
    ]
    lines.extend(f"{marks[key]} {key}" for key in sorted(marks))
    body = ("\n".join(lines) + "\n").encode("ascii")
    return body + f"crc32 {zlib.crc32(body):08x}\n".encode("ascii")


def _parse_int(text: str) -> int:
    # Only plain decimal digits: int() would also take signs, spaces and underscores.
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise _Corrupt(f"bad number {text[:30]!r}")
    value = int(text)
    if value > MAX_OFFSET:
        raise _Corrupt(f"number out of range {value}")
    return value


def _header(line: str, name: str) -> int:
    label, _, value = line.partition(" ")
    if label != name:
        raise _Corrupt(f"expected {name!r}, got {line[:40]!r}")
    return _parse_int(value)


def _decode(data: bytes) -> _Snapshot:
    """Parse and verify a reservation file; raise :class:`_Corrupt` on any defect."""
    body_end = data.rfind(b"crc32 ")
    if body_end <= 0 or data[body_end - 1 : body_end] != b"\n":
        raise _Corrupt("no checksum line (torn or truncated file)")
    trailer = data[body_end:]
    body = data[:body_end]
    if trailer != f"crc32 {zlib.crc32(body):08x}\n".encode("ascii"):
        raise _Corrupt("checksum mismatch")
    try:
        lines = body.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise _Corrupt("non-ASCII content") from None
    if lines.pop() != "" or len(lines) < 5 or lines[0] != _MAGIC:
        raise _Corrupt("bad header")
    generation = _header(lines[1], "generation")
    block = _header(lines[2], "block")
    floor = _header(lines[3], "floor")
    count = _header(lines[4], "entries")
    if block < 1 or count != len(lines) - 5:
        raise _Corrupt("bad block size or entry count")
    marks: dict[str, int] = {}
    for line in lines[5:]:
        mark, _, key = line.partition(" ")
        try:
            _check_key(key)
        except BadRequest:
            raise _Corrupt(f"bad key {key[:40]!r}") from None
        if key in marks:
            raise _Corrupt(f"duplicate key {key!r}")
        marks[key] = _parse_int(mark)
    return _Snapshot(generation, block, floor, marks)


def _read(path: Path) -> _Snapshot | None:
    """Read ``path``: ``None`` if it does not exist; raise :class:`_Corrupt` if invalid."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_FILE_BYTES:
        raise _Corrupt(f"larger than {_MAX_FILE_BYTES} bytes")
    return _decode(data)


def _recover(path: Path, block: int) -> tuple[_Snapshot, bool, _Corrupt | None]:
    """What opening ``path`` (and its ``.bak``) starts from, read only: the snapshot,
    whether it was recovered from ``.bak`` (marks and floor raised by two blocks) and
    the main file's defect. FelixError when files exist but none is valid (see
    "Recovery" in the module docstring)."""
    bak_path = path.with_name(path.name + ".bak")
    try:
        main = _read(path)
        main_error = None
    except _Corrupt as exc:
        main, main_error = None, exc
    try:
        bak = _read(bak_path)
        bak_error = None
    except _Corrupt as exc:
        bak, bak_error = None, exc

    if main is not None:
        if bak is not None:
            # .bak is older, so this can only raise marks; it guards against a
            # .bak that is somehow newer (restored by hand) being ignored.
            for key, mark in main.marks.items():
                main.marks[key] = max(mark, bak.marks.get(key, 0))
            main.floor = max(main.floor, bak.floor)
            main.generation = max(main.generation, bak.generation)
        return main, False, None
    if bak is None:
        if main_error is None and bak_error is None:
            return _Snapshot(0, block, 0, {}), False, None  # fresh start
        raise FelixError(
            f"offset reservation files {path} ({main_error or 'missing'}) and "
            f"{bak_path} ({bak_error or 'missing'}) are unusable: refusing to start, "
            "since guessing could issue offsets that were issued before. Restore a "
            "copy, or delete both files to restart every stream at offset 0."
        )
    # The main file is corrupt or gone but the backup is fine: it is one write
    # older, and one write raises a mark or the floor by at most two blocks.
    margin = 2 * max(bak.block, block)
    # A lost write may have folded or removed any entry, raising the floor to
    # just above its mark: start new streams above every mark .bak knows.
    top = max([bak.floor, *bak.marks.values()])
    recovered = _Snapshot(
        bak.generation + 1,
        block,
        min(top + margin, MAX_OFFSET),
        {key: min(mark + margin, MAX_OFFSET) for key, mark in bak.marks.items()},
    )
    return recovered, True, main_error


def start_offsets(path: str | os.PathLike[str]) -> tuple[int, dict[str, int]]:
    """Where the next :class:`OffsetReservations` opened on ``path`` starts its streams,
    without writing anything: ``(floor, marks)``; a stream with an entry in ``marks``
    starts at its mark, any other at ``floor``. ``(0, {})`` when there is no file;
    FelixError when files exist but none is valid."""
    snapshot, _recovered, _error = _recover(Path(path), DEFAULT_BLOCK)
    return snapshot.floor, dict(snapshot.marks)


class OffsetReservations:
    """Per-shard table of reserved offset marks, persisted in one small file.

    Opening reads ``path`` (and its ``.bak``), recovers as the module docstring
    describes, and writes one new generation reserving a block ahead for every
    known stream and for the streams it does not know (the floor). The directory of
    ``path`` must exist: it is not created, so an unmounted data volume fails loudly
    instead of looking like a fresh start.

    The intended use, per stream key, by the shard that owns it::

        log = StreamLog(settings, first_offset=reservations.start_offset(key))
        ...
        reservations.ensure(key, log.next_offset + len(batch))  # may fsync
        log.append(batch)

    Not thread-safe: one shard owns it. ``in_use(key)``, set by the owner, tells
    whether a stream is in memory (its entry cannot be folded into the floor).

    Attributes (read-only):
        path: the reservation file.
        block: offsets reserved per rewrite.
        max_entries: most stream keys tracked.
        recovered: ``True`` if opening had to fall back to the ``.bak`` file.
        writes: file rewrites done by this object.

    Raises:
        FelixError: the directory does not exist, or the files exist but none is
            valid (see "Recovery" in the module docstring).
        Unavailable: the opening write failed (I/O error).
        ValueError: ``block`` or ``max_entries`` is below 1.
    """

    __slots__ = (
        "_base",
        "_floor",
        "_generation",
        "_marks",
        "_starts",
        "block",
        "folded",
        "in_use",
        "max_entries",
        "path",
        "recovered",
        "writes",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        block: int = DEFAULT_BLOCK,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if block < 1 or max_entries < 1:
            raise ValueError(f"block and max_entries must be >= 1, got {block}, {max_entries}")
        self.path = Path(path)
        self.block = block
        self.max_entries = max_entries
        self.recovered = False
        self.writes = 0
        self.folded = 0
        self.in_use: Callable[[str], bool] = lambda key: True
        if not self.path.parent.is_dir():
            raise FelixError(f"offset reservation directory {self.path.parent} does not exist")
        snapshot = self._load()
        self._generation = snapshot.generation
        # Streams without an entry start here in this process; they issue offsets in
        # [_base, _floor) without a write.
        self._base = snapshot.floor
        self._floor = snapshot.floor
        # Where each stream known at open continues: nothing at or above was issued.
        self._starts: dict[str, int] = dict(snapshot.marks)
        # Current durable marks. Entries loaded from the file may exceed max_entries
        # (if it was lowered); the extra ones are folded into the floor as new keys
        # need room.
        self._marks: dict[str, int] = dict(snapshot.marks)
        bumped = {key: min(mark + block, MAX_OFFSET) for key, mark in self._marks.items()}
        floor = min(self._floor + block, MAX_OFFSET)
        self._write(bumped, floor)
        if self.recovered or snapshot.block != block:
            # Write a second generation so that .bak, too, holds this state and
            # this block size: recovery assumes .bak is one write (of at most two
            # of its blocks) behind the main file.
            self._write(bumped, floor)

    # -- queries -------------------------------------------------------------------

    def start_offset(self, key: str) -> int:
        """The offset a new in-memory log for ``key`` starts at in this process.

        For a stream known when this object was opened, its mark from the previous
        run; otherwise where new streams start (0 on a fresh start). Call it once, when creating
        the stream's log, and keep the log for the life of the process (or
        :meth:`remove` the key when the stream is deleted): it does not track the
        offsets issued since.
        """
        return self._starts.get(key, self._base)

    def reserved(self, key: str) -> int | None:
        """The durable mark of ``key`` (no offset at or above it issued), or ``None``."""
        return self._marks.get(key)

    @property
    def floor(self) -> int:
        """Durable bound: no stream without an entry issued an offset at or above it."""
        return self._floor

    @property
    def base(self) -> int:
        """Start offset, in this process, of streams the table does not know."""
        return self._base

    def __len__(self) -> int:
        return len(self._marks)

    def __contains__(self, key: object) -> bool:
        return key in self._marks

    def __iter__(self) -> Iterator[str]:
        return iter(self._marks)

    # -- updates -------------------------------------------------------------------

    def ensure(self, key: str, end: int) -> bool:
        """Make offsets below ``end`` safe to issue for ``key``; return whether it wrote.

        Call before issuing offsets: when ``end`` is above the durable mark, the
        file is rewritten with the mark raised to the next multiple of ``block``
        above ``end`` and fsynced before this returns (the only blocking step, once
        per ``block`` offsets per stream). Otherwise it is a dict lookup.

        Raises:
            BadRequest: ``key`` is not a valid key (see :data:`MAX_KEY_CHARS`), or
                ``end`` is more than one block above the current mark (a batch larger
                than a block; the recovery bound depends on this), or beyond
                :data:`MAX_OFFSET`.
            Overloaded: ``key`` needs an entry and the table holds ``max_entries``
                entries of streams that are all in memory.
            Unavailable: the file could not be written; nothing changed and no
                offset at or above the old mark may be issued.
        """
        mark = self._marks.get(key)
        if mark is not None and end <= mark:
            return False
        return self._raise_mark(key, end, mark)

    def _raise_mark(self, key: str, end: int, mark: int | None) -> bool:
        marks = self._marks
        floor, base = self._floor, self._base
        folded: list[str] = []
        if mark is None:
            _check_key(key)
            mark = self._floor
            if end <= mark:
                # Streams without an entry issue below the floor without a write.
                return False
            if len(self._marks) >= self.max_entries:
                folded = self._idle(len(self._marks) + 1 - self.max_entries)
                marks = {k: m for k, m in self._marks.items() if k not in folded}
                base = max([base, *(self._marks[k] for k in folded)])
                floor = self._floor_above(base)
        if end - mark > self.block:
            raise BadRequest(f"cannot reserve {end - mark} offsets at once (block is {self.block})")
        new_mark = (end // self.block + 1) * self.block
        if new_mark > MAX_OFFSET:
            if end > MAX_OFFSET:
                raise BadRequest("stream offset space exhausted")
            new_mark = MAX_OFFSET
        marks = dict(marks)
        marks[key] = new_mark
        self._write(marks, floor)
        # Written: the folded streams now start above their marks like any new stream.
        self._base = base
        for gone in folded:
            self._starts.pop(gone, None)
        self.folded += len(folded)
        return True

    def _idle(self, count: int) -> list[str]:
        """``count`` keys of streams not in memory, to fold into the floor: the lowest
        marks first (the floor rises least)."""
        idle = sorted((m, k) for k, m in self._marks.items() if not self.in_use(k))
        if len(idle) < count:
            raise Overloaded(
                f"offset reservation table is full: {len(self._marks)} streams in memory hold "
                f"an entry (limit {self.max_entries}, --max-streams-per-shard)"
            )
        return [key for _, key in idle[:count]]

    def _floor_above(self, base: int) -> int:
        """The floor once new streams start at ``base``: a block of room above it."""
        return self._floor if base < self._floor else min(base + self.block, MAX_OFFSET)

    def remove(self, key: str, issued_end: int = 0) -> bool:
        """Forget ``key`` (its stream was deleted); return whether it had an entry.

        ``issued_end`` is the offset after the last one the stream issued. Streams
        created later, this one again included, start above every offset it issued
        (for a stream with an entry, above its mark, written to the file).

        Raises:
            Unavailable: the file could not be written; nothing changed.
        """
        self._starts.pop(key, None)
        mark = self._marks.get(key)
        if mark is None:
            # It issued below the durable floor: only this process's start moves up.
            self._base = max(self._base, issued_end)
            return False
        marks = dict(self._marks)
        del marks[key]
        base = max(self._base, mark)
        self._write(marks, self._floor_above(base))
        self._base = base
        return True

    def release(self, key: str, issued_end: int) -> None:
        """``key``'s stream left memory without being deleted (cluster mode: its logical
        shard moved to another node); ``issued_end`` is the offset after the last one it
        issued. Created again in this process it continues at ``issued_end`` or above,
        never below. Nothing is written: a stream with an entry keeps it (its mark is
        above what it issued), one without issued below the floor, where new streams
        of this process now start above it (as after :meth:`remove`).
        """
        if key in self._marks:
            self._starts[key] = max(issued_end, self._starts.get(key, 0))
        else:
            self._starts.pop(key, None)
            self._base = max(self._base, issued_end)

    def settle(self, ends: Mapping[str, int]) -> None:
        """A clean stop: ``ends`` holds, per stream in memory, the offset after the last
        one it issued, and no offset is issued any more in this process. The marks are
        written down to exactly those ends, so the next run continues every stream where
        it stopped instead of a block higher (no gap after a graceful restart).

        Written twice, so that ``.bak`` holds it too (loading takes the higher mark of
        the file and ``.bak``); a crash between the two writes keeps the old, higher
        marks: safe, with the usual gap. Streams without an entry get one while the
        table has room; the floor does not move (streams this process does not hold
        still start above it).

        Raises:
            Unavailable: the file could not be written (the old marks stay: safe).
        """
        marks = dict(self._marks)
        for key, end in sorted(ends.items()):
            mark = marks.get(key)
            if mark is not None:
                marks[key] = min(mark, max(end, 0))  # never above: nothing issued there
            elif len(marks) < self.max_entries and self._base <= end <= self._floor:
                _check_key(key)
                marks[key] = end
        if marks == self._marks:
            return
        self._write(marks, self._floor)
        self._write(marks, self._floor)

    # -- file I/O ------------------------------------------------------------------

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _load(self) -> _Snapshot:
        snapshot, recovered, main_error = _recover(self.path, self.block)
        if main_error is not None:  # the corrupt file is kept for inspection
            try:
                os.replace(self.path, self._sibling(".corrupt"))
            except OSError as exc:
                raise FelixError(f"cannot move corrupt {self.path} aside: {exc}") from exc
        self.recovered = recovered
        return snapshot

    def _write(self, marks: dict[str, int], floor: int) -> None:
        """Durably replace the file with ``marks`` and ``floor``; adopt them on success."""
        generation = self._generation + 1
        data = _encode(generation, self.block, floor, marks)
        tmp = self._sibling(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            bak = self._sibling(".bak")
            if self.path.exists():
                # Keep the previous generation as .bak: a hard link, so the current
                # file is never missing, not even for a moment.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(bak)
                os.link(self.path, bak)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise Unavailable(f"cannot write offset reservations to {self.path}: {exc}") from exc
        self._generation = generation
        self._marks = marks
        self._floor = floor
        self.writes += 1
