"""InceptionResNetV2, mirroring ``keras/src/applications/inception_resnet_v2.py``.

Keras leaves most ``conv2d_bn`` layers unnamed, so they are ``conv2d``,
``conv2d_1``, … and ``batch_normalization``, ``batch_normalization_1``, … in
construction order (the names of a fresh session); ``translate`` renumbers
Keras' auto names by rank, so a shifted session counter changes nothing. The
named layers keep Keras' names: ``block35_1_conv`` (the residual's 1x1
projection, with a bias and no BatchNorm), ``conv_7b`` / ``conv_7b_bn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # conv2d_bn: BatchNormalization(axis, scale=False), defaults
MOMENTUM = 0.99

# (block_type, number of blocks, residual scale); the last block8 (idx 10)
# has scale 1.0 and no activation.
STAGES = (("block35", 10, 0.17), ("block17", 20, 0.1), ("block8", 10, 0.2))


class _ConvBN:
  """Keras ``conv2d_bn``: Conv2D (no bias) + BatchNormalization(scale=False)
  + ReLU; unnamed calls take auto-names from one counter per model."""

  def __init__(self, train: bool):
    self.count = 0
    self.train = train

  def __call__(self, x: jax.Array, filters: int,
               kernel: int | Sequence[int], strides: int = 1,
               padding: str = "SAME", name: str | None = None) -> jax.Array:
    if name is None:
      suffix = f"_{self.count}" if self.count else ""
      self.count += 1
      conv_name, bn_name = "conv2d" + suffix, "batch_normalization" + suffix
    else:
      conv_name, bn_name = name, f"{name}_bn"
    x = L.conv(x, filters, kernel, strides=strides, padding=padding,
               use_bias=False, name=conv_name)
    x = L.batch_norm(x, epsilon=EPSILON, momentum=MOMENTUM, train=self.train,
                     scale=False, name=bn_name)
    return nn.relu(x)


def _cat(xs: Sequence[jax.Array]) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


def inception_resnet_block(cb: _ConvBN, x: jax.Array, scale: float,
                           block_type: str, block_idx: int,
                           activation: bool = True) -> jax.Array:
  """Keras ``inception_resnet_block``: ``x + scale * up(branches(x))``.

  Args:
    cb: the model's ``conv2d_bn`` (its counter names the branch layers).
    x: input feature map.
    scale: residual scale (Keras ``CustomScaleLayer``).
    block_type: ``"block35"``, ``"block17"`` or ``"block8"``.
    block_idx: 1-based index; names ``{block_type}_{block_idx}_conv``.
    activation: ReLU after the sum (``{block}_ac``); off for block8_10.

  Returns:
    The block output, with the channels of ``x``.
  """
  if block_type == "block35":
    b0 = cb(x, 32, 1)
    b1 = cb(cb(x, 32, 1), 32, 3)
    b2 = cb(cb(cb(x, 32, 1), 48, 3), 64, 3)
    branches = [b0, b1, b2]
  elif block_type == "block17":
    b0 = cb(x, 192, 1)
    b1 = cb(cb(cb(x, 128, 1), 160, (1, 7)), 192, (7, 1))
    branches = [b0, b1]
  elif block_type == "block8":
    b0 = cb(x, 192, 1)
    b1 = cb(cb(cb(x, 192, 1), 224, (1, 3)), 256, (3, 1))
    branches = [b0, b1]
  else:
    raise ValueError(f"unknown Inception-ResNet block type {block_type!r}")
  # conv2d_bn(..., activation=None, use_bias=True): a plain biased conv.
  up = L.conv(_cat(branches), x.shape[-1], 1, padding="SAME", use_bias=True,
              name=f"{block_type}_{block_idx}_conv")
  x = x + up * scale  # CustomScaleLayer: inputs[0] + inputs[1] * scale
  return L.block_output(nn.relu(x) if activation else x)


class InceptionResNetV2(nn.Module):
  """Keras ``InceptionResNetV2``.

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
    # Stem: 35 x 35 x 192 at 299.
    x = cb(x, 32, 3, strides=2, padding="VALID")
    x = cb(x, 32, 3, padding="VALID")
    x = cb(x, 64, 3)
    x = L.max_pool(x, 3, strides=2)
    x = cb(x, 80, 1, padding="VALID")
    x = cb(x, 192, 3, padding="VALID")
    x = L.max_pool(x, 3, strides=2)

    # mixed_5b (Inception-A): 35 x 35 x 320
    b0 = cb(x, 96, 1)
    b1 = cb(cb(x, 48, 1), 64, 5)
    b2 = cb(cb(cb(x, 64, 1), 96, 3), 96, 3)
    bp = cb(L.avg_pool(x, 3, strides=1, padding="SAME"), 64, 1)
    x = _cat([b0, b1, b2, bp])

    (t35, n35, s35), (t17, n17, s17), (t8, n8, s8) = STAGES
    for i in range(1, n35 + 1):
      x = inception_resnet_block(cb, x, s35, t35, i)

    # mixed_6a (Reduction-A): 17 x 17 x 1088
    b0 = cb(x, 384, 3, strides=2, padding="VALID")
    b1 = cb(cb(cb(x, 256, 1), 256, 3), 384, 3, strides=2, padding="VALID")
    x = _cat([b0, b1, L.max_pool(x, 3, strides=2)])

    for i in range(1, n17 + 1):
      x = inception_resnet_block(cb, x, s17, t17, i)

    # mixed_7a (Reduction-B): 8 x 8 x 2080
    b0 = cb(cb(x, 256, 1), 384, 3, strides=2, padding="VALID")
    b1 = cb(cb(x, 256, 1), 288, 3, strides=2, padding="VALID")
    b2 = cb(cb(cb(x, 256, 1), 288, 3), 320, 3, strides=2, padding="VALID")
    x = _cat([b0, b1, b2, L.max_pool(x, 3, strides=2)])

    for i in range(1, n8):
      x = inception_resnet_block(cb, x, s8, t8, i)
    x = inception_resnet_block(cb, x, 1.0, t8, n8, activation=False)

    x = cb(x, 1536, 1, name="conv_7b")  # 8 x 8 x 1536
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


register(ModelSpec(
    name="inceptionresnetv2",
    keras_name="InceptionResNetV2",
    family="inception_resnet_v2",
    flax_cls=InceptionResNetV2,
    keras_fn="keras.applications.InceptionResNetV2",
    keras_preprocess="keras.applications.inception_resnet_v2",
    input_shape=(299, 299, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=75,
))
