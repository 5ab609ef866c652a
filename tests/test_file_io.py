"""Tests for the atomic file and folder writers in expert_t5x.file_io."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from expert_t5x import file_io

SIZE = 1 << 18  # 256 KiB: many write calls, so a non-atomic writer would be seen mid-file
ROUNDS = 60


def _content(writer: int, round_no: int) -> bytes:
  """A self-checking payload: its header names the byte every later position must hold."""
  header = f"{writer}:{round_no}:".encode().ljust(16, b" ")
  return header + bytes([(writer * 97 + round_no) % 251]) * (SIZE - len(header))


def _check(data: bytes) -> None:
  writer, round_no = (int(x) for x in data[:16].split(b":")[:2])
  assert data == _content(writer, round_no), f"torn or mixed file ({len(data)} bytes)"


def _write_many(path: str, writer: int) -> None:
  for round_no in range(ROUNDS):
    data = _content(writer, round_no)
    file_io.atomic_write(path, lambda f, d=data: [f.write(d[i:i + 4096])
                                                  for i in range(0, len(d), 4096)], mode="wb")


def test_two_writers_and_a_reader_never_see_a_torn_or_mixed_file(tmp_path):
  path = str(tmp_path / "shared.bin")
  file_io.atomic_write(path, lambda f: f.write(_content(9, 0)), mode="wb")
  ctx = multiprocessing.get_context("spawn")
  writers = [ctx.Process(target=_write_many, args=(path, w)) for w in (1, 2)]
  for p in writers:
    p.start()
  reads = 0
  while any(p.is_alive() for p in writers):
    with open(path, "rb") as f:
      _check(f.read())
    reads += 1
  for p in writers:
    p.join(120)
  assert [p.exitcode for p in writers] == [0, 0]  # no writer tripped over the other's temp file
  with open(path, "rb") as f:
    final = f.read()
  _check(final)
  assert final[:2] in (b"1:", b"2:") and reads > 0
  assert os.listdir(tmp_path) == ["shared.bin"]  # no temporary file left behind


def test_no_clobber_write_keeps_the_first_file(tmp_path):
  path = tmp_path / "entry.json"
  file_io.atomic_write_text(path, "first", clobber=False)
  with pytest.raises(FileExistsError):
    file_io.atomic_write_text(path, "second", clobber=False)
  assert path.read_text() == "first" and os.listdir(tmp_path) == ["entry.json"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
  target = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with file_io.atomic_directory(target) as tmp:
      (tmp_path / tmp / "a").write_text("partial")
      raise RuntimeError("killed mid-write")
  assert os.listdir(tmp_path) == []
  with file_io.atomic_directory(target) as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    (tmp_path / tmp / "sub" / "a").write_text("new")
  assert (target / "sub" / "a").read_text() == "new"
  with pytest.raises(OSError):  # the default commit never replaces a folder
    with file_io.atomic_directory(target) as tmp:
      (tmp_path / tmp / "b").write_text("other")
  with file_io.atomic_directory(target, commit=file_io.swap_dir) as tmp:
    (tmp_path / tmp / "b").write_text("swapped")
  assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["out"]
