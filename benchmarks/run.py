"""Benchmarks, side by side in one run: build, translate, CLI, inference.

  python benchmarks/run.py [--models resnet50,mobilenetv2] [--quick]

Measures on this machine, with interleaved repetitions and medians:
  1. Keras model build (TF backend), the translate step alone, the whole CLI
     (``main.py --model X --weights random``) wall time and peak RSS, and a
     fresh process that imports Keras, builds the model and predicts once;
  2. inference at batch 1 and 8: the Flax port under ``jax.jit`` (plain and
     with BatchNorm folded), Keras 3 on the JAX backend through
     ``stateless_call`` under ``jax.jit`` (same XLA compiler: the fair peer),
     Keras on the TF backend (``model(x, training=False)`` in a
     ``tf.function``), and, where ``translate.export_tflite`` exists, the
     exported TFLite file and Keras' own TFLite file in the LiteRT
     interpreter;
  3. the ratios project / peer.
Keras' backend is fixed per process, so the JAX-side rows (Flax and
Keras-JAX, interleaved with each other) run in one worker process and the
TF-side rows in another. Writes benchmarks/RESULTS.md and prints it.
No assertions: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_MODELS = ("resnet50", "mobilenetv2", "efficientnetb0")


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
  """Median seconds of each zero-argument function, run round-robin."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------
# Workers (one backend per process).


def worker_jax(name: str, batches: list[int], reps: int) -> dict:
  """Flax (plain, folded) vs Keras-JAX stateless_call, all under jax.jit."""
  os.environ["KERAS_BACKEND"] = "jax"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top

  spec = models.get_spec(name)
  conv = translate.convert(name, weights="random", seed=0,
                           classifier_activation=None)
  keras_model = conv.keras_model
  folded = translate.fold_batchnorm(conv.variables, conv.module,
                                    spec.input_shape)
  inference = models.create(name, inference=True, classifier_activation=None)
  flax_fn = jax.jit(conv.module.apply)
  folded_fn = jax.jit(inference.apply)
  tv = [v.value for v in keras_model.trainable_variables]
  ntv = [v.value for v in keras_model.non_trainable_variables]

  @jax.jit
  def keras_fn(tv, ntv, x):
    y, _ = keras_model.stateless_call(tv, ntv, x, training=False)
    return y

  out = {}
  for b in batches:
    x = np.asarray(translate.random_images(spec.input_shape, b, seed=1))
    x = np.asarray(models.preprocess(name, x))
    fns = {
        "flax": lambda: flax_fn(conv.variables, x).block_until_ready(),
        "flax_folded": lambda: folded_fn(folded, x).block_until_ready(),
        "keras_jax": lambda: keras_fn(tv, ntv, x).block_until_ready(),
    }
    for fn in fns.values():  # compile and warm up
      fn()
      fn()
    out[b] = _interleaved(fns, reps)
    diff = np.abs(np.asarray(flax_fn(conv.variables, x))
                  - np.asarray(keras_fn(tv, ntv, x))).max()
    out[b]["max_abs_diff_flax_vs_keras_jax"] = float(diff)
  return out


def worker_tf(name: str, batches: list[int], reps: int) -> dict:
  """Keras TF backend in a tf.function, and TFLite files if exportable."""
  os.environ["KERAS_BACKEND"] = "tensorflow"
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  spec = models.get_spec(name)
  start = time.perf_counter()
  keras_model = translate.build_keras(name, None, classifier_activation=None)
  build_s = time.perf_counter() - start
  translate.keras_io.randomize(keras_model, 0)
  module = models.create(name, classifier_activation=None)
  start = time.perf_counter()
  translate.translate(module, keras_model, spec.input_shape)
  translate_s = time.perf_counter() - start
  out = {"keras_build_s": build_s, "translate_s": translate_s}
  fn = tf.function(lambda x: keras_model(x, training=False))
  for b in batches:
    x = np.asarray(models.preprocess(
        name, translate.random_images(spec.input_shape, b, seed=1)))
    fns = {"keras_tf": lambda: fn(x).numpy()}
    fns["keras_tf"]()
    fns["keras_tf"]()
    out[b] = _interleaved(fns, reps)
  return out


# --------------------------------------------------------------------------
# Whole-process measurements.


