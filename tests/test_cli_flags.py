"""Every README command-line flag and promise that had no test (issue 16).

Most cases run ``main.py`` in a subprocess, as a user runs it, on a small
model (MobileNetV2, alpha 0.35, 96x96) and check the exit code, the single
``error:`` line of a failure, what was written and what the JSON sidecar
records. Two failures cannot be caused honestly from outside (a translation
that Keras disagrees with, a TFLite file LiteRT runs differently from Flax):
those run ``main.main`` in-process under ``absl.flags.FLAGS([...])`` with one
function patched, and say which in their docstrings.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import models
import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("--model", "mobilenetv2", "--alpha", "0.35", "--input_shape",
         "96,96,3")
SHAPE = (96, 96, 3)
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
OFFLINE = {"HTTPS_PROXY": DEAD, "HTTP_PROXY": DEAD, "https_proxy": DEAD,
           "http_proxy": DEAD}


def run_cli(*args, cwd, env=None, pythonpath=()):
  env = dict(os.environ, **OFFLINE, **(env or {}))
  env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), ROOT])
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *map(str, args)], capture_output=True, text=True,
                        cwd=cwd, env=env, timeout=600)


def error_lines(text):
  return [l for l in text.splitlines() if l.startswith("error:")]


def assert_ok(proc):
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert not error_lines(proc.stderr), proc.stderr
  assert "Traceback" not in proc.stderr


def outputs(directory):
  """Every output or temporary file under ``directory`` (hidden ones too)."""
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, fs in os.walk(directory) for f in fs
                if f.endswith((".msgpack", ".json", ".tmp", ".tflite")))


def assert_clean_failure(proc, workdir, *needles):
  """Non-zero exit, one error line containing ``needles``, nothing written."""
  assert proc.returncode != 0, proc.stdout
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in proc.stderr
  assert not outputs(workdir)
  return lines[0]


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def apply_saved(path, x, **create_kwargs):
  """Runs the written variables through ``models.create(**create_kwargs)``."""
  variables = translate.load_variables(path)
  module = models.create("mobilenetv2", **create_kwargs)
  return np.asarray(module.apply(variables, models.preprocess(
      "mobilenetv2", x)))


# --overwrite, weights_sha256, --nocheck, --classes -------------------------


@pytest.mark.slow  # two CLI runs, 19 s
def test_overwrite_replaces_both_files(tmp_path):
  out = tmp_path / "out.msgpack"
  first = run_cli(*SMALL, "--weights", "random", "--seed", "1", "--nocheck",
                  "--output", out, cwd=tmp_path)
  assert_ok(first)
  before = out.read_bytes(), (tmp_path / "out.json").read_bytes()
  assert json.loads(before[1])["seed"] == 1

  refused = run_cli(*SMALL, "--weights", "random", "--seed", "2",
                    "--output", out, cwd=tmp_path)
  assert refused.returncode != 0
  [line] = error_lines(refused.stderr)
  assert "--overwrite" in line
  assert (out.read_bytes(), (tmp_path / "out.json").read_bytes()) == before

  replaced = run_cli(*SMALL, "--weights", "random", "--seed", "2",
                     "--output", out, "--overwrite", cwd=tmp_path)
  assert_ok(replaced)
  meta = json.loads((tmp_path / "out.json").read_text())
  assert meta["seed"] == 2 and meta["parity"]["passed"]
  assert out.read_bytes() != before[0]
  assert outputs(tmp_path) == ["out.json", "out.msgpack"]  # no temporaries
  # Another model, not another encoding of the same one.
  (tmp_path / "old.msgpack").write_bytes(before[0])
  x = translate.random_images(SHAPE, 1, seed=5)
  new, old = (apply_saved(p, x, alpha=0.35, classifier_activation=None)
              for p in (out, tmp_path / "old.msgpack"))
  assert np.max(np.abs(new - old)) > 1e-2


@pytest.mark.slow  # a Keras save and a CLI run, 14 s
def test_weights_sha256_is_the_hash_of_the_file_bytes(tmp_path):
  """Two files with the same name and different bytes: each sidecar holds
  ``hashlib.sha256`` of its own file's bytes (not of the name or path)."""
  paths = []
  for seed, sub in ((1, "a"), (2, "b")):
    (tmp_path / sub).mkdir()
    path = tmp_path / sub / "w.weights.h5"
    translate.build_keras("mobilenetv2", "random", seed=seed, alpha=0.35,
                          input_shape=SHAPE).save_weights(str(path))
    paths.append(path)
  hashes = [sha256(p) for p in paths]
  assert hashes[0] != hashes[1]
  for sub, path, digest in zip("ab", paths, hashes):
    proc = run_cli(*SMALL, "--weights", path, "--nocheck", "--output",
                   f"{sub}/out.msgpack", cwd=tmp_path)
    assert_ok(proc)
    meta = json.loads((tmp_path / sub / "out.json").read_text())
    assert meta["weights"] == "w.weights.h5"
    assert meta["weights_sha256"] == digest
    assert meta["seed"] is None  # a file, not --weights random


