"""Benchmarks, side by side in one run: build, translate, CLI, inference.

  python benchmarks/run.py [--models resnet50,user_cnn] [--batches 1,8,32]
                           [--quick]

Measures on this machine, with interleaved repetitions and medians, every
variable and input ``jax.device_put`` first:
  1. Keras model build (TF backend), the translate step alone, and for
     ``--cli_models`` the whole CLI (``main.py --model X --weights random``)
     wall time and peak RSS against a fresh process that imports Keras,
     builds the model and predicts once;
  2. inference at batch 1, 8 and 32 (``--batches``), for the first model of
     every family and two models a user builds from ``keras.layers``
     (``USER_MODELS``: a nested application with a new head, a plain CNN;
     translated by ``translate.from_keras``) by default: the Flax port under
     ``jax.jit``, its inference form (BatchNorm folded, the CPU fast path),
     Keras 3 on the JAX backend through ``stateless_call`` under
     ``jax.jit`` (same XLA compiler), Keras on the TF backend
     (``model(x, training=False)`` in a ``tf.function``), and, if
     ``benchmarks/requirements.txt`` is installed, tf2jax's conversion of
     that ``tf.function`` under ``jax.jit`` and ONNX Runtime (the
     ``tf.function`` converted by tf2onnx, ORT's CPU provider on as many
     threads as there are cores);
  3. the ratios project / peer, and the target (fast / Keras TF ≤ 1.0 at
     every batch size) met or missed.
Keras' backend is fixed per process, so the Keras-JAX comparison runs in one
worker process and the Keras-TF / tf2jax comparison in another (each with
the Flax fast form interleaved). Writes its sections of
benchmarks/RESULTS.md (other benchmarks' sections there are kept) and
prints them.
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
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_MODELS = ("resnet50", "mobilenetv2", "efficientnetb0")

# Models a user writes with keras.layers (not registered applications):
# translated whole by translate.from_keras, their fast form is
# models.Inference(module) with translate.fold_batchnorm variables. Inputs
# are raw [0, 255] images: each model rescales them itself.
USER_MODELS = {
    # keras.io's transfer-learning recipe: a nested application, frozen in
    # inference mode, with a new head.
    "user_tl_mobilenetv2": (160, 160, 3),
    # A plain CNN from scratch: Conv2D + BatchNorm + ReLU + max pool blocks.
    "user_cnn": (128, 128, 3),
}


def user_keras_model(name: str) -> Any:
  """The Keras model of ``USER_MODELS[name]``, built on the current backend
  (random weights: randomize them before timing)."""
  import keras  # pylint: disable=g-import-not-at-top
  shape = USER_MODELS[name]
  inputs = keras.Input(shape)
  if name == "user_tl_mobilenetv2":
    base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                          input_shape=shape)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10)(x)
  else:
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (32, 64, 128, 256):
      x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
      x = keras.layers.BatchNormalization()(x)
      x = keras.layers.Activation("relu")(x)
      x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
  return keras.Model(inputs, outputs, name=name)


def _input_shape(name: str) -> tuple[int, ...]:
  import models  # pylint: disable=g-import-not-at-top
  return USER_MODELS.get(name) or models.get_spec(name).input_shape


def _keras_model(name: str) -> tuple[Any, float]:
  """The randomized Keras model of a registered or user model (the same
  weights in either backend's worker), and its build time in seconds.
  BatchNorm statistics are calibrated as translate.convert(weights="random")
  does, so logits stay O(10)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  randomize = translate.random_weights.randomize
  start = time.perf_counter()
  images = translate.random_images(_input_shape(name), batch=4, seed=1)
  if name not in USER_MODELS:
    keras_model = translate.build_keras(name, None,
                                        classifier_activation=None)
    build_s = time.perf_counter() - start
    calibration = models.get_spec(name).keras_preprocess_input()(images)
    randomize(keras_model, 0, calibration=np.asarray(calibration))
    return keras_model, build_s
  keras_model = user_keras_model(name)
  build_s = time.perf_counter() - start
  randomize(keras_model, 0)
  for layer in keras_model.layers:
    # randomize() calibrates the BatchNorms of one graph: a nested
    # application's on its own inputs (the rescaled images).
    if hasattr(layer, "layers"):
      randomize(layer, 0, calibration=images / 127.5 - 1)
    elif type(layer).__name__ == "BatchNormalization":
      randomize(keras_model, 0, calibration=images)
      break
  return keras_model, build_s


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
  """Median wall seconds of each zero-argument function, run round-robin,
  and (key ``<name>_cpu``) the median CPU seconds the process spent in it
  (all threads): on a shared machine, wall time also measures how much of
  the cores the call got; CPU time measures the work."""
  times = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      times[k].append(time.perf_counter() - start)
      cpu[k].append(time.process_time() - start_cpu)
  out = {k: statistics.median(v) for k, v in times.items()}
  out.update({f"{k}_cpu": statistics.median(v) for k, v in cpu.items()})
  return out


# --------------------------------------------------------------------------
# Workers (one backend per process).


def _flax_forms(name: str, keras_model: Any) -> dict:
  """The translated Flax module, its variables and the folded inference
  form (CPU fast path) with its variables, all device_put; plus the
  translate step's seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top

  shape = _input_shape(name)
  start = time.perf_counter()
  if name in USER_MODELS:
    module, variables, _ = translate.from_keras(keras_model)
    inference = models.Inference(module)
  else:
    module = models.create(name, classifier_activation=None)
    variables, _ = translate.translate(module, keras_model, shape)
    inference = models.create(name, inference=True,
                              classifier_activation=None)
  translate_s = time.perf_counter() - start
  folded = translate.fold_batchnorm(variables, module, shape)
  return {"module": module, "variables": jax.device_put(variables),
          "inference": inference, "folded": jax.device_put(folded),
          "keras_model": keras_model, "translate_s": translate_s}


def _inputs(name: str, batch: int):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top

  x = translate.random_images(_input_shape(name), batch, seed=1)
  if name not in USER_MODELS:
    x = models.preprocess(name, x)
  x = np.asarray(x)
  return x, jax.device_put(x)


def _warm(fns: dict) -> None:
  for fn in fns.values():  # compile and warm up
    fn()
    fn()


def worker_jax(name: str, batches: list[int], reps: int) -> dict:
  """Flax (plain; inference form) vs Keras-JAX stateless_call, under jax.jit.

  Every variable and input is ``jax.device_put`` first, so no call times a
  host-to-device copy of the weights.
  """
  os.environ["KERAS_BACKEND"] = "jax"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  keras_model, _ = _keras_model(name)
  f = _flax_forms(name, keras_model)
  flax_fn = jax.jit(f["module"].apply)
  fast_fn = jax.jit(f["inference"].apply)
  # Families that only tf-keras has (ResNetRS, RegNet) have no Keras 3
  # model, hence no Keras-JAX peer: only the two Flax forms are timed.
  keras3 = hasattr(keras_model, "stateless_call")
  if keras3:
    tv = jax.device_put([v.value for v in keras_model.trainable_variables])
    ntv = jax.device_put(
        [v.value for v in keras_model.non_trainable_variables])

  @jax.jit
  def keras_fn(tv, ntv, x):
    y, _ = keras_model.stateless_call(tv, ntv, x, training=False)
    return y

  out = {}
  for b in batches:
    _, x = _inputs(name, b)
    fns = {
        "flax": lambda: flax_fn(f["variables"], x).block_until_ready(),
        "flax_fast": lambda: fast_fn(f["folded"], x).block_until_ready(),
    }
    if keras3:
      fns["keras_jax"] = lambda: keras_fn(tv, ntv, x).block_until_ready()
    _warm(fns)
    out[b] = _interleaved(fns, reps)
    if not keras3:
      continue
    ref = np.asarray(keras_fn(tv, ntv, x))
    out[b]["max_abs_diff_flax_vs_keras_jax"] = float(
        np.abs(np.asarray(flax_fn(f["variables"], x)) - ref).max())
    out[b]["max_abs_diff_fast_vs_keras_jax"] = float(
        np.abs(np.asarray(fast_fn(f["folded"], x)) - ref).max())
  return out


def onnx_session(tf_fn: Any, input_shape: tuple[int, ...]) -> tuple[Any, str]:
  """``tf_fn`` (a ``tf.function`` of one NHWC float32 batch) converted by
  tf2onnx (batch dimension left free), as an ONNX Runtime session on the CPU
  provider with one thread per core; and the input's name. Raises
  ImportError without ``benchmarks/requirements.txt``."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  try:  # tf2onnx 1.17 predates numpy 2; Keras' own ONNX export patches it
    from keras.src.export.tf2onnx_lib import patch_tf2onnx  # pylint: disable=g-import-not-at-top
    patch_tf2onnx()
  except ImportError:
    pass
  spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="x"),)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.onnx")
    tf2onnx.convert.from_function(tf_fn, input_signature=spec, opset=17,
                                  output_path=path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session = ort.InferenceSession(path, options,
                                   providers=["CPUExecutionProvider"])
  return session, session.get_inputs()[0].name


def worker_tf(name: str, batches: list[int], reps: int,
              tf2jax_batches: list[int] | None = None) -> dict:
  """Keras on TF in a tf.function vs the Flax inference form (CPU fast path),
  tf2jax (the generic converter of that tf.function) and ONNX Runtime (that
  tf.function through tf2onnx), interleaved in one process; plus the Keras
  build and translate-step times. tf2jax runs only at ``tf2jax_batches``
  (all if None): it is the slowest peer by far."""
  os.environ["KERAS_BACKEND"] = "tensorflow"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  keras_model, build_s = _keras_model(name)
  f = _flax_forms(name, keras_model)
  out = {"keras_build_s": build_s, "translate_s": f["translate_s"]}
  fast_fn = jax.jit(f["inference"].apply)
  tf_fn = tf.function(lambda x: keras_model(x, training=False))
  try:
    import tf2jax  # pylint: disable=g-import-not-at-top
  except ImportError:  # benchmarks/requirements.txt
    tf2jax = None
  ort_session = None
  try:
    start = time.perf_counter()
    ort_session, ort_input = onnx_session(tf_fn, _input_shape(name))
    out["ort_convert_s"] = time.perf_counter() - start
  except ImportError:  # benchmarks/requirements.txt
    pass
  except Exception as e:  # pylint: disable=broad-except
    out["ort_error"] = f"{type(e).__name__}: {e}"[:200]
  for b in batches:
    x_np, x = _inputs(name, b)
    x_tf = tf.constant(x_np)
    fns = {"keras_tf": lambda: tf_fn(x_tf).numpy(),
           "flax_fast": lambda: fast_fn(f["folded"], x).block_until_ready()}
    if ort_session is not None:
      fns["ort"] = lambda: ort_session.run(None, {ort_input: x_np})
    ref = tf_fn(x_tf).numpy()
    out[b] = {}
    t2j_ok = tf2jax is not None and (tf2jax_batches is None
                                     or b in tf2jax_batches)
    if t2j_ok:
      start = time.perf_counter()
      try:
        t2j_fn, t2j_params = tf2jax.convert(tf_fn, np.zeros_like(x_np))
      except Exception as e:  # pylint: disable=broad-except
        out[b]["tf2jax_error"] = f"{type(e).__name__}: {e}"[:200]
        t2j_ok = False
    if t2j_ok:
      out[b]["tf2jax_convert_s"] = time.perf_counter() - start
      t2j_params = jax.device_put(t2j_params)
      t2j_jit = jax.jit(t2j_fn)
      fns["tf2jax"] = lambda: jax.block_until_ready(t2j_jit(t2j_params, x))
    _warm(fns)
    out[b].update(_interleaved(fns, reps))
    out[b]["max_abs_diff_fast_vs_keras_tf"] = float(
        np.abs(np.asarray(fast_fn(f["folded"], x)) - ref).max())
    out[b]["keras_tf_max_abs_logit"] = float(np.abs(ref).max())
    if t2j_ok:
      out[b]["max_abs_diff_tf2jax_vs_keras_tf"] = float(
          np.abs(np.asarray(jax.tree.leaves(t2j_jit(t2j_params, x))[0])
                 - ref).max())
    if ort_session is not None:
      out[b]["max_abs_diff_ort_vs_keras_tf"] = float(
          np.abs(ort_session.run(None, {ort_input: x_np})[0] - ref).max())
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


def _worker(kind: str, name: str, batches: list[int], reps: int,
            **kwargs) -> dict:
  code = (f"import sys, json; sys.path.insert(0, {ROOT!r}); "
          f"from benchmarks import run; "
          f"print('RESULT' + json.dumps(run.worker_{kind}({name!r}, "
          f"{batches!r}, {reps}, **{kwargs!r})))")
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


def default_models() -> list[str]:
  """The first registered model of every family (new families included as
  they register), then the users' models."""
  import models  # pylint: disable=g-import-not-at-top
  first: dict[str, str] = {}
  for name in models.list_models():
    first.setdefault(models.get_spec(name).family, name)
  return list(first.values()) + list(USER_MODELS)


# What was tried for the CPU fast path besides what the tables measure, with
# the numbers that decided it (paired interleaved probes on this machine under
# the same load; "ratio" = with / without, median over 11-25 pairs).
TRIED = """\
## What the CPU fast path does, and what was tried

`models.create(name, inference=True)` with `translate.fold_batchnorm`
variables, under `jax.jit`, on CPU (chosen per platform at lowering time with
`jax.lax.platform_dependent`; GPU/TPU lowerings and the TFLite export keep the
native convolutions). The convolution forms below are `models.conv_forms`:
depthwise, 1x1 and im2col at outputs of at most 14x14 are what every
module's convolutions take on CPU, in training too (see the training-step
section); tap dots, Eigen's convolution, space-to-depth stems and strided
im2col are the inference form's only (`conv_forms.inference_forms()`:
their backward passes are slow), as are the BatchNorm folding and the
per-image loop. Probes below are paired and interleaved in one process
(medians of 7–21 pairs) on the same shared 2-core machine at load 7–10; where
wall time was swamped by the load, the decision used the CPU time the
process spent per call ("CPU ratio", with / without):

- depthwise convolutions (`nn.Conv` with one group per channel, and the
  depthwise step of `SeparableConv2D`) as `kh*kw` shifted strided slices times
  per-channel weights, which XLA fuses into one loop: kept. MobileNetV2
  batch 1, folded: 24 → 18.5 ms in one probe, 132 → 19.7 ms in another (the
  native grouped convolution is XLA CPU's slow path); max |Δ| 4e-6;
- batches of more than one image as a `lax.map` over single images, so each
  image's activations stay in cache: kept, except for EfficientNetV2. Batch
  8, CPU time whole batch / per image: vgg16 2.30, inceptionv3 1.43,
  xception 1.30, regnetx002 1.21, resnet50 1.10 (with im2col; on the quiet
  machine, wall 1.09 and CPU 1.07), resnetrs50 1.00; earlier wall-time probes: mobilenetv2 2.4, efficientnetb0 1.33.
  efficientnetv2b0 0.80 (its fused-MBConv stages run dense 3x3
  convolutions on few channels at 112x112 and 56x56, which batch better), so
  EfficientNetV2 runs its batch whole (`inference._WHOLE_BATCH`);
- two images per step of that loop instead of one (batch 8, quiet machine,
  wall / CPU ratio two against one): resnet50 0.92 / 0.92, resnetrs50 0.85 /
  0.84, mobilenetv2 0.86 / 0.87, efficientnetb0 0.88 / 0.89, densenet121
  0.89 / 0.90, regnetx002 1.00 / 0.98, inceptionresnetv2 1.05 / 1.04,
  xception 1.15 / 1.11, inceptionv3 1.17 / 1.09, vgg16 4.07 / 4.32; four per
  step was no better anywhere (resnetrs50 0.86, the rest 0.94–2.86). Kept for
  the five families that gained (an odd last image runs alone); with the
  inference-only forms below, re-measured (third session): nasnetmobile
  0.86, mobilenet 0.86, mobilenetv3large 0.81, mobilenetv3small 0.88
  (whole batch 0.64–0.67, four per step 0.66), mobilenetv2 0.78,
  convnexttiny 0.95, regnetx002 0.97 (CPU 0.93), inceptionv3 0.94–0.98,
  xception 1.02, inceptionresnetv2 0.98 (CPU 1.00): two per step is now
  the default, one for the families in `inference._ONE_PER_STEP`
  (Xception, InceptionResNetV2, VGG);
- 1x1 stride-1 convolutions as `dot_general`: kept. Batch 1, dot / conv:
  resnet50 0.84 (IQR 0.81–0.86), mobilenetv2 0.91, efficientnetb0 0.93;
- im2col (the `kh*kw` shifted windows concatenated along channels) and one
  `dot_general`, for one-group convolutions other than 1x1 stride 1: kept
  where the output has at most 14x14 = 196 pixels. In isolation at batch 1
  (wall, with / native): 3x3 at 7x7x512 0.66–0.74, at 14x14x256 0.60–1.07,
  at 14x14x512 0.91, at 10x10x512 1.89 (one noisy probe), at 28x28x128 1.38,
  at 56x56x64 4.04; ResNet's 7x7 stride-2 stem 2.53; a 1x1 stride-2
  shortcut as a strided slice and a dot 0.40–0.90 at ≤ 28x28 outputs, 4.4 at
  56x56. In the model (CPU ratio): resnet50 0.88 at batch 1 (twice), 0.90
  at batch 8; thresholds 49 and 784 pixels gave 0.88 and 0.90 too;
  inceptionv3 0.98–1.03, xception 0.99–1.01, vgg16 1.00, regnetx002
  1.00–1.02, resnetrs50 0.99 (neutral). Summing `kh*kw` dots over shifted
  windows instead of one im2col dot: 1.02–28x native, never better;
- Xception's `SeparableConv2D` pointwise step as `dot_general`: 0.54–0.92 in
  isolation (19x19x728, 10x10x1536→2048), but CPU ratio 1.04 in the whole
  model at batch 1: not kept (it stays a native 1x1 convolution, which XLA
  already runs as a matrix product);
- RegNet's grouped 3x3 convolutions (group width 8): a block-diagonal dense
  kernel through im2col, 0.80 on the first stage's 3 groups but 2.0–6.8 on
  the later ones; an einsum over groups of im2col patches, 1.02–1.37. The
  native grouped convolution (not XLA CPU's slow path at 8 channels per
  group, unlike depthwise) is kept;
- XLA CPU options of this jaxlib (`XLA_FLAGS`: `xla_cpu_use_onednn`,
  `xla_cpu_experimental_{xnn,ynn,onednn}_fusion_type=…CONVOLUTION,…DOT`,
  `xla_cpu_use_xnnpack`) on a 3x3 conv + matmul at batch 8: none faster than
  the default (39.6 ms default; 42.6–68.2 ms with an option); XLA already
  runs dots through its YNNPACK fusion. Not adopted (and a flag cannot be
  chosen per model anyway);
- Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions (16 strided slices
  and sums as the input transform, one batched `dot_general` of 16
  products, the output transform; 2.25x fewer multiplies, relative error
  8e-7): slower than XLA's native convolution at every shape probed (wall /
  CPU ratio against native, batch 1): 56x56x64 1.41 / 1.43, 56x56x256
  1.30 / 1.25, 112x112x128 1.66 / 1.80, 35x35x96 2.22 / 2.19, 28x28x512
  2.98 / 3.14, 17x17x192 4.90 / 4.90; batch 8 at 28x28x256 1.35 / 1.38. XLA
  CPU's native dense convolution already runs near the cores' peak here;
  not kept (probe of 2026-11-27, second session, under a test run's load:
  paired, CPU-time ratios agree with wall);
- why XLA CPU's native convolution lost (third session of 2026-11-27, quiet
  machine): this jaxlib hands convolutions to YNNPACK, which splits the
  work by blocks of 64 output channels, so a convolution with at most 64
  runs on one thread (56x56x64 3x3 at batch 2: 2.10 ms wall, 2.08 ms CPU;
  with `xla_cpu_experimental_ynn_fusion_type=""`, Eigen's convolution:
  1.37 ms wall, 2.47 ms CPU). XLA's YNNPACK matcher skips a convolution
  whose output is larger than its input; one per-model flag cannot be
  chosen per convolution, but a convolution computed one row taller can.
  Per convolution, every distinct one of a model timed alone in the loop's
  shape (batch 8, medians of 5–7, wall ms, form / native):
  - Eigen's form (`native_conv_eigen`, the taller convolution): Inception's
    149x149x32→32 stem 23.7 / 49.0, 147x147x32→64 46.8 / 59.5 and
    73x73x80→192 37.4 / 58.7, its 5x5 at 35x35 4.9 / 6.5, 1x7 and 7x1 at
    17x17 0.73–0.82 of native; ResNet-RS's 80x80 stem 6.4 / 9.2, Xception's
    149x149 stem 41.7 / 66.0, EfficientNetV2's 56x56x32→128 5.9 / 9.2. It
    lost where YNNPACK already uses both threads on heavy convolutions
    (VGG16's 224x224x64 169 / 152, 112x112x128 113 / 99; 1.8 G
    multiply-adds per image), and at 16 outputs (112x112x32→16 8.0 / 6.2):
    kept for stride-1 kxk with 16+ inputs, 32+ outputs and at most 800 M
    multiply-adds per image. In VGG16's first convolution (3 inputs) it was
    1.07–1.13 of native in the model, hence 16+ inputs;
  - tap dots (`conv_tap_dots`: one `dot_general` to every tap's outputs,
    `(h, w, c) @ (c, 9 * o)`, then nine shifted slices summed): 3x3 with
    64+ inputs and at most 64 outputs up to 56x56 (ResNet's first stage
    5.5 / 8.9 alone, DenseNet's 128→32 at 56x56 5.9 / 9.6 and 28x28 1.6 /
    2.5); better than Eigen's form there (DenseNet 56x56: 8.7), worse
    elsewhere (147x147: 1.0–1.4 of native; 35x35 3x3 with 48 inputs 1.15);
  - space-to-depth for stride-2 stems on 3 channels (`conv_space_to_depth`:
    each 2x2 block one pixel of 12 channels, the kernel zero-padded to even
    size, a stride-1 convolution in Eigen's form): ResNet's 7x7 stem 11.2 /
    20.6, Inception's 3x3 stem 7.3 / 13.7 (im2col 9.5), 225x225 4.1 / 7.6;
    in the model resnet50 0.97 (batch 1) / 0.99 (batch 8), the others
    level;
  - im2col for strided convolutions up to 3x3 at any size: Inception's
    35x35x288→384 reduction 13.6 / 17.5, 1x1 stride-2 shortcuts 0.57–0.73
    (74x74, 37x37, 56x56); not for 7x7;
  - in the whole model, all four against none (inference form, batch 1 /
    batch 8, wall): inceptionv3 0.76 / 0.77, inceptionresnetv2 0.86 / 0.85,
    xception 0.89 / 0.92, densenet121 0.93 / 0.81, resnetrs50 0.94 / 0.91,
    regnetx002 0.87 / 0.93, efficientnetv2b0 0.93 / 0.86, mobilenetv2 0.92
    / 0.81, efficientnetb0 0.98 / 0.91, nasnetmobile 0.95 / 0.96, resnet50
    0.95–0.98 / 0.98, vgg16 and convnexttiny 1.00 (unchanged programs);
  - in training they were slow: a ResNet50 step 2.37x Keras-JAX's
    (0.81x without them), InceptionV3's 3.39x; hence inference only;
  - with them InceptionV3's loop gains from two images per step (0.94–0.98
    of one; 1.17 before); Xception (1.02) and InceptionResNetV2 (0.98)
    stay at one;
  - not kept: a grouped convolution over row bands stacked along channels
    (to give YNNPACK more output channels): 4–10x slower, XLA CPU's grouped
    path; splitting rows or the batch into separate convolutions (XLA ran
    them one after the other): 1.0–1.6x; NCHW: 40–140x;
- fourth session (wall ratios, with / without, interleaved in one
  process; load 1–2):
  - the head on the whole batch (`inference.Inference`: the per-image loop
    stops at the first layer that takes flat `(batch, features)` inputs,
    and the head runs once after it, so its weights are read once, not
    once a step): VGG16 0.90 at batch 8 (its 400 MB `fc1` was read eight
    times), the others level (resnet50 1.01, mobilenetv2 1.00); with it,
    VGG16's two images per step are level with one (1.00; 4.1 with the
    head in the loop), Xception 1.02, InceptionResNetV2 0.97: kept at one;
  - max and average pooling as strided slices, one axis at a time
    (`conv_forms.pool_separable`), instead of XLA CPU's `reduce_window`:
    0.10–0.24 of its time in isolation at Inception's and ResNet's shapes
    (batch 2), bit-identical maxima; in the model (batch 1 / 8):
    inceptionv3 0.89 / 0.88, vgg16 0.88 / 0.88, nasnetmobile 0.88 / 0.86,
    densenet121 0.97 / 0.94, xception 0.99 / 0.95, resnet50 0.98 / 0.98,
    resnetrs50 level. InceptionResNetV2 was 1.05 slower: XLA fused its
    chain of 20 residual sums into the pool after them (one fusion, 6.6 ms
    per image); a `reduce_window` along the rows avoided that (0.98) but
    lost NASNet's gain (0.95), so the chain itself was fixed (next item)
    and the slices kept everywhere (NASNet 0.87 of the rows variant's time);
  - a residual block's output computed once (`conv_forms.materialize`):
    XLA CPU fuses `relu(shortcut + f(x))` into each consumer, the next
    block's sum included, so each block recomputed every earlier block's
    sum in its stage (InceptionResNetV2's 20th block17 fusion read 20
    convolution outputs; ResNet50's up to 6). `optimization_barrier` is
    dropped before fusion on CPU; a `lax.cond` whose branches both return
    the value makes it a buffer. In the model (batch 1 / 8):
    inceptionresnetv2 0.89 / 0.87, resnet50 0.89 / 0.97, resnetrs50 0.97 /
    0.94, regnetx002 0.99 / 0.98; level or worse, so not used there:
    resnet50v2 1.01 / 1.01, xception 0.99 / 1.00, mobilenetv2 1.03 (batch
    8), efficientnetb0 0.99, efficientnetv2b0 1.00 / 1.02, convnexttiny
    1.01;
  - not kept: XLA's YNNPACK fusion of elementwise ops
    (`xla_cpu_experimental_ynn_fusion_type` with `…ELTWISE`, to fuse the
    bias and ReLU into the matrix products): ResNet50 1.13 at batch 8;
    different images per loop step per stage (the stem and first stage at
    two, the rest at four or eight): 1.02–1.07; an `optimization_barrier`
    on the block outputs: no effect (removed before fusion).

Where Keras TF still wins (this run, load 1.0–1.8; wall / CPU-time
ratio): every named target is met at both batch sizes, ResNet50's batch 8
included (0.93 / 0.95; 1.00 in the table before this session's pools and
block outputs). Behind, none of them a named target: at batch 1 VGG16
(1.08 / 1.01) and Xception (1.07 / 1.00), level in CPU time; at batch 8
InceptionV3 (1.09 / 1.10; 1.37 before), VGG16 (1.24 / 1.20; 1.34),
Xception (1.21 / 1.10; 1.27), InceptionResNetV2 (1.25 / 1.23), RegNetX002
(1.09 / 0.94) and NASNetMobile (1.01 / 0.94; 1.09). Their work is dense
convolutions and matrix products, where TF's oneDNN kernels are faster per
convolution than XLA's (VGG16's 3x3 convolutions 1.05–1.5x TF's time each;
Inception's 3x3 stride-2 stem 2–3x even in the best form here) and batch
the 8 images: TF's time per image falls from batch 1 to 8 (ResNet50 30 →
21.5 ms), the per-image loop's stays (23 → 22 ms), and two cores at about
350 GFLOP/s on ResNet50 leave little to win per convolution. Tried before
this session and not kept: running ResNet50's last stages on the whole
batch after the per-image loop (from conv5 0.977 wall / 0.978 CPU over 21
pairs, from conv4 1.00, from conv3 1.01, from inside a stage 1.7, the
residual's input computed twice); the 3x3 stride-2 max pool as nine 2-D
strided slices and a maximum (1.58 and 1.60x `reduce_window`'s time at
114x114 and 147x147; one axis at a time, this session, 0.10–0.18x).
"""


def _targets(results: dict, batches: list[int]) -> list[str]:
  """One line per (model, target): met, or missed by how much."""
  lines = ["## Against the target: Flax fast / Keras TF ≤ 1.0", ""]
  for name, r in results.items():
    for b in batches:
      j, t = r["jax"].get(b, {}), r["tf"][b]
      vs_tf = t["flax_fast"] / t["keras_tf"]
      verdict = ("met" if vs_tf <= 1.0 else
                 f"missed by {100 * (vs_tf - 1):.0f}%")
      stretch = " (stretch ≤ 0.8 met)" if vs_tf <= 0.8 else ""
      if "keras_jax" in j:
        vs_jax = j["flax_fast"] / j["keras_jax"]
        jv = f"= {vs_jax:.2f}, ≤ 1.0 " + (
            "met" if vs_jax <= 1.0 else
            f"missed by {100 * (vs_jax - 1):.0f}%") + (
                f" (CPU time ratio "
                f"{j['flax_fast_cpu'] / j['keras_jax_cpu']:.2f})"
                if "keras_jax_cpu" in j else "")
      elif not j:
        jv = "— (not timed at this batch)"
      else:
        jv = "— (no Keras 3 model: tf-keras only)"
      cpu = (f" (CPU time ratio {t['flax_fast_cpu'] / t['keras_tf_cpu']:.2f})"
             if "keras_tf_cpu" in t else "")
      lines.append(f"- {_label(name, r)} batch {b}: Flax fast / Keras TF = "
                   f"{vs_tf:.2f}, ≤ 1.0 {verdict}{stretch}{cpu}; fast / "
                   f"Keras-JAX {jv}.")
  return lines


def _label(name: str, r: dict) -> str:
  """The model's name, with † if its row comes from an earlier run."""
  return f"{name} †" if r.get("earlier") else name


def _relative(t: dict) -> str:
  """max |Δ| / max(1, max |Keras logit|) (random weights give large logits)."""
  if "keras_tf_max_abs_logit" not in t:
    return f"{t['max_abs_diff_fast_vs_keras_tf']:.1e} (abs)"
  top = t["keras_tf_max_abs_logit"]
  rel = t["max_abs_diff_fast_vs_keras_tf"] / max(1.0, top)
  if top > 100:  # uncalibrated weights, or no BatchNorm to calibrate (VGG)
    return f"{rel:.1e} (logits up to {top:.0f})"
  return f"{rel:.1e}"


def _sections(text: str) -> list[tuple[str, str]]:
  """``[(title, text)]`` of each ``## `` section; the preamble's title is
  ''."""
  out, title, lines = [], "", []
  for line in text.splitlines(keepends=True):
    if line.startswith("## "):
      out.append((title, "".join(lines)))
      title, lines = line.strip(), []
    lines.append(line)
  out.append((title, "".join(lines)))
  return out


def write_results(path: str, text: str) -> None:
  """Writes ``text`` to ``path``, keeping the sections of the file there
  that ``text`` does not have (other benchmarks' results: the training
  step, the recurrent TFLite files), after this run's own."""
  new_titles = {t for t, _ in _sections(text)}
  kept = []
  if os.path.exists(path):
    with open(path) as f:
      kept = [body for t, body in _sections(f.read())
              if t and t not in new_titles]
  if kept:
    text = text.rstrip("\n") + "\n\n" + "".join(kept).rstrip("\n") + "\n"
  with open(path, "w") as f:
    f.write(text)


def render(results: dict, batches: list[int], load: tuple[float, ...] = (),
           date: str | None = None, note: str | None = None) -> str:
  """RESULTS.md text."""
  lines = [
      "# Benchmarks", "",
      f"Measured {date or datetime.date.today().isoformat()} on {_machine()}; "
      f"{_versions()}.",
  ]
  if load:
    lines.append("Machine load (1-minute load average, sampled before and "
                 "after each model): " + ", ".join(f"{v:.1f}" for v in load)
                 + f" on {os.cpu_count()} cores (the run itself keeps up "
                 f"to {os.cpu_count()} busy; more means other jobs shared "
                 "the cores and inflated the times); the ratios are side by "
                 "side in one process.")
  if note:
    lines.append(note)
  lines += [
      "Medians of interleaved repetitions, every variable and input "
      "`jax.device_put` first; ratios are project / peer, lower is better "
      "(≤ 1.0 means the project is at least as fast). \"Flax fast\" is "
      "`models.create(name, inference=True)` with `translate.fold_batchnorm` "
      "variables under `jax.jit` (the CPU fast path, chosen automatically).",
      "", "## Inference against Keras on TensorFlow (ms per batch)", "",
      "One process: Keras TF (`model(x, training=False)` in a `tf.function`), "
      "the Flax fast form and tf2jax (the generic converter of that "
      "`tf.function`, under `jax.jit`), interleaved.", "",
      "| model | batch | Flax fast | Keras TF tf.function | tf2jax jit | "
      "Flax fast / Keras TF | Flax fast / tf2jax | tf2jax / Keras TF | "
      "tf2jax convert (s) | max relative Δ fast vs Keras TF | "
      "CPU time: Flax fast / Keras TF |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    for b in batches:
      t = r["tf"][b]
      t2j = t.get("tf2jax")
      lines.append(
          f"| {_label(name, r)} | {b} | {t['flax_fast'] * 1e3:.1f} | "
          f"{t['keras_tf'] * 1e3:.1f} | "
          + (f"{t2j * 1e3:.1f}" if t2j else "—") + " | "
          f"**{t['flax_fast'] / t['keras_tf']:.2f}** | "
          + (f"{t['flax_fast'] / t2j:.2f} | {t2j / t['keras_tf']:.2f} | "
             f"{t['tf2jax_convert_s']:.1f}" if t2j else
             "— | — | " + ("fails¹" if "tf2jax_error" in t else "—"))
          + f" | {_relative(t)} | " + (
              f"{t['flax_fast_cpu'] / t['keras_tf_cpu']:.2f} |"
              if "keras_tf_cpu" in t else "— |"))
  earlier = sorted({r["earlier"] for r in results.values()
                    if r.get("earlier")})
  if earlier:
    lines += ["", "† " + " ".join(earlier)]
  errors = sorted({t["tf2jax_error"] for r in results.values()
                   for t in (r["tf"][b] for b in batches)
                   if "tf2jax_error" in t})
  if errors:
    lines += ["", "¹ tf2jax.convert raised: " + "; ".join(
        f"`{e}`" for e in errors)]
  lines += [
      "", "## Inference against ONNX Runtime (ms per batch)", "",
      "The same process as the table above: the Keras model's "
      "`tf.function` converted by tf2onnx (opset 17, batch dimension free), "
      "ONNX Runtime's CPU provider with all graph optimizations and "
      f"{os.cpu_count()} intra-op threads (one per core), interleaved with "
      "Keras TF and the Flax fast form.", "",
      "| model | batch | Flax fast | ONNX Runtime | Keras TF | "
      "Flax fast / ORT | ORT / Keras TF | CPU time: Flax fast / ORT | "
      "tf2onnx convert (s) | max relative Δ ORT vs Keras TF |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    for b in batches:
      t, ort_s = r["tf"][b], r["tf"][b].get("ort")
      if not ort_s:
        lines.append(f"| {_label(name, r)} | {b} | "
                     f"{t['flax_fast'] * 1e3:.1f} | "
                     + ("fails²" if "ort_error" in r["tf"] else "—")
                     + f" | {t['keras_tf'] * 1e3:.1f} | — | — | — | — | — |")
        continue
      top = max(1.0, t.get("keras_tf_max_abs_logit", 1.0))
      lines.append(
          f"| {_label(name, r)} | {b} | {t['flax_fast'] * 1e3:.1f} | "
          f"{ort_s * 1e3:.1f} | {t['keras_tf'] * 1e3:.1f} | "
          f"**{t['flax_fast'] / ort_s:.2f}** | "
          f"{ort_s / t['keras_tf']:.2f} | "
          + (f"{t['flax_fast_cpu'] / t['ort_cpu']:.2f}"
             if "ort_cpu" in t else "—")
          + f" | {r['tf'].get('ort_convert_s', 0.0):.1f} | "
          f"{t['max_abs_diff_ort_vs_keras_tf'] / top:.1e} |")
  ort_errors = sorted({r["tf"]["ort_error"] for r in results.values()
                       if "ort_error" in r["tf"]})
  if ort_errors:
    lines += ["", "² tf2onnx or ONNX Runtime raised: " + "; ".join(
        f"`{e}`" for e in ort_errors)]
  lines += [
      "", "## Inference against Keras on JAX (ms per batch)", "",
      "One process: the plain Flax port, the Flax fast form and Keras 3 on "
      "the JAX backend (`stateless_call` under `jax.jit`: same compiler), "
      "interleaved.", "",
      "| model | batch | Flax jit | Flax fast | Keras-JAX stateless_call jit "
      "| Flax / Keras-JAX | Flax fast / Keras-JAX |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    for b in batches:
      if b not in r["jax"]:
        continue  # the slow peers are timed at small batches only
      j = r["jax"][b]
      kj = j.get("keras_jax")
      lines.append(
          f"| {_label(name, r)} | {b} | {j['flax'] * 1e3:.1f} | "
          f"{j['flax_fast'] * 1e3:.1f} | "
          + (f"{kj * 1e3:.1f} | {j['flax'] / kj:.2f} | "
             f"{j['flax_fast'] / kj:.2f} |" if kj else
             "— (tf-keras only) | — | — |"))
  lines += ["", "## Translation and CLI", "",
            "| model | Keras build (s) | translate step (s) | CLI wall (s) | "
            "Keras build+predict process (s) | CLI / peer | CLI peak RSS |",
            "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    t, c = r["tf"], r.get("cli")
    lines.append(
        f"| {_label(name, r)} | {t['keras_build_s']:.2f} | "
        f"{t['translate_s']:.2f} | "
        + (f"{c['cli_s']:.1f} | {c['peer_s']:.1f} | "
           f"{c['cli_s'] / c['peer_s']:.2f} | "
           f"{c['cli_peak_rss'] / 2**30:.2f} GiB |" if c else
           "— | — | — | — |"))
  lines += ["", *_targets(results, batches), "", TRIED]
  return "\n".join(lines).rstrip("\n") + "\n"


def _batch_list(flag: str, text: str) -> list[int]:
  """Sorted positive batch sizes of a comma-separated flag, or exit with
  one error line."""
  try:
    batches = sorted({int(b) for b in text.split(",") if b.strip()})
  except ValueError:
    batches = []
  if not batches or batches[0] < 1:
    sys.exit(f"error: {flag} {text!r}: give positive integers separated by "
             f"commas, e.g. {flag} 1,8,32")
  return batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=None,
                      help="comma-separated; default: the first registered "
                      "model of every family")
  parser.add_argument("--cli_models", default=",".join(DEFAULT_MODELS),
                      help="models whose CLI wall time and RSS are measured")
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--batches", default="1,8,32",
                      help="comma-separated batch sizes")
  parser.add_argument("--slow_peer_batches", default="1,8",
                      help="the batches (of --batches) at which the slow "
                      "peers, Keras-JAX and tf2jax, are timed too (seconds "
                      "a call at batch 32 for some families)")
  parser.add_argument("--quick", action="store_true",
                      help="batch 1 only, few repetitions")
  parser.add_argument("--output",
                      default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
  parser.add_argument("--json", default=None,
                      help="also write the raw measurements here (JSON)")
  parser.add_argument("--render_from", default=None,
                      help="render --output from a --json file of an "
                      "earlier run (measures nothing)")
  args = parser.parse_args()
  if args.render_from:
    with open(args.render_from) as f:
      saved = json.load(f)
    results = {n: {kind: ({(int(k) if k.isdigit() else k): v
                           for k, v in r.items()}
                          if kind in ("jax", "tf") else r)
                   for kind, r in res.items()}
               for n, res in saved["results"].items()}
    text = render(results, saved["batches"], tuple(saved["load"]),
                  saved.get("date"), saved.get("note"))
    write_results(args.output, text)
    print(text)
    return
  import models  # pylint: disable=g-import-not-at-top
  names = ([n.lower() for n in args.models.split(",") if n] if args.models
           else default_models())
  known = [*models.list_models(), *USER_MODELS]
  unknown = [n for n in names if n.lower() not in known]
  if unknown:
    sys.exit(f"error: unknown model(s) {unknown}; registered: "
             f"{', '.join(known)}")
  batches = _batch_list("--batches", args.batches)
  slow_peer_batches = _batch_list("--slow_peer_batches",
                                  args.slow_peer_batches)
  cli_models = {n for n in args.cli_models.split(",") if n}
  reps = args.reps or (3 if args.quick else 9)
  if args.quick:
    batches = slow_peer_batches = [1]
  jax_batches = [b for b in batches if b in slow_peer_batches] or batches[:1]
  results = {}
  load = [os.getloadavg()[0]]
  for name in names:
    print(f"benchmarking {name} …", flush=True)
    results[name] = {
        "jax": _worker("jax", name, jax_batches, reps),
        "tf": _worker("tf", name, batches, reps,
                      tf2jax_batches=slow_peer_batches),
    }
    if name in cli_models:
      results[name]["cli"] = measure_cli(name, 1 if args.quick else 3)
    load.append(os.getloadavg()[0])
    print(json.dumps({name: results[name]}, default=str), flush=True)
    text = render(results, batches, tuple(load))
    # After each model: a long run that is stopped still leaves a table.
    write_results(args.output, text)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"results": results, "batches": batches, "load": load,
                   "date": datetime.date.today().isoformat()}, f)
  print(text)


if __name__ == "__main__":
  main()
