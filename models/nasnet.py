"""NASNet-A (NASNetMobile, NASNetLarge), mirroring
``keras/src/applications/nasnet.py``.

One general module, variants by ``partial`` with Keras' settings
(``penultimate_filters``, ``num_blocks``, ``stem_block_filters``,
``skip_reduction``, ``filter_multiplier``). Every layer with weights is named
by Keras (``separable_conv_1_normal_left1_0``, ``adjust_bn_stem_2``, …), so
there are no session-counter names. Every BatchNorm has momentum 0.9997 and
epsilon 1e-3.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # nasnet.py: BatchNormalization(momentum=0.9997,
MOMENTUM = 0.9997  # epsilon=1e-3) throughout

# Keras NASNetMobile / NASNetLarge arguments of NASNet(...).
MOBILE = {"penultimate_filters": 1056, "num_blocks": 4,
          "stem_block_filters": 32, "skip_reduction": False,
          "filter_multiplier": 2}
LARGE = {"penultimate_filters": 4032, "num_blocks": 6,
         "stem_block_filters": 96, "skip_reduction": True,
         "filter_multiplier": 2}


def _bn(x: jax.Array, name: str, train: bool) -> jax.Array:
  return L.batch_norm(x, epsilon=EPSILON, momentum=MOMENTUM, train=train,
                      name=name)


def _cat(xs: list[jax.Array]) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


def _avg3_same(x: jax.Array) -> jax.Array:
  """AveragePooling2D((3, 3), strides=(1, 1), padding="same"), padding
  excluded from the mean as in Keras."""
  return L.avg_pool(x, 3, strides=1, padding="SAME")


def separable_conv_block(x: jax.Array, filters: int, kernel_size: int = 3,
                         strides: int = 1, *, block_id: str,
                         train: bool) -> jax.Array:
  """Keras ``_separable_conv_block``: 2 x [ReLU, SeparableConv2D, BN].

  Stride 2 zero-pads explicitly (``correct_pad``) and convolves 'valid'; stride
  1 convolves 'same'. Only the first separable conv is strided.
  """
  x = nn.relu(x)
  if strides == 2:
    x = L.zero_pad(x, L.correct_pad(x, kernel_size))
    pad = "VALID"
  else:
    pad = "SAME"
  x = L.separable_conv(x, filters, kernel_size, strides=strides, padding=pad,
                       use_bias=False, name=f"separable_conv_1_{block_id}")
  x = _bn(x, f"separable_conv_1_bn_{block_id}", train)
  x = nn.relu(x)
  x = L.separable_conv(x, filters, kernel_size, padding="SAME",
                       use_bias=False, name=f"separable_conv_2_{block_id}")
  return _bn(x, f"separable_conv_2_bn_{block_id}", train)


def adjust_block(p: jax.Array | None, ip: jax.Array, filters: int, *,
                 block_id: str, train: bool) -> jax.Array:
  """Keras ``_adjust_block``: matches the previous path ``p`` to ``ip``.

  ``p=None`` becomes ``ip``. A ``p`` of another width (Keras compares axis
  -2 only) is halved by two 1x1/2 average pools, the second on ``p`` shifted
  by one pixel (ZeroPadding2D bottom/right, Cropping2D top/left), each
  followed by a 1x1 conv of ``filters // 2``, concatenated and normalized.
  Otherwise a ``p`` with other channels is projected by a 1x1 conv + BN.
  """
  if p is None:
    return ip
  if p.shape[-2] != ip.shape[-2]:
    p = nn.relu(p)  # adjust_relu_1_{block_id}
    p1 = L.avg_pool(p, 1, strides=2)
    p1 = L.conv(p1, filters // 2, 1, padding="SAME", use_bias=False,
                name=f"adjust_conv_1_{block_id}")
    p2 = L.zero_pad(p, ((0, 1), (0, 1)))[:, 1:, 1:, :]  # Cropping2D((1,0),(1,0))
    p2 = L.avg_pool(p2, 1, strides=2)
    p2 = L.conv(p2, filters // 2, 1, padding="SAME", use_bias=False,
                name=f"adjust_conv_2_{block_id}")
    return _bn(_cat([p1, p2]), f"adjust_bn_{block_id}", train)
  if p.shape[-1] != filters:
    p = L.conv(nn.relu(p), filters, 1, padding="SAME", use_bias=False,
               name=f"adjust_conv_projection_{block_id}")
    return _bn(p, f"adjust_bn_{block_id}", train)
  return p


def normal_a_cell(ip: jax.Array, p: jax.Array | None, filters: int, *,
                  block_id: str, train: bool) -> tuple[jax.Array, jax.Array]:
  """Keras ``_normal_a_cell``; returns ``(output, ip)``."""
  p = adjust_block(p, ip, filters, block_id=block_id, train=train)
  h = L.conv(nn.relu(ip), filters, 1, padding="SAME", use_bias=False,
             name=f"normal_conv_1_{block_id}")
  h = _bn(h, f"normal_bn_1_{block_id}", train)
  sep = functools.partial(separable_conv_block, train=train)
  x1 = (sep(h, filters, 5, block_id=f"normal_left1_{block_id}")
        + sep(p, filters, block_id=f"normal_right1_{block_id}"))
  x2 = (sep(p, filters, 5, block_id=f"normal_left2_{block_id}")
        + sep(p, filters, 3, block_id=f"normal_right2_{block_id}"))
  x3 = _avg3_same(h) + p
  x4 = _avg3_same(p) + _avg3_same(p)  # normal_left4 + normal_right4
  x5 = sep(h, filters, block_id=f"normal_left5_{block_id}") + h
  return _cat([p, x1, x2, x3, x4, x5]), ip


def reduction_a_cell(ip: jax.Array, p: jax.Array | None, filters: int, *,
                     block_id: str, train: bool
                     ) -> tuple[jax.Array, jax.Array]:
  """Keras ``_reduction_a_cell``; returns ``(output, ip)``."""
  p = adjust_block(p, ip, filters, block_id=block_id, train=train)
  h = L.conv(nn.relu(ip), filters, 1, padding="SAME", use_bias=False,
             name=f"reduction_conv_1_{block_id}")
  h = _bn(h, f"reduction_bn_1_{block_id}", train)
  h3 = L.zero_pad(h, L.correct_pad(h, 3))  # reduction_pad_1_{block_id}
  sep = functools.partial(separable_conv_block, strides=2, train=train)
  x1 = (sep(h, filters, 5, block_id=f"reduction_left1_{block_id}")
        + sep(p, filters, 7, block_id=f"reduction_right1_{block_id}"))
  x2 = (L.max_pool(h3, 3, strides=2)  # zero-padded, then 'valid'
        + sep(p, filters, 7, block_id=f"reduction_right2_{block_id}"))
  x3 = (L.avg_pool(h3, 3, strides=2)  # zeros of h3 count: 'valid' pool
        + sep(p, filters, 5, block_id=f"reduction_right3_{block_id}"))
  x4 = x2 + _avg3_same(x1)
  # Keras reuses the id "reduction_left4" for this stride-1 block.
  x5 = (separable_conv_block(x1, filters, 3,
                             block_id=f"reduction_left4_{block_id}",
                             train=train)
        + L.max_pool(h3, 3, strides=2))
  return _cat([x2, x3, x4, x5]), ip


class NASNet(nn.Module):
  """Keras ``NASNet`` (NASNet-A).

  Attributes:
    penultimate_filters: channels of the last cells (``24 * filters``).
    num_blocks: normal cells per stage (N).
    stem_block_filters: filters of ``stem_conv1``.
    skip_reduction: whether the cell after a reduction takes, as its previous
      path, the input of the last normal cell (True) instead of the input of
      the reduction cell (False).
    filter_multiplier: width growth per reduction.
    include_top: add global average pooling and the ``predictions`` Dense.
    classes: size of the ``predictions`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  penultimate_filters: int = 4032
  num_blocks: int = 6
  stem_block_filters: int = 96
  skip_reduction: bool = True
  filter_multiplier: int = 2
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    fm, n = self.filter_multiplier, self.num_blocks
    if self.penultimate_filters % (24 * fm**2):
      raise ValueError("penultimate_filters must be a multiple of 24 * "
                       f"filter_multiplier**2, got {self.penultimate_filters}")
    filters = self.penultimate_filters // 24
    normal = functools.partial(normal_a_cell, train=train)
    reduction = functools.partial(reduction_a_cell, train=train)

    x = L.conv(x, self.stem_block_filters, 3, strides=2, padding="VALID",
               use_bias=False, name="stem_conv1")
    x = _bn(x, "stem_bn1", train)
    x, p = reduction(x, None, filters // fm**2, block_id="stem_1")
    x, p = reduction(x, p, filters // fm, block_id="stem_2")
    for i in range(n):
      x, p = normal(x, p, filters, block_id=f"{i}")
    x, p0 = reduction(x, p, filters * fm, block_id=f"reduce_{n}")
    p = p if self.skip_reduction else p0
    for i in range(n):
      x, p = normal(x, p, filters * fm, block_id=f"{n + i + 1}")
    x, p0 = reduction(x, p, filters * fm**2, block_id=f"reduce_{2 * n}")
    p = p if self.skip_reduction else p0
    for i in range(n):
      x, p = normal(x, p, filters * fm**2, block_id=f"{2 * n + i + 1}")
    x = nn.relu(x)
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation)


NASNetMobile = functools.partial(NASNet, **MOBILE)
NASNetLarge = functools.partial(NASNet, **LARGE)

register(ModelSpec(
    name="nasnetmobile",
    keras_name="NASNetMobile",
    family="nasnet",
    flax_cls=NASNetMobile,
    keras_fn="keras.applications.NASNetMobile",
    keras_preprocess="keras.applications.nasnet",
    input_shape=(224, 224, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=32,  # obtain_input_shape(min_size=32); any size without imagenet
))

register(ModelSpec(
    name="nasnetlarge",
    keras_name="NASNetLarge",
    family="nasnet",
    flax_cls=NASNetLarge,
    keras_fn="keras.applications.NASNetLarge",
    keras_preprocess="keras.applications.nasnet",
    input_shape=(331, 331, 3),
    preprocess="tf",
    bn_epsilon=EPSILON,
    min_size=32,
    slow=True,
))