def _run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
  """Wall seconds and peak RSS (bytes) of a child process."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, cwd=ROOT)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
  return wall, usage.ru_maxrss * 1024


PEER_SCRIPT = """
import os, sys
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, {root!r})
import numpy as np, keras, models
spec = models.get_spec({name!r})
model = spec.keras_constructor()(weights=None)
x = np.zeros((1, *spec.input_shape), np.float32)
model.predict(x, verbose=0)
"""


def measure_cli(name: str, reps: int) -> dict:
  """CLI wall time and peak RSS vs a fresh Keras build-and-predict process."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  cli, peer = [], []
  rss = 0
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(reps):
      out = os.path.join(tmp, f"{name}_{i}.msgpack")
      wall, peak = _run_measured(
          [sys.executable, os.path.join(ROOT, "main.py"), "--model", name,
           "--weights", "random", "--output", out], env)
      cli.append(wall)
      rss = max(rss, peak)
      wall, _ = _run_measured(
          [sys.executable, "-c", PEER_SCRIPT.format(root=ROOT, name=name)],
          env)
      peer.append(wall)
  return {"cli_s": statistics.median(cli), "peer_s": statistics.median(peer),
          "cli_peak_rss": rss}


def _worker(kind: str, name: str, batches: list[int], reps: int) -> dict:
  code = (f"import sys, json; sys.path.insert(0, {ROOT!r}); "
          f"from benchmarks import run; "
          f"print('RESULT' + json.dumps(run.worker_{kind}({name!r}, "
          f"{batches!r}, {reps})))")
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=env, cwd=ROOT)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  if proc.returncode != 0 or not line:
    raise RuntimeError(f"{kind} worker failed for {name}: "
                       f"{proc.stderr[-3000:]}")
  res = json.loads(line[-1][len("RESULT"):])
  return {(int(k) if k.isdigit() else k): v for k, v in res.items()}


def _versions() -> str:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  names = ("tensorflow", "keras", "jax", "jaxlib", "flax")
  return ", ".join(f"{n} {md.version(n)}" for n in names)


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def render(results: dict, batches: list[int]) -> str:
  """RESULTS.md text."""
  lines = [
      "# Benchmarks", "",
      f"Measured {datetime.date.today().isoformat()} on {_machine()}; "
      f"{_versions()}.",
      "Medians of interleaved repetitions; ratios are project / peer, "
      "lower is better (≤ 1.0 means the project is at least as fast).", "",
      "## Inference (ms per batch)", "",
      "| model | batch | Flax jit | Flax jit, BN folded | Keras-JAX "
      "stateless_call jit | Keras TF tf.function | Flax / Keras-JAX | "
      "folded / Keras-JAX | folded / Keras TF |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    for b in batches:
      j, t = r["jax"][b], r["tf"][b]
      lines.append(
          f"| {name} | {b} | {j['flax'] * 1e3:.1f} | "
          f"{j['flax_folded'] * 1e3:.1f} | {j['keras_jax'] * 1e3:.1f} | "
          f"{t['keras_tf'] * 1e3:.1f} | {j['flax'] / j['keras_jax']:.2f} | "
          f"{j['flax_folded'] / j['keras_jax']:.2f} | "
          f"{j['flax_folded'] / t['keras_tf']:.2f} |")
  lines += ["", "## Translation and CLI", "",
            "| model | Keras build (s) | translate step (s) | CLI wall (s) | "
            "Keras build+predict process (s) | CLI / peer | CLI peak RSS |",
            "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    t, c = r["tf"], r["cli"]
    lines.append(
        f"| {name} | {t['keras_build_s']:.2f} | {t['translate_s']:.2f} | "
        f"{c['cli_s']:.1f} | {c['peer_s']:.1f} | "
        f"{c['cli_s'] / c['peer_s']:.2f} | {c['cli_peak_rss'] / 2**30:.2f} GiB "
        "|")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
  parser.add_argument("--quick", action="store_true",
                      help="one model-size pass with few repetitions")
  parser.add_argument("--output",
                      default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
  args = parser.parse_args()
  import models  # pylint: disable=g-import-not-at-top
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n.lower() not in models.list_models()]
  if unknown:
    sys.exit(f"error: unknown model(s) {unknown}; registered: "
             f"{', '.join(models.list_models())}")
  reps = 3 if args.quick else 15
  batches = [1] if args.quick else [1, 8]
  results = {}
  for name in names:
    print(f"benchmarking {name} …", flush=True)
    results[name] = {
        "jax": _worker("jax", name, batches, reps),
        "tf": _worker("tf", name, batches, reps),
        "cli": measure_cli(name, 1 if args.quick else 3),
    }
  text = render(results, batches)
  with open(args.output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
