"""The test-side log reader (tests/segfiles.py) against hand-built bytes.

The fault tests trust this reader to say what is on disk after a crash, so it is
checked here against byte strings spelled out field by field from the format.
"""

from __future__ import annotations

import binascii
import random
from pathlib import Path

import pytest

from tests import segfiles


def _be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def test_segment_header_and_record_bytes_follow_the_format() -> None:
    head28 = b"FLSG" + _be(1, 2) + _be(0, 2) + _be(5, 8) + _be(7, 8) + _be(0, 4)
    assert segfiles.segment_header(5, 7) == head28 + _be(binascii.crc32(head28), 4)
    assert len(segfiles.segment_header(5, 7)) == 32

    payload = b"hi"
    head24 = _be(2, 4) + _be(5, 8) + _be(9, 8) + _be(binascii.crc32(payload), 4)
    assert segfiles.record(5, 9, payload) == head24 + _be(binascii.crc32(head24), 4) + payload


def test_envelope_bytes_and_decoding() -> None:
    raw = segfiles.envelope({"k": "v", "é": ""}, b"body")
    expect = b"\x00" + _be(2, 2) + _be(1, 2) + b"k" + _be(1, 2) + b"v"
    expect += _be(2, 2) + "é".encode() + _be(0, 2) + b"body"
    assert raw == expect
    assert segfiles.decode_envelope(raw) == (0, {"k": "v", "é": ""}, b"body")
    assert segfiles.decode_envelope(segfiles.envelope(None, b"")) == (0, {}, b"")
    with pytest.raises(ValueError):
        segfiles.decode_envelope(raw[:6])


def _three(tmp_path: Path) -> Path:
    return segfiles.write_segment(tmp_path, 10, [(10, 1, b"a"), (12, 2, b"bb"), (13, 3, b"")])


def test_scan_clean_segment(tmp_path: Path) -> None:
    path = _three(tmp_path)
    scan = segfiles.scan_segment(path)
    assert scan.clean and scan.base_offset == 10 and scan.created_us == 1
    assert [(r.offset, r.timestamp_us, r.payload) for r in scan.records] == [
        (10, 1, b"a"),
        (12, 2, b"bb"),
        (13, 3, b""),
    ]
    assert [r.position for r in scan.records] == [32, 32 + 29, 32 + 29 + 30]
    assert scan.good_end == scan.size == 32 + 29 + 30 + 28


@pytest.mark.parametrize("cut", [1, 10, 27, 28, 29])
def test_scan_reports_a_short_tail(tmp_path: Path, cut: int) -> None:
    path = _three(tmp_path)
    full = path.stat().st_size
    # Cut inside the last two records: the scan stops at the last whole one.
    last_start = 32 + 29 + 30
    with path.open("r+b") as f:
        f.truncate(last_start + cut if cut < 28 else last_start - 30 + cut)
    scan = segfiles.scan_segment(path)
    assert scan.short and scan.problem is not None
    assert scan.good_end in (last_start, last_start - 30)
    assert scan.size < full


@pytest.mark.parametrize(
    ("position", "what"),
    [(32 + 3, "header CRC"), (32 + 28, "payload CRC"), (32 + 29 + 24, "header CRC")],
)
def test_scan_reports_a_flipped_bit(tmp_path: Path, position: int, what: str) -> None:
    path = _three(tmp_path)
    before = segfiles.tree_digest(tmp_path)
    segfiles.flip_bit(path, position, 3)
    assert segfiles.tree_digest(tmp_path) != before
    scan = segfiles.scan_segment(path)
    assert not scan.short and scan.problem is not None and what in scan.problem
    with pytest.raises(segfiles.FormatError):
        segfiles.read_stream(tmp_path)


def test_bad_segment_header_and_name(tmp_path: Path) -> None:
    path = _three(tmp_path)
    segfiles.flip_bit(path, 12)
    with pytest.raises(segfiles.FormatError, match="header CRC"):
        segfiles.scan_segment(path)
    wrong = tmp_path / "other"
    wrong.mkdir()
    moved = wrong / f"{11:020d}.seg"
    segfiles.write_segment(wrong, 10, []).rename(moved)
    with pytest.raises(segfiles.FormatError, match="file name"):
        segfiles.scan_segment(moved)


