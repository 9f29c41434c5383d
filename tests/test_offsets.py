"""Tests for felix.shard.offsets: reserved offset marks that survive shard restarts."""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from felix.errors import BadRequest, FelixError, Overloaded, Unavailable
from felix.shard.offsets import MAX_KEY_CHARS, MAX_OFFSET, OffsetReservations, _encode
from felix.shard.stream_log import StreamLog

BLOCK = 100


def open_res(path: Path, block: int = BLOCK, max_entries: int = 100) -> OffsetReservations:
    return OffsetReservations(path, block=block, max_entries=max_entries)


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "shard-0.offsets"


# -- basics ----------------------------------------------------------------------------


def test_fresh_start(path: Path) -> None:
    res = open_res(path)
    assert res.start_offset("t/ns/s") == 0
    # Opening reserves one block for the streams the file does not know, in one write.
    assert (res.floor, len(res), res.writes, res.recovered) == (BLOCK, 0, 1, False)
    assert res.reserved("t/ns/s") is None


def test_new_streams_cost_no_write(path: Path) -> None:
    """Issue 11: a new stream costs no file write (constant, off the request path)."""
    res = open_res(path, max_entries=10)
    for i in range(5000):
        assert res.ensure(f"t/ns/s{i}", BLOCK) is False
        assert res.start_offset(f"t/ns/s{i}") == 0
    assert (res.writes, len(res)) == (1, 0)
    size = path.stat().st_size
    res = open_res(path, max_entries=10)
    # Restarted: every stream (known or not) continues above the old floor, and the
    # file did not grow with the streams.
    assert res.start_offset("t/ns/s7") == BLOCK and path.stat().st_size == size


def test_ensure_writes_once_per_block(path: Path) -> None:
    res = open_res(path)
    assert res.ensure("s", 100) is False  # below the floor: no entry needed
    assert res.ensure("s", 101) is True  # past it: an entry, a block ahead
    assert res.reserved("s") == 200
    assert [res.ensure("s", end) for end in (150, 200)] == [False, False]
    assert res.writes == 2
    assert res.ensure("s", 201) is True
    assert res.reserved("s") == 300
    assert res.ensure("s", 300 + BLOCK) is True  # a whole block at once is allowed
    assert res.reserved("s") == 500
    assert res.writes == 4
    assert "s" in res and list(res) == ["s"] and len(res) == 1


def test_ensure_at_or_below_floor_needs_no_entry(path: Path) -> None:
    res = open_res(path)
    assert res.ensure("s", 0) is False and res.ensure("s", BLOCK) is False
    assert len(res) == 0 and res.writes == 1


def test_ensure_refuses_jumps_larger_than_a_block(path: Path) -> None:
    res = open_res(path)
    with pytest.raises(BadRequest, match="block"):
        res.ensure("s", 2 * BLOCK + 1)
    res.ensure("s", BLOCK + 1)
    with pytest.raises(BadRequest, match="block"):
        res.ensure("s", 200 + BLOCK + 1)
    assert res.reserved("s") == 200


@pytest.mark.parametrize(
    "key", ["", "a b", "a\nb", "a\tb", "caf\u00e9", "x" * (MAX_KEY_CHARS + 1), "\x00"]
)
def test_invalid_keys_are_refused(path: Path, key: str) -> None:
    with pytest.raises(BadRequest, match="invalid stream key"):
        open_res(path).ensure(key, 1)


def test_constructor_arguments_are_checked(path: Path) -> None:
    with pytest.raises(ValueError):
        OffsetReservations(path, block=0)
    with pytest.raises(ValueError):
        OffsetReservations(path, max_entries=0)


def test_missing_directory_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    with pytest.raises(FelixError, match="does not exist"):
        OffsetReservations(tmp_path / "unmounted" / "shard-0.offsets")


