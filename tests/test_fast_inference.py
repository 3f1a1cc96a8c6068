"""The CPU fast form of the inference path (models/conv_forms.py).

On CPU, ``models.create(..., inference=True)`` runs depthwise convolutions as
fused shifted multiply-adds (XLA CPU's grouped convolution is slow); on GPU
and TPU, and in anything traced into TensorFlow (the TFLite export), the
native grouped convolution stays. Tested here: the arithmetic against
``lax.conv_general_dilated`` for every stride, padding, kernel and depth
multiplier the families use; the per-platform choice read from the lowered
programs; the TFLite export of the inference form; and logits against Keras
for one model of every family through the fast form.
"""

import collections
import re

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import models
from models import conv_forms
from models import inference
from models import layers
import translate
from translate import export

DN = ("NHWC", "HWIO", "NHWC")


def _grouped_convs(text: str) -> int:
  """Convolutions with more than one feature group in a lowered program."""
  return sum(int(g) > 1 for g in re.findall(r"feature_group_count = (\d+)",
                                            text))


def _depthwise_kernels(variables) -> int:
  flat = traverse_util.flatten_dict(variables)
  return sum(1 for k, v in flat.items()
             if (k[-1] == "kernel" and v.ndim == 4 and v.shape[-2] == 1
                 and v.shape[-1] > 1) or k[-1] == "depthwise_kernel")


# (input h, w, c), kernel (kh, kw), strides, padding, depth multiplier; the
# paddings are those the families use: SAME (MobileNet, EfficientNet,
# ConvNeXt, Xception), VALID after an explicit asymmetric pad (correct_pad),
# and the asymmetric pads themselves.
CASES = [
    ((9, 9, 4), (3, 3), (1, 1), "SAME", 1),
    ((9, 8, 4), (3, 3), (2, 2), "SAME", 1),   # odd/even: asymmetric SAME
    ((10, 10, 3), (3, 3), (2, 2), "VALID", 1),
    ((8, 8, 5), (3, 3), (2, 2), ((0, 1), (0, 1)), 1),  # correct_pad
    ((11, 11, 4), (5, 5), (2, 2), "SAME", 1),
    ((11, 11, 4), (5, 5), (1, 1), ((1, 2), (2, 1)), 1),
    ((14, 14, 6), (7, 7), (1, 1), "SAME", 1),  # ConvNeXt
    ((9, 9, 3), (3, 3), (1, 1), "SAME", 2),    # MobileNet depth_multiplier
    ((9, 7, 3), (3, 5), (2, 1), "VALID", 3),
]


@pytest.mark.parametrize("shape,kernel,strides,padding,m", CASES)
def test_shifted_depthwise_equals_grouped_convolution(shape, kernel, strides,
                                                      padding, m):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape)).astype(np.float32)
  c = shape[-1]
  k = rng.normal(size=(*kernel, 1, c * m)).astype(np.float32)
  ref = jax.lax.conv_general_dilated(x, k, strides, padding,
                                     dimension_numbers=DN,
                                     feature_group_count=c)
  pads = conv_forms._pads(padding, shape[:2], kernel, strides)  # pylint: disable=protected-access
  out = jax.jit(conv_forms.depthwise_shifted, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(k), strides, tuple(map(tuple, pads)))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_mobilenetv2():
  shape = (96, 96, 3)
  conv = translate.convert("mobilenetv2", weights="random", seed=3,
                           input_shape=shape, classifier_activation=None)
  folded = translate.fold_batchnorm(conv.variables, conv.module, shape)
  module = models.create("mobilenetv2", inference=True, input_shape=shape,
                         classifier_activation=None)
  x = np.asarray(models.preprocess(
      "mobilenetv2", translate.random_images(shape, 1, seed=2)))
  return conv, folded, module, x


