"""The CPU fast path's dense-convolution form (models/inference.py):
im2col + one dot_general against ``lax.conv_general_dilated``, on tiny
synthetic shapes, for the strides, paddings and kernels the families use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import inference

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
  pads = inference._pads(padding, shape[:2], kernel, strides)  # pylint: disable=protected-access
  out = jax.jit(inference.conv_im2col, static_argnums=(2, 3))(
      jnp.asarray(x), jnp.asarray(k), strides, tuple(map(tuple, pads)))
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