def test_file_format(path: Path) -> None:
    res = open_res(path)
    res.ensure("t/ns/b", 105)
    res.ensure("t/ns/a", 150)
    text = path.read_text("ascii")
    body, _, trailer = text.rpartition("crc32 ")
    assert body.splitlines() == [
        "felix-offsets 1",
        "generation 3",
        f"block {BLOCK}",
        "floor 100",
        "entries 2",
        "200 t/ns/a",
        "200 t/ns/b",
    ]
    assert trailer == f"{zlib.crc32(body.encode()):08x}\n"
    assert sibling(path, ".bak").exists()  # generation 2
    assert not sibling(path, ".tmp").exists()


# -- restarts ------------------------------------------------------------------------------


def test_restart_continues_above_everything_issued(path: Path) -> None:
    res = open_res(path)
    res.ensure("s", 150)  # offsets below 150 may have been issued
    assert res.reserved("s") == 200
    res.ensure("quiet", 60)  # no entry: below the floor (100)
    del res  # "kill -9": nothing else is flushed

    res = open_res(path)
    assert res.start_offset("s") == 200  # above 149, the highest possibly issued
    assert res.reserved("s") == 300  # opening reserved one more block...
    assert res.writes == 1  # ...for every stream in a single write
    assert res.ensure("s", 200 + BLOCK) is False  # so the first publishes do not write
    assert res.start_offset("quiet") == res.start_offset("other") == 100  # the old floor
    assert res.floor == 200


def test_a_clean_stop_continues_every_stream_where_it_stopped(path: Path) -> None:
    res = open_res(path)
    res.ensure("s", 150)  # an entry, mark 200; issued up to 149
    res.ensure("quiet", 60)  # no entry: issued 0..59 below the floor (100)
    res.settle({"s": 150, "quiet": 60})
    assert res.reserved("s") == 150 and res.reserved("quiet") == 60

    res = open_res(path)
    # No gap: each continues at exactly the next offset it would have issued...
    assert res.start_offset("s") == 150 and res.start_offset("quiet") == 60
    # ...and streams it did not know still start above everything issued.
    assert res.start_offset("other") == 100
    assert res.ensure("s", 150 + BLOCK) is False  # opening reserved a block above


def test_a_settle_is_safe_if_the_stop_is_cut_between_its_two_writes(path: Path) -> None:
    """.bak keeps the old, higher marks until the second write: loading takes the
    higher of the two, so a settle cut short falls back to the usual gap."""
    res = open_res(path)
    res.ensure("s", 150)
    before = path.read_bytes()  # what the first write keeps as .bak
    res.settle({"s": 150})
    # As if only the first write had happened: main settled, .bak the state before.
    sibling(path, ".bak").write_bytes(before)
    res = open_res(path)
    assert res.start_offset("s") == 200  # the mark before the settle: above all issued


def test_a_settle_never_raises_a_mark_nor_moves_the_floor(path: Path) -> None:
    res = open_res(path)
    res.ensure("s", 150)
    res.settle({"s": 10_000, "late": 5_000})  # ends it cannot have issued: ignored
    assert res.reserved("s") == 200 and res.reserved("late") is None
    assert res.floor == BLOCK


def test_opening_writes_once_however_many_streams(path: Path) -> None:
    res = open_res(path, max_entries=1000)
    for i in range(500):
        res.ensure(f"s{i}", BLOCK + 1)
    res = open_res(path, max_entries=1000)
    assert res.writes == 1
    assert all(res.start_offset(f"s{i}") == 200 for i in range(500))


def test_stream_offsets_strictly_increase_across_restarts(path: Path) -> None:
    """The quick version of R9: one producer, one stream, shard restarts."""
    issued: list[int] = []
    for restart in range(5):
        res = open_res(path)
        log = StreamLog(first_offset=res.start_offset("t/ns/orders"))
        for size in (1, 7, 30, 99, 3, 60)[: restart + 2]:
            res.ensure("t/ns/orders", log.next_offset + size)
            base, count = log.append([b"x"] * size)
            issued.extend(range(base, base + count))
    assert issued == sorted(set(issued))


# -- removing streams ---------------------------------------------------------------------


