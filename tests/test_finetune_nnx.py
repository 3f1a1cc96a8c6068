"""examples/finetune_nnx.py, run as a person would: in a subprocess, tiny
sizes (MobileNet alpha 0.25 at 32x32, randomized weights, scikit-learn's
digits); runs of one test share a JAX compilation cache."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune_nnx.py"
# SGD with a small rate: after a few Adam steps from random weights (and
# random BatchNorm statistics) the translation back to Keras drifts past
# --to_keras' 1e-4 parity bound by float32 rounding alone (1.2e-4 measured).
TINY = ["--model", "mobilenet", "--alpha", "0.25", "--size", "32",
        "--batch_size", "8", "--eval_every", "0", "--optimizer", "sgd",
        "--lr", "1e-3"]


def finetune(tmp, *flags, check=True, script=SCRIPT):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, str(script), *TINY, *flags],
                        cwd=tmp, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def history(path):
  return json.loads(path.read_text())["history"]


def test_bad_save_path_is_one_error_before_any_work(tmp_path):
  proc = finetune(tmp_path, "--save", "out.weights.h5", check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --save out.weights.h5: give a .msgpack path"]
  assert not (tmp_path / "finetune_nnx_run").exists()


@pytest.mark.slow  # three training runs and a --to_keras: about 60 s
def test_resume_continues_the_same_curve_and_the_backbone_goes_to_keras(
    tmp_path):
  """4 steps straight == 2 steps, then --resume to 4 (parameters,
  statistics, dropout stream and optimizer state from nnx.state); the
  saved backbone goes back to Keras with main.py --to_keras."""
  finetune(tmp_path, "--steps", "4", "--workdir", str(tmp_path / "straight"),
           "--save", str(tmp_path / "backbone.msgpack"))
  finetune(tmp_path, "--steps", "2", "--workdir", str(tmp_path / "split"))
  first = history(tmp_path / "split" / "metrics.json")
  assert first["step"] == [1, 2]
  finetune(tmp_path, "--steps", "4", "--resume", "--workdir",
           str(tmp_path / "split"))
  straight = history(tmp_path / "straight" / "metrics.json")
  resumed = history(tmp_path / "split" / "metrics.json")
  assert straight["step"] == resumed["step"] == [1, 2, 3, 4]
  np.testing.assert_allclose(resumed["loss"][2:], straight["loss"][2:],
                             rtol=1e-5)
  np.testing.assert_allclose(resumed["loss"][:2], first["loss"], rtol=0)
  assert len(set(np.round(straight["loss"], 4))) == 4  # a real curve
  assert (tmp_path / "split" / "finetune.png").read_bytes()[:8] == (
      b"\x89PNG\r\n\x1a\n")
  proc = finetune(tmp_path, "--steps", "2", "--workdir",
                  str(tmp_path / "split"), check=False)
  assert proc.returncode == 1 and "--resume" in proc.stderr
  back = subprocess.run(
      [sys.executable, str(ROOT / "main.py"), "--to_keras",
       str(tmp_path / "backbone.msgpack")], cwd=tmp_path, capture_output=True,
      text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert back.returncode == 0, back.stderr[-3000:]
  assert (tmp_path / "backbone.weights.h5").exists()
