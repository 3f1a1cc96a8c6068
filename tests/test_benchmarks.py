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
       "--models", "resnet50", "--quick", "--output", str(out)],
      capture_output=True, text=True, timeout=1200,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert "| resnet50 | 1 |" in text and "Keras-JAX" in text
  assert text.strip() in proc.stdout


def test_unknown_model_is_refused():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
       "--models", "resnet5000", "--quick"], capture_output=True, text=True,
      timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode != 0 and "unknown model" in proc.stderr
