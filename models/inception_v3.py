"""InceptionV3, mirroring ``keras/src/applications/inception_v3.py``.

Keras leaves the ``conv2d_bn`` layers unnamed, so they are called ``conv2d``,
``conv2d_1``, … and ``batch_normalization``, ``batch_normalization_1``, … in
construction order (the names of a fresh session). The Flax leaves take the
same names from a counter; ``translate`` renumbers the Keras layers by rank,
so a Keras session counter shifted by earlier models changes nothing.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # Keras' BatchNormalization default


class _ConvBN:
  """Keras ``conv2d_bn`` with auto-names from one counter per model."""

  def __init__(self, train: bool):
    self.count = 0
    self.train = train

  def __call__(self, x, filters, num_row, num_col, padding="SAME",
               strides=1):
    suffix = f"_{self.count}" if self.count else ""
    self.count += 1
    x = L.conv(x, filters, (num_row, num_col), strides=strides,
               padding=padding, use_bias=False, name="conv2d" + suffix)
    # BatchNormalization(scale=False): no gamma.
    x = L.batch_norm(x, epsilon=EPSILON, train=self.train, scale=False,
                     name="batch_normalization" + suffix)
    return nn.relu(x)


def _avg3(x):
  """AveragePooling2D((3, 3), strides=(1, 1), padding="same"), padding
  excluded from the mean as in Keras."""
  return L.avg_pool(x, 3, strides=1, padding="SAME")


class InceptionV3(nn.Module):
  """Keras ``InceptionV3``.

  Attributes:
    include_top: add global average pooling and the ``predictions`` Dense.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cb = _ConvBN(train)
    cat = lambda xs: jnp.concatenate(xs, axis=-1)  # noqa: E731
    x = cb(x, 32, 3, 3, strides=2, padding="VALID")
    x = cb(x, 32, 3, 3, padding="VALID")
    x = cb(x, 64, 3, 3)
    x = L.max_pool(x, 3, strides=2)
    x = cb(x, 80, 1, 1, padding="VALID")
    x = cb(x, 192, 3, 3, padding="VALID")
    x = L.max_pool(x, 3, strides=2)

    # mixed0, mixed1, mixed2: 35 x 35
    for pool_filters in (32, 64, 64):
      b1 = cb(x, 64, 1, 1)
      b5 = cb(cb(x, 48, 1, 1), 64, 5, 5)
      b3 = cb(cb(cb(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
      bp = cb(_avg3(x), pool_filters, 1, 1)
      x = cat([b1, b5, b3, bp])

    # mixed3: 17 x 17
    b3 = cb(x, 384, 3, 3, strides=2, padding="VALID")
    bd = cb(cb(cb(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2,
            padding="VALID")
    x = cat([b3, bd, L.max_pool(x, 3, strides=2)])

    # mixed4 (128), mixed5, mixed6 (160), mixed7 (192)
    for f in (128, 160, 160, 192):
      b1 = cb(x, 192, 1, 1)
      b7 = cb(cb(cb(x, f, 1, 1), f, 1, 7), 192, 7, 1)
      bd = cb(x, f, 1, 1)
      bd = cb(cb(cb(cb(bd, f, 7, 1), f, 1, 7), f, 7, 1), 192, 1, 7)
      bp = cb(_avg3(x), 192, 1, 1)
      x = cat([b1, b7, bd, bp])

    # mixed8: 8 x 8
    b3 = cb(cb(x, 192, 1, 1), 320, 3, 3, strides=2, padding="VALID")
    b7 = cb(cb(cb(x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
    b7 = cb(b7, 192, 3, 3, strides=2, padding="VALID")
    x = cat([b3, b7, L.max_pool(x, 3, strides=2)])

    # mixed9, mixed10
    for _ in range(2):
      b1 = cb(x, 320, 1, 1)
      b3 = cb(x, 384, 1, 1)
      b3 = cat([cb(b3, 384, 1, 3), cb(b3, 384, 3, 1)])  # mixed9_i
      bd = cb(cb(x, 448, 1, 1), 384, 3, 3)
      bd = cat([cb(bd, 384, 1, 3), cb(bd, 384, 3, 1)])
      bp = cb(_avg3(x), 192, 1, 1)
      x = cat([b1, b3, bd, bp])

    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


register(ModelSpec(
    name="inceptionv3",
    keras_name="InceptionV3",
    family="inception_v3",
    flax_cls=InceptionV3,
    keras_fn="keras.applications.InceptionV3",
    keras_preprocess="keras.applications.inception_v3",
    input_shape=(299, 299, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=75,
))