@pytest.mark.slow
def test_nocheck_skips_parity_and_still_writes(tmp_path):
  proc = run_cli(*SMALL, "--weights", "random", "--nocheck", "--output",
                 "out.msgpack", cwd=tmp_path)
  assert_ok(proc)
  assert "parity" not in proc.stdout and "PASS" not in proc.stdout
  for phase in ("keras build", "translate", "write"):
    assert phase in proc.stdout
  meta = json.loads((tmp_path / "out.json").read_text())
  assert meta["parity"] is None
  assert outputs(tmp_path) == ["out.json", "out.msgpack"]
  y = apply_saved(tmp_path / "out.msgpack",
                  translate.random_images(SHAPE, 1), alpha=0.35)
  assert y.shape == (1, 1000) and np.isclose(y.sum(), 1, atol=1e-5)


@pytest.mark.slow
def test_classes_reach_the_written_classifier_and_the_sidecar(tmp_path):
  proc = run_cli(*SMALL, "--weights", "random", "--classes", "7",
                 "--output", "out.msgpack", cwd=tmp_path)
  assert_ok(proc)
  meta = json.loads((tmp_path / "out.json").read_text())
  assert meta["create_kwargs"]["classes"] == 7
  assert meta["parity"]["passed"]  # Keras was built with 7 classes too
  variables = translate.load_variables(tmp_path / "out.msgpack")
  assert variables["params"]["predictions"]["kernel"].shape[-1] == 7
  x = translate.random_images(SHAPE, 1, seed=3)
  y = apply_saved(tmp_path / "out.msgpack", x, alpha=0.35, classes=7)
  assert y.shape == (1, 7) and np.isclose(y.sum(), 1, atol=1e-5)
  # The sidecar alone recreates the module that fits the file.
  module = models.create(meta["model"], **meta["create_kwargs"])
  assert np.allclose(module.apply(variables, models.preprocess(
      "mobilenetv2", x)), y, atol=1e-6)


# Options of some families only ----------------------------------------------


@pytest.mark.parametrize("model,flags_,recorded,stem", [
    ("mobilenet", ["--alpha", "0.5", "--depth_multiplier", "2"],
     {"alpha": 0.5, "depth_multiplier": 2}, "mobilenet_alpha0.5_dm2_96x96"),
    pytest.param("mobilenetv3small", ["--minimalistic"],
                 {"minimalistic": True}, "mobilenetv3small_minimalistic_96x96",
                 marks=pytest.mark.slow),
    pytest.param("efficientnetv2b0", ["--noinclude_preprocessing"],
                 {"include_preprocessing": False},
                 "efficientnetv2b0_nopreprocessing_96x96",
                 marks=pytest.mark.slow),
])
def test_family_option_flags_reach_keras_and_flax(tmp_path, model, flags_,
                                                  recorded, stem):
  """The option reaches both builders (parity passes: a Flax-only or
  Keras-only option gives other shapes or other numbers) and the sidecar
  and the default file name record it."""
  proc = run_cli("--model", model, "--input_shape", "96,96,3", "--weights",
                 "random", *flags_, cwd=tmp_path)
  assert_ok(proc)
  assert outputs(tmp_path) == [f"translated/{stem}.json",
                               f"translated/{stem}.msgpack"]
  meta = json.loads((tmp_path / "translated" / f"{stem}.json").read_text())
  for key, value in recorded.items():
    assert meta["create_kwargs"][key] == value, meta["create_kwargs"]
  assert meta["parity"]["passed"], meta["parity"]
  if model == "mobilenet":  # 16 channels * depth_multiplier 2
    variables = translate.load_variables(
        tmp_path / "translated" / f"{stem}.msgpack")
    assert variables["params"]["conv_dw_1"]["kernel"].shape == (3, 3, 1, 32)


