"""``main.py --weights FILE`` without ``--model``: the whole Keras model in a
file, with its sidecar, emitted source, back to Keras and TFLite; and the
one-line refusals around it."""

import hashlib
import importlib.util
import json
import os

import keras
import numpy as np
import pytest

import translate
from translate import random_weights

from graph_check import assert_close  # pylint: disable=g-bad-import-order


def _cnn() -> keras.Model:
  inputs = keras.Input((12, 10, 3), name="image")
  x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


@pytest.fixture
def cnn_file(tmp_path):
  model = _cnn()
  random_weights.randomize(model, 2)
  path = tmp_path / "cnn.keras"
  model.save(path)
  return model, path


def _import(path):
  spec = importlib.util.spec_from_file_location("generated_cli", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_whole_model_file_translates_with_sidecar_and_source(
    tmp_path, cli, cnn_file):
  model, path = cnn_file
  code, out, err = cli("--weights", path, "--output", "cnn.msgpack",
                       "--emit_source", "gen.py")
  assert code == 0, err
  assert "PASS" in out
  meta = json.loads((tmp_path / "cnn.json").read_text())
  assert meta["weights_sha256"] == hashlib.sha256(
      path.read_bytes()).hexdigest()
  assert meta["input_specs"] == [{"shape": [12, 10, 3], "dtype": "float32"}]
  assert meta["parity"]["passed"] and meta["parity"]["max_rel"] <= 1e-5
  # The emitted file on the written variables equals Keras.
  module = _import(tmp_path / "gen.py").create()
  variables = translate.load_variables(tmp_path / "cnn.msgpack")
  x = np.random.default_rng(1).normal(size=(2, 12, 10, 3)).astype("float32")
  assert_close(module.apply(variables, x), model(x, training=False))

  # Back into the user's own model: the sidecar names the file.
  code, out, err = cli("--to_keras", "cnn.msgpack")
  assert code == 0, err
  assert "bit for bit" in out
  fresh = _cnn()
  fresh.load_weights(tmp_path / "cnn.weights.h5")
  for a, b in zip(fresh.weights, model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  # TFLite from the same file, checked against Keras.
  code, out, err = cli("--weights", path, "--output", "cnn2.msgpack",
                       "--export", "tflite")
  assert code == 0, err
  assert (tmp_path / "cnn2.tflite").exists() and "TFLite vs Keras" in out


def test_changed_keras_file_is_refused_by_to_keras(tmp_path, cli,
                                                   cnn_file):
  model, path = cnn_file
  code, _, err = cli("--weights", path, "--output", "cnn.msgpack")
  assert code == 0, err
  random_weights.randomize(model, 9)
  model.save(path)  # the user saved another model over it
  code, _, err = cli("--to_keras", "cnn.msgpack")
  assert code == 1 and len(err) == 1 and "changed since" in err[0], err
  assert not (tmp_path / "cnn.weights.h5").exists()


def test_refusals_are_one_line_and_write_nothing(tmp_path, cli,
                                                 cnn_file):
  model, path = cnn_file
  model.save_weights(tmp_path / "cnn.weights.h5")
  x = keras.Input((3,))
  lam = keras.Model(x, keras.layers.Lambda(lambda t: t + 1)(x))
  lam.save(tmp_path / "lam.keras")
  base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                        input_shape=(96, 96, 3), alpha=0.35)
  tl = keras.Sequential([keras.Input((96, 96, 3)), base,
                         keras.layers.GlobalAveragePooling2D(),
                         keras.layers.Dense(5, name="head")])
  tl.save(tmp_path / "tl.keras")
  before = sorted(os.listdir(tmp_path))
  cases = [
      (["--weights", "cnn.weights.h5"], "weights only"),
      (["--weights", "lam.keras"], "Lambda"),
      (["--weights", "tl.keras", "--model", "mobilenetv2"], "drop --model"),
      (["--weights", path, "--classes", "3"], "--classes applies to a "
       "registered --model"),
      (["--weights", path, "--emit_source", "out.txt"], "must end with .py"),
      (["--model", "resnet50", "--weights", "random", "--emit_source",
        "g.py"], "drop --model"),
  ]
  for args, needle in cases:
    code, _, err = cli(*args)
    assert code == 1 and len(err) == 1, (args, err)
    assert err[0].startswith("error: ") and needle in err[0], (args, err)
  assert sorted(os.listdir(tmp_path)) == before
