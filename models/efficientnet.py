"""EfficientNetB0–B7, mirroring ``keras/src/applications/efficientnet.py``.

The Keras model normalizes inside: ``Rescaling(1/255)``, a ``Normalization``
whose mean/variance are weights (translated, never hard-coded), and, with
ImageNet weights only, a second ``Rescaling(1/sqrt(stddev))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # Keras' BatchNormalization default
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
DEPTH_DIVISOR = 8
DROP_CONNECT_RATE = 0.2

# Copied from Keras' DEFAULT_BLOCKS_ARGS (id_skip is True and se_ratio 0.25
# in every row).
DEFAULT_BLOCKS_ARGS = (
    dict(kernel_size=3, repeats=1, filters_in=32, filters_out=16,
         expand_ratio=1, strides=1),
    dict(kernel_size=3, repeats=2, filters_in=16, filters_out=24,
         expand_ratio=6, strides=2),
    dict(kernel_size=5, repeats=2, filters_in=24, filters_out=40,
         expand_ratio=6, strides=2),
    dict(kernel_size=3, repeats=3, filters_in=40, filters_out=80,
         expand_ratio=6, strides=2),
    dict(kernel_size=5, repeats=3, filters_in=80, filters_out=112,
         expand_ratio=6, strides=1),
    dict(kernel_size=5, repeats=4, filters_in=112, filters_out=192,
         expand_ratio=6, strides=2),
    dict(kernel_size=3, repeats=1, filters_in=192, filters_out=320,
         expand_ratio=6, strides=1),
)
SE_RATIO = 0.25

# name: (width_coefficient, depth_coefficient, default_size, dropout_rate)
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}


class EfficientNet(nn.Module):
  """Keras ``EfficientNet``.

  Attributes:
    width_coefficient: scales the filters (``round_filters``).
    depth_coefficient: scales the repeats (``round_repeats``).
    dropout_rate: dropout before the ``predictions`` layer.
    drop_connect_rate: largest stochastic-depth rate (grows linearly over
      the blocks, as in Keras).
    imagenet_rescaling: the second ``Rescaling`` Keras adds only for
      ``weights="imagenet"`` (``translate.convert`` sets it then).
    include_top, classes, pooling, classifier_activation: as in Keras.
  """

  width_coefficient: float
  depth_coefficient: float
  dropout_rate: float = 0.2
  drop_connect_rate: float = DROP_CONNECT_RATE
  imagenet_rescaling: bool = False
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  def round_filters(self, filters: int) -> int:
    """Keras ``round_filters``."""
    filters *= self.width_coefficient
    new = max(DEPTH_DIVISOR,
              int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if new < 0.9 * filters:  # do not round down by more than 10%
      new += DEPTH_DIVISOR
    return int(new)

  def round_repeats(self, repeats: int) -> int:
    """Keras ``round_repeats``."""
    return int(math.ceil(self.depth_coefficient * repeats))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, train=train)
    x = x / 255.0  # Rescaling(1.0 / 255.0)
    x = L.Normalization(name="normalization")(x)
    if self.imagenet_rescaling:
      x = x * jnp.asarray([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB],
                          x.dtype)
    x = L.zero_pad(x, L.correct_pad(x, 3))
    x = L.conv(x, self.round_filters(32), 3, strides=2, use_bias=False,
               name="stem_conv")
    x = nn.swish(bn(x, name="stem_bn"))

    b = 0
    blocks = float(sum(self.round_repeats(a["repeats"])
                       for a in DEFAULT_BLOCKS_ARGS))
    for i, args in enumerate(DEFAULT_BLOCKS_ARGS):
      filters_in = self.round_filters(args["filters_in"])
      filters_out = self.round_filters(args["filters_out"])
      strides = args["strides"]
      for j in range(self.round_repeats(args["repeats"])):
        if j > 0:  # only the first block strides and changes the width
          strides, filters_in = 1, filters_out
        x = _block(x, bn, train, self.drop_connect_rate * b / blocks,
                   name=f"block{i + 1}{chr(j + 97)}_", filters_in=filters_in,
                   filters_out=filters_out, kernel_size=args["kernel_size"],
                   strides=strides, expand_ratio=args["expand_ratio"])
        b += 1

    x = L.conv(x, self.round_filters(1280), 1, padding="SAME",
               use_bias=False, name="top_conv")
    x = nn.swish(bn(x, name="top_bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation,
                  dropout=self.dropout_rate, train=train)


def _block(inputs: jax.Array, bn: Callable[..., jax.Array], train: bool,
           drop_rate: float, *, name: str, filters_in: int, filters_out: int,
           kernel_size: int, strides: int, expand_ratio: int) -> jax.Array:
  """Keras ``block``: expand, depthwise, squeeze-excite, project.

  Args:
    inputs: NHWC feature map with ``filters_in`` channels.
    bn: ``L.batch_norm`` with the family epsilon and mode bound.
    train: training mode (drop-connect active).
    drop_rate: drop-connect rate of this block (Keras ``drop_rate``).
    name: Keras layer-name prefix, e.g. ``"block2a_"``.
    filters_in: input channels (already ``round_filters``-ed).
    filters_out: output channels (already ``round_filters``-ed).
    kernel_size: depthwise kernel size.
    strides: depthwise stride (1 or 2).
    expand_ratio: expansion factor of the 1x1 ``expand_conv``.

  Returns:
    The block output; ``inputs`` is added back when the shape is unchanged.
  """
  filters = filters_in * expand_ratio
  x = inputs
  if expand_ratio != 1:
    x = L.conv(x, filters, 1, padding="SAME", use_bias=False,
               name=f"{name}expand_conv")
    x = nn.swish(bn(x, name=f"{name}expand_bn"))
  if strides == 2:
    x = L.zero_pad(x, L.correct_pad(x, kernel_size))
  x = L.depthwise_conv(x, kernel_size, strides=strides, use_bias=False,
                       padding="VALID" if strides == 2 else "SAME",
                       name=f"{name}dwconv")
  x = nn.swish(bn(x, name=f"{name}bn"))

  filters_se = max(1, int(filters_in * SE_RATIO))
  se = jnp.mean(x, axis=(1, 2), keepdims=True)  # squeeze + reshape
  se = nn.swish(L.conv(se, filters_se, 1, padding="SAME",
                       name=f"{name}se_reduce"))
  se = nn.sigmoid(L.conv(se, filters, 1, padding="SAME",
                         name=f"{name}se_expand"))
  x = x * se

  x = L.conv(x, filters_out, 1, padding="SAME", use_bias=False,
             name=f"{name}project_conv")
  x = bn(x, name=f"{name}project_bn")
  if strides == 1 and filters_in == filters_out:  # id_skip is always True
    if drop_rate > 0:
      # Keras Dropout(noise_shape=(None, 1, 1, 1)): one draw per sample.
      x = nn.Dropout(drop_rate, broadcast_dims=(1, 2, 3),
                     deterministic=not train, name=f"{name}drop")(x)
    x = x + inputs
  return x


def keras_efficientnet(variant: str, **kwargs: Any) -> Any:
  """Keras' EfficientNet ``variant`` with every option ``models.create``
  takes.

  The public ``keras.applications.EfficientNetB0`` … fix ``dropout_rate``
  and ``drop_connect_rate``; this calls the ``EfficientNet`` builder they
  forward to, with their coefficients, name and weights name, so that those
  two options reach Keras too (ImageNet weights load the same way).
  """
  from keras.src.applications import efficientnet  # pylint: disable=g-import-not-at-top
  width, depth, size, dropout = VARIANTS[variant]
  kwargs = {"dropout_rate": dropout, "drop_connect_rate": DROP_CONNECT_RATE,
            "weights": "imagenet", **kwargs}
  return efficientnet.EfficientNet(width, depth, size,
                                   name=f"efficientnet{variant}",
                                   weights_name=variant, **kwargs)


for _v, (_w, _d, _size, _dropout) in VARIANTS.items():
  register(ModelSpec(
      name=f"efficientnet{_v}",
      keras_name=f"EfficientNet{_v.upper()}",
      family="efficientnet",
      flax_cls=functools.partial(EfficientNet, width_coefficient=_w,
                                 depth_coefficient=_d),
      keras_fn=f"models.efficientnet.keras_efficientnet_{_v}",
      keras_preprocess="keras.applications.efficientnet",
      input_shape=(_size, _size, 3),
      preprocess="none",  # the model rescales and normalizes itself
      bn_epsilon=EPSILON,
      min_size=32,
      # Keras' own option names: top dropout and the largest drop-connect
      # rate (off with 0, as Keras' `if dropout_rate > 0`).
      options={"dropout_rate": _dropout,
               "drop_connect_rate": DROP_CONNECT_RATE},
      imagenet_options={"imagenet_rescaling": True},
      slow=_v != "b0",  # the README tier runs B0; CI the rest
  ))
  globals()[f"keras_efficientnet_{_v}"] = functools.partial(
      keras_efficientnet, _v)