def test_platform_choice_cpu_shifted_gpu_tpu_native(small_mobilenetv2):
  """Lowered for CPU the program has no grouped convolution left; lowered
  for CUDA or TPU it has one per depthwise kernel (cuDNN's is fast)."""
  _, folded, module, x = small_mobilenetv2
  n_dw = _depthwise_kernels(folded)
  assert n_dw == 17
  lowered = {p: jax.export.export(jax.jit(module.apply), platforms=(p,))(
      folded, x).mlir_module() for p in ("cpu", "cuda", "tpu")}
  assert _grouped_convs(lowered["cpu"]) == 0
  assert _grouped_convs(lowered["cuda"]) == n_dw
  assert _grouped_convs(lowered["tpu"]) == n_dw
  # 1x1 stride-1 convolutions become dot_general on CPU only; the stem is
  # the one convolution left (stride 1 on its space-to-depth input).
  flat = traverse_util.flatten_dict(folded)
  n_conv = sum(1 for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4)
  n_1x1 = sum(1 for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4
              and v.shape[:2] == (1, 1))
  assert n_1x1 == 34
  assert lowered["cpu"].count("stablehlo.convolution") == n_conv - n_dw - n_1x1
  assert "tensor<3x3x3x32xf32>" in lowered["cuda"]  # the stem, stride 2
  assert "tensor<2x2x12x32xf32>" in lowered["cpu"]  # space-to-depth
  assert lowered["cuda"].count("stablehlo.convolution") == n_conv
  # A batch of several images loops over single images on CPU only.
  x3 = np.concatenate([x, x, x])
  batched = {p: jax.export.export(jax.jit(module.apply), platforms=(p,))(
      folded, x3).mlir_module() for p in ("cpu", "cuda")}
  assert "stablehlo.while" in batched["cpu"]
  # MobileNetV2 takes two images per step (not in inference._ONE_PER_STEP),
  # and the odd one left runs on its own.
  assert "MobileNetV2" not in inference._ONE_PER_STEP  # pylint: disable=protected-access
  assert "tensor<1x2x96x96x3xf32>" in batched["cpu"]
  assert "tensor<1x96x96x3xf32>" in batched["cpu"]
  assert "stablehlo.while" not in batched["cuda"]
  assert "stablehlo.while" not in lowered["cpu"]  # batch 1: no loop
  # What plain jax.jit runs here (this machine is a CPU): compiled, no
  # grouped convolution and no leftover platform conditional.
  assert jax.default_backend() == "cpu"
  compiled = jax.jit(module.apply).lower(folded, x).compile().as_text()
  assert _grouped_convs(compiled) == 0 and "conditional" not in compiled


