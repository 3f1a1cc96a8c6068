"""Our TFLite file (Flax -> jax2tf) against Keras' own, for the same weights.

  python benchmarks/tflite_vs_keras.py [--models resnet50,mobilenetv2]
                                       [--threads 2] [--reps 30]

For each model: Keras (TF backend) with randomized weights, translated to
Flax and exported through ``translate.export_tflite``; Keras' own file from
``tf.lite.TFLiteConverter.from_keras_model`` (Keras 3's ``model.export(...,
format="litert")`` when that converter refuses the model). Prints the size
ratio, the LiteRT interpreter latency ratio at batch 1 (same thread count,
interleaved runs, medians) and the output difference; ratios are ours /
Keras', lower is better. ``--dynamic_batch`` adds our export with a symbolic
batch size as a third contestant, interleaved with the other two, to measure
what that option costs (its size and latency ratios are against our static
file). No assertions: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def keras_tflite(keras_model) -> bytes:
  """Keras' own TFLite conversion of ``keras_model``."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from models.backend import quiet_native_stderr  # pylint: disable=g-import-not-at-top
  try:
    with quiet_native_stderr():
      return tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()
  except Exception:  # pylint: disable=broad-except
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.tflite")
      with quiet_native_stderr():
        keras_model.export(path, format="litert")
      with open(path, "rb") as f:
        return f.read()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet50,mobilenetv2")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--dynamic_batch", action="store_true",
                      help="also time our dynamic-batch export")
  args = parser.parse_args()
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import export  # pylint: disable=g-import-not-at-top

  rows, dyn_rows = [], []
  for name in args.models.split(","):
    spec = models.get_spec(name)
    conv = translate.convert(name, weights="random", seed=0,
                             classifier_activation=None)
    start = time.perf_counter()
    ours = export.export_tflite(conv.module.apply, conv.variables,
                                [((1, *spec.input_shape), np.float32)])
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = keras_tflite(conv.keras_model)
    theirs_s = time.perf_counter() - start
    dynamic = (export.export_tflite(conv.module.apply, conv.variables,
                                    [((1, *spec.input_shape), np.float32)],
                                    dynamic_batch=True)
               if args.dynamic_batch else None)
    x = np.asarray(models.preprocess(
        name, translate.random_images(spec.input_shape, 1, seed=1)))
    a = export.load_interpreter(ours, args.threads)
    b = export.load_interpreter(theirs, args.threads)
    contestants = [("ours", a), ("keras", b)]
    if dynamic is not None:
      contestants.append(("dynamic", export.load_interpreter(dynamic,
                                                             args.threads)))
    times = {key: [] for key, _ in contestants}
    for _, interp in contestants:  # warm up
      export.run_tflite(interp, x)
    for _ in range(args.reps):
      for key, interp in contestants:
        t = time.perf_counter()
        export.run_tflite(interp, x)
        times[key].append(time.perf_counter() - t)
    diff = export.compare(export.run_tflite(a, x)[0],
                          export.run_tflite(b, x)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows.append((name, len(ours), len(theirs), med["ours"], med["keras"],
                 diff["max_abs"], ours_s, theirs_s))
    if dynamic is not None:
      dyn_rows.append((name, len(dynamic), len(ours), med["dynamic"],
                       med["ours"], sum(export.tflite_ops(dynamic).values()),
                       sum(export.tflite_ops(ours).values())))

  print(f"LiteRT interpreter, {args.threads} threads, batch 1, medians of "
        f"{args.reps} interleaved runs; ratios are ours / Keras'.")
  print("| model | size ours (MiB) | size Keras (MiB) | size ratio | "
        "latency ours (ms) | latency Keras (ms) | latency ratio | "
        "max |Δ| outputs | export ours (s) | export Keras (s) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name, so, sk, lo, lk, d, eo, ek in rows:
    print(f"| {name} | {so / 2**20:.1f} | {sk / 2**20:.1f} | {so / sk:.3f} | "
          f"{lo * 1e3:.1f} | {lk * 1e3:.1f} | {lo / lk:.2f} | {d:.2g} | "
          f"{eo:.1f} | {ek:.1f} |")
  if dyn_rows:
    print("\nThe cost of --dynamic_batch (ours, symbolic batch / static):")
    print("| model | size ratio | latency ratio at batch 1 | ops dynamic | "
          "ops static |")
    print("|---|---|---|---|---|")
    for name, sd, ss, ld, ls, od, os_ in dyn_rows:
      print(f"| {name} | {sd / ss:.3f} | {ld / ls:.2f} | {od} | {os_} |")


if __name__ == "__main__":
  main()
