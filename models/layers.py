"""Leaf helpers shared by the families: each mirrors one Keras layer.

Every helper that owns variables takes the Keras layer name, so the Flax tree
uses exactly the Keras names and matching is an exact look-up. The helpers are
called inside a family's ``@nn.compact`` method.
"""

from __future__ import annotations

import re
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import conv_forms

Padding = str | Sequence[tuple[int, int]]

ACTIVATIONS: dict[Any, Callable[[jax.Array], jax.Array]] = {
    None: lambda x: x,
    "linear": lambda x: x,
    "softmax": nn.softmax,
    "sigmoid": nn.sigmoid,
    "relu": nn.relu,
    "relu6": nn.relu6,
    "swish": nn.swish,
    "silu": nn.swish,
    "tanh": jnp.tanh,
    # Keras 3: relu6(x + 3) / 6 (tf-keras 2 had 0.2 x + 0.5).
    "hard_sigmoid": lambda x: jax.nn.relu6(x + 3.0) / 6.0,
    # Keras' gelu is exact (erf) by default; Flax's nn.gelu defaults to tanh.
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def activation(name: Any, what: str = "classifier_activation"
               ) -> Callable[[jax.Array], jax.Array]:
  """Maps a Keras activation name (or a callable) to a JAX function.

  Args:
    name: a Keras activation name (``"relu"``, ``None`` for linear) or a
      callable, returned as is.
    what: the argument it came from, for the error message.
  """
  if callable(name):
    return name
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"unsupported {what} {name!r}; use one of "
        f"{sorted(str(k) for k in ACTIVATIONS)} or a callable") from None


def snake_case(name: str) -> str:
  """Keras' auto-name base of a layer class: ``SimpleRNN`` -> ``simple_rnn``,
  ``Conv2D`` -> ``conv2d`` (Keras names an unnamed layer this plus
  ``"_<session counter>"``)."""
  name = re.sub(r"\W+", "", name)
  name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def make_divisible(v: float, divisor: int, min_value: int | None = None
                   ) -> int:
  """Keras ``_make_divisible`` (MobileNetV2, MobileNetV3): ``v`` rounded to
  a multiple of ``divisor``.

  Args:
    v: the unrounded width, e.g. ``32 * alpha``.
    divisor: the multiple (8 throughout MobileNetV2).
    min_value: the smallest result (default ``divisor``).

  Returns:
    The nearest multiple, raised by one ``divisor`` if that lost over 10%.
  """
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:  # do not round down by more than 10%
    new_v += divisor
  return new_v


