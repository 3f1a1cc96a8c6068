"""Weights as users really have them: every saver's file format, names that
changed between Keras versions, whole-model files that fix their own
options, orbax output, one-line flag errors and an instant ``--list``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tf_keras

import models
import translate
from translate import random_weights, weights_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)


def run_cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=600)


def error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  return lines[0]


def _tf_keras_model(name, **kwargs):
  """A randomized tf-keras model of registry model ``name``."""
  ctor = getattr(tf_keras.applications, models.get_spec(name).keras_name)
  model = ctor(weights=None, **kwargs)
  # BatchNorm statistics calibrated on X keep activations O(1), so float32
  # rounding differences between tf-keras and Keras 3 stay at 1e-6.
  calibration = X if kwargs.get("input_shape") == X.shape[1:] else None
  random_weights.randomize(model, seed=3, calibration=calibration)
  return model


def _loaded_matches(name, path, source, **kwargs):
  """The Keras 3 model built from ``path`` computes what ``source`` does."""
  model = translate.build_keras(name, path, **kwargs)
  want = np.asarray(source(X))
  got = np.asarray(model(X, training=False))
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * max(1.0, np.abs(want).max()))


# One model per Keras 3 family that tf-keras also ships; the first two run in
# the README tier, every family in the slow tier.
TF_KERAS_FAMILIES = [
    ("resnet50", {}), ("densenet121", {}), ("mobilenetv2", {}),
    ("efficientnetb0", {}), ("inceptionv3", {}), ("vgg16", {}),
    ("xception", {}), ("mobilenet", {}), ("mobilenetv3small", {}),
    ("inceptionresnetv2", {}), ("nasnetmobile", {}), ("efficientnetv2b0", {}),
    ("convnexttiny", {}),
]


def _family_param(name, kwargs):
  slow = name != "resnet50"
  return pytest.param(name, kwargs, id=name,
                      marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name,kwargs", [_family_param(*p) for p in
                                         TF_KERAS_FAMILIES])
def test_every_family_reads_what_tf_keras_writes(tmp_path, name, kwargs):
  """tf-keras' .weights.h5 (no layer names: paired by layer order) and its
  legacy whole-model .h5 (old layer names such as DenseNet's conv1/conv)."""
  shape = (75, 75, 3) if models.get_spec(name).min_size <= 75 else None
  kw = dict(include_top=False, input_shape=shape, **kwargs)
  source = _tf_keras_model(name, **kw)
  source.save_weights(tmp_path / "w.weights.h5")
  source.save(tmp_path / "m.h5")
  _loaded_matches(name, str(tmp_path / "w.weights.h5"), source, **kw)
  _loaded_matches(name, str(tmp_path / "m.h5"), source, **kw)


@pytest.mark.slow
def test_tf_keras_weights_h5_is_nameless_and_paired_by_structure(tmp_path):
  source = _tf_keras_model("resnetrs50", include_top=False,
                           input_shape=(75, 75, 3))
  path = tmp_path / "rs.weights.h5"
  source.save_weights(path)
  stored, named = weights_files._read(str(path))  # pylint: disable=protected-access
  assert not named and "layers/conv2d" in stored
  _loaded_matches("resnetrs50", str(path), source, include_top=False,
                  input_shape=(75, 75, 3))
  # A file of another structure: both sides listed, nothing loaded.
  with pytest.raises(weights_files.WeightsFileError) as e:
    translate.build_keras("resnetrs50", str(path), input_shape=(75, 75, 3))
  msg = str(e.value)
  assert "paired by layer order" in msg and "layers/dense" in msg


@pytest.mark.slow  # two CLI runs, 24 s
def test_tf_keras_densenet_whole_model_file_on_the_cli(tmp_path):
  """The issue's case: a tf-keras DenseNet121 saved with model.save('m.h5')
  (stem named conv1/conv), with options the file fixes."""
  source = _tf_keras_model("densenet121", input_shape=(64, 64, 3),
                           classes=5, classifier_activation=None)
  source.save(tmp_path / "m.h5")
  source.save(tmp_path / "m.keras")
  for f in ("m.h5", "m.keras"):
    out = tmp_path / f"{f}.msgpack"
    proc = run_cli("--model", "densenet121", "--weights", f, "--output",
                   str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / f"{f}.json").read_text())
    assert meta["create_kwargs"]["classes"] == 5
    assert meta["create_kwargs"]["classifier_activation"] is None
    assert meta["input_shape"] == [64, 64, 3]
    assert meta["parity"]["passed"]


@pytest.fixture(scope="module")
def logits_keras_file(tmp_path_factory):
  """A Keras 3 EfficientNetB0 with classifier_activation=None, as .keras."""
  d = tmp_path_factory.mktemp("keras3")
  model = translate.build_keras("efficientnetb0", "random", seed=2,
                                input_shape=(96, 96, 3),
                                classifier_activation=None)
  model.save(d / "e0.keras")
  return d / "e0.keras"