def test_remove_drops_entry_and_raises_floor(path: Path) -> None:
    res = open_res(path)
    res.ensure("a", 150)
    res.ensure("b", 130)
    res.ensure("b", 230)
    assert res.reserved("b") == 300
    assert res.remove("b", 230) is True
    assert "b" not in res and res.floor == 400
    assert res.start_offset("b") == 300  # a re-created "b" never reuses an offset
    assert res.start_offset("new") == 300
    assert res.remove("b") is False
    writes = res.writes
    assert res.remove("never-seen") is False and res.writes == writes

    res = open_res(path)
    assert (list(res), res.floor) == (["a"], 500)
    assert res.start_offset("b") == 400
    assert res.start_offset("a") == 200


def test_removing_a_stream_without_entry_moves_new_streams_above_it(path: Path) -> None:
    res = open_res(path)
    res.ensure("a", 40)  # issued 0..39 below the floor: no entry, no write
    assert res.remove("a", 40) is False and res.writes == 1
    assert res.start_offset("a") == 40  # re-created: above what it issued
    res = open_res(path)
    assert res.start_offset("a") >= 40


def test_remove_of_a_stream_known_from_the_file(path: Path) -> None:
    open_res(path).ensure("a", 110)
    res = open_res(path)
    assert res.start_offset("a") == 200
    assert res.remove("a", 200) is True
    assert res.start_offset("a") == 300  # the mark reserved at open
    assert res.floor == 400


# -- bounds ---------------------------------------------------------------------------------


def test_table_is_bounded(path: Path) -> None:
    res = open_res(path, max_entries=2)
    live = {"a", "b", "c"}
    res.in_use = live.__contains__
    res.ensure("a", 101)
    res.ensure("b", 101)
    with pytest.raises(Overloaded, match=r"full.*--max-streams-per-shard"):
        res.ensure("c", 101)
    assert res.ensure("a", 250) is True  # known keys still advance
    live.discard("b")  # "b" left memory: its entry can be folded into the floor
    assert res.ensure("c", 101) is True
    assert set(res) == {"a", "c"} and res.folded == 1
    assert res.start_offset("b") >= 200  # above everything "b" was allowed to issue


def test_a_full_table_is_not_exhausted_after_a_restart(path: Path) -> None:
    """Issue 11: after a restart no stream is in memory, so old entries make room."""
    res = open_res(path, max_entries=3)
    for key in "abc":
        res.ensure(key, 101)
    res = open_res(path, max_entries=3)
    res.in_use = lambda key: False
    assert res.ensure("d", 201) is True  # past the floor (200 after the restart)
    assert len(res) == 3 and "d" in res
    folded = {"a", "b", "c"} - set(res)
    (gone,) = folded
    assert res.start_offset(gone) >= 300  # its mark at open: never goes backward


def test_file_with_more_entries_than_allowed_is_kept_whole(path: Path) -> None:
    res = open_res(path, max_entries=5)
    for key in "abcde":
        res.ensure(key, 101)
    res = open_res(path, max_entries=2)
    assert len(res) == 5  # kept until a new key needs room
    with pytest.raises(Overloaded):
        res.ensure("f", 201)  # every stream is in memory (the default in_use)
    res.in_use = lambda key: False
    assert res.ensure("f", 201) is True and len(res) == 2


def test_offset_space_end(path: Path) -> None:
    path.write_bytes(_encode(1, BLOCK, 0, {"s": MAX_OFFSET - 50}))
    res = open_res(path)
    assert res.reserved("s") == MAX_OFFSET  # the opening bump is capped
    assert res.ensure("s", MAX_OFFSET) is False
    with pytest.raises(BadRequest, match="exhausted"):
        res.ensure("s", MAX_OFFSET + 1)


def test_write_failure_is_unavailable_and_changes_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = open_res(path)
    res.ensure("s", 101)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(Unavailable, match="Input/output error"):
        res.ensure("s", 201)
    with pytest.raises(Unavailable):
        res.remove("s")
    assert (res.reserved("s"), res.floor, res.writes, res.base) == (200, 100, 2, 0)
    monkeypatch.undo()
    assert res.ensure("s", 201) is True
    assert open_res(path).start_offset("s") == 300


