"""EfficientNetV2 B0–B3, S, M, L, mirroring
``keras/src/applications/efficientnet_v2.py``.

Differences from EfficientNet (v1) that are easy to get wrong, all copied from
Keras on purpose:

- BatchNorm momentum is 0.9 (``bn_momentum=0.9``), epsilon Keras' 1e-3.
- Every convolution, strided ones included, is ``padding="same"`` (TF's
  SAME: the extra row/column goes after), no ``ZeroPadding2D``.
- ``round_filters`` has no "round down by at most 10%" correction.
- The drop-connect rate of block ``b`` is ``0.2 * b / blocks`` where
  ``blocks`` sums the *unrounded* repeats, so B1–B3 (depth > 1) exceed 0.2 in
  their last blocks; block 0 has no ``Dropout`` (rate 0 is falsy in Keras).
- ``include_preprocessing`` (default True) puts constants in the graph, not
  weights: B0–B3 with RGB input: ``Rescaling(1/255)`` then
  ``Normalization(mean, variance)`` with ImageNet's mean/std given to the
  constructor; S/M/L (and B* on 1 channel): ``Rescaling(1/128, offset=-1)``.
  The ImageNet weights do not change the graph (unlike v1's second
  ``Rescaling``).
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

EPSILON = 1e-3  # Keras' BatchNormalization default (not overridden)
MOMENTUM = 0.9  # EfficientNetV2(bn_momentum=0.9)
DEPTH_DIVISOR = 8  # EfficientNetV2(depth_divisor=8)
MIN_DEPTH = 8  # EfficientNetV2(min_depth=8)
DROPOUT_RATE = 0.2  # EfficientNetV2(dropout_rate=0.2): top_dropout
DROP_CONNECT_RATE = 0.2  # EfficientNetV2(drop_connect_rate=0.2)

# include_preprocessing=True, B variants on RGB: Rescaling(scale=1.0 / 255),
# then Normalization(mean=MEAN_RGB, variance=VARIANCE_RGB): constructor
# arguments, so constants of the architecture (the layer has no weights).
RESCALE = 1.0 / 255
MEAN_RGB = (0.485, 0.456, 0.406)
VARIANCE_RGB = (0.229**2, 0.224**2, 0.225**2)
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's std floor
# S/M/L (and B on one channel): Rescaling(scale=1.0 / 128.0, offset=-1).
RESCALE_SML, OFFSET_SML = 1.0 / 128.0, -1.0


def _row(kernel_size: int, num_repeat: int, input_filters: int,
         output_filters: int, expand_ratio: int, se_ratio: float,
         strides: int, conv_type: int) -> dict[str, Any]:
  """One row of Keras' ``DEFAULT_BLOCKS_ARGS`` (conv_type 1: fused)."""
  return dict(kernel_size=kernel_size, num_repeat=num_repeat,
              input_filters=input_filters, output_filters=output_filters,
              expand_ratio=expand_ratio, se_ratio=se_ratio, strides=strides,
              conv_type=conv_type)


# Keras' DEFAULT_BLOCKS_ARGS; columns: kernel_size, num_repeat, input_filters,
# output_filters, expand_ratio, se_ratio, strides, conv_type. B0-B3 share one
# table (Keras repeats it four times); width/depth coefficients scale it.
_B_BLOCKS = (
    _row(3, 1, 32, 16, 1, 0, 1, 1),
    _row(3, 2, 16, 32, 4, 0, 2, 1),
    _row(3, 2, 32, 48, 4, 0, 2, 1),
    _row(3, 3, 48, 96, 4, 0.25, 2, 0),
    _row(3, 5, 96, 112, 6, 0.25, 1, 0),
    _row(3, 8, 112, 192, 6, 0.25, 2, 0),
)
DEFAULT_BLOCKS_ARGS = {
    "efficientnetv2-s": (
        _row(3, 2, 24, 24, 1, 0.0, 1, 1),
        _row(3, 4, 24, 48, 4, 0.0, 2, 1),
        _row(3, 4, 48, 64, 4, 0, 2, 1),
        _row(3, 6, 64, 128, 4, 0.25, 2, 0),
        _row(3, 9, 128, 160, 6, 0.25, 1, 0),
        _row(3, 15, 160, 256, 6, 0.25, 2, 0),
    ),
    "efficientnetv2-m": (
        _row(3, 3, 24, 24, 1, 0, 1, 1),
        _row(3, 5, 24, 48, 4, 0, 2, 1),
        _row(3, 5, 48, 80, 4, 0, 2, 1),
        _row(3, 7, 80, 160, 4, 0.25, 2, 0),
        _row(3, 14, 160, 176, 6, 0.25, 1, 0),
        _row(3, 18, 176, 304, 6, 0.25, 2, 0),
        _row(3, 5, 304, 512, 6, 0.25, 1, 0),
    ),
    "efficientnetv2-l": (
        _row(3, 4, 32, 32, 1, 0, 1, 1),
        _row(3, 7, 32, 64, 4, 0, 2, 1),
        _row(3, 7, 64, 96, 4, 0, 2, 1),
        _row(3, 10, 96, 192, 4, 0.25, 2, 0),
        _row(3, 19, 192, 224, 6, 0.25, 1, 0),
        _row(3, 25, 224, 384, 6, 0.25, 2, 0),
        _row(3, 7, 384, 640, 6, 0.25, 1, 0),
    ),
    "efficientnetv2-b0": _B_BLOCKS,
    "efficientnetv2-b1": _B_BLOCKS,
    "efficientnetv2-b2": _B_BLOCKS,
    "efficientnetv2-b3": _B_BLOCKS,
}

