"""ResNet (v1) and ResNetV2, mirroring ``keras/src/applications/resnet.py``
and ``resnet_v2.py``.

Layer names, paddings and the epsilon are copied from the Keras source so the
Flax tree carries exactly the Keras layer names.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1.001e-5  # keras resnet.py: BatchNormalization(epsilon=1.001e-5)

# Blocks per stack, from ResNet50/101/152's stack_fn in Keras.
STAGE_SIZES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_FILTERS = (64, 128, 256, 512)


class ResNet(nn.Module):
  """Keras ``ResNet`` (``preact=False``) and ``ResNetV2`` (``preact=True``).

  Attributes:
    stage_sizes: blocks in each of the four stacks (conv2 … conv5).
    preact: ``True`` for ResNetV2 (pre-activation blocks).
    include_top: add global average pooling and the ``predictions`` Dense.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None`` for
      logits.
  """

  stage_sizes: Sequence[int]
  preact: bool = False
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, train=train)
    x = L.zero_pad(x, 3)  # ZeroPadding2D(3) + 7x7/2 valid conv: not SAME
    x = L.conv(x, 64, 7, strides=2, name="conv1_conv")
    if not self.preact:
      x = nn.relu(bn(x, name="conv1_bn"))
    x = L.zero_pad(x, 1)  # Keras zero-pads before the max-pool
    x = L.max_pool(x, 3, strides=2)

    for stack, (filters, blocks) in enumerate(
        zip(STAGE_FILTERS, self.stage_sizes)):
      name = f"conv{stack + 2}"
      if self.preact:
        stride1 = 1 if stack == 3 else 2  # conv5 uses stride1=1 in Keras
        x = _block_v2(x, filters, bn, conv_shortcut=True,
                      name=f"{name}_block1")
        for i in range(2, blocks):
          x = _block_v2(x, filters, bn, name=f"{name}_block{i}")
        x = _block_v2(x, filters, bn, stride=stride1,
                      name=f"{name}_block{blocks}")
      else:
        stride1 = 1 if stack == 0 else 2  # conv2 uses stride1=1 in Keras
        x = _block_v1(x, filters, bn, stride=stride1, name=f"{name}_block1")
        for i in range(2, blocks + 1):
          x = _block_v1(x, filters, bn, conv_shortcut=False,
                        name=f"{name}_block{i}")

    if self.preact:
      x = nn.relu(bn(x, name="post_bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


def _block_v1(x, filters, bn, stride=1, conv_shortcut=True, name=""):
  """Keras ``residual_block_v1``."""
  if conv_shortcut:
    shortcut = L.conv(x, 4 * filters, 1, strides=stride, name=f"{name}_0_conv")
    shortcut = bn(shortcut, name=f"{name}_0_bn")
  else:
    shortcut = x
  x = L.conv(x, filters, 1, strides=stride, name=f"{name}_1_conv")
  x = nn.relu(bn(x, name=f"{name}_1_bn"))
  x = L.conv(x, filters, 3, padding="SAME", name=f"{name}_2_conv")
  x = nn.relu(bn(x, name=f"{name}_2_bn"))
  x = L.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
  x = bn(x, name=f"{name}_3_bn")
  return L.block_output(nn.relu(shortcut + x))


def _block_v2(x, filters, bn, stride=1, conv_shortcut=False, name=""):
  """Keras ``residual_block_v2``."""
  preact = nn.relu(bn(x, name=f"{name}_preact_bn"))
  if conv_shortcut:
    shortcut = L.conv(preact, 4 * filters, 1, strides=stride,
                      name=f"{name}_0_conv")
  else:
    # MaxPooling2D(1, strides=stride) is a strided subsample.
    shortcut = L.max_pool(x, 1, strides=stride) if stride > 1 else x
  x = L.conv(preact, filters, 1, use_bias=False, name=f"{name}_1_conv")
  x = nn.relu(bn(x, name=f"{name}_1_bn"))
  x = L.zero_pad(x, 1)
  x = L.conv(x, filters, 3, strides=stride, use_bias=False,
             name=f"{name}_2_conv")
  x = nn.relu(bn(x, name=f"{name}_2_bn"))
  x = L.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
  return shortcut + x


for _depth in (50, 101, 152):
  for _v2 in (False, True):
    _suffix = "V2" if _v2 else ""
    register(ModelSpec(
        name=f"resnet{_depth}{_suffix.lower()}",
        keras_name=f"ResNet{_depth}{_suffix}",
        family="resnet",
        flax_cls=functools.partial(ResNet, stage_sizes=STAGE_SIZES[_depth],
                                   preact=_v2),
        keras_fn=f"keras.applications.ResNet{_depth}{_suffix}",
        keras_preprocess=("keras.applications.resnet_v2" if _v2
                          else "keras.applications.resnet"),
        input_shape=(224, 224, 3),
        preprocess="tf" if _v2 else "caffe",
        bn_epsilon=EPSILON,
        min_size=32,
        slow=_depth != 50,  # the README tier runs one depth per variant
    ))
