"""Every user mistake or fault: one error line, non-zero exit, no files.

Each case runs ``main.py`` in a subprocess and checks the exit code, a single
``error:`` line naming the problem (no traceback unless ``--verbose``), and
that no output file, complete or partial, is left behind.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd, env=None):
  env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=600)


def assert_clean_failure(proc, workdir, *needles):
  """Non-zero exit, one error line containing ``needles``, nothing written."""
  assert proc.returncode != 0, proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert "Traceback" not in proc.stderr
  left = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs
          if f.endswith((".msgpack", ".json", ".tmp", ".tflite"))]
  assert not left, left
  return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Weights files made here with Keras' own savers."""
  d = tmp_path_factory.mktemp("weights")
  out = {}
  top = translate.build_keras("resnet50", "random", seed=1)
  out["top"] = str(d / "r50.weights.h5")
  top.save_weights(out["top"])
  notop = translate.build_keras("resnet50", "random", seed=1,
                                include_top=False)
  out["notop"] = str(d / "r50_notop.weights.h5")
  notop.save_weights(out["notop"])
  out["densenet"] = str(d / "densenet121.weights.h5")
  keras.applications.DenseNet121(weights=None).save_weights(out["densenet"])
  data = open(out["top"], "rb").read()
  out["truncated"] = str(d / "truncated.weights.h5")
  with open(out["truncated"], "wb") as f:
    f.write(data[: len(data) // 2])
  out["noise"] = str(d / "noise.weights.h5")
  with open(out["noise"], "wb") as f:
    f.write(np.random.default_rng(0).bytes(4096))
  inputs = keras.Input((8, 8, 3))
  lam = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
  out["lambda"] = str(d / "lambda.keras")
  lam.save(out["lambda"])
  keras.backend.clear_session()
  return out


def test_unknown_model(tmp_path):
  proc = run_cli("--model", "resnet_50", cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "unknown model", "resnet50")


def test_weights_of_another_model_name_the_misfits(tmp_path, files):
  proc = run_cli("--model", "resnet50", "--weights", files["densenet"],
                 cwd=tmp_path)
  line = assert_clean_failure(proc, tmp_path, "does not fit")
  assert "conv1_conv" in line or "conv2_block1" in line  # resnet layers
  assert "conv5_block" in line  # densenet layers the model lacks


@pytest.mark.parametrize("which", ["truncated", "noise"])
def test_corrupt_weights_file(tmp_path, files, which):
  proc = run_cli("--model", "resnet50", "--weights", files[which],
                 cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "cannot read weights file")


def test_notop_file_with_include_top(tmp_path, files):
  proc = run_cli("--model", "resnet50", "--weights", files["notop"],
                 cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "does not fit", "predictions",
                       "--include_top")


@pytest.mark.slow
def test_top_file_without_include_top(tmp_path, files):
  proc = run_cli("--model", "resnet50", "--weights", files["top"],
                 "--noinclude_top", cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "does not fit", "predictions")


@pytest.mark.parametrize("shape,needle", [
    ("16,16,3", "too small"), ("224,224,4", "channels"),
    ("224,224", "height, width, channels"), ("a,b,c", "integers")])
def test_bad_input_shape_is_caught_before_weights_are_read(tmp_path, shape,
                                                           needle):
  # The weights file does not exist: the shape error must come first.
  proc = run_cli("--model", "resnet50", "--noinclude_top", "--input_shape",
                 shape, "--weights", "missing.weights.h5", cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, needle)


def test_missing_output_directory(tmp_path):
  proc = run_cli("--model", "resnet50", "--weights", "random", "--output",
                 str(tmp_path / "no" / "such" / "dir" / "x.msgpack"),
                 cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "does not exist")


def test_unwritable_output_directory(tmp_path):
  # /proc refuses new files even to root (os.access would say yes).
  proc = run_cli("--model", "resnet50", "--weights", "random", "--output",
                 "/proc/x.msgpack", cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "not writable")


def test_existing_output_needs_overwrite(tmp_path):
  (tmp_path / "x.json").write_text("{}")
  proc = run_cli("--model", "resnet50", "--weights", "random", "--output",
                 "x.msgpack", cwd=tmp_path)
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
  assert (tmp_path / "x.json").read_text() == "{}"
  assert not (tmp_path / "x.msgpack").exists()


def test_imagenet_without_network_says_offline(tmp_path):
  dead = "http://127.0.0.1:9"  # nothing listens on the discard port
  proc = run_cli("--model", "resnet50", cwd=tmp_path,
                 env={"HTTPS_PROXY": dead, "HTTP_PROXY": dead,
                      "https_proxy": dead, "http_proxy": dead,
                      "KERAS_HOME": str(tmp_path.parent / "keras_home")})
  assert_clean_failure(proc, tmp_path, "offline", "--weights random",
                       "--weights PATH")


def test_keras_file_with_lambda_is_refused(tmp_path, files):
  proc = run_cli("--model", "resnet50", "--weights", files["lambda"],
                 cwd=tmp_path)
  assert_clean_failure(proc, tmp_path, "Lambda", "safe_mode")


def test_verbose_shows_the_traceback(tmp_path, files):
  proc = run_cli("--model", "resnet50", "--weights", files["noise"],
                 "--verbose", cwd=tmp_path)
  assert proc.returncode != 0 and "Traceback" in proc.stderr


CORRUPT = """
import sys
import numpy as np
from absl import app
import translate.core as core
merge = core.merge
def corrupt(layers, shapes):
  variables, matches, renamed = merge(layers, shapes)
  kernel = variables["params"]["conv3_block2_2_conv"]["kernel"]
  kernel[0, 0, 0, 0] += 10.0 * np.abs(kernel).max()
  return variables, matches, renamed
core.merge = corrupt
import main
sys.argv = ["main.py"] + sys.argv[1:]
app.run(main.main)
"""


def _run_corrupt_main(tmp_path, *flags):
  """main.py with a translation bug planted (``CORRUPT``)."""
  script = tmp_path / "corrupt_main.py"
  script.write_text(CORRUPT)
  env = dict(os.environ, PYTHONPATH=ROOT)
  args = [sys.executable, str(script), "--model", "resnet50", "--weights",
          "random", "--output", "out.msgpack", *flags]
  return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path,
                        env=env, timeout=600)


@pytest.mark.slow
def test_failed_parity_writes_nothing(tmp_path):
  proc = _run_corrupt_main(tmp_path)
  assert_clean_failure(proc, tmp_path, "parity check failed",
                       "--keep_failed")


@pytest.mark.slow  # one more CLI run, 9 s
def test_keep_failed_writes_the_failed_translation(tmp_path):
  proc = _run_corrupt_main(tmp_path, "--keep_failed")
  assert proc.returncode == 0, proc.stderr
  meta = json.loads((tmp_path / "out.json").read_text())
  assert meta["parity"]["passed"] is False


@pytest.mark.slow  # two CLI runs, 19 s
def test_same_input_gives_byte_identical_files(tmp_path):
  for out in ("a.msgpack", "b.msgpack"):
    proc = run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                   "--input_shape", "96,96,3", "--weights", "random",
                   "--seed", "3", "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
  for ext in ("msgpack", "json"):
    assert ((tmp_path / f"a.{ext}").read_bytes()
            == (tmp_path / f"b.{ext}").read_bytes())


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
  from translate import io as tio  # pylint: disable=g-import-not-at-top
  with pytest.raises(RuntimeError):
    with tio._atomic_files([str(tmp_path / "a.msgpack"),  # pylint: disable=protected-access
                            str(tmp_path / "a.json")]) as (f1, f2):
      f1.write(b"x" * 1000)
      raise RuntimeError("disk full")
  assert not list(tmp_path.iterdir())