def test_options_come_from_the_whole_model_file(logits_keras_file):
  assert weights_files.file_options(str(logits_keras_file)) == {
      "input_shape": (96, 96, 3), "include_top": True, "classes": 1000,
      "classifier_activation": None}
  conv = translate.convert("efficientnetb0", weights=str(logits_keras_file))
  assert conv.module.classifier_activation is None
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "efficientnetb0", seed=1)
  assert report.passed and report.max_rel < 1e-4, report.summary()
  with pytest.raises(weights_files.WeightsFileError,
                     match="saved with classes=1000, but classes=10"):
    translate.convert("efficientnetb0", weights=str(logits_keras_file),
                      classes=10)


def test_a_contradicting_flag_is_one_error(tmp_path, logits_keras_file):
  proc = run_cli("--model", "efficientnetb0", "--weights",
                 str(logits_keras_file), "--classifier_activation", "softmax",
                 "--output", str(tmp_path / "x.msgpack"), cwd=tmp_path)
  assert proc.returncode == 1
  line = error_line(proc)
  assert "classifier_activation=None" in line and "'softmax'" in line
  assert os.listdir(tmp_path) == []


def test_no_top_file_options():
  source_path = None  # built in-process: a Keras 3 no-top max-pooled model
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    model = translate.build_keras("mobilenetv2", None, include_top=False,
                                  pooling="max", input_shape=(96, 96, 3),
                                  alpha=0.35)
    source_path = os.path.join(d, "m.keras")
    model.save(source_path)
    assert weights_files.file_options(source_path) == {
        "input_shape": (96, 96, 3), "include_top": False, "pooling": "max"}


@pytest.mark.parametrize("args,needles", [
    (["--quantize", "int4"], ["--quantize=int4", "none|float16|dynamic|int8"]),
    (["--pooling", "mean"], ["--pooling=mean", "avg|max"]),
    (["--format", "npz"], ["--format=npz", "msgpack|orbax"]),
])
def test_a_bad_flag_value_is_one_error_line(tmp_path, args, needles):
  proc = run_cli("--model", "resnet50", *args, cwd=tmp_path)
  assert proc.returncode == 2
  line = error_line(proc)
  for n in needles:
    assert n in line, line
  assert "FATAL" not in proc.stderr
  assert os.listdir(tmp_path) == []


def test_list_traces_nothing(monkeypatch, capsys):
  import main  # pylint: disable=g-import-not-at-top

  def refuse(*a, **k):
    raise AssertionError("--list must not trace a model")

  monkeypatch.setattr(translate, "variable_shapes", refuse)
  monkeypatch.setattr(models, "create", refuse)
  main.list_models()
  out = capsys.readouterr().out
  assert "25,583,592" in out and "350,196,968" in out  # ResNet50, XLarge
  table = out.strip().split("\n\n")[0]  # then the options by family
  assert len(table.splitlines()) == len(models.list_models()) + 1


@pytest.mark.slow  # three CLI runs; tests/unit/test_orbax.py covers the bytes
def test_orbax_output_from_the_cli_restores_the_msgpack(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  common = ["--model", "mobilenetv2", "--alpha", "0.35", "--input_shape",
            "96,96,3", "--weights", "random", "--seed", "4", "--nocheck"]
  a = run_cli(*common, "--output", "m.msgpack", cwd=tmp_path)
  b = run_cli(*common, "--format", "orbax", "--output", "ck", cwd=tmp_path)
  assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
  want = traverse_util.flatten_dict(
      translate.load_variables(tmp_path / "m.msgpack"))
  got = traverse_util.flatten_dict(
      ocp.PyTreeCheckpointer().restore(str(tmp_path / "ck")))
  assert set(got) == set(want)
  assert all(np.asarray(got[k]).tobytes() == v.tobytes()
             for k, v in want.items())
  assert json.loads((tmp_path / "ck.json").read_text())["model"] == \
      "mobilenetv2"
  bad = run_cli(*common, "--format", "orbax", "--output", "x.msgpack",
                cwd=tmp_path)
  assert "checkpoint directory" in error_line(bad)


def test_family_name_aliases_for_session_numbered_names(tmp_path):
  """tf-keras numbers RegNet's head from a session counter: a file saved in
  a session that had built a RegNet before holds '2head_dense'; the spec's
  name_aliases map it back (without them: a missing/extra layer error)."""
  tf_keras.applications.RegNetX002(weights=None, input_shape=(64, 64, 3))
  source = tf_keras.applications.RegNetX002(weights=None,
                                            input_shape=(64, 64, 3))
  assert "2head_dense" in [l.name for l in source.layers]
  random_weights.randomize(source, seed=1)
  source.save_weights(tmp_path / "rg.h5")
  x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(
      np.float32)
  model = translate.build_keras("regnetx002", str(tmp_path / "rg.h5"),
                                input_shape=(64, 64, 3),
                                classifier_activation=None)
  np.testing.assert_allclose(np.asarray(model(x)), source(x).numpy(),
                             rtol=1e-5, atol=1e-5)
