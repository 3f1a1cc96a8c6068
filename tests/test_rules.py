"""Each translation rule against the Keras layer's own output.

One Keras layer with randomized weights (and statistics) is translated into
the Flax leaf helper of the same name and both are run on the same input.
"""

from typing import Any, Callable

import flax.linen as nn
import keras
import numpy as np
import pytest

from models import layers as L
import translate
from translate import random_weights


class One(nn.Module):
  """A Flax model made of one leaf helper call."""
  fn: Callable[..., Any]

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.fn(x)


CASES = {
    "conv2d": (keras.layers.Conv2D(5, 3, strides=2, name="layer"),
               lambda x: L.conv(x, 5, 3, strides=2, name="layer")),
    "conv2d_same_nobias": (
        keras.layers.Conv2D(4, (3, 1), padding="same", use_bias=False,
                            name="layer"),
        lambda x: L.conv(x, 4, (3, 1), padding="same", use_bias=False,
                         name="layer")),
    "depthwise_m1": (keras.layers.DepthwiseConv2D(3, name="layer"),
                     lambda x: L.depthwise_conv(x, 3, name="layer")),
    "depthwise_m3": (
        keras.layers.DepthwiseConv2D(3, depth_multiplier=3, padding="same",
                                     strides=2, name="layer"),
        lambda x: L.depthwise_conv(x, 3, depth_multiplier=3, padding="same",
                                   strides=2, name="layer")),
    "batchnorm": (keras.layers.BatchNormalization(epsilon=1e-3, name="layer"),
                  lambda x: L.batch_norm(x, epsilon=1e-3, train=False,
                                         name="layer")),
    "batchnorm_no_scale": (
        keras.layers.BatchNormalization(epsilon=1e-3, scale=False,
                                        name="layer"),
        lambda x: L.batch_norm(x, epsilon=1e-3, train=False, scale=False,
                               name="layer")),
    "batchnorm_no_center": (
        keras.layers.BatchNormalization(epsilon=1.001e-5, center=False,
                                        name="layer"),
        lambda x: L.batch_norm(x, epsilon=1.001e-5, train=False,
                               center=False, name="layer")),
    "normalization": (keras.layers.Normalization(axis=-1, name="layer"),
                      lambda x: L.Normalization(name="layer")(x)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_keras_layer_output(case):
  make_keras, fn = CASES[case]
  layer = make_keras.from_config(make_keras.get_config())  # fresh per test
  inputs = keras.Input((9, 8, 4))
  model = keras.Model(inputs, layer(inputs))
  if case == "normalization":
    layer.adapt(np.zeros((2, 9, 8, 4), np.float32))  # builds mean/variance
  random_weights.randomize(model, seed=3)
  module = One(fn)
  variables, report = translate.translate(module, model, (9, 8, 4))
  assert report.match_counts == {"exact": 1}
  x = np.random.default_rng(0).normal(size=(2, 9, 8, 4)).astype(np.float32)
  want = np.asarray(model(x, training=False))
  got = np.asarray(module.apply(variables, x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_rule():
  inputs = keras.Input((7,))
  model = keras.Model(inputs, keras.layers.Dense(3, name="layer")(inputs))
  random_weights.randomize(model, seed=4)
  module = One(lambda x: L.dense(x, 3, name="layer"))
  variables, _ = translate.translate(module, model, (7,))
  x = np.random.default_rng(1).normal(size=(4, 7)).astype(np.float32)
  np.testing.assert_allclose(module.apply(variables, x), model(x),
                             rtol=1e-5, atol=1e-5)


def test_depthwise_multiplier_layout_is_not_a_plain_transpose():
  """With m=3 the Keras kernel (h, w, c, m) must become (h, w, 1, c*m)."""
  rule = translate.RULES["DepthwiseConv2D"]["depthwise_kernel"]
  k = np.arange(2 * 2 * 4 * 3).reshape(2, 2, 4, 3)
  out = rule.apply(k)
  assert out.shape == (2, 2, 1, 12)
  # output channel c*m + j is input channel c's j-th filter
  assert out[0, 1, 0, 2 * 3 + 1] == k[0, 1, 2, 1]


def test_unknown_layer_class_is_an_error():
  with pytest.raises(KeyError, match="no translation rule"):
    translate.rules.rule_for("ConvLSTM2D", "conv_lstm2d_1")