def correct_pad(x: jax.Array, kernel_size: int
                ) -> tuple[tuple[int, int], tuple[int, int]]:
  """Keras ``imagenet_utils.correct_pad``: ``((top, bottom), (left,
  right))`` zero padding before a stride-2 'valid' window; one less at the
  top/left on an even side."""
  adjust = (1 - x.shape[1] % 2, 1 - x.shape[2] % 2)
  c = kernel_size // 2
  return ((c - adjust[0], c), (c - adjust[1], c))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Conv):
  """``nn.Conv`` (same attributes, same variables) lowered in the fastest
  form for the platform (``models.conv_forms``): on CPU a depthwise
  convolution runs as shifted multiply-adds, a 1x1 one as a matrix product
  and a small-output one as im2col; elsewhere, and in a TensorFlow trace,
  the native convolution. The same function to float32 rounding, in
  training and inference.

  A ``bias`` variable left by ``translate.fold_batchnorm`` is added even
  where ``use_bias`` is False (the folded BatchNorm's shift).
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = conv_forms.conv_module(self, inputs)
    if y is None:
      y = super().__call__(inputs)
      if self.use_bias:
        return y
    if self.has_variable("params", "bias"):
      y = y + self.get_variable("params", "bias")
    return y


def conv(x: jax.Array, filters: int, kernel: int | Sequence[int], *,
         name: str, strides: int | Sequence[int] = 1,
         padding: Padding = "VALID", use_bias: bool = True,
         groups: int = 1) -> jax.Array:
  """Keras ``Conv2D`` (default padding ``valid``, like Keras, not Flax)."""
  return Conv(filters, _pair(kernel), strides=_pair(strides),
                 padding=padding.upper() if isinstance(padding, str)
                 else padding,
                 use_bias=use_bias, feature_group_count=groups,
                 name=name)(x)


def depthwise_conv(x: jax.Array, kernel: int | Sequence[int], *, name: str,
                   strides: int | Sequence[int] = 1,
                   padding: Padding = "VALID", use_bias: bool = True,
                   depth_multiplier: int = 1) -> jax.Array:
  """Keras ``DepthwiseConv2D``: a grouped conv with one group per channel."""
  c = x.shape[-1]
  return conv(x, c * depth_multiplier, kernel, name=name, strides=strides,
              padding=padding, use_bias=use_bias, groups=c)


class BatchNorm(nn.BatchNorm):
  """Keras ``BatchNormalization`` on the last axis, in Keras' arithmetic.

  A drop-in ``nn.BatchNorm`` (same attributes and the same variables:
  ``scale``, ``bias`` in ``params``, ``mean``, ``var`` in ``batch_stats``;
  an ``nn.BatchNorm`` instance, so translation, ``translate.fold_batchnorm``
  and the inference form see no difference) whose ``__call__`` computes what
  Keras computes. Two arithmetics, the same function up to float32 rounding
  and the moving variance:

  ``arithmetic="keras"`` (default): Keras 3
  (``keras/src/layers/normalization/batch_normalization.py``,
  ``keras.ops.moments`` and ``keras.ops.batch_normalization``):

  - batch statistics with the two-pass variance ``mean((x - mean)²)``;
    Flax's default ``E[x²] - E[x]²`` cancels in float32 (ResNet50's
    ``conv5_block2_3_conv`` kernel gradient was 12% off);
  - the output ``x * inv + (beta - mean * inv)`` with
    ``inv = gamma * rsqrt(var + eps)``, Keras' order (Flax computes
    ``(x - mean) * inv + beta``);
  - moving statistics ``moving * momentum + batch * (1 - momentum)``, the
    batch variance biased (1/N).

  ``arithmetic="tf_fused"``: tf-keras (Keras 2), whose layer sends 4D/5D
  float32 inputs to TF's fused kernel (``tf.compat.v1.nn.fused_batch_norm``,
  ``FusedBatchNormV3``); the ResNet-RS and RegNet families. In training:

  - the output ``(x - mean) * inv + beta``, centered first, and its
    gradient in that form (the kernel's ``FusedBatchNormGradV3`` works on
    ``x - mean``; Keras 3's order cancels in float32 where ``|mean|`` is
    large against the spread, and misses tf-keras' float32 accuracy);
  - the mean corrected once, ``m + mean(x - m)`` with ``m = mean(x)``, so it
    is as accurately rounded as the kernel's, then ``mean((x - mean)²)``;
  - the moving variance takes the *unbiased* batch variance,
    ``N / (N - 1)`` times the biased one used to normalize (N values per
    channel; the kernel divides by ``max(N - 1, 1)``).

  Inference (``use_running_average``) is the same in both.

  ``axis`` other than -1, ``axis_name`` and masks are not supported (Keras
  Applications use none; under ``jax.jit`` with a batch sharded over a mesh
  the statistics are global anyway).

  Attributes:
    arithmetic: ``"keras"`` (Keras 3) or ``"tf_fused"`` (tf-keras' fused
      kernel), as above.
  """

  arithmetic: str = "keras"

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               *, mask: jax.Array | None = None) -> jax.Array:
    if mask is not None or self.axis_name is not None or self.axis != -1:
      raise NotImplementedError(
          "models.layers.BatchNorm normalizes the last axis, without a mask "
          "or axis_name")
    if self.arithmetic not in ("keras", "tf_fused"):
      raise ValueError("arithmetic must be 'keras' or 'tf_fused', got "
                       f"{self.arithmetic!r}")
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    tf_fused = self.arithmetic == "tf_fused" and not use_running_average
    c = x.shape[-1]
    x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
    ra_mean = self.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, jnp.float32), (c,))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      if tf_fused:
        # One correction step: x - m is exact near m, so the mean is
        # rounded about as well as the kernel's. m is a constant for the
        # gradient (the corrected mean does not depend on it).
        m = jax.lax.stop_gradient(jnp.mean(x, axis=axes))
        mean = m + jnp.mean(x - m, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
      else:
        mean = jnp.mean(x, axis=axes)
        var = jnp.var(x, axis=axes)  # two-pass, as keras.ops.moments
      if not self.is_initializing():
        batch_var = var
        if tf_fused:
          n = x.size // c
          batch_var = var * (n / max(n - 1, 1))
        mom = self.momentum
        ra_mean.value = ra_mean.value * mom + mean * (1.0 - mom)
        ra_var.value = ra_var.value * mom + batch_var * (1.0 - mom)
    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      inv = inv * self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (c,), self.param_dtype)
            if self.use_bias else None)
    if tf_fused:
      y = (x - mean) * inv
      if bias is not None:
        y = y + bias
    else:
      res = -mean * inv
      if bias is not None:
        res = res + bias
      y = x * inv + res
    return y if self.dtype is None else y.astype(self.dtype)


def batch_norm(x: jax.Array, *, name: str, epsilon: float, train: bool,
               scale: bool = True, center: bool = True,
               momentum: float = 0.99, arithmetic: str = "keras"
               ) -> jax.Array:
  """Keras ``BatchNormalization`` on the last axis (Keras momentum 0.99;
  ``arithmetic="tf_fused"`` for tf-keras' fused kernel, see ``BatchNorm``).
  """
  return BatchNorm(use_running_average=not train, momentum=momentum,
                   epsilon=epsilon, use_scale=scale, use_bias=center,
                   arithmetic=arithmetic, name=name)(x)


class SeparableConv(nn.Module):
  """Keras ``SeparableConv2D``: depthwise then pointwise, one layer.

  The parameters keep Keras' names (``depthwise_kernel``,
  ``pointwise_kernel``, ``bias``) in one Flax module, so the layer matches
  its Keras name exactly. ``depthwise_kernel`` is stored in Flax's grouped
  layout ``(h, w, 1, c * m)``; translation rearranges Keras' ``(h, w, c, m)``.

  Attributes:
    filters: output channels of the pointwise step.
    kernel_size: depthwise window.
    strides: depthwise strides.
    padding: ``"VALID"`` (Keras' default) or ``"SAME"``, of the depthwise step.
    depth_multiplier: depthwise channel multiplier ``m``.
    use_bias: add ``bias`` after the pointwise step (Keras default True).
  """

  filters: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = "VALID"
  depth_multiplier: int = 1
  use_bias: bool = True
  # translate.fold_batchnorm scales this kernel by a following BatchNorm.
  FOLD_KERNEL: ClassVar[str] = "pointwise_kernel"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kh, kw = _pair(self.kernel_size)
    m = self.depth_multiplier
    init = nn.initializers.lecun_normal()
    dw = self.param("depthwise_kernel", init, (kh, kw, 1, c * m), jnp.float32)
    pw = self.param("pointwise_kernel", init, (1, 1, c * m, self.filters),
                    jnp.float32)
    strides = _pair(self.strides)
    pads = conv_forms._pads(self.padding.upper(), x.shape[1:3], (kh, kw),  # pylint: disable=protected-access
                            strides)
    # The depthwise step in the platform's form (shifted multiply-adds on
    # CPU); the pointwise step stays a native 1x1 convolution: as
    # dot_general it was no faster in Xception (benchmarks/RESULTS.md).
    x = conv_forms.depthwise(x, dw, strides, pads)
    x = jax.lax.conv_general_dilated(x, pw, (1, 1), "VALID",
                                     dimension_numbers=conv_forms.DN)
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.filters,),
                         jnp.float32)
    elif self.has_variable("params", "bias"):  # a folded BatchNorm's shift
      x = x + self.get_variable("params", "bias")
    return x


def separable_conv(x: jax.Array, filters: int, kernel: int | Sequence[int], *,
                   name: str, strides: int | Sequence[int] = 1,
                   padding: str = "VALID", use_bias: bool = True,
                   depth_multiplier: int = 1) -> jax.Array:
  """Keras ``SeparableConv2D`` (default padding ``valid``, like Keras)."""
  return SeparableConv(filters, _pair(kernel), _pair(strides), padding,
                       depth_multiplier, use_bias, name=name)(x)


class LayerNorm(nn.Module):
  """Keras ``LayerNormalization`` over the last axis, in Keras' arithmetic.

  Keras (``keras.ops.layer_normalization``) takes the two-pass variance
  (``tf.nn.moments``), then computes ``x * inv + (beta - mean * inv)`` with
  ``inv = gamma * rsqrt(var + eps)``; Flax's ``nn.LayerNorm`` computes
  ``(x - mean) * inv + beta``, which rounds differently when the mean is large
  against the spread. The parameters keep Flax's names (``scale``, ``bias``).

  Attributes:
    epsilon: Keras' ``epsilon`` (default 1e-3).
  """

  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return x * inv + (-mean * inv + bias)


def layer_norm(x: jax.Array, *, name: str, epsilon: float = 1e-3
               ) -> jax.Array:
  """Keras ``LayerNormalization`` on the last axis (Keras epsilon 1e-3)."""
  return LayerNorm(epsilon=epsilon, name=name)(x)


class LayerScale(nn.Module):
  """Keras ConvNeXt's ``LayerScale``: ``x * gamma``, one weight per channel.

  Attributes:
    init_value: initial value of ``gamma`` (Keras ``init_values``).
  """

  init_value: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), jnp.float32)
    return x * gamma


def dense(x: jax.Array, units: int, *, name: str,
          use_bias: bool = True) -> jax.Array:
  """Keras ``Dense``."""
  return nn.Dense(units, use_bias=use_bias, name=name)(x)


def zero_pad(x: jax.Array, padding: int | Sequence[tuple[int, int]]
             ) -> jax.Array:
  """Keras ``ZeroPadding2D``: ``((top, bottom), (left, right))`` or an int."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  (t, b), (l, r) = padding
  return jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))


