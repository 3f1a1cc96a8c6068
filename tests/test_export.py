"""TFLite export through jax2tf: parity, builtin ops, vmapped functions,
quantization, the CLI."""

import os
import subprocess
import sys

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
  first registered. The others repeat the same blocks deeper or wider and
  are marked slow (measured on 2 shared cores: 7-17 s each for these, up
  to 45 s for ResNetRS152; every model together takes about 6 minutes).
  """
  seen, keep = set(), set()
  for name in models.list_models():
    spec = models.get_spec(name)
    key = (spec.family, spec.preprocess)
    if key not in seen:
      seen.add(key)
      keep.add(name)
  return keep


def _param(name):
  slow = (models.get_spec(name).slow
          or name not in _default_export_models())
  return pytest.param(name, marks=[pytest.mark.slow] if slow else [],
                      id=name)


@pytest.mark.parametrize("name", [_param(n) for n in models.list_models()])
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
  has_depthwise = any(v.shape[-2] == 1 and v.shape[-1] > 1
                      for k, v in flat.items()
                      if k[-1] == "kernel" and v.ndim == 4)
  assert (ops["DEPTHWISE_CONV_2D"] > 0) == has_depthwise
  n_conv = sum(1 for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4)
  assert ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"] == n_conv, ops
  assert export.unfolded_affine_ops(flatbuffer) == []
  pairs = translate.conv_bn_pairs(conv.module, conv.variables,
                                  models.get_spec(name).input_shape)
  n_bn = sum(1 for k in flat if k[0] == "batch_stats" and k[-1] == "mean")
  allowed = ops["LOGISTIC"] + ops["SUM"] + ops["MEAN"] + (
      n_bn - len(pairs)) + 3
  assert ops["MUL"] <= allowed, (ops, len(pairs), n_bn)
  assert ops["RSQRT"] == 0 and ops["SQRT"] == 0


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
  translate.keras_io.randomize(kmodel, seed=0)
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
  translate.keras_io.randomize(kmodel, seed=0)
  module = SmallConv(conv_name="c")
  variables, _ = translate.translate(module, kmodel, (32, 32, 3))
  flatbuffer = export.export_tflite(module.apply, variables,
                                    [((1, 32, 32, 3), np.float32)],
                                    dynamic_batch=True)
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  out = export.run_tflite(flatbuffer, x)[0]
  np.testing.assert_allclose(out, module.apply(variables, x), rtol=1e-5,
                             atol=1e-5)


@pytest.fixture(scope="module")
def small_mobilenet():
  return translate.convert("mobilenetv2", weights="random", seed=2,
                           alpha=0.35, input_shape=(96, 96, 3),
                           classifier_activation=None)


@pytest.mark.parametrize("quantize", ["float16", "dynamic", "int8"])
def test_quantized_exports_run_and_report(small_mobilenet, quantize):
  conv = small_mobilenet
  x = np.asarray(models.preprocess(
      "mobilenetv2", translate.random_images((96, 96, 3), 8, seed=4)))
  data = [(x[i:i + 1],) for i in range(8)] if quantize == "int8" else None
  flatbuffer = export.export_tflite(
      conv.module.apply, conv.variables, [((1, 96, 96, 3), np.float32)],
      quantize=quantize, representative_data=data)
  float_size = 4 * (conv.report.params + conv.report.stats)
  assert len(flatbuffer) < 0.75 * float_size  # smaller than float32
  interp = export.load_interpreter(flatbuffer)
  out = np.concatenate([export.run_tflite(interp, x[i:i + 1])[0]
                        for i in range(len(x))])
  ref = np.asarray(conv.module.apply(conv.variables, x))
  c = export.compare(out, ref)
  print(f"{quantize}: max |Δ| {c['max_abs']:.3g} (max |logit| "
        f"{np.abs(ref).max():.3g}), top-1 agreement "
        f"{c['top1_agreement']:.0%} on {len(x)} images")
  assert np.all(np.isfinite(out)) and 0 < c["max_abs"]
  assert set(c) == {"max_abs", "max_rel", "top1_agreement"}
  assert 0.0 <= c["top1_agreement"] <= 1.0
  # Random weights: the 1000 logits of random images are close together, so
  # top-1 agreement is a weak signal here; the error bounds are the check.
  # Measured (8 images, this model): float16 ~1e-3 relative, dynamic and
  # int8 a few percent of the logit range.
  bound = {"float16": 1e-2, "dynamic": 0.25, "int8": 0.5}[quantize]
  assert c["max_abs"] <= bound * np.ptp(ref), (c, np.ptp(ref))
  ops = export.tflite_ops(flatbuffer)
  assert not [o for o in ops if o.startswith("CUSTOM")], ops
  if quantize == "int8":  # float in/out around an int8 graph
    assert ops["QUANTIZE"] >= 1 and ops["DEQUANTIZE"] >= 1, ops
    graph = export.tflite_graph(flatbuffer)
    convs = [op for op in graph.ops if op.name in export.CONVOLUTIONS]
    assert convs and all(graph.dtypes[op.inputs[0]] == "INT8"
                         and graph.dtypes[op.inputs[1]] == "INT8"
                         for op in convs)


def test_int8_needs_calibration_data():
  with pytest.raises(ValueError, match="representative_data"):
    export.export_tflite(lambda v, x: x, {}, [((1, 4), np.float32)],
                         quantize="int8")


def _run_cli(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                         *args], capture_output=True, text=True, cwd=cwd,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=900)


def test_cli_exports_tflite_and_prints_parity(tmp_path):
  proc = _run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                  "--input_shape", "96,96,3", "--weights", "random",
                  "--export", "tflite", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  path = tmp_path / "translated" / "mobilenetv2_alpha0.35_96x96.tflite"
  assert path.stat().st_size > 1e6
  assert "TFLite vs Flax" in proc.stdout and "TFLite vs Keras" in proc.stdout
  assert "export" in proc.stdout


def test_cli_int8_with_npy_calibration(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3))
  np.save(tmp_path / "calib.npy", images.astype(np.uint8))
  proc = _run_cli("--model", "mobilenetv2", "--alpha", "0.35",
                  "--input_shape", "96,96,3", "--weights", "random",
                  "--export", "tflite", "--quantize", "int8",
                  "--calibration", "calib.npy", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "translated" /
          "mobilenetv2_alpha0.35_96x96.int8.tflite").exists()
  assert "top-1 agreement" in proc.stdout


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
