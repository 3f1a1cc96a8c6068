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


def test_render_from_saved_results(tmp_path):
  """--render_from re-renders a saved --json run without measuring: the
  CPU-time ratio where it was measured, and † on rows carried over from an
  earlier run, with its footnote."""
  import json  # pylint: disable=g-import-not-at-top
  t = {"flax_fast": 0.01, "keras_tf": 0.02, "flax_fast_cpu": 0.03,
       "keras_tf_cpu": 0.04, "max_abs_diff_fast_vs_keras_tf": 1e-6,
       "keras_tf_max_abs_logit": 10.0}
  j = {"flax": 0.02, "flax_fast": 0.01, "keras_jax": 0.02}
  tf = {"keras_build_s": 1.0, "translate_s": 1.0, "1": t}
  saved = {"batches": [1], "load": [1.0, 2.0], "date": "2026-01-02",
           "results": {
               "resnet50": {"jax": {"1": j}, "tf": tf},
               "mobilenetv2": {"jax": {"1": j}, "tf": tf,
                               "earlier": "From an earlier run."}}}
  path, out = tmp_path / "r.json", tmp_path / "RESULTS.md"
  path.write_text(json.dumps(saved))
  # The file already holds another benchmark's section (kept) and a stale
  # section of this script's own (replaced, not repeated).
  out.write_text("# Benchmarks\n\nold preamble\n\n"
                 "## Against the targets (issue 11)\n\nSTALE\n\n"
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
  assert "STALE" not in text and "old preamble" not in text
  assert text.count("## Against the targets (issue 11)") == 1
  assert text.count("## Training step: Flax port vs Keras-JAX\n\n"
                    "| resnet50 | 1.06 |") == 1
  assert text.index("## Against the targets") < text.index("## Training step")