def block_output(x: jax.Array) -> jax.Array:
  """A residual block's output: computed once in the inference form on CPU
  (``conv_forms.materialize``), ``x`` elsewhere."""
  return conv_forms.materialize(x)


def max_pool(x: jax.Array, pool: int, strides: int | None = None,
             padding: str = "VALID") -> jax.Array:
  """Keras ``MaxPooling2D`` (``same`` ignores the padded cells, as TF)."""
  strides = pool if strides is None else strides
  return conv_forms.pool(x, "max", _pair(pool), _pair(strides),
                         padding.upper())


def avg_pool(x: jax.Array, pool: int, strides: int | None = None,
             padding: str = "VALID") -> jax.Array:
  """Keras ``AveragePooling2D``: ``same`` excludes the padding from the mean.

  Flax counts padded cells by default; Keras (TF) does not.
  """
  strides = pool if strides is None else strides
  return conv_forms.pool(x, "avg", _pair(pool), _pair(strides),
                         padding.upper())


def global_pool(x: jax.Array, mode: str) -> jax.Array:
  """``GlobalAveragePooling2D`` (``avg``) or ``GlobalMaxPooling2D`` (``max``)."""
  if mode == "avg":
    return jnp.mean(x, axis=(1, 2))
  if mode == "max":
    return jnp.max(x, axis=(1, 2))
  raise ValueError(f"pooling must be None, 'avg' or 'max', got {mode!r}")


def head(x: jax.Array, *, include_top: bool, classes: int,
         pooling: str | None, classifier_activation: Any,
         dropout: float = 0.0, train: bool = False,
         name: str = "predictions") -> jax.Array:
  """The Keras Applications top: pool, optional dropout, ``Dense``.

  With ``include_top=False`` returns the feature map or its ``pooling``.
  """
  if not include_top:
    return x if pooling is None else global_pool(x, pooling)
  x = global_pool(x, "avg")
  if dropout:
    x = nn.Dropout(dropout, deterministic=not train, name="top_dropout")(x)
  x = dense(x, classes, name=name)
  return activation(classifier_activation)(x)


class Normalization(nn.Module):
  """Keras ``Normalization(axis=-1)`` whose mean/variance are weights.

  Keras computes ``(x - mean) / max(sqrt(variance), 1e-7)``; mean and variance
  are translated (``batch_stats``), never hard-coded.
  """

  epsilon: float = 1e-7  # keras.backend.epsilon()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    return (x - mean.value) / jnp.maximum(jnp.sqrt(var.value), self.epsilon)
