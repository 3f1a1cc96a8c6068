"""TFLite export through jax2tf: parity, builtin ops, vmapped functions,
quantization, the CLI."""

import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import traverse_util

import models
import translate
from models import layers as L
from translate import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export_model(name, **kwargs):
  spec = models.get_spec(name)
  shape = kwargs.get("input_shape", spec.input_shape)
  conv = translate.convert(name, weights="random", seed=1,
                           classifier_activation=None, **kwargs)
  flatbuffer = export.export_tflite(conv.module.apply, conv.variables,
                                    [((1, *shape), np.float32)])
  return conv, flatbuffer, shape


@pytest.mark.slow  # README tier: MobileNetV2's export, the graphs' and
# transposed convolutions' TFLite parity
def test_float32_export_matches_flax_within_tolerance():
  conv, flatbuffer, shape = _export_model("resnet50")
  x = np.asarray(models.preprocess(
      "resnet50", translate.random_images(shape, 2, seed=3)))
  interp = export.load_interpreter(flatbuffer)
  out = np.concatenate([export.run_tflite(interp, x[i:i + 1])[0]
                        for i in range(2)])
  ref = np.asarray(conv.module.apply(conv.variables, x))
  c = export.compare(out, ref)
  assert c["max_rel"] <= translate.TOLERANCE, c
  ops = export.tflite_ops(flatbuffer)
  assert ops["CONV_2D"] == 53 and ops["FULLY_CONNECTED"] == 1
  # ResNet50's only multiplications are BatchNorm's: all folded away.
  assert not {"MUL", "RSQRT", "SUB", "DIV"} & set(ops), ops


def _default_export_models():
  """One model per family and preprocessing variant (ResNet v1 and v2
  differ: pre-activation BatchNorms that follow no convolution): the
  first registered. The others repeat the same blocks deeper or wider, so
  their graphs hold no op kind the first one lacks; exporting all 71 would
  cost CI about 40 minutes.
  """
  seen, keep = set(), []
  for name in models.list_models():
    spec = models.get_spec(name)
    key = (spec.family, spec.preprocess)
    if key not in seen:
      seen.add(key)
      keep.append(name)
  return keep


# Families whose export runs in the README tier (a depthwise CNN); the
# others' (7-100 s each on 2 cores), ResNet50's with its float32 parity
# test above, in the slow tier.
README_TIER_EXPORTS = ("mobilenetv2",)


def _param(name):
  slow = models.get_spec(name).slow or name not in README_TIER_EXPORTS
  return pytest.param(name, marks=[pytest.mark.slow] if slow else [],
                      id=name)


@pytest.mark.parametrize("name", [_param(n) for n in _default_export_models()])
def test_exported_graph_is_builtin_with_batchnorm_folded(name):
  """Builtin ops only; convolutions are CONV_2D / DEPTHWISE_CONV_2D; and no
  BatchNorm arithmetic is left for the BatchNorms that follow a convolution.

  Two criteria, both read from the flatbuffer:

  1. Structural: no MUL/ADD/SUB/DIV takes a convolution's output and a
     constant (``export.unfolded_affine_ops``), which is what an unfolded
     BatchNorm is; residual ADDs, swish and squeeze-excite MULs take two
     computed tensors and are not counted.
  2. A count: an unfolded BatchNorm costs a MUL. The legitimate MULs are one
     per sigmoid (swish and squeeze-excite gates: LOGISTIC + MUL), one per
     mean (jnp.mean lowers to SUM then MUL by 1/n: squeeze-excite and
     global average pooling), one per BatchNorm that follows no convolution
     (DenseNet's and ResNetV2's pre-activations) and at most 3 for the
     input normalization; a model whose conv-BatchNorm pairs were not
     folded exceeds that by one per pair. No RSQRT/SQRT is left at all
     (the variances are constants).
  """
  conv, flatbuffer, _ = _export_model(name)
  ops = export.tflite_ops(flatbuffer)
  assert not [o for o in ops if o.startswith("CUSTOM")], ops
  assert ops["CONV_2D"] > 0
  flat = traverse_util.flatten_dict(conv.variables)
  # SeparableConv2D (Xception, NASNet) is one depthwise and one pointwise
  # convolution: its depthwise_kernel and pointwise_kernel leaves.
  separable = sum(1 for k in flat if k[-1] == "depthwise_kernel")
  has_depthwise = separable > 0 or any(
      v.shape[-2] == 1 and v.shape[-1] > 1 for k, v in flat.items()
      if k[-1] == "kernel" and v.ndim == 4)
  assert (ops["DEPTHWISE_CONV_2D"] > 0) == has_depthwise
  n_conv = sum(1 for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4
               ) + 2 * separable
  assert ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"] == n_conv, ops
  assert export.unfolded_affine_ops(flatbuffer) == []
  pairs = translate.conv_bn_pairs(conv.module, conv.variables,
                                  models.get_spec(name).input_shape)
  n_bn = sum(1 for k in flat if k[0] == "batch_stats" and k[-1] == "mean")
  # Hard-sigmoid gates (MobileNetV3): relu6(conv + 3) * (1 / 6), then the
  # gate: two MULs each, the first by a constant after a RELU6-fused conv.
  graph = export.tflite_graph(flatbuffer)
  producers = graph.producers()
  hard_sigmoids = sum(
      1 for op in graph.ops if op.name == "MUL" and any(
          producers.get(t) is not None
          and producers[t].fused_activation == "RELU6"
          for t in op.inputs) and set(op.inputs) & graph.constants)
  allowed = ops["LOGISTIC"] + 2 * hard_sigmoids + ops["SUM"] + ops["MEAN"] + (
      n_bn - len(pairs)) + 3
  if n_bn:  # a model without BatchNorm (ConvNeXt: LayerNorm) folds nothing
    assert ops["MUL"] <= allowed, (ops, len(pairs), n_bn)
    assert ops["RSQRT"] == 0 and ops["SQRT"] == 0
  else:
    assert not pairs


