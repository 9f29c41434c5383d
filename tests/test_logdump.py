"""felix log dump: prints a log, verifies it, never changes it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from felix.cli import main
from felix.shard.disklog import DiskLog, DiskLogSettings
from felix.shard.log_format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, encode_envelope

SMALL = DiskLogSettings(segment_bytes=4096, index_interval_bytes=256)


def make_log(d: Path) -> None:
    log = DiskLog.open(d, SMALL, first_offset=0)
    for i in range(200):
        headers = {"trace": f"t{i}"} if i % 2 else None
        log.append([(i, 1_700_000_000_000_000 + i, encode_envelope(headers, b"body-%03d" % i))])
    log.close()


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["log", "dump", *args])
    return code, capsys.readouterr().out


def test_dump_prints_segments_and_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_log(tmp_path / "s")
    code, out = run(capsys, str(tmp_path / "s"), "--limit", "2")
    assert code == 0
    assert out.count("segment ") == len(list((tmp_path / "s").glob("*.seg"))) >= 2
    assert "(sealed) base=0" in out and "(active)" in out
    assert "b'body-000'" in out and "headers={'trace': 't1'}" in out
    assert "b'body-002'" not in out and "--limit 2 reached" in out
    code, out = run(capsys, str(tmp_path / "s"), "--check")
    assert code == 0 and out.rstrip().endswith("check: OK")
    assert sum(int(n) for n in re.findall(r"(\d+) record\(s\) verified", out)) == 200


def test_check_finds_a_flipped_bit_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "s"
    make_log(d)
    first = sorted(d.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    second_record = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 3 + 8
    data[second_record + RECORD_HEADER_SIZE + 5] ^= 0x20  # payload of offset 1
    first.write_bytes(bytes(data))
    before = snapshot(d)
    code, out = run(capsys, str(d), "--check", "--limit", "0")
    assert code == 1
    assert f"{first}: DAMAGED at byte {second_record}: payload CRC mismatch" in out
    assert "1 problem(s)" in out
    assert snapshot(d) == before


def test_torn_tail_and_stale_index_are_reported_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "s"
    make_log(d)
    active = sorted(d.glob("*.seg"))[-1]
    os.truncate(active, active.stat().st_size - 4)
    idx = sorted(d.glob("*.idx"))[0]
    idx.write_bytes(idx.read_bytes()[:-1])
    before = snapshot(d)
    code, out = run(capsys, str(d), "--check")
    assert code == 0 and "check: OK" in out
    assert f"{active}: torn tail: " in out and "opening the log cuts them" in out
    assert f"{idx}: index " in out and "rebuilds it" in out
    assert snapshot(d) == before  # read-only
    code, out = run(capsys, str(active), "--check")  # one file
    assert code == 0 and "torn tail" in out


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, str(tmp_path / "nope"))[0] == 1
    assert run(capsys, str(tmp_path))[1].endswith("no segment files\n")
    (tmp_path / "x.seg").write_bytes(b"junk")
    code, out = run(capsys, str(tmp_path / "x.seg"))
    assert code == 1 and "file name" in out
    (tmp_path / f"{0:020d}.seg").write_bytes(b"junk" * 10)
    code, out = run(capsys, str(tmp_path / f"{0:020d}.seg"))
    assert code == 1 and "DAMAGED at byte 0" in out


def test_unreadable_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / f"{0:020d}.seg").mkdir()  # a directory where a segment should be
    assert main(["log", "dump", str(tmp_path)]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["log", "dump", str(tmp_path), "--limit", "-1"]) == 2