def test_read_stream_checks_order_across_segments(tmp_path: Path) -> None:
    segfiles.write_segment(tmp_path, 0, [(0, 0, b"x"), (4, 0, b"y")])
    segfiles.write_segment(tmp_path, 5, [(5, 0, b"z")])
    assert segfiles.payloads(segfiles.read_stream(tmp_path)) == [(0, b"x"), (4, b"y"), (5, b"z")]
    segfiles.write_segment(tmp_path, 3, [])
    with pytest.raises(segfiles.FormatError, match="not above"):
        segfiles.read_stream(tmp_path)


@pytest.mark.parametrize("mode", ["prefix", "per_segment", "sealed_whole"])
def test_power_loss_keeps_every_synced_record(tmp_path: Path, mode: str) -> None:
    for seed in range(40):
        d = tmp_path / f"{mode}{seed}"
        segfiles.write_segment(d, 0, [(i, i, bytes(i)) for i in range(5)])
        segfiles.write_segment(d, 5, [(i, i, bytes(i)) for i in range(5, 9)])
        segfiles.write_segment(d, 9, [(i, i, bytes(i)) for i in range(9, 12)])
        before = segfiles.read_stream(d)
        rng = random.Random(seed)
        synced = rng.randint(0, 12)
        segfiles.power_loss(d, synced, rng, mode=mode)
        after: list[segfiles.Rec] = []
        for path in segfiles.segment_paths(d):
            if path.stat().st_size >= 32:
                after += segfiles.scan_segment(path).records
        assert [r for r in before if r.offset < synced] == [r for r in after if r.offset < synced]
        assert set(after) <= set(before)
        if mode != "per_segment":
            # One prefix survives: no record is missing below the last survivor.
            assert after == before[: len(after)]
        if mode == "sealed_whole":
            assert after[: len(before) - 3] == before[:-3]


def test_read_stream_allows_a_half_created_last_segment_only_when_asked(tmp_path: Path) -> None:
    segfiles.write_segment(tmp_path, 0, [(0, 0, b"x")])
    (tmp_path / f"{1:020d}.seg").write_bytes(segfiles.segment_header(1)[:7])
    with pytest.raises(segfiles.FormatError, match="truncated"):
        segfiles.read_stream(tmp_path)
    assert segfiles.payloads(segfiles.read_stream(tmp_path, allow_torn_tail=True)) == [(0, b"x")]


def test_index_parsing_and_checking(tmp_path: Path) -> None:
    seg = segfiles.write_segment(tmp_path, 10, [(10, 5, b"a"), (12, 3, b"bb"), (13, 9, b"")])
    entries = [(10, 32, 0), (13, 32 + 29 + 30, 5)]
    head = b"FLIX" + _be(1, 2) + _be(0, 2) + _be(10, 8) + _be(seg.stat().st_size, 8)
    head += _be(13, 8) + _be(9, 8) + _be(3, 4) + _be(len(entries), 4)
    body = head + b"".join(_be(o, 8) + _be(p, 8) + _be(t, 8) for o, p, t in entries)
    idx = seg.with_suffix(".idx")
    idx.write_bytes(body + _be(binascii.crc32(body), 4))
    index = segfiles.check_index(seg, 40)
    assert index.entries == entries and index.record_count == 3
    with pytest.raises(segfiles.FormatError, match="gap"):
        segfiles.check_index(seg, 10)  # entries further apart than the interval allows
    wrong = body.replace(_be(13, 8) + _be(32 + 29 + 30, 8), _be(12, 8) + _be(32 + 29 + 30, 8))
    idx.write_bytes(wrong + _be(binascii.crc32(wrong), 4))
    with pytest.raises(segfiles.FormatError, match="not a record start"):
        segfiles.check_index(seg, 40)
    segfiles.flip_bit(idx, 50)
    with pytest.raises(segfiles.FormatError, match="CRC"):
        segfiles.parse_index(idx)
