"""Orbax checkpoints as an output format: the same tree and bytes as the
msgpack, a sidecar, and the same all-or-nothing write."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization, traverse_util

import translate
from translate import io as tio

RNG = np.random.default_rng(0)
VARS = {"params": {"conv": {"kernel": RNG.normal(size=(3, 3, 2, 4)).astype(
    np.float32), "bias": RNG.normal(size=(4,)).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": RNG.normal(size=(4,)).astype(
            np.float32), "var": RNG.uniform(size=(4,)).astype(np.float32)}}}


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_orbax_restores_the_msgpack_tree_bit_for_bit(tmp_path):
  mp, ck = tmp_path / "m.msgpack", tmp_path / "m_orbax"
  translate.save_variables(mp, VARS, {"model": "x"})
  path, side = translate.save_variables(ck, VARS, {"model": "x"},
                                        format="orbax")
  assert (path, side) == (str(ck), str(ck) + ".json")
  assert ck.is_dir() and json.loads((tmp_path / "m_orbax.json").read_text()
                                    ) == {"model": "x", "variables_sha256":
                                          tio.variables_sha256(ck)}
  want = _flat(serialization.msgpack_restore(mp.read_bytes()))
  got = _flat(ocp.PyTreeCheckpointer().restore(str(ck)))
  assert set(got) == set(want)
  for k, v in want.items():
    assert np.asarray(got[k]).dtype == v.dtype
    assert np.asarray(got[k]).tobytes() == v.tobytes()
  loaded = _flat(translate.load_variables(ck))
  assert all(np.array_equal(loaded[k], v) for k, v in want.items())
  assert translate.load_metadata(ck) == {"model": "x"}


def test_the_format_follows_the_path_unless_given():
  assert tio.format_of("a/b.msgpack") == "msgpack"
  assert tio.format_of("a/b") == "orbax"
  with pytest.raises(ValueError, match="format must be one of"):
    tio.format_of("a/b", "npz")


def test_overwrite_replaces_a_checkpoint(tmp_path):
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, {"v": 1}, format="orbax")
  changed = {**VARS, "params": {"conv": {**VARS["params"]["conv"],
                                         "bias": np.zeros(4, np.float32)}}}
  translate.save_variables(ck, changed, {"v": 2}, format="orbax")
  assert translate.load_metadata(ck) == {"v": 2}
  np.testing.assert_array_equal(
      translate.load_variables(ck)["params"]["conv"]["bias"], 0.0)
  assert sorted(os.listdir(tmp_path)) == ["ck", "ck.json"]


@pytest.mark.parametrize("call", [1, 2])
def test_a_failed_rename_leaves_neither_new_file(tmp_path, monkeypatch, call):
  real, count = os.replace, {"n": 0}

  def flaky(a, b):
    count["n"] += 1
    if count["n"] == call:
      raise OSError("injected rename failure")
    return real(a, b)

  monkeypatch.setattr(tio.os, "replace", flaky)
  with pytest.raises(OSError, match="injected"):
    translate.save_variables(tmp_path / "ck", VARS, {"v": 1}, format="orbax")
  assert sorted(os.listdir(tmp_path)) == []


def test_a_failed_overwrite_keeps_the_previous_pair(tmp_path, monkeypatch):
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, {"v": 1}, format="orbax")
  real, count = os.replace, {"n": 0}

  def flaky(a, b):
    count["n"] += 1
    if count["n"] == 3:  # old aside, new in place, then the sidecar fails
      raise OSError("injected rename failure")
    return real(a, b)

  monkeypatch.setattr(tio.os, "replace", flaky)
  with pytest.raises(OSError, match="injected"):
    translate.save_variables(ck, {"params": {"fc": {"kernel": np.ones(2)}}},
                             {"v": 2}, format="orbax")
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["ck", "ck.json"]
  assert translate.load_metadata(ck) == {"v": 1}
  np.testing.assert_array_equal(
      translate.load_variables(ck)["params"]["conv"]["kernel"],
      VARS["params"]["conv"]["kernel"])


def _tree_bytes(root):
  return {os.path.relpath(os.path.join(d, f), root):
          open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


# Over an existing checkpoint: replace 1 moves the old directory aside,
# link 1 backs up the old sidecar (a hard link), replace 2-3 put the new
# pair in; fsync 1 is the sidecar's temporary.
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
@pytest.mark.parametrize("name,call", [
    ("fsync", 1), ("replace", 1), ("link", 1), ("replace", 2), ("replace", 3)])
def test_a_failed_overwrite_step_keeps_the_old_pair_byte_identical(
    tmp_path, monkeypatch, name, call, error):
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, {"v": 1}, format="orbax")
  before = _tree_bytes(ck), (tmp_path / "ck.json").read_bytes()
  real, count = getattr(os, name), {"n": 0}

  def flaky(*args, **kwargs):
    count["n"] += 1
    if count["n"] == call:
      raise error(f"injected failure of {name} call {call}")
    return real(*args, **kwargs)

  monkeypatch.setattr(tio.os, name, flaky)
  with pytest.raises(error, match="injected"):
    translate.save_variables(ck, {"params": {"fc": {"kernel": np.ones(2)}}},
                             {"v": 2}, format="orbax")
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["ck", "ck.json"]
  assert (_tree_bytes(ck), (tmp_path / "ck.json").read_bytes()) == before
  translate.load_variables(ck)  # the recorded sha256 still matches


def test_the_checkpoint_sha256_is_the_documented_manifest(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, format="orbax")
  lines = "".join(f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
                  for rel, data in sorted(_tree_bytes(ck).items()))
  want = hashlib.sha256(lines.encode()).hexdigest()
  assert tio.variables_sha256(ck) == want
  assert json.loads((tmp_path / "ck.json").read_text())[
      "variables_sha256"] == want


def test_a_changed_checkpoint_file_is_refused(tmp_path):
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, format="orbax")
  data = max((os.path.join(d, f) for d, _, fs in os.walk(ck) for f in fs
              if os.sep + "d" + os.sep in os.path.join(d, f)),
             key=os.path.getsize)  # an array chunk: orbax would still read it
  raw = bytearray(open(data, "rb").read())
  raw[-1] ^= 1
  open(data, "wb").write(bytes(raw))
  with pytest.raises(tio.VariablesFileError, match="does not match the sha256"):
    translate.load_variables(ck)


def test_overwrite_false_keeps_an_existing_checkpoint(tmp_path):
  ck = tmp_path / "ck"
  translate.save_variables(ck, VARS, {"v": 1}, format="orbax")
  before = _tree_bytes(ck), (tmp_path / "ck.json").read_bytes()
  with pytest.raises(FileExistsError, match=f"^{ck} already exists; pass "
                     "--overwrite to replace it or choose another --output$"):
    translate.save_variables(ck, VARS, {"v": 2}, format="orbax",
                             overwrite=False)
  assert sorted(os.listdir(tmp_path)) == ["ck", "ck.json"]
  assert (_tree_bytes(ck), (tmp_path / "ck.json").read_bytes()) == before


@pytest.mark.parametrize("racer", ["ck", "ck.json"])
def test_overwrite_false_keeps_what_appears_during_the_write(
    tmp_path, monkeypatch, racer):
  """Another program (taking no lock) creates the checkpoint directory or
  its sidecar after the existence check: it is left as it is."""
  real = os.fsync

  def create_then_fsync(fd):  # the sidecar's fsync, before the renames
    if racer == "ck":
      (tmp_path / "ck").mkdir()
      (tmp_path / "ck" / "theirs").write_bytes(b"theirs")
    else:
      (tmp_path / "ck.json").write_bytes(b"theirs")
    return real(fd)

  monkeypatch.setattr(tio.os, "fsync", create_then_fsync)
  with pytest.raises(FileExistsError, match=f"{racer} already exists"):
    translate.save_variables(tmp_path / "ck", VARS, format="orbax",
                             overwrite=False)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == [racer]
  theirs = (tmp_path / "ck" / "theirs" if racer == "ck"
            else tmp_path / "ck.json")
  assert theirs.read_bytes() == b"theirs"
  if racer == "ck":
    assert os.listdir(tmp_path / "ck") == ["theirs"]
