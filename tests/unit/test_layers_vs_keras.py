"""Leaf helpers against the Keras layers they mirror, on non-square inputs
with asymmetric settings (a swapped height/width cannot pass)."""

import keras
import numpy as np
import pytest

from models import layers as L
from keras.src.applications import imagenet_utils

X = np.random.default_rng(0).normal(size=(2, 7, 10, 3)).astype(np.float32)


@pytest.mark.parametrize("pad", [((1, 2), (3, 0)), ((0, 3), (2, 1)), 2])
def test_zero_pad_per_axis(pad):
  want = keras.layers.ZeroPadding2D(pad)(X)
  got = L.zero_pad(X, pad)
  assert got.shape == tuple(want.shape)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1, 7, 10, 3), (1, 10, 7, 3),
                                   (1, 8, 9, 3), (1, 9, 8, 3)])
def test_correct_pad_per_axis(shape):
  x = np.zeros(shape, np.float32)
  want = imagenet_utils.correct_pad(keras.ops.convert_to_tensor(x), 3)
  assert L.correct_pad(x, 3) == tuple(map(tuple, want))


@pytest.mark.parametrize("pool,strides,padding", [
    (3, 2, "same"), (3, 2, "valid"), (2, 1, "same"), (3, 1, "same")])
def test_pooling_on_non_square_maps(pool, strides, padding):
  x = X - 3.0  # all negative near the edges: -inf vs 0 padding would show
  np.testing.assert_allclose(
      L.max_pool(x, pool, strides, padding),
      keras.layers.MaxPooling2D(pool, strides, padding)(x), rtol=1e-6)
  np.testing.assert_allclose(
      L.avg_pool(x, pool, strides, padding),
      keras.layers.AveragePooling2D(pool, strides, padding)(x),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [k for k in L.ACTIVATIONS if k])
def test_every_activation_equals_keras(name):
  x = np.linspace(-8, 8, 2 * 161, dtype=np.float32).reshape(2, 161)
  want = np.asarray(keras.activations.get(name)(x))
  np.testing.assert_allclose(L.activation(name)(x), want, rtol=1e-5,
                             atol=1e-6)


def test_no_activation_is_identity_and_unknown_names_are_refused():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(L.activation(None)(x), x)
  with pytest.raises(ValueError, match="unsupported classifier_activation "
                     "'softplusx'"):
    L.activation("softplusx")


@pytest.mark.parametrize("strides,padding,m", [
    (2, "same", 2), (1, "valid", 1), (2, "valid", 3)])
def test_separable_conv_equals_keras(strides, padding, m):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import random_weights  # pylint: disable=g-import-not-at-top
  inp = keras.Input(X.shape[1:])
  out = keras.layers.SeparableConv2D(5, 3, strides=strides, padding=padding,
                                     depth_multiplier=m, name="sep")(inp)
  model = keras.Model(inp, out)
  random_weights.randomize(model, seed=1)

  class Sep(nn.Module):
    @nn.compact
    def __call__(self, x):
      return L.separable_conv(x, 5, 3, strides=strides, padding=padding,
                              depth_multiplier=m, name="sep")

  variables, _ = translate.translate(Sep(), model, X.shape[1:])
  np.testing.assert_allclose(Sep().apply(variables, X), model(X), rtol=1e-5,
                             atol=1e-5)


def test_layer_norm_and_layer_scale_equal_keras():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import translate  # pylint: disable=g-import-not-at-top
  from translate import random_weights  # pylint: disable=g-import-not-at-top
  from keras.src.applications.convnext import LayerScale  # pylint: disable=g-import-not-at-top
  inp = keras.Input(X.shape[1:])
  x = keras.layers.LayerNormalization(epsilon=1e-6, name="ln")(inp + 2.0)
  out = LayerScale(0.5, 3, name="ls")(x)
  model = keras.Model(inp, out)
  random_weights.randomize(model, seed=2)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = L.layer_norm(x + 2.0, epsilon=1e-6, name="ln")
      return L.LayerScale(name="ls")(x)

  variables, _ = translate.translate(M(), model, X.shape[1:])
  # Random gamma, not the 0.5 it was built with: the weight was carried.
  assert not np.allclose(variables["params"]["ls"]["gamma"], 0.5)
  np.testing.assert_allclose(M().apply(variables, X), model(X), rtol=1e-5,
                             atol=1e-5)
