"""The CPU forms of convolutions (models/conv_forms.py): im2col + one
dot_general against ``lax.conv_general_dilated``, on tiny synthetic shapes,
for the strides, paddings and kernels the families use; and
``models.layers.Conv``, which picks a form per convolution, against
``nn.Conv`` in values and gradients."""

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
     "native"),  # 256 output pixels: above the im2col limit
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
  x, variables = _case_variables(shape, kw)
  ours, ref = layers.Conv(**kw), nn.Conv(**kw)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == \
      jax.tree.map(jnp.shape, variables)  # the same variables as nn.Conv
  kernel = variables["params"]["kernel"]
  geometry = conv_forms.plain_geometry(ours, x, kernel)
  assert conv_forms.cpu_form(x.shape, kernel.shape, *geometry,
                             kw.get("feature_group_count", 1)) == form
  text = jax.jit(ours.apply).lower(variables, x).as_text()
  assert ("convolution" in text) == (form == "native"), text.count("conv")

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  grad = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))
  (gv, gx), (rv, rx) = grad(variables, x), jax.grad(loss(ref), (0, 1))(
      variables, x)
  np.testing.assert_allclose(ours.apply(variables, x),
                             ref.apply(variables, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves((gv, gx)), jax.tree.leaves((rv, rx))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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