def test_a_failed_fold_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_res(path, max_entries=2).ensure("a", 101)
    res = open_res(path, max_entries=1)
    res.in_use = lambda key: False
    assert res.start_offset("a") == 200

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(Unavailable):
        res.ensure("b", 201)  # would fold "a" into the floor
    assert (list(res), res.start_offset("a"), res.folded) == (["a"], 200, 0)
    monkeypatch.undo()
    assert res.ensure("b", 201) is True and res.start_offset("a") >= 300


# -- corruption and recovery ---------------------------------------------------------------


def write_two_generations(path: Path) -> None:
    res = open_res(path)  # generation 1: floor 100
    res.ensure("a", 150)  # generation 2: a=200, floor 100 (.bak holds generation 1)
    res.ensure("a", 250)  # generation 3: a=300 (.bak holds generation 2)


DAMAGE = {
    "truncated-crc": lambda p: p.write_bytes(p.read_bytes()[:-5]),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:20]),
    "flipped": lambda p: p.write_bytes(p.read_bytes().replace(b"300 a", b"200 a")),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"\xff" * 64),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_main_file_recovers_from_backup_with_margin(path: Path, damage: str) -> None:
    write_two_generations(path)
    DAMAGE[damage](path)
    res = open_res(path)
    assert res.recovered is True
    # .bak said a=200; the lost file was one write newer (a=300 here): +2 blocks covers it.
    assert res.start_offset("a") == 400 >= 300
    # Streams without an entry start above every mark .bak knows, plus the margin.
    assert res.start_offset("unknown") == 400
    assert sibling(path, ".corrupt").exists() == (damage != "deleted")
    assert not open_res(path).recovered  # both files are good again


def test_recovery_margin_covers_the_largest_single_write(path: Path) -> None:
    res = open_res(path)
    res.ensure("a", 101)  # generation 2: a=200
    res.ensure("a", 200 + BLOCK)  # a full block past the mark: generation 3 has a=400
    res.ensure("a", 400)  # issue everything up to 399 without another write
    path.write_bytes(b"garbage")
    assert open_res(path).start_offset("a") >= 400


def test_corrupt_file_is_kept_for_inspection(path: Path) -> None:
    write_two_generations(path)
    path.write_bytes(b"garbage")
    open_res(path)
    assert sibling(path, ".corrupt").read_bytes() == b"garbage"


def test_recovery_writes_backup_too_so_a_second_corruption_is_safe(path: Path) -> None:
    write_two_generations(path)
    path.write_bytes(b"garbage")
    res = open_res(path)
    log_next = res.start_offset("a")
    res.ensure("a", log_next + 60)  # issue up to 359 (reserved 400 already covers it)
    path.write_bytes(b"garbage again")
    res = open_res(path)
    assert res.recovered and res.start_offset("a") >= log_next + 60


def test_unusable_files_refuse_to_start(path: Path) -> None:
    write_two_generations(path)
    path.write_bytes(b"garbage")
    sibling(path, ".bak").write_bytes(b"garbage")
    with pytest.raises(FelixError, match="refusing to start"):
        open_res(path)


def test_corrupt_main_without_backup_refuses_to_start(path: Path) -> None:
    open_res(path).ensure("a", 1)
    sibling(path, ".bak").unlink(missing_ok=True)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FelixError, match="refusing to start"):
        open_res(path)


def test_missing_main_with_corrupt_backup_refuses_to_start(path: Path) -> None:
    write_two_generations(path)
    path.unlink()
    sibling(path, ".bak").write_bytes(b"x")
    with pytest.raises(FelixError, match="refusing to start"):
        open_res(path)


