"""The CPU forms of convolutions (models/conv_forms.py): im2col + one
dot_general against ``lax.conv_general_dilated``, on tiny synthetic shapes,
for the strides, paddings and kernels the families use; and
``models.layers.Conv``, which picks a form per convolution, against
``nn.Conv`` in values and gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import conv_forms
from models import layers

DN = ("NHWC", "HWIO", "NHWC")

# (input h, w, c), kernel (kh, kw), strides, padding, output channels.
CASES = [
    ((9, 8, 3), (3, 3), (2, 2), "SAME", 4),    # odd/even: asymmetric SAME
    ((7, 7, 3), (3, 3), (1, 1), "VALID", 4),   # Xception/Inception 'valid'
    ((8, 8, 3), (3, 3), (2, 2), ((0, 1), (0, 1)), 4),  # correct_pad
    ((11, 11, 3), (7, 7), (2, 2), ((3, 3), (3, 3)), 4),  # ResNet stem
    ((8, 8, 6), (1, 1), (2, 2), "VALID", 5),    # strided 1x1 shortcut
    ((9, 9, 4), (1, 7), (1, 1), "SAME", 3),     # Inception 1x7 / 7x1
    ((9, 7, 3), (3, 5), (2, 1), ((1, 2), (2, 1)), 4),
]


@pytest.mark.parametrize("shape,kernel,strides,padding,o", CASES)
def test_im2col_equals_convolution(shape, kernel, strides, padding, o):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape)).astype(np.float32)
  k = rng.normal(size=(*kernel, shape[-1], o)).astype(np.float32)
  ref = jax.lax.conv_general_dilated(x, k, strides, padding,
                                     dimension_numbers=DN)
  pads = conv_forms._pads(padding, shape[:2], kernel, strides)  # pylint: disable=protected-access
  out = jax.jit(conv_forms.conv_im2col, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(k), strides, tuple(map(tuple, pads)))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# The stride-1 forms: (form, input h, w, c), kernel (kh, kw), padding,
# output channels.
STRIDE_1_CASES = [
    ("conv_tap_dots", (9, 8, 5), (3, 3), "SAME", 4),
    ("conv_tap_dots", (7, 7, 3), (3, 3), "VALID", 4),
    ("conv_tap_dots", (9, 9, 4), (1, 7), "SAME", 3),
    ("conv_tap_dots", (9, 7, 3), (3, 5), ((1, 2), (2, 0)), 6),  # asymmetric
    ("native_conv_eigen", (9, 8, 5), (3, 3), "SAME", 4),
    ("native_conv_eigen", (7, 7, 3), (3, 3), "VALID", 4),
    ("native_conv_eigen", (9, 9, 4), (1, 7), "SAME", 4),
    ("native_conv_eigen", (9, 9, 4), (7, 1), "SAME", 4),
    ("native_conv_eigen", (9, 7, 3), (3, 5), ((1, 2), (2, 0)), 4),
]


@pytest.mark.parametrize("form,shape,kernel,padding,o", STRIDE_1_CASES)
def test_stride_1_form_equals_convolution(form, shape, kernel, padding, o):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape)).astype(np.float32)
  k = rng.normal(size=(*kernel, shape[-1], o)).astype(np.float32)
  ref = jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                     dimension_numbers=DN)
  pads = conv_forms._pads(padding, shape[:2], kernel, (1, 1))  # pylint: disable=protected-access
  out = jax.jit(getattr(conv_forms, form), static_argnums=2)(
      jnp.asarray(x), jnp.asarray(k), tuple(map(tuple, pads)))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# x shape, kernel, strides, the form in the inference form, and in training.
FORM_CASES = [
    ((2, 20, 20, 64), (3, 3, 64, 64), (1, 1), "tap_dots", "native"),
    ((1, 56, 56, 128), (3, 3, 128, 32), (1, 1), "tap_dots", "native"),
    ((2, 57, 57, 64), (3, 3, 64, 64), (1, 1), "eigen", "native"),  # > 56x56
    ((2, 20, 20, 64), (3, 3, 64, 65), (1, 1), "eigen", "native"),  # > 64 out
    ((2, 20, 20, 63), (3, 3, 63, 64), (1, 1), "eigen", "native"),  # < 64 in
    ((2, 20, 20, 64), (5, 5, 64, 64), (1, 1), "eigen", "native"),  # not 3x3
    ((1, 149, 149, 32), (3, 3, 32, 32), (1, 1), "eigen", "native"),
    ((1, 20, 20, 15), (3, 3, 15, 64), (1, 1), "native", "native"),  # < 16 in
    ((1, 20, 20, 32), (3, 3, 32, 31), (1, 1), "native", "native"),  # < 32 out
    ((1, 224, 224, 64), (3, 3, 64, 64), (1, 1), "native", "native"),  # 1.8G
    ((1, 20, 20, 64), (1, 1, 64, 64), (1, 1), "dot", "dot"),
    ((2, 14, 14, 64), (3, 3, 64, 64), (1, 1), "im2col", "im2col"),
    ((2, 60, 60, 64), (3, 3, 64, 64), (2, 2), "im2col", "native"),
    ((2, 60, 60, 64), (1, 1, 64, 64), (2, 2), "im2col", "native"),
    ((2, 28, 28, 64), (1, 1, 64, 64), (2, 2), "im2col", "im2col"),  # 14x14
    ((2, 60, 60, 8), (7, 7, 8, 64), (2, 2), "native", "native"),
    ((2, 60, 60, 3), (7, 7, 3, 64), (2, 2), "space_to_depth", "native"),
    ((2, 61, 61, 3), (3, 3, 3, 32), (2, 2), "space_to_depth", "native"),
    ((2, 60, 60, 3), (4, 4, 3, 64), (4, 4), "native", "native"),  # ConvNeXt
]


@pytest.mark.parametrize("x_shape,kernel,strides,form,trained", FORM_CASES)
def test_cpu_form_by_shape(x_shape, kernel, strides, form, trained):
  """The shape rules behind each CPU form (benchmarks/RESULTS.md has the
  measurements). In the inference form: tap dots where XLA's native kernel
  runs on one thread (3x3, at most 64 outputs), Eigen's convolution for
  other stride-1 kxk ones with 16+ inputs, 32+ outputs and at most 800M
  multiply-adds per image, im2col for small outputs and strided kernels up
  to 3x3, space-to-depth for stride-2 stems. Outside it (training, plain
  modules) only the forms whose backward passes are fast."""
  kh, kw = kernel[:2]
  pads = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)
  if strides != (1, 1):
    pads = ((0, 0), (0, 0))
  with conv_forms.inference_forms():
    assert conv_forms.cpu_form(x_shape, kernel, strides, pads, 1) == form
  assert conv_forms.cpu_form(x_shape, kernel, strides, pads, 1) == trained


def test_eigen_form_leaves_xla_cpus_ynnpack_kernel():
  """Why the form exists: on this jaxlib a native convolution with 64
  output channels is a YNNPACK fusion (one thread), the taller one is not.
  A jaxlib that changes this makes the form a plain native convolution
  again (correct, no faster): re-measure then."""
  x = jnp.ones((1, 40, 40, 64), jnp.float32)
  k = jnp.ones((3, 3, 64, 64), jnp.float32)
  pads = ((1, 1), (1, 1))

  def compiled(f):
    return jax.jit(f).lower(x, k).compile().as_text()

  assert "__ynn_fusion" in compiled(
      lambda x, k: conv_forms.native_conv(x, k, (1, 1), pads))
  assert "__ynn_fusion" not in compiled(
      lambda x, k: conv_forms.native_conv_eigen(x, k, pads))


# models.layers.Conv: (input h, w, c), nn.Conv keywords, the CPU form it must
# take. Every form must give nn.Conv's values and gradients.
LAYER_CASES = [
    ((9, 9, 6), dict(features=6, kernel_size=(3, 3), strides=(2, 2),
                     padding="SAME", feature_group_count=6), "depthwise"),
    ((9, 9, 3), dict(features=6, kernel_size=(3, 3), padding="SAME",
                     feature_group_count=3), "depthwise"),  # multiplier 2
    ((9, 9, 6), dict(features=5, kernel_size=(1, 1)), "dot"),
    ((9, 9, 6), dict(features=5, kernel_size=(3, 3), strides=(2, 2),
                     padding=((1, 1), (0, 2))), "im2col"),
    ((16, 16, 2), dict(features=3, kernel_size=(3, 3), padding="SAME"),
     "native"),  # 256 output pixels, 2 inputs: no other form
    ((16, 15, 64), dict(features=5, kernel_size=(3, 3), padding="SAME"),
     "tap_dots"),
    ((16, 15, 16), dict(features=32, kernel_size=(3, 3), padding="SAME"),
     "eigen"),
    ((40, 40, 8), dict(features=4, kernel_size=(3, 3), strides=(2, 2),
                       padding="SAME"), "im2col"),  # 400 output pixels
    ((41, 40, 3), dict(features=4, kernel_size=(7, 7), strides=(2, 2),
                       padding=((3, 3), (2, 3))), "space_to_depth"),
    ((9, 9, 6), dict(features=6, kernel_size=(3, 3), padding="SAME",
                     feature_group_count=2), "native"),  # grouped, not dw
]


def _case_variables(shape, kw, use_bias=True):
  x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
  variables = nn.Conv(**kw, use_bias=use_bias).init(jax.random.key(0), x)
  rng = np.random.default_rng(2)
  variables = jax.tree.map(
      lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), variables)
  return x, variables


@pytest.mark.parametrize("shape,kw,form", LAYER_CASES)
def test_conv_layer_takes_its_cpu_form_with_nn_conv_values_and_gradients(
    shape, kw, form):
  # In the inference form, which has every form (test_cpu_form_by_shape
  # checks which ones training keeps); gradients too, though slow there.
  with conv_forms.inference_forms():
    _check_layer(shape, kw, form)


def _check_layer(shape, kw, form):
  x, variables = _case_variables(shape, kw)
  ours, ref = layers.Conv(**kw), nn.Conv(**kw)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == \
      jax.tree.map(jnp.shape, variables)  # the same variables as nn.Conv
  kernel = variables["params"]["kernel"]
  geometry = conv_forms.plain_geometry(ours, x, kernel)
  assert conv_forms.cpu_form(x.shape, kernel.shape, *geometry,
                             kw.get("feature_group_count", 1)) == form
  text = jax.jit(ours.apply).lower(variables, x).as_text()
  assert ("convolution" in text) == (
      form in ("native", "eigen", "space_to_depth")), \
      text.count("conv")
  if form in ("eigen", "space_to_depth"):  # out of YNNPACK's reach
    assert "__ynn_fusion" not in jax.jit(ours.apply).lower(variables, x).compile(
    ).as_text()

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  grad = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))
  (gv, gx), (rv, rx) = grad(variables, x), jax.grad(loss(ref), (0, 1))(
      variables, x)
  expected = ref.apply(variables, x)
  np.testing.assert_allclose(ours.apply(variables, x), expected, rtol=1e-5,
                             atol=1e-6 * np.abs(expected).max())
  for a, b in zip(jax.tree.leaves((gv, gx)), jax.tree.leaves((rv, rx))):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("shape,kw,form", [LAYER_CASES[0], LAYER_CASES[4]])
def test_conv_layer_adds_a_folded_bias_once(shape, kw, form):
  """A ``bias`` left by fold_batchnorm on a use_bias=False convolution is
  added once, in the CPU form as in the native one."""
  del form
  x, variables = _case_variables(shape, kw, use_bias=True)
  expected = nn.Conv(**kw).apply(variables, x)
  module = layers.Conv(**kw, use_bias=False)
  np.testing.assert_allclose(jax.jit(module.apply)(variables, x), expected,
                             rtol=1e-5, atol=1e-5)
  with conv_forms.native_convolutions():
    native = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  np.testing.assert_allclose(native, expected, rtol=1e-5, atol=1e-5)


# Pools: (input h, w, c), window, strides, padding; the families' pools.
POOL_CASES = [
    ((9, 9, 3), 3, 2, "VALID"),    # ResNet/Inception stems, reductions
    ((8, 9, 3), 3, 2, "SAME"),     # Xception (odd/even: asymmetric SAME)
    ((7, 7, 4), 3, 1, "SAME"),     # Inception/NASNet branch pools
    ((8, 8, 3), 2, 2, "VALID"),    # VGG, DenseNet transitions
    ((7, 7, 3), 2, 2, "SAME"),     # ResNet-RS shortcut
    ((7, 7, 3), 1, 2, "VALID"),    # ResNetV2 / NASNet strided 1x1
]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,window,stride,padding", POOL_CASES)
def test_separable_pool_equals_reduce_window(kind, shape, window, stride,
                                          padding):
  """``pool_separable`` against Flax's ``reduce_window`` pools (the average
  counting only cells inside the input, as Keras); ``layers.max_pool`` /
  ``avg_pool`` take it in the inference form only."""
  x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
  win, st = (window, window), (stride, stride)
  if kind == "max":
    ref = nn.max_pool(x, win, strides=st, padding=padding)
  else:
    ref = nn.avg_pool(x, win, strides=st, padding=padding,
                      count_include_pad=False)
  pads = conv_forms._pads(padding, shape[:2], win, st)  # pylint: disable=protected-access
  out = conv_forms.pool_separable(jnp.asarray(x), kind, win, st, pads)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  fn = {"max": layers.max_pool, "avg": layers.avg_pool}[kind]
  f = jax.jit(lambda x: fn(x, window, stride, padding))
  with conv_forms.inference_forms():
    fast = f.lower(x).compile().as_text()
    np.testing.assert_allclose(f(x), ref, rtol=1e-6, atol=1e-6)
  plain = jax.jit(lambda x: fn(x, window, stride, padding)).lower(
      x).compile().as_text()
  # Slices in the form, XLA's reduce_window in the plain trace.
  windows = lambda hlo: set(re.findall(r"window=\{size=(\S+) ", hlo))
  assert not windows(fast)
  if window > 1:
    assert windows(plain) == {f"1x{window}x{window}x1"}


def _chain(x, kernels, biases):
  """Residual blocks ``relu(x + x @ w + b)`` over channels, each output
  through ``materialize``."""
  for w, b in zip(kernels, biases):
    y = (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape) + b
    x = conv_forms.materialize(jax.nn.relu(x + y))
  return x


def test_materialize_keeps_each_block_output_once():
  """Same values; in the inference form on CPU each block output is a
  buffer (a conditional's result), so no fusion reads more than one block's
  product and bias besides its input. Without it XLA fuses each block's sum
  into the next block's, and the last fusion reads every product and bias
  of the chain (this jaxlib's fusion; one that changes it fails here, and
  the residual families' ``block_output`` would need re-measuring)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 8, 8, 32)).astype(np.float32)
  kernels = [rng.normal(size=(32, 32)).astype(np.float32) * 0.1
             for _ in range(6)]
  biases = [rng.normal(size=(32,)).astype(np.float32) for _ in range(6)]
  # Distinct functions: jax.jit's trace cache does not see the form's switch.
  plain_fn = jax.jit(lambda *a: _chain(*a))
  plain = plain_fn.lower(x, kernels, biases).compile().as_text()
  with conv_forms.inference_forms():
    fast_fn = jax.jit(lambda *a: _chain(*a))
    fast = fast_fn.lower(x, kernels, biases).compile().as_text()
    np.testing.assert_allclose(fast_fn(x, kernels, biases),
                               plain_fn(x, kernels, biases), rtol=1e-6)

  def most_inputs(hlo):  # of any fusion
    return max(len(re.findall(r"param_\d+", line.split("->")[0]))
               for line in hlo.splitlines()
               if line.startswith("%fused_computation"))

  assert fast.count(" conditional(") == 6 and " conditional(" not in plain
  assert most_inputs(plain) >= 12
  assert most_inputs(fast) <= 3


def test_pools_and_block_outputs_stay_native_off_cpu():
  """Lowered for CUDA or TPU, the inference form keeps XLA's pool
  (``reduce_window``) and no conditional for a block output; for CPU it
  takes the slices and the conditional."""
  def body(x):
    x = conv_forms.materialize(jax.nn.relu(x))
    return layers.max_pool(x, 3, 2) + layers.avg_pool(x, 3, 2)

  x = np.zeros((1, 9, 9, 4), np.float32)
  with conv_forms.inference_forms():
    text = {p: jax.export.export(jax.jit(lambda x: body(x)), platforms=(p,))(
        x).mlir_module() for p in ("cpu", "cuda", "tpu")}
  # The block output's conditional tests one element against itself.
  assert "reduce_window" not in text["cpu"]
  assert text["cpu"].count("stablehlo.compare") == 1
  for p in ("cuda", "tpu"):
    # The max, and the average's sum and its count of cells inside x.
    assert text[p].count("stablehlo.reduce_window") == 3, p
    assert "stablehlo.compare" not in text[p], p
