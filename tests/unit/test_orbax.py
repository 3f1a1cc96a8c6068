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
                                    ) == {"model": "x"}
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
