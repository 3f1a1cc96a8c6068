"""MobileNetV3Small and MobileNetV3Large, mirroring
``keras/src/applications/mobilenet_v3.py``.

Two registry entries (``mobilenetv3small``, ``mobilenetv3large``) built from
one module; ``alpha``, ``minimalistic``, ``include_preprocessing`` and
``dropout_rate`` are Keras' own arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L
from models.registry import ModelSpec, register

EPSILON = 1e-3  # keras mobilenet_v3.py: BatchNormalization(epsilon=1e-3,
MOMENTUM = 0.999  # momentum=0.999) everywhere
SE_RATIO = 0.25  # se_ratio of the non-minimalistic models


def depth(v: float) -> int:
  """Keras ``_depth``: a multiple of 8, never 10% below ``v``."""
  return L.make_divisible(v, 8)


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """Keras mobilenet_v3 ``hard_sigmoid``: ``ReLU(6.0)(x + 3.0) * (1.0 / 6.0)``
  (a multiplication, unlike ``keras.activations.hard_sigmoid``)."""
  return nn.relu6(x + 3.0) * (1.0 / 6.0)


def hard_swish(x: jax.Array) -> jax.Array:
  """Keras ``Activation("hard_swish")``, i.e. the TF backend's ``hard_silu``:
  ``x * (relu6(x + 3) / 6)`` (a division)."""
  return x * (nn.relu6(x + 3.0) / 6.0)


class Block(NamedTuple):
  """One ``_inverted_res_block`` call of a Keras ``stack_fn``.

  Attributes:
    expansion: expansion factor (Keras' float, e.g. ``72.0 / 16``).
    filters: output filters before ``alpha`` (``depth(filters * alpha)``).
    kernel: depthwise kernel; ``None`` is the model's ``kernel`` (5, or 3
      when minimalistic).
    stride: 1 or 2.
    se: uses the model's ``se_ratio`` (0.25, none when minimalistic).
    relu: always ReLU; otherwise the model's activation (hard-swish, ReLU
      when minimalistic).
  """

  expansion: float
  filters: int
  kernel: int | None
  stride: int
  se: bool
  relu: bool


# MobileNetV3Small's stack_fn, block_id 0 … 10.
SMALL = (
    Block(1, 16, 3, 2, True, True),
    Block(72.0 / 16, 24, 3, 2, False, True),
    Block(88.0 / 24, 24, 3, 1, False, True),
    Block(4, 40, None, 2, True, False),
    Block(6, 40, None, 1, True, False),
    Block(6, 40, None, 1, True, False),
    Block(3, 48, None, 1, True, False),
    Block(3, 48, None, 1, True, False),
    Block(6, 96, None, 2, True, False),
    Block(6, 96, None, 1, True, False),
    Block(6, 96, None, 1, True, False),
)

# MobileNetV3Large's stack_fn, block_id 0 … 14.
LARGE = (
    Block(1, 16, 3, 1, False, True),
    Block(4, 24, 3, 2, False, True),
    Block(3, 24, 3, 1, False, True),
    Block(3, 40, None, 2, True, True),
    Block(3, 40, None, 1, True, True),
    Block(3, 40, None, 1, True, True),
    Block(6, 80, 3, 2, False, False),
    Block(2.5, 80, 3, 1, False, False),
    Block(2.3, 80, 3, 1, False, False),
    Block(2.3, 80, 3, 1, False, False),
    Block(6, 112, 3, 1, True, False),
    Block(6, 112, 3, 1, True, False),
    Block(6, 160, None, 2, True, False),
    Block(6, 160, None, 1, True, False),
    Block(6, 160, None, 1, True, False),
)


class MobileNetV3(nn.Module):
  """Keras ``MobileNetV3`` (the function behind Small and Large).

  Attributes:
    stack: the ``stack_fn`` blocks (``SMALL`` or ``LARGE``).
    last_point_ch: width of ``conv_2`` (1024 Small, 1280 Large), scaled by
      ``alpha`` only when ``alpha > 1``.
    alpha: width multiplier.
    minimalistic: no squeeze-excite, ReLU everywhere, 3x3 depthwise kernels.
    include_preprocessing: start with Keras' ``Rescaling(1 / 127.5, -1)``
      (inputs in [0, 255]); without it inputs are expected in [-1, 1].
    dropout_rate: Keras' ``Dropout`` before the ``logits`` conv (none at 0).
    include_top: add the ``conv_2``/``logits`` classifier.
    classes: size of the ``logits`` layer.
    pooling: ``None``, ``"avg"`` or ``"max"`` when ``include_top=False``.
    classifier_activation: ``"softmax"`` (Keras' default) or ``None``.
  """

  stack: Sequence[Block]
  last_point_ch: int
  alpha: float = 1.0
  minimalistic: bool = False
  include_preprocessing: bool = True
  dropout_rate: float = 0.2
  include_top: bool = True
  classes: int = 1000
  pooling: str | None = None
  classifier_activation: Any = "softmax"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(L.batch_norm, epsilon=EPSILON, momentum=MOMENTUM,
                           train=train)
    if self.minimalistic:
      kernel, act, se_ratio = 3, nn.relu, None
    else:
      kernel, act, se_ratio = 5, hard_swish, SE_RATIO
    if self.include_preprocessing:  # Rescaling: x * scale + offset
      x = x * jnp.float32(1.0 / 127.5) + jnp.float32(-1.0)
    # 'same' at stride 2: Flax pads like TF (the odd extra row at the bottom).
    x = L.conv(x, 16, 3, strides=2, padding="SAME", use_bias=False,
               name="conv")
    x = act(bn(x, name="conv_bn"))
    for block_id, b in enumerate(self.stack):
      x = _inverted_res_block(
          x, bn, b.expansion, depth(b.filters * self.alpha),
          kernel if b.kernel is None else b.kernel, b.stride,
          se_ratio if b.se else None, nn.relu if b.relu else act, block_id)
    last_conv_ch = depth(x.shape[-1] * 6)
    last_point_ch = self.last_point_ch
    if self.alpha > 1.0:  # the classifier widens only for alpha > 1
      last_point_ch = depth(last_point_ch * self.alpha)
    x = L.conv(x, last_conv_ch, 1, padding="SAME", use_bias=False,
               name="conv_1")
    x = act(bn(x, name="conv_1_bn"))
    if not self.include_top:
      return x if self.pooling is None else L.global_pool(x, self.pooling)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = L.conv(x, last_point_ch, 1, padding="SAME", name="conv_2")
    x = act(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train,
                     name="dropout")(x)
    x = L.conv(x, self.classes, 1, padding="SAME", name="logits")
    x = x.reshape(x.shape[0], -1)  # Flatten
    return L.activation(self.classifier_activation)(x)  # "predictions"


def _se_block(inputs: jax.Array, filters: int, se_ratio: float,
              prefix: str) -> jax.Array:
  """Keras ``_se_block``: avg pool (keepdims), 1x1 conv + ReLU, 1x1 conv,
  ``hard_sigmoid``, multiply; both convs have a bias."""
  x = jnp.mean(inputs, axis=(1, 2), keepdims=True)
  x = L.conv(x, depth(filters * se_ratio), 1, padding="SAME",
             name=f"{prefix}squeeze_excite_conv")
  x = nn.relu(x)
  x = L.conv(x, filters, 1, padding="SAME",
             name=f"{prefix}squeeze_excite_conv_1")
  return inputs * hard_sigmoid(x)


def _inverted_res_block(x: jax.Array, bn: Callable[..., jax.Array],
                        expansion: float, filters: int, kernel_size: int,
                        stride: int, se_ratio: float | None,
                        activation: Callable[[jax.Array], jax.Array],
                        block_id: int) -> jax.Array:
  """Keras ``_inverted_res_block``.

  Args:
    x: the block input.
    bn: ``L.batch_norm`` with the family epsilon/momentum and ``train`` bound.
    expansion: factor of the 1x1 ``expand`` conv (block 0 has none).
    filters: output filters, already ``depth(filters * alpha)``.
    kernel_size: depthwise kernel.
    stride: 1 or 2 (2: ``correct_pad`` then a ``valid`` depthwise conv).
    se_ratio: squeeze-excite ratio, or ``None`` for no squeeze-excite.
    activation: ReLU or hard-swish.
    block_id: Keras' block index; block 0 is named ``expanded_conv_``.

  Returns:
    The block output (with the residual added when shapes allow, as Keras).
  """
  shortcut = x
  prefix = "expanded_conv_"
  infilters = x.shape[-1]
  if block_id:
    prefix = f"expanded_conv_{block_id}_"
    x = L.conv(x, depth(infilters * expansion), 1, padding="SAME",
               use_bias=False, name=f"{prefix}expand")
    x = activation(bn(x, name=f"{prefix}expand_bn"))
  if stride == 2:
    x = L.zero_pad(x, L.correct_pad(x, kernel_size))
  x = L.depthwise_conv(x, kernel_size, strides=stride, use_bias=False,
                       padding="SAME" if stride == 1 else "VALID",
                       name=f"{prefix}depthwise")
  x = activation(bn(x, name=f"{prefix}depthwise_bn"))
  if se_ratio:
    x = _se_block(x, depth(infilters * expansion), se_ratio, prefix)
  x = L.conv(x, filters, 1, padding="SAME", use_bias=False,
             name=f"{prefix}project")
  x = bn(x, name=f"{prefix}project_bn")
  if stride == 1 and infilters == filters:
    return shortcut + x
  return x


_OPTIONS = {"alpha": 1.0, "minimalistic": False,
            "include_preprocessing": True, "dropout_rate": 0.2}

for _name, _stack, _last, _slow in (("MobileNetV3Small", SMALL, 1024, False),
                                    ("MobileNetV3Large", LARGE, 1280, True)):
  register(ModelSpec(
      name=_name.lower(),
      keras_name=_name,
      family="mobilenet_v3",
      flax_cls=functools.partial(MobileNetV3, stack=_stack,
                                 last_point_ch=_last),
      keras_fn=f"keras.applications.{_name}",
      keras_preprocess="keras.applications.mobilenet_v3",
      input_shape=(224, 224, 3),
      # preprocess_input is a pass-through: the Rescaling is in the model.
      preprocess="none",
      bn_epsilon=EPSILON,
      min_size=32,
      options=_OPTIONS,
      option_choices={"alpha": (1.0, 0.75), "minimalistic": (False, True),
                      "include_preprocessing": (True, False)},
      slow=_slow,
      # tf-keras (and its ImageNet files) name the BatchNorms
      # "expanded_conv_3/expand/BatchNorm"; Keras 3 "expanded_conv_3_expand_bn"
      # (the "/" and the case are matched without an alias).
      name_aliases=((r"/BatchNorm$", "_bn"),),
  ))