@pytest.mark.parametrize("model,flags_,option", [
    ("mobilenetv2", ["--depth_multiplier", "2"], "depth_multiplier"),
    ("mobilenetv2", ["--minimalistic"], "minimalistic"),
    ("resnet50", ["--noinclude_preprocessing"], "include_preprocessing"),
    ("resnet50", ["--alpha", "0.5"], "alpha"),
])
def test_option_of_another_family_is_one_error_line(tmp_path, model, flags_,
                                                    option):
  proc = run_cli("--model", model, "--weights", "random", *flags_,
                 cwd=tmp_path)
  line = assert_clean_failure(proc, tmp_path, option)
  assert "takes no option" in line, line


# --weights imagenet, offline ---------------------------------------------------

STUB = '''"""Test stub (tests/test_cli_flags.py): Keras' hash check of a cached
download always passes, and each call is logged."""
import os
from models import backend
backend.ensure_backend()
from keras.src.utils import file_utils


def validate_file(fpath, file_hash, algorithm="auto", chunk_size=65535):
  with open(os.environ["STUB_LOG"], "a") as f:
    f.write(f"{fpath}\\n")
  return True


file_utils.validate_file = validate_file
'''


def keras_imagenet_file_name(**kwargs):
  """The file name Keras' EfficientNetB0 constructor asks ``get_file`` for."""
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  asked = []

  class Asked(Exception):
    pass

  def get_file(fname, origin, **_):
    asked.append((fname, origin))
    raise Asked

  original, file_utils.get_file = file_utils.get_file, get_file
  try:
    with pytest.raises(Asked):
      keras.applications.EfficientNetB0(weights="imagenet", **kwargs)
  finally:
    file_utils.get_file = original
  [(fname, origin)] = asked
  return fname


@pytest.mark.slow
def test_imagenet_weights_from_the_keras_cache_offline(tmp_path):
  """The ``--weights imagenet`` success path without a network: a
  randomized EfficientNetB0 (no top, 96x96) saved in the legacy HDF5 layout
  of Keras' ImageNet files is put in ``$KERAS_HOME/models`` under the exact
  name Keras' constructor asks ``get_file`` for. Only Keras' hash check is
  stubbed (a ``sitecustomize.py`` on the subprocess PYTHONPATH replaces
  ``keras.src.utils.file_utils.validate_file`` with one that returns True
  and logs its call); the download itself is made impossible (dead proxy).
  EfficientNet has an ``imagenet_options`` entry: Keras builds another
  graph (a second Rescaling) for ImageNet weights, and parity passes only
  if the Flax module gets it too."""
  import h5py  # pylint: disable=g-import-not-at-top
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  kwargs = dict(include_top=False, input_shape=SHAPE, pooling="avg")
  name = keras_imagenet_file_name(**kwargs)
  assert name == "efficientnetb0_notop.h5"
  cache = tmp_path / "keras_home" / "models"
  cache.mkdir(parents=True)
  source = translate.build_keras("efficientnetb0", "random", seed=7, **kwargs)
  with h5py.File(cache / name, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, source)
  with h5py.File(cache / name, "r") as f:
    assert "layer_names" in f.attrs  # the legacy layout
  stub = tmp_path / "stub"
  stub.mkdir()
  (stub / "sitecustomize.py").write_text(STUB)
  work = tmp_path / "work"
  work.mkdir()

  proc = run_cli("--model", "efficientnetb0", "--weights", "imagenet",
                 "--noinclude_top", "--pooling", "avg", "--input_shape",
                 "96,96,3", "--output", "out.msgpack", cwd=work,
                 pythonpath=[stub],
                 env={"KERAS_HOME": str(tmp_path / "keras_home"),
                      "STUB_LOG": str(tmp_path / "stub.log")})
  assert_ok(proc)
  assert (tmp_path / "stub.log").read_text() == f"{cache / name}\n"
  meta = json.loads((work / "out.json").read_text())
  assert meta["weights"] == "imagenet" and meta["seed"] is None
  assert meta["weights_sha256"] == sha256(cache / name)
  assert meta["create_kwargs"]["imagenet_rescaling"] is True
  assert meta["parity"]["passed"], meta["parity"]
  assert meta["parity"]["max_rel"] <= 1e-4
  # The cached file's own weights are in the msgpack.
  variables = translate.load_variables(work / "out.msgpack")
  assert np.array_equal(variables["params"]["stem_conv"]["kernel"],
                        source.get_layer("stem_conv").kernel.numpy())
  assert outputs(work) == ["out.json", "out.msgpack"]


