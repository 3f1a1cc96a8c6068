"""The msgpack + JSON pair is written atomically: a failure at any step
(either write, either fsync, either rename) leaves neither file, and no
temporary file either."""

import os

import numpy as np
import pytest

import translate
from translate import io as tio

VARS = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}},
        "batch_stats": {}}


def _fail_on(monkeypatch, target, name, call):
  real = getattr(target, name)
  count = {"n": 0}

  def flaky(*args, **kwargs):
    count["n"] += 1
    if count["n"] == call:
      raise OSError(f"injected failure of {name} call {call}")
    return real(*args, **kwargs)

  monkeypatch.setattr(target, name, flaky)
  return count


@pytest.mark.parametrize("name,call", [
    ("replace", 1), ("replace", 2), ("fsync", 1), ("fsync", 2)])
def test_a_failed_step_leaves_neither_file(tmp_path, monkeypatch, name, call):
  out = tmp_path / "m.msgpack"
  count = _fail_on(monkeypatch, tio.os, name, call)
  with pytest.raises(OSError, match="injected"):
    translate.save_variables(out, VARS, {"model": "x"})
  assert count["n"] >= call
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("call", [1, 2])
def test_a_failed_temporary_file_leaves_nothing(tmp_path, monkeypatch, call):
  _fail_on(monkeypatch, tio.tempfile, "mkstemp", call)
  with pytest.raises(OSError, match="injected"):
    translate.save_variables(tmp_path / "m.msgpack", VARS, {"model": "x"})
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("bad", [0, 1])
def test_a_failed_write_leaves_nothing(tmp_path, bad):
  paths = [tmp_path / "a.msgpack", tmp_path / "a.json"]
  contents = [b"one", b"two"]
  contents[bad] = object()  # not bytes: the write itself raises
  with pytest.raises(TypeError):
    tio.write_files_atomically(paths, contents)
  assert sorted(os.listdir(tmp_path)) == []


def test_success_writes_both_and_nothing_else(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, VARS, {"model": "x"})
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]
  assert translate.load_metadata(out) == {"model": "x"}
  np.testing.assert_array_equal(
      translate.load_variables(out)["params"]["fc"]["kernel"], 1.0)


def test_sha256_hashes_the_bytes(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  p = tmp_path / "w.bin"
  p.write_bytes(b"keras weights" * 100000)
  assert translate.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
  q = tmp_path / "w2.bin"
  q.write_bytes(b"other bytes")
  assert translate.sha256_file(q) != translate.sha256_file(p)