def test_native_convolutions_block_and_the_training_module_on_cpu(
    small_mobilenetv2):
  conv, folded, module, x = small_mobilenetv2
  n_dw = _depthwise_kernels(folded)
  with conv_forms.native_convolutions():
    assert not conv_forms.fast_path_allowed()
    text = jax.jit(module.apply).lower(folded, x).as_text()
    plain = jax.jit(conv.module.apply).lower(conv.variables, x).as_text()
  assert conv_forms.fast_path_allowed()
  assert _grouped_convs(text) == n_dw and _grouped_convs(plain) == n_dw
  # The training module's convolutions take the CPU forms too, in its
  # backward pass as well (a training step has no grouped convolution on
  # CPU, one or more per depthwise kernel on CUDA).
  def loss(params, x):
    out, _ = conv.module.apply(
        {"params": params, "batch_stats": conv.variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    return out.sum()
  grad = jax.jit(jax.grad(loss))
  lowered = {p: jax.export.export(grad, platforms=(p,))(
      conv.variables["params"], x).mlir_module() for p in ("cpu", "cuda")}
  assert _grouped_convs(lowered["cpu"]) == 0
  assert _grouped_convs(lowered["cuda"]) >= 2 * n_dw  # forward and backward


def test_fast_and_native_forms_agree(small_mobilenetv2):
  _, folded, module, x = small_mobilenetv2
  x = np.concatenate([x, x[:, :, ::-1], -x])  # through the per-image loop
  fast = np.asarray(jax.jit(module.apply)(folded, x))
  with conv_forms.native_convolutions():
    native = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(folded, x))
  scale = max(1.0, float(np.abs(native).max()))
  assert np.abs(fast - native).max() <= 1e-4 * scale


@pytest.mark.slow
def test_tflite_export_of_the_inference_form_keeps_depthwise_ops(
    small_mobilenetv2):
  """The fast form must not leak into the TFLite graph, even after the same
  function was jitted (and cached) on CPU: one DEPTHWISE_CONV_2D per
  depthwise kernel, no slices or pads in their place."""
  _, folded, module, x = small_mobilenetv2
  x = np.concatenate([x, x[:, ::-1]])  # batch 2: the CPU form would loop
  expected = np.asarray(jax.jit(module.apply)(folded, x))
  flatbuffer = translate.export_tflite(module.apply, folded, [x.shape])
  ops = export.tflite_ops(flatbuffer)
  flat = traverse_util.flatten_dict(folded)
  n_conv = sum(1 for k, v in flat.items()
               if k[-1] == "kernel" and v.ndim == 4)
  n_dw = _depthwise_kernels(folded)
  assert ops["DEPTHWISE_CONV_2D"] == n_dw, ops
  assert ops["CONV_2D"] == n_conv - n_dw, ops
  assert not {"STRIDED_SLICE", "SLICE", "PAD", "PADV2", "WHILE",
              "BATCH_MATMUL"} & set(ops), ops
  assert not [o for o in ops if o.startswith("CUSTOM")], ops
  out = translate.run_tflite(flatbuffer, x)
  cmp = export.compare(np.asarray(out), expected)
  assert cmp["max_abs"] <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def _first_per_family() -> dict[str, str]:
  first = collections.OrderedDict()
  for name in models.list_models():
    first.setdefault(models.get_spec(name).family, name)
  return first


# Default tier: the families whose fast form is cheapest to check; every
# other family's first model runs in the slow tier at its native size.
DEFAULT = {"mobilenet": dict(input_shape=(96, 96, 3), depth_multiplier=2),
           "mobilenet_v2": dict(input_shape=(96, 96, 3))}


def _family_params():
  for family, name in _first_per_family().items():
    options = DEFAULT.get(family)
    yield pytest.param(name, options or {},
                       marks=[] if options else [pytest.mark.slow],
                       id=f"{family}-{name}")


@pytest.mark.parametrize("name,options", list(_family_params()))
def test_fast_path_parity_with_keras(name, options):
  """Logits of the CPU fast inference form (folded BatchNorm, shifted
  depthwise) against Keras, ≤ 1e-4 relative; and the fast form is really
  what ran: no grouped convolution is left where the model has depthwise
  kernels."""
  spec = models.get_spec(name)
  shape = options.get("input_shape", spec.input_shape)
  conv = translate.convert(name, weights="random", seed=4, **options)
  folded = translate.fold_batchnorm(conv.variables, conv.module, shape)
  module = models.create(name, inference=True, **options)
  report = translate.check_parity(module, folded, conv.keras_model, name,
                                  seed=5)
  assert report.passed, report.summary()
  assert report.max_rel <= 1e-4
  x = np.zeros((1, *shape), np.float32)
  fast = _grouped_convs(jax.jit(module.apply).lower(folded, x).as_text())
  if not options:  # slow tier: the residual families keep block outputs
    compiled = jax.jit(module.apply).lower(folded, x).compile().as_text()
    assert (" conditional(" in compiled) == (spec.family in (
        "resnet", "resnet_rs", "regnet", "inception_resnet_v2")), name
  with conv_forms.native_convolutions():
    native = _grouped_convs(
        jax.jit(conv.module.apply).lower(conv.variables, x).as_text())
  # Every depthwise kernel left the grouped form; other grouped convolutions
  # (RegNet's) stay native.
  assert fast == native - _depthwise_kernels(folded)
  if options:
    return
  # Slow tier: a batch loops over single images on CPU, except in the
  # families measured faster whole (lowered only, not compiled).
  x3 = np.zeros((3, *shape), np.float32)
  text = jax.jit(module.apply).lower(folded, x3).as_text()
  whole = type(module.inner).__name__ in inference._WHOLE_BATCH  # pylint: disable=protected-access
  assert ("stablehlo.while" in text) == (not whole), name
  assert whole == (spec.family == "efficientnet_v2"), name
  if not whole:  # two images per loop step, one in _ONE_PER_STEP's families
    step = 1 if type(module.inner).__name__ in inference._ONE_PER_STEP else 2  # pylint: disable=protected-access
    assert f"tensor<{3 // step}x{step}x{'x'.join(map(str, shape))}xf32>" \
        in text, name
    assert (step == 1) == (spec.family in ("xception", "inception_resnet_v2",
                                           "vgg")), name
  # The head (from the first layer with flat (batch, features) inputs) takes
  # the whole batch after the loop; MobileNet's and MobileNetV3's heads are
  # 1x1 convolutions and stay in it.
  flat = []

  def spy(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and args
        and getattr(args[0], "ndim", None) == 2):
      flat.append(args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(conv.module.apply, conv.variables, x)
  assert bool(flat) == (spec.family not in ("mobilenet", "mobilenet_v3")), name
  if flat:
    assert f"tensor<3x{flat[0]}xf32>" in text, name


class _Convs(nn.Module):
  """Convolutions the fast form must leave native (they are not plain
  depthwise / pointwise / dense), next to ones it rewrites."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = layers.Conv(c, (3, 3), kernel_dilation=2, feature_group_count=c,
                name="dilated_dw")(x)                                # native
    y = y + layers.Conv(c, (3, 3), padding="CIRCULAR", feature_group_count=c,
                    name="circular_dw")(x)                           # native
    y = y + layers.Conv(c, (3, 3), input_dilation=1, feature_group_count=c,
                    padding=((1, 1), (1, 1)), name="dw")(x)          # fast
    g = layers.Conv(2 * c, (3, 3), feature_group_count=c // 2,
                name="grouped")(y)                                   # native
    g = g + layers.Conv(2 * c, (3, 3), kernel_dilation=2,
                    name="dilated_dense")(y)                         # native
    z = layers.Conv(c, (1, 1), strides=2, name="pw_strided")(g)          # im2col
    z = z + layers.Conv(c, (1, 1), padding=((1, 1), (1, 1)),
                    name="pw_padded")(g)[:, 1:-1:2, 1:-1:2]          # im2col
    z = z + layers.Conv(c, (3, 3), strides=2, padding=((1, 1), (0, 2)),
                    name="dense")(g)                                 # im2col
    z = z + layers.Conv(c, (1, 1), kernel_dilation=3, name="pw")(g)[:, ::2, ::2]
    return z                                                         # pw fast


def test_only_plain_depthwise_pointwise_and_dense_convolutions_are_rewritten():
  x = np.random.default_rng(1).normal(size=(2, 9, 9, 4)).astype(np.float32)
  inner = _Convs()
  variables = inner.init(jax.random.key(0), x)
  module = inference.Inference(inner=_Convs(parent=None))
  ref = np.asarray(jax.jit(inner.apply)(variables, x))
  out = np.asarray(jax.jit(module.apply)(variables, x))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  text = jax.export.export(jax.jit(module.apply), platforms=("cpu",))(
      variables, x[:1]).mlir_module()
  # 9 convolutions: the plain depthwise one, the 1x1 'pw' (a dilation of a
  # 1x1 kernel changes nothing) and the three dense ones with small outputs
  # (im2col) are rewritten; 4 stay.
  assert text.count("stablehlo.convolution") == 4
  assert _grouped_convs(text) == 3
  # Lowered for CUDA every convolution stays.
  cuda = jax.export.export(jax.jit(module.apply), platforms=("cuda",))(
      variables, x[:1]).mlir_module()
  assert cuda.count("stablehlo.convolution") == 9


def test_im2col_only_for_small_outputs():
  """A dense convolution runs as im2col + dot on CPU only where its output
  has at most conv_forms._IM2COL_MAX_PIXELS pixels (14x14): larger ones
  were measured faster natively."""
  limit = conv_forms._IM2COL_MAX_PIXELS  # pylint: disable=protected-access
  assert limit == 14 * 14
  conv = nn.Conv(3, (3, 3), padding="SAME")
  module = layers.Conv(3, (3, 3), padding="SAME")
  for size, native in ((14, 0), (15, 1)):
    x = np.ones((1, size, size, 2), np.float32)
    variables = conv.init(jax.random.key(0), x)
    text = jax.export.export(jax.jit(module.apply), platforms=("cpu",))(
        variables, x).mlir_module()
    assert text.count("stablehlo.convolution") == native, size
    np.testing.assert_allclose(module.apply(variables, x),
                               conv.apply(variables, x), rtol=1e-5,
                               atol=1e-5)
