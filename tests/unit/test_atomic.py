"""The msgpack + JSON pair is written atomically: a failure at any step
(either write, either fsync, either rename) leaves neither file, and no
temporary file either; over an existing pair, a failure at any step (the
backups included) or an interrupt leaves the old pair byte-identical."""

import os

import numpy as np
import pytest

import translate
from translate import io as tio

VARS = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}},
        "batch_stats": {}}


def _fail_on(monkeypatch, target, name, call, error=OSError):
  real = getattr(target, name)
  count = {"n": 0}

  def flaky(*args, **kwargs):
    count["n"] += 1
    if count["n"] == call:
      raise error(f"injected failure of {name} call {call}")
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


NEW = {"params": {"fc": {"kernel": np.full((2, 3), 7, np.float32)}},
       "batch_stats": {}}


def _old_pair(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, VARS, {"model": "old"})
  return out, {p: p.read_bytes() for p in (out, tmp_path / "m.json")}


# Over an existing pair: fsync 1-2 are the temporaries, link 1-2 the
# backups (hard links; the old files stay in place), replace 1-2 put the new
# files in; replace 3 on is the rollback.
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("name,call", [
    ("fsync", 1), ("fsync", 2), ("link", 1), ("link", 2), ("replace", 1),
    ("replace", 2)])
def test_a_failed_overwrite_keeps_the_old_pair(tmp_path, monkeypatch, name,
                                               call, error):
  out, before = _old_pair(tmp_path)
  count = _fail_on(monkeypatch, tio.os, name, call, error)
  with pytest.raises(error, match="injected"):
    translate.save_variables(out, NEW, {"model": "new"})
  monkeypatch.undo()
  assert count["n"] >= call
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]
  assert {p: p.read_bytes() for p in before} == before
  translate.load_variables(out)  # the sidecar's sha256 still matches


def test_a_failed_restore_names_the_backup_that_keeps_the_old_file(
    tmp_path, monkeypatch):
  out, before = _old_pair(tmp_path)
  real, count = os.replace, {"n": 0}

  def flaky(a, b):
    count["n"] += 1
    if count["n"] in (2, 3):  # the sidecar's rename, then the msgpack's undo
      raise OSError(f"injected failure of rename {count['n']}")
    return real(a, b)

  monkeypatch.setattr(tio.os, "replace", flaky)
  with pytest.raises(OSError, match="restoring then failed") as e:
    translate.save_variables(out, NEW, {"model": "new"})
  monkeypatch.undo()
  msg = str(e.value)
  assert "injected failure of rename 2" in msg and "\n" not in msg
  backups = [f for f in os.listdir(tmp_path) if f.endswith(".bak")]
  assert len(backups) == 1 and backups[0].startswith(".m.msgpack.")
  assert str(tmp_path / backups[0]) in msg and "move it back" in msg
  assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".lock"))]
  assert (tmp_path / backups[0]).read_bytes() == before[out]
  assert (tmp_path / "m.json").read_bytes() == before[tmp_path / "m.json"]
  os.replace(tmp_path / backups[0], out)  # what the message says to do
  assert {p: p.read_bytes() for p in before} == before


def test_overwrite_false_refuses_an_existing_file(tmp_path):
  p = tmp_path / "m.tflite"
  p.write_bytes(b"old")
  with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
    tio.write_files_atomically([p], [b"new"], overwrite=False)
  assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.tflite"]
  tio.write_files_atomically([p], [b"new"])  # overwrite=True, the default
  assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["m.tflite"]


# overwrite=False places with os.link (replace is never called).
@pytest.mark.parametrize("call", [1, 2])
def test_a_failed_link_of_a_new_pair_leaves_nothing(tmp_path, monkeypatch,
                                                    call):
  count = _fail_on(monkeypatch, tio.os, "link", call)
  monkeypatch.setattr(tio.os, "replace", None)
  with pytest.raises(OSError, match="injected"):
    translate.save_variables(tmp_path / "m.msgpack", VARS, overwrite=False)
  assert count["n"] == call
  assert sorted(os.listdir(tmp_path)) == []
