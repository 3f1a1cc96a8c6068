"""The CLI's round trips without repeated flags: the default outputs of both
formats side by side, ``--to_keras`` and ``--weights X.msgpack --export``
reading the model and options from the sidecar, and a flag that contradicts
the sidecar refused in one line."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "mobilenetv3small", "--weights", "random",
         "--input_shape", "64,64,3", "--noinclude_top", "--pooling", "avg",
         "--alpha", "0.75"]
STEM = "mobilenetv3small_notop_avg_alpha0.75_64x64"


def _keras_weights(path):
  """Every dataset of a .weights.h5 by path, as arrays."""
  out = {}
  with h5py.File(path, "r") as f:
    f.visititems(lambda k, v: out.__setitem__(k, np.asarray(v))
                 if isinstance(v, h5py.Dataset) else None)
  return out


@pytest.mark.slow
def test_both_formats_then_back_to_keras_and_tflite_from_the_sidecar(
    tmp_path, cli):
  code, out, err = cli(*SMALL)
  assert code == 0, err
  code, out, err = cli(*SMALL, "--format", "orbax")  # right after: no clash
  assert code == 0, err
  d = tmp_path / "translated"
  assert sorted(os.listdir(d)) == [f"{STEM}.json", f"{STEM}.msgpack",
                                   f"{STEM}.orbax", f"{STEM}.orbax.json"]
  meta = json.loads((d / f"{STEM}.json").read_text())
  assert meta["create_kwargs"]["alpha"] == 0.75
  msgpack = translate.load_variables(d / f"{STEM}.msgpack")

  # Back to Keras with no --model and no options: the sidecar has them.
  code, out, err = cli("--to_keras", f"translated/{STEM}.msgpack")
  assert code == 0, err
  assert "PASS" in out
  from_msgpack = _keras_weights(d / f"{STEM}.weights.h5")
  code, out, err = cli("--to_keras", f"translated/{STEM}.orbax")
  assert code == 0, err
  from_orbax = _keras_weights(d / f"{STEM}.orbax.weights.h5")
  assert from_msgpack.keys() == from_orbax.keys() and len(from_msgpack) > 50
  for k in from_msgpack:
    np.testing.assert_array_equal(from_msgpack[k], from_orbax[k])

  # A fine-tuned translation exported to TFLite: the sidecar gives the
  # model and options; the check runs against Keras holding the variables.
  tuned = {"params": {k: dict(v) for k, v in msgpack["params"].items()},
           "batch_stats": msgpack["batch_stats"]}
  layer = sorted(tuned["params"])[3]
  leaf = sorted(tuned["params"][layer])[0]
  tuned["params"][layer][leaf] = tuned["params"][layer][leaf] * 1.5
  translate.save_variables(tmp_path / "tuned.msgpack", tuned, meta)
  code, out, err = cli("--weights", "tuned.msgpack", "--export", "tflite")
  assert code == 0, err
  assert "TFLite vs Keras" in out and "PASS" in out
  assert (tmp_path / "tuned.tflite").exists()
  assert not (tmp_path / "translated" / "tuned.msgpack").exists()
  # Overriding a flag that does not change the variables is allowed.
  code, out, err = cli("--weights", "tuned.msgpack", "--classifier_activation",
                       "none", "--output", "again.msgpack")
  assert code == 0, err
  again = translate.load_variables(tmp_path / "again.msgpack")
  np.testing.assert_array_equal(again["params"][layer][leaf],
                                tuned["params"][layer][leaf])
  assert json.loads((tmp_path / "again.json").read_text())[
      "create_kwargs"]["classifier_activation"] is None


@pytest.mark.parametrize("flag", ["--weights", "--to_keras"])
def test_a_flag_that_contradicts_the_sidecar_is_one_line(tmp_path, cli,
                                                         flag):
  """``--model`` other than the one the sidecar records, or a flag that
  changes the variables' shapes, is refused before anything is read."""
  path = tmp_path / "x.msgpack"
  translate.save_variables(path, {"params": {}}, {
      "model": "mobilenetv2", "create_kwargs": {"include_top": True,
                                                "classes": 1000}})
  for extra, needle in ((["--model", "resnet50"], "--model resnet50 "
                         "contradicts"),
                        (["--classes", "10"], "--classes 10 contradicts"),
                        (["--noinclude_top"], "--include_top False "
                         "contradicts")):
    code, _, err = cli(flag, str(path), *extra)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0] and "x.json" in err[0], err[0]
  assert sorted(os.listdir(tmp_path)) == ["x.json", "x.msgpack"]


def test_keras2flax_is_main(tmp_path):
  """The console script (``pip install .``) runs ``main.cli``: no
  arguments print the usage, as ``python main.py`` does."""
  code = ("import sys; sys.argv = ['keras2flax']; import main; main.cli()")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert "keras2flax --model resnet50" in proc.stdout


@pytest.mark.parametrize("flag", ["--weights", "--to_keras"])
def test_a_translation_holding_nan_is_refused_by_name(tmp_path, cli, flag):
  """The CLI re-reads its own outputs as input too: NaN/Inf in them is
  refused naming the leaf, before any model is built."""
  kernel = np.ones((3, 3, 3, 4), np.float32)
  kernel[0, 1, 2, 3] = np.nan
  path = tmp_path / "x.msgpack"
  translate.save_variables(path, {"params": {"conv1": {"kernel": kernel}}}, {
      "model": "mobilenetv2", "create_kwargs": {}})
  code, _, err = cli(flag, str(path), "--nocheck", "--output",
                     str(tmp_path / ("y.msgpack" if flag == "--weights"
                                     else "y.weights.h5")))
  assert code == 1 and len(err) == 1, err
  assert "NaN in params/conv1/kernel (1 of 108 values)" in err[0], err[0]
  assert sorted(os.listdir(tmp_path)) == ["x.json", "x.msgpack"]