def test_unfolded_affine_detector_sees_an_unfoldable_scale():
  """The negative control of criterion 1: a per-pixel scale after a
  convolution cannot be folded into it and is reported."""
  kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(
      np.float32)
  scale = np.random.default_rng(1).uniform(1, 2, (8, 8, 4)).astype(
      np.float32)

  def fn(variables, x):
    y = jax.lax.conv_general_dilated(x, variables["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return jax.nn.relu(y * variables["s"])

  variables = {"k": kernel, "s": scale}
  flatbuffer = export.export_tflite(fn, variables, [((1, 8, 8, 3),
                                                     np.float32)])
  assert export.unfolded_affine_ops(flatbuffer) == ["MUL after CONV_2D"]
  x = np.random.default_rng(2).normal(size=(1, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(export.run_tflite(flatbuffer, x)[0],
                             fn(variables, x), rtol=1e-5, atol=1e-5)


class SmallConv(nn.Module):
  """The seed post's model: Conv2D(8, 3, relu, same) + GlobalMaxPooling."""
  conv_name: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(L.conv(x, 8, 3, padding="SAME", name=self.conv_name))
    return L.global_pool(x, "max")


def test_seed_example_vmapped_set_model():
  inputs = keras.Input((64, 64, 3))
  conv_layer = keras.layers.Conv2D(8, 3, activation="relu", padding="same")
  kmodel = keras.Model(inputs,
                       keras.layers.GlobalMaxPooling2D()(conv_layer(inputs)))
  translate.random_weights.randomize(kmodel, seed=0)
  module = SmallConv(conv_name=conv_layer.name)
  variables, _ = translate.translate(module, kmodel, (64, 64, 3))
  x1 = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  np.testing.assert_allclose(module.apply(variables, x1), kmodel(x1),
                             rtol=1e-5, atol=1e-5)

  def v_predict(variables, x):  # a set of 4 images -> one embedding
    return jnp.mean(jax.vmap(module.apply, (None, 0))(variables, x), axis=-2)

  flatbuffer = export.export_tflite(v_predict, variables,
                                    [((1, 4, 64, 64, 3), np.float32)])
  x = np.random.default_rng(1).normal(size=(1, 4, 64, 64, 3)).astype(
      np.float32)
  out = export.run_tflite(flatbuffer, x)[0]
  assert out.shape == (1, 8)
  c = export.compare(out, np.asarray(v_predict(variables, x)))
  assert c["max_rel"] <= translate.TOLERANCE, c
  # The graph reshapes (B, 4, ...) to (4B, ...) around the convolution:
  # RESHAPE -> CONV_2D (on 4 images) -> RESHAPE back -> the pooling.
  graph = export.tflite_graph(flatbuffer)
  producers = graph.producers()
  convs = [op for op in graph.ops if op.name in export.CONVOLUTIONS]
  assert [op.name for op in convs] == ["CONV_2D"]
  conv = convs[0]
  assert graph.shapes[conv.inputs[0]] == (4, 64, 64, 3)
  assert graph.shapes[conv.outputs[0]] == (4, 64, 64, 8)
  before = producers[conv.inputs[0]]
  assert before.name == "RESHAPE"
  assert before.inputs[0] in graph.inputs
  assert graph.shapes[before.inputs[0]] == (1, 4, 64, 64, 3)
  after = [op for op in graph.ops if conv.outputs[0] in op.inputs]
  assert [op.name for op in after] == ["RESHAPE"]
  assert graph.shapes[after[0].outputs[0]] == (1, 4, 64, 64, 8)
  assert not [o for o in export.tflite_ops(flatbuffer)
              if o.startswith("CUSTOM")]


def test_dynamic_batch_runs_other_batch_sizes():
  inputs = keras.Input((32, 32, 3))
  kmodel = keras.Model(inputs, keras.layers.Conv2D(8, 3, name="c")(inputs))
  translate.random_weights.randomize(kmodel, seed=0)
  module = SmallConv(conv_name="c")
  variables, _ = translate.translate(module, kmodel, (32, 32, 3))
  flatbuffer = export.export_tflite(module.apply, variables,
                                    [((1, 32, 32, 3), np.float32)],
                                    dynamic_batch=True)
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  out = export.run_tflite(flatbuffer, x)[0]
  np.testing.assert_allclose(out, module.apply(variables, x), rtol=1e-5,
                             atol=1e-5)


# Quantization. One small classifier (MobileNetV2 alpha 0.35, 96x96, 10
# classes) is exported once per mode (module-scoped: each conversion takes
# 8-20 s here) and every test reads the same files.

QUANT_SHAPE = (96, 96, 3)
N_CALIBRATION, N_EVAL = 16, 64
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# The converter's dynamic-range quantization leaves weights with fewer
# elements than this in float32 (tflite::optimize's default min_elements).
DYNAMIC_MIN_ELEMENTS = 1024
# Per mode: (max relative error, min top-1 agreement) against the float
# Flax model on N_EVAL held-out images; see _accuracy. Measured (relative
# error / top-1 agreement; ranges over model seeds 2, 3, 5 and two versions
# of the weight randomization): float16 0.009-0.011 / 100%, dynamic
# 0.11-0.14 / 88-95%, int8 0.21-0.25 / 75-92%. The same figures for broken
# models: any output that ignores its input >= 1 (see _accuracy) and at
# most the most frequent class's share in top-1 (14-20%, <= 30% asserted),
# shuffled outputs 1.4 / 11-12%, int8 calibrated on unpreprocessed
# [0, 255] images 1.29-1.40 / 9-19%. Each bound sits between the two,
# about 2x from either side; float16's error bound is also below what
# dynamic reaches.
ACCURACY_BOUNDS = {"float16": (0.03, 0.95), "dynamic": (0.3, 0.75),
                   "int8": (0.5, 0.55)}


def _smooth_images(n, seed):
  """RGB images in [0, 255]: a random 6x6 colour field upsampled, plus
  pixel noise. Unlike i.i.d. pixel noise (whose every image looks alike to
  a network once averaged over a receptive field), they differ in colour
  and layout, so the model's output depends on the image."""
  rng = np.random.default_rng(seed)
  low = rng.uniform(0, 255, (n, 6, 6, 3))
  up = np.asarray(jax.image.resize(low, (n, *QUANT_SHAPE), "linear"))
  return np.clip(up + rng.normal(0, 20, up.shape), 0, 255).astype(np.float32)


@pytest.fixture(scope="module")
def quant_model():
  """The float model, its calibration and evaluation images, its outputs.

  With random weights each class's mean logit over images is about 5x its
  variation from image to image, so every image gets the same top-1 class
  and top-1 agreement could not tell a good export from a constant one
  (measured: int8 calibrated on unpreprocessed images still agreed on 100%).
  The head's bias is therefore re-centred on the calibration images (each
  class's mean logit there becomes 0), as a trained classifier's would be:
  the top-1 class then depends on the image (no class takes over 30% of
  the evaluation images; asserted below).
  """
  conv = translate.convert("mobilenetv2", weights="random", seed=2,
                           alpha=0.35, input_shape=QUANT_SHAPE, classes=10,
                           classifier_activation=None)
  raw = _smooth_images(N_CALIBRATION + N_EVAL, seed=4)
  x = np.asarray(models.preprocess("mobilenetv2", raw))
  apply = jax.jit(conv.module.apply)
  variables = jax.tree.map(np.asarray, conv.variables)
  head = variables["params"]["predictions"]
  head["bias"] = head["bias"] - np.asarray(
      apply(variables, x[:N_CALIBRATION])).mean(0)
  return types.SimpleNamespace(
      module=conv.module, variables=variables,
      float_bytes=4 * (conv.report.params + conv.report.stats),
      raw_calibration=raw[:N_CALIBRATION], calibration=x[:N_CALIBRATION],
      images=x[N_CALIBRATION:],
      ref=np.asarray(apply(variables, x[N_CALIBRATION:])))


@pytest.fixture(scope="module")
def quantized(quant_model):
  """``quantized(mode)`` -> the flatbuffer, converted once per mode.

  ``"int8_raw"`` is the broken variant: int8 calibrated on the images
  before ``preprocess`` ([0, 255] instead of [-1, 1]).
  """
  m, cache = quant_model, {}

  def get(mode):
    if mode not in cache:
      calibration = {"int8": m.calibration,
                     "int8_raw": m.raw_calibration}.get(mode)
      cache[mode] = export.export_tflite(
          m.module.apply, m.variables, [((1, *QUANT_SHAPE), np.float32)],
          quantize=mode[:4] if calibration is not None else mode,
          representative_data=None if calibration is None
          else [(c[None],) for c in calibration])
    return cache[mode]
  return get


def _run_each(flatbuffer, images):
  interp = export.load_interpreter(flatbuffer)
  return np.concatenate([export.run_tflite(interp, x[None])[0]
                         for x in images])


def _accuracy(out, ref):
  """Relative error and top-1 agreement of ``out`` against ``ref``.

  The relative error is ``||out - ref|| / ||ref - mean_images(ref)||``
  (Frobenius norms over images x classes): the error measured against the
  part of the reference that depends on the image. For any output ``c``
  that ignores its input, ``||c - ref|| >= ||mean_images(ref) - ref||``
  (the mean minimizes the squared distance), so it scores >= 1, whatever
  the constant. (``max |Δ| <= 0.5 * ptp(ref)``, the bound this replaces,
  was met by a constant output: the logits' range is mostly the per-class
  offsets, which a constant reproduces.)
  """
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return {"rel_error": float(np.linalg.norm(out - ref)
                             / np.linalg.norm(ref - ref.mean(0))),
          "top1": float(np.mean(out.argmax(-1) == ref.argmax(-1)))}


def _meets(figures, mode):
  max_error, min_top1 = ACCURACY_BOUNDS[mode]
  return figures["rel_error"] <= max_error and figures["top1"] >= min_top1


def _tensors(flatbuffer):
  """The flatbuffer's main graph and LiteRT's ``get_tensor_details()`` by
  tensor index; the two readers must agree on every tensor's type."""
  graph = export.tflite_graph(flatbuffer)
  details = {d["index"]: d for d in
             export.load_interpreter(flatbuffer).get_tensor_details()}
  for i, t in enumerate(graph.dtypes):
    assert np.dtype(details[i]["dtype"]).name == t.lower(), (i, t)
  return graph, details


def _input_scale(graph, details):
  """(scale, zero point) of the int8 tensor the float input is quantized
  to: the calibrated input range is 255 * scale."""
  (quantize,) = [op for op in graph.ops if op.name == "QUANTIZE"
                 and op.inputs[0] in graph.inputs]
  q = details[quantize.outputs[0]]["quantization_parameters"]
  return float(q["scales"][0]), int(q["zero_points"][0])


@pytest.mark.parametrize("mode", ["float16", "dynamic", "int8"])
@pytest.mark.slow
def test_quantized_tensor_types(quant_model, quantized, mode):
  """What each mode stores and computes in, read from the file: float16
  weights dequantized to float32 compute; int8 weights with float32
  activations (dynamic range); int8 activations between one QUANTIZE at
  the input and one DEQUANTIZE at the output (int8). A mode that silently
  became another (or float32) fails here."""
  flatbuffer = quantized(mode)
  graph, details = _tensors(flatbuffer)
  producers = graph.producers()
  weighted = [op for op in graph.ops if op.name in WEIGHTED_OPS]
  # 52 convolutions + the classifier.
  assert len(weighted) == 53, export.tflite_ops(flatbuffer)
  assert not [o for o in export.tflite_ops(flatbuffer)
              if o.startswith("CUSTOM")]
  types_ = set(graph.dtypes)
  size = len(flatbuffer) / quant_model.float_bytes
  if mode == "float16":
    assert "INT8" not in types_ and "UINT8" not in types_
    for op in weighted:
      dq = producers.get(op.inputs[1])
      assert dq is not None and dq.name == "DEQUANTIZE", op
      assert graph.dtypes[dq.inputs[0]] == "FLOAT16"
      assert dq.inputs[0] in graph.constants
      assert {graph.dtypes[t] for t in (op.inputs[0], *op.outputs)} == {
          "FLOAT32"}
    assert 0.45 < size < 0.6, size  # 2 bytes a weight
  elif mode == "dynamic":
    assert "FLOAT16" not in types_
    assert not {"QUANTIZE", "DEQUANTIZE"} & {op.name for op in graph.ops}
    n_int8 = 0
    for op in weighted:
      w = op.inputs[1]
      assert {graph.dtypes[t] for t in (op.inputs[0], *op.outputs)} == {
          "FLOAT32"}, op
      assert w in graph.constants and w not in producers
      if np.prod(graph.shapes[w]) >= DYNAMIC_MIN_ELEMENTS:
        assert graph.dtypes[w] == "INT8", (op, graph.shapes[w])
        scales = details[w]["quantization_parameters"]["scales"]
        assert len(scales) and np.all(scales > 0)
        n_int8 += 1
      else:
        assert graph.dtypes[w] == "FLOAT32", (op, graph.shapes[w])
    assert n_int8 >= 30, n_int8
    assert size < 0.4, size  # mostly 1 byte a weight
  else:
    assert "FLOAT16" not in types_
    boundary = [op.name for op in graph.ops
                if "FLOAT32" in {graph.dtypes[t] for t in
                                 (*op.inputs, *op.outputs) if t >= 0}]
    assert boundary == ["QUANTIZE", "DEQUANTIZE"], boundary
    assert graph.ops[0].name == "QUANTIZE" and graph.ops[-1].name == (
        "DEQUANTIZE")
    for op in graph.ops[1:-1]:
      for t in (*op.inputs, *op.outputs):
        if t >= 0 and t not in graph.constants:  # activations
          assert graph.dtypes[t] == "INT8", (op, t)
          assert details[t]["quantization_parameters"]["scales"][0] > 0
    for op in weighted:
      assert graph.dtypes[op.inputs[1]] == "INT8"
      assert graph.dtypes[op.inputs[2]] == "INT32"  # the bias
    # Calibrated on preprocessed inputs: MobileNetV2's [-1, 1] is 255 steps
    # of 2/255 (the unpreprocessed [0, 255] gives 1.0).
    scale, zero_point = _input_scale(graph, details)
    assert scale == pytest.approx(2 / 255, rel=0.05) and abs(zero_point) <= 1
    assert size < 0.45, size


def test_quantized_model_is_a_balanced_classifier(quant_model):
  """The premise of the accuracy bounds: the float model's top-1 class
  depends on the image, and the bounds reject outputs that ignore it."""
  ref = quant_model.ref
  counts = np.bincount(ref.argmax(-1), minlength=10)
  assert counts.max() <= 0.3 * len(ref) and (counts > 0).sum() >= 6, counts
  rng = np.random.default_rng(0)
  broken = {
      "mean output": np.broadcast_to(ref.mean(0), ref.shape),
      "zero output": np.zeros_like(ref),
      "most frequent class": np.broadcast_to(
          10 * np.eye(10)[counts.argmax()], ref.shape),
      "shuffled images": ref[rng.permutation(len(ref))],
  }
  for what, out in broken.items():
    figures = _accuracy(out, ref)
    print(f"{what}: relative error {figures['rel_error']:.3g}, top-1 "
          f"agreement {figures['top1']:.0%}")
    assert figures["rel_error"] >= 1 - 1e-9, what
    for mode in ACCURACY_BOUNDS:
      assert not _meets(figures, mode), (what, mode, figures)
  assert _accuracy(ref, ref) == {"rel_error": 0.0, "top1": 1.0}


@pytest.mark.parametrize("mode", ["float16", "dynamic", "int8"])
@pytest.mark.slow
def test_quantized_accuracy_against_float(quant_model, quantized, mode):
  out = _run_each(quantized(mode), quant_model.images)
  assert out.shape == quant_model.ref.shape and np.all(np.isfinite(out))
  figures = _accuracy(out, quant_model.ref)
  print(f"{mode}: relative error {figures['rel_error']:.3g}, top-1 "
        f"agreement {figures['top1']:.0%} on {len(out)} images")
  assert _meets(figures, mode), (figures, ACCURACY_BOUNDS[mode])


@pytest.mark.slow
def test_int8_calibrated_on_unpreprocessed_images_fails_the_bound(
    quant_model, quantized):
  """The negative control of the int8 bound: calibration that skipped
  preprocessing ([0, 255] instead of [-1, 1]) gives a file that runs and
  has the right types, and fails the bound (on correctly preprocessed
  inputs, as it would be served)."""
  flatbuffer = quantized("int8_raw")
  scale, zero_point = _input_scale(*_tensors(flatbuffer))
  assert scale == pytest.approx(1.0, rel=0.05) and zero_point == -128
  out = _run_each(flatbuffer, quant_model.images)
  figures = _accuracy(out, quant_model.ref)
  print(f"int8 calibrated on [0, 255]: relative error "
        f"{figures['rel_error']:.3g}, top-1 agreement {figures['top1']:.0%}")
  assert np.all(np.isfinite(out))
  assert figures["rel_error"] > 2 * ACCURACY_BOUNDS["int8"][0], figures
  assert figures["top1"] < ACCURACY_BOUNDS["int8"][1], figures


def test_int8_needs_calibration_data():
  with pytest.raises(ValueError, match="representative_data"):
    export.export_tflite(lambda v, x: x, {}, [((1, 4), np.float32)],
                         quantize="int8")


def _run_cli(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=900)


@pytest.mark.slow
def test_cli_exports_tflite_and_prints_parity(tmp_path):
  proc = _run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                  "--input_shape", "96,96,3", "--weights", "random",
                  "--export", "tflite", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  path = tmp_path / "translated" / "mobilenetv2_alpha0.35_96x96.tflite"
  assert path.stat().st_size > 1e6
  assert "TFLite vs Flax" in proc.stdout and "TFLite vs Keras" in proc.stdout
  assert "export" in proc.stdout


@pytest.mark.slow  # int8 calibration and export, 12 s
def test_cli_int8_with_npy_calibration(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3))
  np.save(tmp_path / "calib.npy", images.astype(np.uint8))
  proc = _run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                  "--input_shape", "96,96,3", "--weights", "random",
                  "--export", "tflite", "--quantize", "int8",
                  "--calibration", "calib.npy", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  path = tmp_path / "translated" / "mobilenetv2_alpha0.35_96x96.int8.tflite"
  assert "top-1 agreement" in proc.stdout
  # The CLI calibrated on the images after preprocess ([0, 255] -> [-1, 1]:
  # 255 steps of 2/255), not on the raw file (a scale of 1).
  scale, zero_point = _input_scale(*_tensors(path.read_bytes()))
  assert scale == pytest.approx(2 / 255, rel=0.05) and abs(zero_point) <= 1


@pytest.mark.slow
def test_cli_refuses_pickled_calibration(tmp_path):
  np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object),
          allow_pickle=True)
  proc = _run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                  "--input_shape", "96,96,3", "--weights", "random",
                  "--export", "tflite", "--quantize", "int8",
                  "--calibration", "evil.npy", cwd=tmp_path)
  assert proc.returncode != 0
  assert "cannot read it as a numeric .npy" in proc.stderr
  assert not list((tmp_path / "translated").glob("*.tflite"))


@pytest.mark.parametrize("args, message", [
    (("--quantize", "float16"), "only apply with --export tflite"),
    (("--export", "tflite", "--quantize", "int8", "--dynamic_batch"),
     "needs a static batch"),
    (("--export", "tflite", "--quantize", "int8", "--calibration",
      "missing.npy"), "neither a directory nor an existing .npy"),
])
def test_cli_refuses_inconsistent_export_flags_before_any_work(
    tmp_path, args, message):
  proc = _run_cli("--model", "mobilenetv2", "--weights", "random", *args,
                  cwd=tmp_path)
  assert proc.returncode == 1
  assert message in proc.stderr and len(proc.stderr.splitlines()) == 1
  assert "keras build" not in proc.stdout
  assert not (tmp_path / "translated").exists() or not list(
      (tmp_path / "translated").iterdir())
