"""Smoke test: the benchmark script runs and writes its table (no timing
assertions: these machines are shared and noisy)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a benchmark run, even --quick: minutes on 2 cores
def test_quick_benchmark_writes_a_table(tmp_path):
  out = tmp_path / "RESULTS.md"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
       "--models", "mobilenetv2", "--quick", "--output", str(out)],
      capture_output=True, text=True, timeout=1200,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert "| mobilenetv2 | 1 |" in text and "Keras-JAX" in text
  assert text.strip() in proc.stdout


def test_unknown_model_is_refused():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
       "--models", "resnet5000", "--quick"], capture_output=True, text=True,
      timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode != 0 and "unknown model" in proc.stderr


def test_bad_batches_are_refused():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
       "--models", "mobilenetv2", "--batches", "1,eight"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode != 0
  assert "--batches '1,eight'" in proc.stderr
  assert "e.g. --batches 1,8,32" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow  # builds and translates both models: ~10 s
def test_user_models_translate_with_their_fast_form():
  """The benchmark's users' models (not registered applications) go through
  translate.from_keras and models.Inference; the fast form equals Keras."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  for name in run.USER_MODELS:
    keras_model, _ = run._keras_model(name)  # pylint: disable=protected-access
    f = run._flax_forms(name, keras_model)  # pylint: disable=protected-access
    x_np, x = run._inputs(name, 3)  # pylint: disable=protected-access
    ref = np.asarray(keras_model(x_np, training=False))
    assert np.abs(ref).max() < 100, name  # calibrated: logits O(10)
    fast = jax.jit(f["inference"].apply)(f["folded"], x)
    np.testing.assert_allclose(fast, ref, atol=1e-4 * max(1, np.abs(ref).max()),
                               err_msg=name)
    assert len(jax.tree.leaves(f["folded"])) < len(
        jax.tree.leaves(f["variables"])), name  # the BatchNorms were folded


def test_render_from_saved_results(tmp_path):
  """--render_from re-renders a saved --json run without measuring: the
  CPU-time ratio where it was measured, and † on rows carried over from an
  earlier run, with its footnote."""
  import json  # pylint: disable=g-import-not-at-top
  t = {"flax_fast": 0.01, "keras_tf": 0.02, "flax_fast_cpu": 0.03,
       "keras_tf_cpu": 0.04, "max_abs_diff_fast_vs_keras_tf": 1e-6,
       "keras_tf_max_abs_logit": 10.0, "ort": 0.004, "ort_cpu": 0.006,
       "max_abs_diff_ort_vs_keras_tf": 2e-6}
  j = {"flax": 0.02, "flax_fast": 0.01, "keras_jax": 0.02}
  tf = {"keras_build_s": 1.0, "translate_s": 1.0, "ort_convert_s": 3.0,
        "1": t}
  # A model whose ONNX conversion failed: its row says so, with the error.
  t_no_ort = {k: v for k, v in t.items() if not k.startswith(("ort",
                                                              "max_abs_diff_ort"))}
  tf_no_ort = {"keras_build_s": 1.0, "translate_s": 1.0, "1": t_no_ort,
               "ort_error": "ValueError: no ONNX op for X"}
  saved = {"batches": [1], "load": [1.0, 2.0], "date": "2026-01-02",
           "results": {
               "resnet50": {"jax": {"1": j}, "tf": tf},
               "mobilenetv2": {"jax": {"1": j}, "tf": tf,
                               "earlier": "From an earlier run."},
               "user_cnn": {"jax": {"1": j}, "tf": tf_no_ort}}}
  path, out = tmp_path / "r.json", tmp_path / "RESULTS.md"
  path.write_text(json.dumps(saved))
  # The file already holds another benchmark's section (kept) and a stale
  # section of this script's own (replaced, not repeated).
  out.write_text("# Benchmarks\n\nold preamble\n\n"
                 "## Against the target: Flax fast / Keras TF ≤ 1.0\n\n"
                 "STALE\n\n"
                 "## Training step: Flax port vs Keras-JAX\n\n"
                 "| resnet50 | 1.06 |\n")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
       "--render_from", str(path), "--output", str(out)],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert "Measured 2026-01-02" in text
  assert "| resnet50 | 1 | 10.0 | 20.0 |" in text
  assert "| **0.50** |" in text and "| 1.0e-07 | 0.75 |" in text
  assert "| mobilenetv2 † | 1 |" in text and "† From an earlier run." in text
  assert "(CPU time ratio 0.75)" in text
  # ONNX Runtime: 10 ms / 4 ms = 2.50; ORT / Keras TF 0.20; CPU 0.03 / 0.006
  # = 5.00; convert 3.0 s; 2e-6 / max(1, 10) = 2.0e-07.
  assert ("| resnet50 | 1 | 10.0 | 4.0 | 20.0 | **2.50** | 0.20 | 5.00 | "
          "3.0 | 2.0e-07 |") in text
  assert "| user_cnn | 1 | 10.0 | fails² | 20.0 |" in text
  assert "² tf2onnx or ONNX Runtime raised: `ValueError: no ONNX op" in text
  assert "STALE" not in text and "old preamble" not in text
  assert text.count("## Against the target: Flax fast / Keras TF") == 1
  assert text.count("## Training step: Flax port vs Keras-JAX\n\n"
                    "| resnet50 | 1.06 |") == 1
  assert text.index("## Against the target") < text.index("## Training step")


def test_render_batch_32_without_the_slow_peers():
  """At batches past --slow_peer_batches only Keras TF, ORT and the fast
  form are timed: the Keras-JAX table leaves the row out and the target
  line says so, instead of failing on the missing entry."""
  sys.path.insert(0, ROOT)
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  t = {"flax_fast": 0.01, "keras_tf": 0.02,
       "max_abs_diff_fast_vs_keras_tf": 1e-6, "keras_tf_max_abs_logit": 10.0}
  big = dict(t, flax_fast=0.3, keras_tf=0.2)
  results = {"vgg16": {
      "jax": {1: {"flax": 0.02, "flax_fast": 0.01, "keras_jax": 0.02}},
      "tf": {"keras_build_s": 1.0, "translate_s": 1.0, 1: t, 32: big}}}
  text = run.render(results, [1, 32], date="2026-01-02")
  jax_table = text[text.index("Inference against Keras on JAX"):
                   text.index("## Translation")]
  assert "| vgg16 | 1 |" in jax_table and "| vgg16 | 32 |" not in jax_table
  assert ("- vgg16 batch 32: Flax fast / Keras TF = 1.50, ≤ 1.0 missed by "
          "50%; fast / Keras-JAX — (not timed at this batch).") in text
  assert "| vgg16 | 32 | 300.0 | 200.0 | — | **1.50** |" in text
