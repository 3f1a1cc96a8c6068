"""DenseNet121/169/201, mirroring ``keras/src/applications/densenet.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1.001e-5  # keras densenet.py: BatchNormalization(epsilon=1.001e-5)
GROWTH_RATE = 32  # conv_block(x, 32, ...) in dense_block
REDUCTION = 0.5  # transition_block(x, 0.5, ...)

# Blocks per dense block, from DenseNet121/169/201 in Keras.
BLOCKS = {
    121: (6, 12, 24, 16),
    169: (6, 12, 32, 32),
    201: (6, 12, 48, 32),
}


class DenseNet(nn.Module):
  """Keras ``DenseNet``.

  Attributes:
    blocks: conv blocks in each of the four dense blocks (conv2 … conv5).
    include_top: add global average pooling and the ``predictions`` Dense.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  blocks: Sequence[int]
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, train=train)
    x = L.zero_pad(x, 3)  # ZeroPadding2D(3) + 7x7/2 valid conv: not SAME
    x = L.conv(x, 64, 7, strides=2, use_bias=False, name="conv1_conv")
    x = nn.relu(bn(x, name="conv1_bn"))
    x = L.zero_pad(x, 1)  # Keras zero-pads before the max-pool
    x = L.max_pool(x, 3, strides=2)
    for i, blocks in enumerate(self.blocks):
      for j in range(blocks):
        x = _conv_block(x, bn, name=f"conv{i + 2}_block{j + 1}")
      if i < len(self.blocks) - 1:
        x = _transition_block(x, bn, name=f"pool{i + 2}")
    x = nn.relu(bn(x, name="bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


def _conv_block(x: jax.Array, bn: Callable[..., jax.Array], name: str
                ) -> jax.Array:
  """Keras ``conv_block``: BN-ReLU-1x1-BN-ReLU-3x3, concatenated after x.

  Args:
    x: the block input (all earlier features of the dense block).
    bn: ``L.batch_norm`` with the family epsilon and ``train`` bound.
    name: Keras block label, e.g. ``"conv2_block1"``.

  Returns:
    ``x`` with ``GROWTH_RATE`` new channels appended.
  """
  x1 = nn.relu(bn(x, name=f"{name}_0_bn"))
  x1 = L.conv(x1, 4 * GROWTH_RATE, 1, use_bias=False, name=f"{name}_1_conv")
  x1 = nn.relu(bn(x1, name=f"{name}_1_bn"))
  x1 = L.conv(x1, GROWTH_RATE, 3, padding="SAME", use_bias=False,
              name=f"{name}_2_conv")
  return jnp.concatenate([x, x1], axis=-1)  # Concatenate()([x, x1])


def _transition_block(x: jax.Array, bn: Callable[..., jax.Array], name: str
                      ) -> jax.Array:
  """Keras ``transition_block``: BN-ReLU-1x1 conv, 2x2 average pooling.

  Args:
    x: the output of a dense block.
    bn: ``L.batch_norm`` with the family epsilon and ``train`` bound.
    name: Keras block label, e.g. ``"pool2"``.

  Returns:
    Half the channels (``int(c * REDUCTION)``, as Keras) at half the size
    (floored: a 2x2/2 ``valid`` pool drops an odd last row/column).
  """
  x = nn.relu(bn(x, name=f"{name}_bn"))
  x = L.conv(x, int(x.shape[-1] * REDUCTION), 1, use_bias=False,
             name=f"{name}_conv")
  return L.avg_pool(x, 2, strides=2)


for _depth, _blocks in BLOCKS.items():
  register(ModelSpec(
      name=f"densenet{_depth}",
      keras_name=f"DenseNet{_depth}",
      family="densenet",
      flax_cls=functools.partial(DenseNet, blocks=_blocks),
      keras_fn=f"keras.applications.DenseNet{_depth}",
      keras_preprocess="keras.applications.densenet",
      input_shape=(224, 224, 3),
      preprocess="torch",
      bn_epsilon=EPSILON,
      min_size=32,
      slow=_depth != 121,  # the README tier runs DenseNet121; CI the rest
  ))
