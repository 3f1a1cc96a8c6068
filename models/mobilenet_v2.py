"""MobileNetV2, mirroring ``keras/src/applications/mobilenet_v2.py``.

One registry entry (``mobilenetv2``, alpha 1.0 at 224); ``alpha`` and
``input_shape`` reach every width (0.35 … 1.4) and size (96 … 224) Keras
accepts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # keras mobilenet_v2.py: BatchNormalization(epsilon=1e-3,
MOMENTUM = 0.999  # momentum=0.999)
ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # with ImageNet weights
SIZES = (96, 128, 160, 192, 224)

# (filters, stride, expansion) of _inverted_res_block, block_id 0 … 16.
BLOCKS = (
    (16, 1, 1),
    (24, 2, 6), (24, 1, 6),
    (32, 2, 6), (32, 1, 6), (32, 1, 6),
    (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6),
    (96, 1, 6), (96, 1, 6), (96, 1, 6),
    (160, 2, 6), (160, 1, 6), (160, 1, 6),
    (320, 1, 6),
)


class MobileNetV2(nn.Module):
  """Keras ``MobileNetV2``.

  Attributes:
    alpha: width multiplier.
    include_top: add global average pooling and the ``predictions`` Dense.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  alpha: float = 1.0
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           train=train)
    # 'same' at stride 2: Flax pads like TF (the odd extra row at the bottom).
    x = L.conv(x, L.make_divisible(32 * self.alpha, 8), 3, strides=2,
               padding="SAME", use_bias=False, name="Conv1")
    x = nn.relu6(bn(x, name="bn_Conv1"))
    for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
      x = _inverted_res_block(x, bn, expansion, stride, self.alpha, filters,
                              block_id)
    # No alpha on the last conv unless alpha > 1 (as in Keras).
    last = L.make_divisible(1280 * self.alpha, 8) if self.alpha > 1.0 else 1280
    x = L.conv(x, last, 1, use_bias=False, name="Conv_1")
    x = nn.relu6(bn(x, name="Conv_1_bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


def _inverted_res_block(inputs: jax.Array, bn: Callable[..., jax.Array],
                        expansion: int, stride: int, alpha: float,
                        filters: int, block_id: int) -> jax.Array:
  """Keras ``_inverted_res_block``.

  Args:
    inputs: the block input.
    bn: ``L.batch_norm`` with the family epsilon/momentum and ``train`` bound.
    expansion: expansion factor of the 1x1 ``expand`` conv (block 0 has
      none).
    stride: 1 or 2 (2: ``correct_pad`` then a ``valid`` depthwise conv).
    alpha: width multiplier.
    filters: output filters before ``alpha`` and rounding to a multiple of 8.
    block_id: Keras' block index; block 0 is named ``expanded_conv_``.

  Returns:
    The block output (with the residual added when shapes allow, as Keras).
  """
  in_channels = inputs.shape[-1]
  pointwise_filters = L.make_divisible(int(filters * alpha), 8)
  x = inputs
  prefix = f"block_{block_id}_"
  if block_id:
    x = L.conv(x, expansion * in_channels, 1, padding="SAME", use_bias=False,
               name=f"{prefix}expand")
    x = nn.relu6(bn(x, name=f"{prefix}expand_BN"))
  else:
    prefix = "expanded_conv_"
  if stride == 2:
    x = L.zero_pad(x, L.correct_pad(x, 3))
  x = L.depthwise_conv(x, 3, strides=stride, use_bias=False,
                       padding="SAME" if stride == 1 else "VALID",
                       name=f"{prefix}depthwise")
  x = nn.relu6(bn(x, name=f"{prefix}depthwise_BN"))
  x = L.conv(x, pointwise_filters, 1, padding="SAME", use_bias=False,
             name=f"{prefix}project")
  x = bn(x, name=f"{prefix}project_BN")
  if in_channels == pointwise_filters and stride == 1:
    return inputs + x
  return x


register(ModelSpec(
    name="mobilenetv2",
    keras_name="MobileNetV2",
    family="mobilenet_v2",
    flax_cls=MobileNetV2,
    keras_fn="keras.applications.MobileNetV2",
    keras_preprocess="keras.applications.mobilenet_v2",
    input_shape=(224, 224, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=32,
    options={"alpha": 1.0},
    # keras/src/applications/mobilenet_v2.py: the ImageNet alphas.
    option_choices={"alpha": (1.0, 0.35, 0.5, 0.75, 1.3, 1.4)},
))
