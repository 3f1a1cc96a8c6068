"""MobileNet (v1), mirroring ``keras/src/applications/mobilenet.py``.

``conv1`` then 13 depthwise-separable blocks (``conv_dw_<i>`` depthwise,
``conv_pw_<i>`` pointwise, each with BatchNorm and ReLU6). A strided block
pads with ``conv_pad_<i>`` = ``ZeroPadding2D(((0, 1), (0, 1)))`` and runs a
``valid`` depthwise conv. The top is not a Dense: global average pooling
(kept 1x1), ``dropout``, a 1x1 ``conv_preds`` Conv2D with bias, a reshape
to ``(classes,)`` and the ``predictions`` Activation.

Options, with Keras' names: ``alpha`` (width; 0.25, 0.5, 0.75, 1.0 have
ImageNet weights, any positive value builds), ``depth_multiplier`` (depthwise
channel multiplier, 1 for ImageNet) and ``dropout`` (rate before
``conv_preds``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # Keras' BatchNormalization defaults (epsilon=1e-3,
MOMENTUM = 0.99  # momentum=0.99): mobilenet.py sets neither
ALPHAS = (0.25, 0.5, 0.75, 1.0)  # with ImageNet weights
SIZES = (128, 160, 192, 224)  # with ImageNet weights

# (pointwise filters, stride) of _depthwise_conv_block, block_id 1 … 13.
BLOCKS = (
    (64, 1),
    (128, 2), (128, 1),
    (256, 2), (256, 1),
    (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)


class MobileNet(nn.Module):
  """Keras ``MobileNet``.

  Attributes:
    alpha: width multiplier; every conv has ``int(filters * alpha)``
      filters (no rounding to a multiple of 8, unlike MobileNetV2).
    depth_multiplier: depthwise channel multiplier of every ``conv_dw_<i>``.
    dropout: rate of the ``dropout`` layer before ``conv_preds``.
    include_top: add the pooling, ``dropout``, ``conv_preds`` top.
    classes: output channels of ``conv_preds``.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  alpha: float = 1.0
  depth_multiplier: int = 1
  dropout: float = 1e-3
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           train=train)
    # _conv_block: 'same' at stride 2, TF's padding (extra row at the bottom
    # for even sizes), which Flax's "SAME" reproduces.
    x = L.conv(x, int(32 * self.alpha), 3, strides=2, padding="SAME",
               use_bias=False, name="conv1")
    x = nn.relu6(bn(x, name="conv1_bn"))
    for block_id, (filters, stride) in enumerate(BLOCKS, start=1):
      x = _depthwise_conv_block(x, bn, int(filters * self.alpha),
                                self.depth_multiplier, stride, block_id)
    if not self.include_top:
      return x if self.pooling is None else L.global_pool(x, self.pooling)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)  # GlobalAveragePooling2D
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    x = L.conv(x, self.classes, 1, padding="SAME", name="conv_preds")
    x = x.reshape(x.shape[0], self.classes)  # reshape_2
    return L.activation(self.classifier_activation)(x)  # predictions


def _depthwise_conv_block(x: jax.Array, bn: Callable[..., jax.Array],
                          filters: int, depth_multiplier: int, stride: int,
                          block_id: int) -> jax.Array:
  """Keras ``_depthwise_conv_block``.

  Args:
    x: the block input.
    bn: ``L.batch_norm`` with the family epsilon/momentum and ``train``.
    filters: output channels of ``conv_pw_<block_id>`` (``alpha`` applied).
    depth_multiplier: depthwise channel multiplier.
    stride: 1 (``same`` depthwise) or 2 (``conv_pad`` then ``valid``).
    block_id: Keras' block number, 1 … 13.

  Returns:
    The block output (ReLU6 of the pointwise BatchNorm).
  """
  if stride == 1:
    padding = "SAME"
  else:
    # conv_pad_<id>: bottom/right only, whatever the parity of the size
    # (not correct_pad as in MobileNetV2).
    x = L.zero_pad(x, ((0, 1), (0, 1)))
    padding = "VALID"
  x = L.depthwise_conv(x, 3, strides=stride, padding=padding, use_bias=False,
                       depth_multiplier=depth_multiplier,
                       name=f"conv_dw_{block_id}")
  x = nn.relu6(bn(x, name=f"conv_dw_{block_id}_bn"))
  x = L.conv(x, filters, 1, padding="SAME", use_bias=False,
             name=f"conv_pw_{block_id}")
  return nn.relu6(bn(x, name=f"conv_pw_{block_id}_bn"))


register(ModelSpec(
    name="mobilenet",
    keras_name="MobileNet",
    family="mobilenet",
    flax_cls=MobileNet,
    keras_fn="keras.applications.MobileNet",
    keras_preprocess="keras.applications.mobilenet",
    input_shape=(224, 224, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=32,
    options={"alpha": 1.0, "depth_multiplier": 1, "dropout": 1e-3},
    # keras/src/applications/mobilenet.py: the ImageNet alphas.
    option_choices={"alpha": (1.0, 0.75, 0.5, 0.25)},
))