# Keras constructor suffix: (width_coefficient, depth_coefficient,
# default_size), from EfficientNetV2B0 ... EfficientNetV2L.
VARIANTS = {
    "B0": (1.0, 1.0, 224),
    "B1": (1.0, 1.1, 240),
    "B2": (1.1, 1.2, 260),
    "B3": (1.2, 1.4, 300),
    "S": (1.0, 1.0, 384),
    "M": (1.0, 1.0, 480),
    "L": (1.0, 1.0, 480),
}


def round_filters(filters: float, width_coefficient: float) -> int:
  """Keras ``round_filters`` (v2: no 10% round-down correction)."""
  filters *= width_coefficient
  minimum_depth = MIN_DEPTH or DEPTH_DIVISOR
  new_filters = max(
      minimum_depth,
      int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
  return int(new_filters)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Keras ``round_repeats``."""
  return int(math.ceil(depth_coefficient * repeats))


def block_plan(blocks_args: str, width_coefficient: float,
               depth_coefficient: float,
               drop_connect_rate: float = DROP_CONNECT_RATE
               ) -> list[dict[str, Any]]:
  """Every block of the network, in order, as Keras builds it.

  ``drop_connect_rate`` is Keras' option of that name: the rate of block
  ``b`` is ``drop_connect_rate * b / blocks``.

  Returns:
    One dict per block: ``name`` (``"block2a_"``), ``fused``,
    ``input_filters``, ``output_filters`` (rounded), ``kernel_size``,
    ``strides``, ``expand_ratio``, ``se_ratio`` and ``drop_rate`` (Keras'
    ``survival_probability`` argument, used as the ``Dropout`` rate).
  """
  table = DEFAULT_BLOCKS_ARGS[blocks_args]
  # Keras sums the unrounded repeats, so with depth_coefficient > 1 the
  # last blocks' rates exceed drop_connect_rate.
  blocks = float(sum(args["num_repeat"] for args in table))
  plan, b = [], 0
  for i, args in enumerate(table):
    input_filters = round_filters(args["input_filters"], width_coefficient)
    output_filters = round_filters(args["output_filters"], width_coefficient)
    strides = args["strides"]
    for j in range(round_repeats(args["num_repeat"], depth_coefficient)):
      if j > 0:  # only the first block strides and changes the width
        strides, input_filters = 1, output_filters
      plan.append(dict(
          name=f"block{i + 1}{chr(j + 97)}_", fused=args["conv_type"] == 1,
          input_filters=input_filters, output_filters=output_filters,
          kernel_size=args["kernel_size"], strides=strides,
          expand_ratio=args["expand_ratio"], se_ratio=args["se_ratio"],
          drop_rate=drop_connect_rate * b / blocks))
      b += 1
  return plan


def preprocessing(x: jax.Array, b_variant: bool) -> jax.Array:
  """Keras' ``include_preprocessing`` layers, op for op.

  ``Rescaling`` computes ``x * float32(scale) + offset``; ``Normalization``
  ``(x - mean) / max(sqrt(float32(variance)), 1e-7)``.

  Args:
    x: NHWC pixels in [0, 255].
    b_variant: a B0–B3 model (ImageNet mean/std on RGB input); otherwise, or
      for a one-channel input, scale to [-1, 1].
  """
  if b_variant and x.shape[-1] == 3:
    x = x * jnp.asarray(RESCALE, x.dtype)
    mean = jnp.asarray(MEAN_RGB, x.dtype)
    std = jnp.maximum(jnp.sqrt(jnp.asarray(VARIANCE_RGB, x.dtype)),
                      KERAS_EPSILON)
    return (x - mean) / std
  return x * jnp.asarray(RESCALE_SML, x.dtype) + jnp.asarray(OFFSET_SML,
                                                              x.dtype)


class EfficientNetV2(nn.Module):
  """Keras ``EfficientNetV2``.

  Attributes:
    blocks_args: key of ``DEFAULT_BLOCKS_ARGS`` (Keras' model ``name``,
      e.g. ``"efficientnetv2-b0"``).
    width_coefficient: scales the filters (``round_filters``).
    depth_coefficient: scales the repeats (``round_repeats``).
    include_preprocessing: Keras' option: rescale (and for B0–B3 normalize)
      pixels in [0, 255] inside the model; False expects inputs in [-1, 1].
    dropout_rate: Keras' option: dropout before ``predictions`` (none at 0).
    drop_connect_rate: Keras' option: the largest drop-connect rate (grows
      linearly over the blocks; none at 0).
    include_top, classes, pooling, classifier_activation: as in Keras.
  """

  blocks_args: str
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  include_preprocessing: bool = True
  dropout_rate: float = DROPOUT_RATE
  drop_connect_rate: float = DROP_CONNECT_RATE
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           train=train)
    if self.include_preprocessing:
      # Keras: name.split("-")[-1].startswith("b")
      x = preprocessing(
          x, self.blocks_args.split("-")[-1].startswith("b"))

    table = DEFAULT_BLOCKS_ARGS[self.blocks_args]
    x = L.conv(x, round_filters(table[0]["input_filters"],
                                self.width_coefficient), 3, strides=2,
               padding="SAME", use_bias=False, name="stem_conv")
    x = nn.swish(bn(x, name="stem_bn"))

    for args in block_plan(self.blocks_args, self.width_coefficient,
                           self.depth_coefficient, self.drop_connect_rate):
      args = dict(args)
      block = fused_mbconv_block if args.pop("fused") else mbconv_block
      x = block(x, bn, train, **args)

    x = L.conv(x, round_filters(1280, self.width_coefficient), 1,
               padding="SAME", use_bias=False, name="top_conv")
    x = nn.swish(bn(x, name="top_bn"))
    return L.head(x, include_top=self.include_top, classes=self.classes,
                  pooling=self.pooling,
                  classifier_activation=self.classifier_activation,
                  dropout=self.dropout_rate, train=train)


def _squeeze_excite(x: jax.Array, *, name: str, input_filters: int,
                    se_ratio: float) -> jax.Array:
  """SE of both block kinds: squeeze, 1x1 swish, 1x1 sigmoid, excite."""
  filters_se = max(1, int(input_filters * se_ratio))
  se = jnp.mean(x, axis=(1, 2), keepdims=True)  # se_squeeze + se_reshape
  se = nn.swish(L.conv(se, filters_se, 1, padding="SAME",
                       name=f"{name}se_reduce"))
  se = nn.sigmoid(L.conv(se, x.shape[-1], 1, padding="SAME",
                         name=f"{name}se_expand"))
  return x * se  # se_excite


def _residual(x: jax.Array, inputs: jax.Array, train: bool, *, name: str,
              drop_rate: float) -> jax.Array:
  """Drop-connect (a ``Dropout`` with ``noise_shape=(None, 1, 1, 1)``: one
  draw per sample; absent at rate 0, as Keras' ``if survival_probability``)
  and the ``add``."""
  if drop_rate:
    x = nn.Dropout(drop_rate, broadcast_dims=(1, 2, 3),
                   deterministic=not train, name=f"{name}drop")(x)
  return x + inputs


def mbconv_block(inputs: jax.Array, bn: Callable[..., jax.Array],
                 train: bool, *, name: str, input_filters: int,
                 output_filters: int, expand_ratio: int, kernel_size: int,
                 strides: int, se_ratio: float, drop_rate: float
                 ) -> jax.Array:
  """Keras ``MBConvBlock``: 1x1 expand, depthwise, SE, 1x1 project.

  Args:
    inputs: NHWC feature map with ``input_filters`` channels.
    bn: ``L.batch_norm`` with the family epsilon, momentum and mode bound.
    train: training mode (BatchNorm statistics, drop-connect).
    name: Keras layer-name prefix, e.g. ``"block4a_"``.
    input_filters, output_filters: channels in and out (rounded).
    expand_ratio: width factor of ``expand_conv`` (none when 1).
    kernel_size: depthwise kernel size.
    strides: depthwise stride.
    se_ratio: squeeze-excite ratio of ``input_filters`` (none when 0).
    drop_rate: drop-connect rate (Keras ``survival_probability``).

  Returns:
    The block output (plus ``inputs`` when the shape is unchanged).
  """
  filters = input_filters * expand_ratio
  x = inputs
  if expand_ratio != 1:
    x = L.conv(x, filters, 1, padding="SAME", use_bias=False,
               name=f"{name}expand_conv")
    x = nn.swish(bn(x, name=f"{name}expand_bn"))
  x = L.depthwise_conv(x, kernel_size, strides=strides, padding="SAME",
                       use_bias=False, name=f"{name}dwconv2")
  x = nn.swish(bn(x, name=f"{name}bn"))
  if 0 < se_ratio <= 1:
    x = _squeeze_excite(x, name=name, input_filters=input_filters,
                        se_ratio=se_ratio)
  x = L.conv(x, output_filters, 1, padding="SAME", use_bias=False,
             name=f"{name}project_conv")
  x = bn(x, name=f"{name}project_bn")
  if strides == 1 and input_filters == output_filters:
    x = _residual(x, inputs, train, name=name, drop_rate=drop_rate)
  return x


def fused_mbconv_block(inputs: jax.Array, bn: Callable[..., jax.Array],
                       train: bool, *, name: str, input_filters: int,
                       output_filters: int, expand_ratio: int,
                       kernel_size: int, strides: int, se_ratio: float,
                       drop_rate: float) -> jax.Array:
  """Keras ``FusedMBConvBlock``: a full KxK ``expand_conv`` replaces the 1x1
  expand + depthwise pair; with ``expand_ratio == 1`` the KxK strided conv
  is ``project_conv`` itself, followed by an activation.

  Arguments as in ``mbconv_block``.
  """
  filters = input_filters * expand_ratio
  x = inputs
  if expand_ratio != 1:
    x = L.conv(x, filters, kernel_size, strides=strides, padding="SAME",
               use_bias=False, name=f"{name}expand_conv")
    x = nn.swish(bn(x, name=f"{name}expand_bn"))
  if 0 < se_ratio <= 1:
    x = _squeeze_excite(x, name=name, input_filters=input_filters,
                        se_ratio=se_ratio)
  fused = expand_ratio == 1
  x = L.conv(x, output_filters, kernel_size if fused else 1,
             strides=strides if fused else 1, padding="SAME", use_bias=False,
             name=f"{name}project_conv")
  x = bn(x, name=f"{name}project_bn")
  if fused:
    x = nn.swish(x)  # project_activation
  if strides == 1 and input_filters == output_filters:
    x = _residual(x, inputs, train, name=name, drop_rate=drop_rate)
  return x


def keras_efficientnet_v2(variant: str, **kwargs: Any) -> Any:
  """Keras' EfficientNetV2 ``variant`` (``"B0"`` … ``"L"``) with every
  option ``models.create`` takes.

  The public ``keras.applications.EfficientNetV2B0`` … fix ``dropout_rate``
  and ``drop_connect_rate``; this calls the ``EfficientNetV2`` builder they
  forward to, with their coefficients, name and weights name, so that those
  two options reach Keras too (ImageNet weights load the same way).
  """
  from keras.src.applications import efficientnet_v2  # pylint: disable=g-import-not-at-top
  width, depth, size = VARIANTS[variant]
  kwargs = {"dropout_rate": DROPOUT_RATE,
            "drop_connect_rate": DROP_CONNECT_RATE, "weights": "imagenet",
            **kwargs}
  return efficientnet_v2.EfficientNetV2(
      width_coefficient=width, depth_coefficient=depth, default_size=size,
      name=f"efficientnetv2-{variant.lower()}",
      # Keras' weights names: "b0" … "b3", "-s", "-m", "-l".
      weights_name=variant.lower() if variant.startswith("B")
      else f"-{variant.lower()}", **kwargs)


for _v, (_w, _d, _size) in VARIANTS.items():
  register(ModelSpec(
      name=f"efficientnetv2{_v.lower()}",
      keras_name=f"EfficientNetV2{_v}",
      family="efficientnet_v2",
      flax_cls=functools.partial(
          EfficientNetV2, blocks_args=f"efficientnetv2-{_v.lower()}",
          width_coefficient=_w, depth_coefficient=_d),
      keras_fn=f"models.efficientnet_v2.keras_efficientnet_v2_{_v.lower()}",
      keras_preprocess="keras.applications.efficientnet_v2",
      input_shape=(_size, _size, 3),
      preprocess="none",  # the model rescales (and normalizes) itself
      bn_epsilon=EPSILON,
      min_size=32,  # obtain_input_shape(min_size=32)
      options={"include_preprocessing": True, "dropout_rate": DROPOUT_RATE,
               "drop_connect_rate": DROP_CONNECT_RATE},
      option_choices={"include_preprocessing": (True, False)},
      slow=_v != "B0",
  ))
  globals()[f"keras_efficientnet_v2_{_v.lower()}"] = functools.partial(
      keras_efficientnet_v2, _v)