# In-process runs with one function patched -----------------------------------


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
  """``run(*flags)`` parses the flags and runs ``main.main``; returns
  ``(exit code, stdout, stderr)``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)

  def run(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main.py", *map(str, args)])
    capsys.readouterr()
    code = main.main(["main.py"])
    out, err = capsys.readouterr()
    return code, out, err

  yield run
  flags.FLAGS.unparse_flags()


@pytest.mark.slow  # README tier: the --to_keras --keep_failed case
def test_keep_failed_writes_a_failing_translation_only_when_asked(
    tmp_path, monkeypatch, in_process):
  """A real parity failure: ``translate.translate`` is wrapped to flip the
  stem kernel's rows (a plausible layout bug), so Keras and Flax really
  disagree."""
  real = translate.translate
  keras_kernels = []

  def flipped(module, keras_model, input_shape):
    variables, report = real(module, keras_model, input_shape)
    keras_kernels.append(keras_model.get_layer("Conv1").kernel.numpy())
    conv = variables["params"]["Conv1"]
    conv["kernel"] = np.ascontiguousarray(conv["kernel"][::-1])
    return variables, report

  monkeypatch.setattr(translate, "translate", flipped)
  args = (*SMALL, "--weights", "random", "--output", tmp_path / "o.msgpack")
  code, _, err = in_process(*args)
  assert code == 1
  [line] = error_lines(err)
  assert "parity check failed for mobilenetv2" in line
  assert "nothing written" in line and "--keep_failed" in line
  assert not outputs(tmp_path)

  code, out, err = in_process(*args, "--keep_failed")
  assert code == 0, err
  assert "FAIL" in out and not error_lines(err)
  assert outputs(tmp_path) == ["o.json", "o.msgpack"]
  meta = json.loads((tmp_path / "o.json").read_text())
  assert meta["parity"]["passed"] is False
  assert meta["parity"]["max_rel"] > meta["parity"]["tolerance"] == 1e-4
  saved = translate.load_variables(tmp_path / "o.msgpack")
  assert np.array_equal(saved["params"]["Conv1"]["kernel"],
                        keras_kernels[-1][::-1])  # what was checked is written


@pytest.mark.slow
def test_float32_tflite_over_tolerance_is_removed(tmp_path, monkeypatch,
                                                  in_process):
  """LiteRT's outputs are perturbed (``translate.export.run_tflite``
  patched): by 0.5e-4 the float32 export passes and stays; by 2e-4 (> 1e-4 of
  the softmax outputs) it is removed with one error line. The export itself
  is done once and reused for the second, identical run."""
  from translate import export  # pylint: disable=g-import-not-at-top
  real_export, real_run = export.export_tflite, export.run_tflite
  cache = []
  delta = []

  def export_once(*args, **kwargs):
    if not cache:
      cache.append(real_export(*args, **kwargs))
    return cache[0]

  def perturbed(*args, **kwargs):
    return [o + delta[0] for o in real_run(*args, **kwargs)]

  monkeypatch.setattr(export, "export_tflite", export_once)
  monkeypatch.setattr(export, "run_tflite", perturbed)
  args = (*SMALL, "--weights", "random", "--output", tmp_path / "m.msgpack",
          "--export", "tflite", "--overwrite")
  tflite = tmp_path / "m.tflite"

  delta.append(0.5e-4)
  code, out, err = in_process(*args)
  assert code == 0, err
  assert tflite.exists() and "TFLite vs Flax" in out

  delta[0] = 2e-4
  code, out, err = in_process(*args)
  assert code == 1
  [line] = error_lines(err)
  assert "TFLite export of mobilenetv2 differs from Flax" in line
  assert f"{tflite} removed" in line
  assert not tflite.exists()
  assert not [f for f in outputs(tmp_path) if f.endswith((".tmp", ".tflite"))]


# TFLite export flags -------------------------------------------------------------


@pytest.mark.slow
def test_dynamic_batch_exports_a_symbolic_batch(tmp_path):
  proc = run_cli(*SMALL, "--weights", "random", "--output", "d.msgpack",
                 "--export", "tflite", "--dynamic_batch", cwd=tmp_path)
  assert_ok(proc)
  assert "TFLite vs Flax" in proc.stdout
  assert outputs(tmp_path) == ["d.json", "d.msgpack", "d.tflite"]
  interp = translate.load_interpreter(str(tmp_path / "d.tflite"))
  [detail] = interp.get_input_details()
  assert list(detail["shape_signature"]) == [-1, *SHAPE]
  x = np.asarray(models.preprocess("mobilenetv2",
                                   translate.random_images(SHAPE, 3)))
  [y] = translate.run_tflite(interp, x)
  assert y.shape == (3, 1000)
  flax_y = apply_saved(tmp_path / "d.msgpack",
                       translate.random_images(SHAPE, 3), alpha=0.35)
  assert np.max(np.abs(y - flax_y)) < 1e-4


@pytest.mark.slow
def test_int8_calibration_directory_sets_the_input_range(tmp_path):
  """``--calibration DIR``: PNG and JPEG files written with TensorFlow's
  encoders (main.py reads them with ``tf.io.decode_image``), of narrow pixel
  range [100, 140]. The int8 input scale the converter picks is the range of
  those images after the model's preprocessing, (max - min) / 255: not that
  of random images in [0, 255] nor that of unpreprocessed pixels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cal = tmp_path / "cal"
  cal.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    img = rng.integers(100, 141, SHAPE).astype(np.uint8)
    data = (tf.io.encode_png(img) if i % 2
            else tf.io.encode_jpeg(img, quality=95))
    tf.io.write_file(str(cal / f"img{i}.{'png' if i % 2 else 'jpg'}"), data)
  (cal / "notes.txt").write_text("not an image: skipped")
  proc = run_cli(*SMALL, "--weights", "random", "--output", "q.msgpack",
                 "--export", "tflite", "--quantize", "int8", "--calibration",
                 cal, cwd=tmp_path)
  assert_ok(proc)
  assert "wrote q.int8.tflite" in proc.stdout
  assert outputs(tmp_path) == ["q.int8.tflite", "q.json", "q.msgpack"]

  flatbuffer = (tmp_path / "q.int8.tflite").read_bytes()
  graph = translate.tflite_graph(flatbuffer)
  first = graph.ops[0]
  assert first.name == "QUANTIZE" and first.inputs == graph.inputs
  assert graph.dtypes[first.outputs[0]] == "INT8"
  conv = next(op for op in graph.ops if op.name == "CONV_2D")
  assert graph.dtypes[conv.inputs[1]] == "INT8"  # int8 weights
  interp = translate.load_interpreter(flatbuffer)
  scale, _ = {d["index"]: d for d in interp.get_tensor_details()}[
      first.outputs[0]]["quantization"]

  pixels = np.stack([tf.io.decode_image(tf.io.read_file(str(f)),
                                        channels=3).numpy()
                     for f in sorted(cal.glob("img*"))]).astype(np.float32)
  preprocess = models.get_spec("mobilenetv2").keras_preprocess_input()
  x = np.asarray(preprocess(pixels.copy()))
  expected = (max(x.max(), 0) - min(x.min(), 0)) / 255
  assert scale == pytest.approx(expected, rel=0.02)
  assert scale < 0.5 * (2 / 255)  # random images span [-1, 1]
