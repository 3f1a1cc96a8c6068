"""Xception, mirroring ``keras/src/applications/xception.py``.

Entry flow (``block1`` … ``block4``), eight middle-flow blocks
(``block5`` … ``block12``) and the exit flow (``block13``, ``block14``), built
from ``SeparableConv2D`` layers named ``block<b>_sepconv<i>``. The four
strided 1x1 residual convolutions and their BatchNorms are unnamed in Keras,
so their names come from Keras' counter in construction order: ``conv2d``
(block 2) … ``conv2d_3`` (block 13), ``batch_normalization`` …
``batch_normalization_3`` (``translate`` renumbers a session's names to
these).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # Keras' BatchNormalization defaults (epsilon=1e-3,
MOMENTUM = 0.99  # momentum=0.99): xception.py sets neither
# (block, (sepconv1, sepconv2 filters), ReLU before sepconv1) of the blocks
# with a strided 1x1 shortcut; their shortcuts are Keras' conv2d, conv2d_1,
# conv2d_2 (entry flow) and conv2d_3 (exit flow), in this order.
ENTRY_BLOCKS = ((2, (128, 128), False), (3, (256, 256), True),
                (4, (728, 728), True))
EXIT_BLOCK = (13, (728, 1024), True)
MIDDLE_BLOCKS = 8  # block5 … block12, 728 channels each


class Xception(nn.Module):
  """Keras ``Xception``.

  Attributes:
    include_top: add ``avg_pool`` and the ``predictions`` Dense.
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
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           train=train)
    sep = functools.partial(L.separable_conv, kernel=3, padding="SAME",
                            use_bias=False)
    # Entry flow. Unlike the other convolutions, block1's are 'valid'.
    x = L.conv(x, 32, 3, strides=2, use_bias=False, name="block1_conv1")
    x = nn.relu(bn(x, name="block1_conv1_bn"))
    x = L.conv(x, 64, 3, use_bias=False, name="block1_conv2")
    x = nn.relu(bn(x, name="block1_conv2_bn"))

    # block2 has no ReLU before its first separable conv (x is already
    # ReLU-ed); Keras names the ReLU between the two "block2_sepconv2_act".
    for rank, (block, filters, first_relu) in enumerate(ENTRY_BLOCKS):
      x = _downsampling_block(x, bn, sep, rank, block, filters, first_relu)

    # Middle flow: three ReLU-sepconv-BN with an identity shortcut.
    for block in range(5, 5 + MIDDLE_BLOCKS):
      residual = x
      for i in (1, 2, 3):
        x = sep(nn.relu(x), 728, name=f"block{block}_sepconv{i}")
        x = bn(x, name=f"block{block}_sepconv{i}_bn")
      x = x + residual

    # Exit flow.
    x = _downsampling_block(x, bn, sep, len(ENTRY_BLOCKS), *EXIT_BLOCK)
    x = sep(x, 1536, name="block14_sepconv1")
    x = nn.relu(bn(x, name="block14_sepconv1_bn"))
    x = sep(x, 2048, name="block14_sepconv2")
    x = nn.relu(bn(x, name="block14_sepconv2_bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


def _downsampling_block(x: jax.Array, bn: Callable[..., jax.Array],
                        sep: Callable[..., jax.Array], residual_id: int,
                        block: int, filters: tuple[int, int],
                        first_relu: bool) -> jax.Array:
  """An entry/exit-flow block: two separable convs and a 3x3/2 max pool,
  plus a strided 1x1 conv + BN shortcut.

  Args:
    x: the block input.
    bn: ``L.batch_norm`` with the family epsilon/momentum and ``train``.
    sep: ``L.separable_conv`` (3x3, ``same``, no bias).
    residual_id: rank of the shortcut's auto-named ``conv2d`` /
      ``batch_normalization`` pair (0 … 3).
    block: Keras block number (2, 3, 4 or 13).
    filters: output channels of ``sepconv1`` and ``sepconv2`` (the shortcut
      has the second).
    first_relu: whether a ReLU precedes ``sepconv1`` (all but block 2).

  Returns:
    ``max_pool(...) + shortcut``.
  """
  suffix = f"_{residual_id}" if residual_id else ""
  residual = L.conv(x, filters[1], 1, strides=2, padding="SAME",
                    use_bias=False, name=f"conv2d{suffix}")
  residual = bn(residual, name=f"batch_normalization{suffix}")
  if first_relu:
    x = nn.relu(x)
  x = sep(x, filters[0], name=f"block{block}_sepconv1")
  x = nn.relu(bn(x, name=f"block{block}_sepconv1_bn"))
  x = sep(x, filters[1], name=f"block{block}_sepconv2")
  x = bn(x, name=f"block{block}_sepconv2_bn")
  # 'same' max pool: TF ignores the padded cells, as Flax's -inf padding.
  x = L.max_pool(x, 3, 2, padding="SAME")
  return x + residual


register(ModelSpec(
    name="xception",
    keras_name="Xception",
    family="xception",
    flax_cls=Xception,
    keras_fn="keras.applications.Xception",
    keras_preprocess="keras.applications.xception",
    input_shape=(299, 299, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=71,
))