def test_leftover_tmp_file_is_ignored(path: Path) -> None:
    write_two_generations(path)
    # A crash while writing the next generation leaves a temp file; no offset under
    # it was issued, since ensure() had not returned.
    sibling(path, ".tmp").write_bytes(b"half a fi")
    res = open_res(path)
    assert not res.recovered and res.start_offset("a") == 300


def test_backup_with_higher_marks_can_only_raise_them(path: Path) -> None:
    write_two_generations(path)
    sibling(path, ".bak").write_bytes(_encode(9, BLOCK, 50, {"a": 700, "gone": 900}))
    res = open_res(path)
    assert res.start_offset("a") == 700
    assert res.start_offset("other") == 100  # the main file's floor (higher than 50)
    assert "gone" not in res  # membership comes from the main file


@pytest.mark.parametrize(
    "content",
    [
        b"felix-offsets 2\n",
        _encode(1, BLOCK, 0, {"a": 1}).replace(b"entries 1", b"entries 2"),
        _encode(1, BLOCK, 0, {"a": 1}).replace(b"block 100", b"block 0"),
        _encode(1, BLOCK, 0, {"a": 1}).replace(b"1 a", b"-1 a"),
    ],
)
def test_malformed_files_are_corrupt(path: Path, content: bytes) -> None:
    if b"crc32" in content:  # re-sign so that only the content is wrong
        body = content[: content.rindex(b"crc32 ")]
        content = body + f"crc32 {zlib.crc32(body):08x}\n".encode()
    path.write_bytes(content)
    with pytest.raises(FelixError, match="refusing to start"):
        open_res(path)


def test_block_size_change_rewrites_backup(path: Path) -> None:
    open_res(path, block=100).ensure("a", 101)
    res = open_res(path, block=1000)
    assert res.writes == 2  # the backup now records the new block size
    assert b"block 1000" in sibling(path, ".bak").read_bytes()
    path.write_bytes(b"garbage")
    res = open_res(path, block=100)  # margin uses the larger of the two blocks
    assert res.start_offset("a") >= 200 + 1000


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("issue"), st.sampled_from("abc"), st.integers(1, BLOCK) | st.just(BLOCK)
            ),
            st.tuples(st.just("remove"), st.sampled_from("abc"), st.just(0)),
            st.tuples(
                st.just("restart"),
                st.sampled_from(["clean", "truncate", "garbage", "delete"]),
                st.just(0),
            ),
        ),
        max_size=40,
    )
)
def test_offsets_never_go_backward(steps: list[tuple[str, str, int]]) -> None:
    """Random publishes, deletes, restarts and main-file damage: every stream a shard
    creates starts above every offset ever issued under that key."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.offsets"
        res = open_res(path, max_entries=2)
        tails: dict[str, int] = {}  # in-memory logs of this process
        res.in_use = tails.__contains__
        highest: dict[str, int] = {}  # highest offset ever issued per key, plus one
        for op, arg, n in steps:
            if op == "issue":
                if arg not in tails:
                    tails[arg] = res.start_offset(arg)
                    assert tails[arg] >= highest.get(arg, 0)
                end = tails[arg] + n
                try:
                    res.ensure(arg, end)
                except Overloaded:
                    # Every entry belongs to a stream in memory (a shard's stream
                    # limit refuses the stream before that): nothing was issued.
                    continue
                tails[arg] = end
                highest[arg] = end
            elif op == "remove":
                res.remove(arg, tails.pop(arg, 0))
            else:
                # Recovery needs an intact .bak; every open that recovers rewrites both
                # files, so damaging the main file before any restart is fair.
                damaged = arg != "clean" and path.exists() and sibling(path, ".bak").exists()
                if damaged:
                    if arg == "truncate":
                        path.write_bytes(path.read_bytes()[:-7])
                    elif arg == "garbage":
                        path.write_bytes(b"\x00garbage")
                    else:
                        path.unlink()
                res = open_res(path, max_entries=2)
                assert res.recovered == damaged
                tails = {}
                res.in_use = tails.__contains__
        for key, end in highest.items():
            assert res.start_offset(key) >= end or key in tails
