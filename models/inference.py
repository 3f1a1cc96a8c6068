"""The inference form of any model: convolutions carry folded BatchNorms.

``Inference(module)`` has the same variable tree as ``module`` minus what
``translate.fold_batchnorm`` removed: a BatchNorm whose variables are gone is
skipped, and a convolution with a folded ``bias`` adds it even where the
original had ``use_bias=False``.

On CPU it also takes a faster route for depthwise convolutions (``nn.Conv``
with one group per input channel, and the depthwise step of
``layers.SeparableConv``). XLA CPU runs a grouped convolution as a slow
generic loop; the same arithmetic written as ``kh * kw`` strided slices times
per-channel weights, summed, fuses into one elementwise loop and is 5 to 15
times faster at MobileNetV2's and EfficientNet's shapes (``benchmarks/
RESULTS.md``). The choice is made per platform at lowering time with
``jax.lax.platform_dependent``: GPU and TPU keep the native convolution
(cuDNN's depthwise kernel is fast), and so does anything traced into a
TensorFlow graph (``jax2tf``, hence ``translate.export_tflite``), so that the
TFLite converter still sees one ``DEPTHWISE_CONV_2D`` per depthwise kernel.
``native_convolutions()`` forces the native form for other exporters.

More CPU choices, made the same way, because the measurements support them
(``benchmarks/RESULTS.md``): a batch of more than one image runs as a loop
over single images (``lax.map``; each image's activations stay in cache:
1.2 to 2.3 times less CPU time at batch 8), except for the families in
``_WHOLE_BATCH`` (EfficientNetV2: 20% less CPU time as a whole batch);
1x1 stride-1 convolutions run as ``dot_general`` (about 10% faster at batch
1); and other one-group convolutions whose output has at most
``_IM2COL_MAX_PIXELS`` pixels (14x14) run as im2col and one ``dot_general``
(ResNet50: 12% less CPU time; neutral elsewhere; slower at larger outputs).
RegNet's grouped convolutions and ``SeparableConv``'s pointwise step stay
native: the alternatives measured were no faster.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator, Sequence

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp

from models.layers import SeparableConv

_STATE = threading.local()
# What the CPU fast form does besides the shifted depthwise convolution; each
# measured in benchmarks/RESULTS.md (switches for that measurement only).
_DOT_1X1 = True     # 1x1 stride-1 convolutions as dot_general
_PER_SAMPLE = True  # batch > 1 as a loop over single images (cache-sized)
_IM2COL_MAX_PIXELS = 196  # im2col + dot for dense convs with outputs
                          # of at most this many pixels (14x14)
# Families whose batches run whole on CPU: measured faster than the
# per-image loop (EfficientNetV2's fused-MBConv stages run dense 3x3
# convolutions on few channels at large sizes).
_WHOLE_BATCH = frozenset({"EfficientNetV2"})


@contextlib.contextmanager
def native_convolutions() -> Iterator[None]:
  """Within this block the inference form traces native convolutions only.

  For exporters that lower for CPU but want the convolution ops themselves
  (``translate.export_tflite`` needs none of this: a trace into a TensorFlow
  graph is detected).
  """
  prev = getattr(_STATE, "native", False)
  _STATE.native = True
  try:
    yield
  finally:
    _STATE.native = prev


def _tracing_into_tensorflow() -> bool:
  """True while a TensorFlow graph is being built (jax2tf inside a
  ``tf.function``, which is how ``translate.export_tflite`` converts)."""
  tf = sys.modules.get("tensorflow")
  return tf is not None and not tf.executing_eagerly()


def fast_path_allowed() -> bool:
  """Whether the CPU fast form may be traced here (it is then chosen per
  platform at lowering time)."""
  return not getattr(_STATE, "native", False) and not _tracing_into_tensorflow()


def _pads(padding: Any, spatial: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]] | None:
  """Explicit ``(low, high)`` pads per spatial axis, or None if unsupported."""
  padding = canonicalize_padding(padding, len(kernel))
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
    return [tuple(p) for p in jax.lax.padtype_to_pads(
        spatial, kernel, strides, padding)]
  return [tuple(int(v) for v in p) for p in padding]


def depthwise_shifted(x: jax.Array, kernel: jax.Array,
                      strides: Sequence[int],
                      pads: Sequence[tuple[int, int]]) -> jax.Array:
  """A depthwise convolution as a sum of ``kh * kw`` shifted, strided slices
  times per-channel weights (one fused loop under XLA).

  Computes what ``lax.conv_general_dilated(x, kernel, strides, pads,
  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)``
  computes, up to float rounding.

  Args:
    x: ``(n, h, w, c)``.
    kernel: ``(kh, kw, 1, c * m)`` (Flax's grouped layout; output channel
      ``i * m + j`` reads input channel ``i``).
    strides: ``(sh, sw)``.
    pads: ``((top, bottom), (left, right))``.

  Returns:
    ``(n, ho, wo, c * m)``.
  """
  n, h, w, c = x.shape
  kh, kw, _, cm = kernel.shape
  sh, sw = strides
  if cm != c:
    x = jnp.repeat(x, cm // c, axis=-1)  # depth multiplier m > 1
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (h + sum(pads[0]) - kh) // sh + 1
  wo = (w + sum(pads[1]) - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(
          x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1,
                            cm), (1, sh, sw, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _depthwise(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution: the shifted form on CPU, native elsewhere."""
  c = x.shape[-1]

  def native(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, tuple(strides), [tuple(p) for p in pads],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

  if not fast_path_allowed():
    return native(x, kernel)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, k: depthwise_shifted(x, k, strides, pads),
      default=native)


def _plain_conv(mod: nn.Conv, x: jax.Array, kernel: jax.Array | None
                ) -> tuple[tuple[int, int], Any] | None:
  """``(strides, pads)`` of a plain 2D ``nn.Conv`` (NHWC, shared weights,
  no dilation or mask, a padding ``_pads`` resolves), else None."""
  if (x.ndim != 4 or kernel is None or kernel.ndim != 4
      or not mod.shared_weights
      or mod.input_dilation not in (None, 1, (1, 1))
      or mod.kernel_dilation not in (None, 1, (1, 1))
      or getattr(mod, "mask", None) is not None):
    return None
  strides = mod.strides or 1
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  pads = _pads(mod.padding, x.shape[1:3], kernel.shape[:2], strides)
  return None if pads is None else (strides, pads)


def _fast_depthwise_conv(mod: nn.Conv, x: jax.Array) -> jax.Array | None:
  """``mod(x)`` through ``_depthwise`` if ``mod`` is a plain depthwise
  ``nn.Conv`` (NHWC, zero padding, no dilation; else None: run it
  natively)."""
  kernel = mod.get_variable("params", "kernel")
  geometry = _plain_conv(mod, x, kernel)
  if (geometry is None or mod.feature_group_count != x.shape[-1]
      or kernel.shape[2] != 1):
    return None
  strides, pads = geometry
  y = _depthwise(x, kernel, strides, pads)
  if mod.has_variable("params", "bias"):
    y = y + mod.get_variable("params", "bias")
  return y


def _fast_separable_conv(mod: SeparableConv, x: jax.Array
                         ) -> jax.Array | None:
  """``SeparableConv`` with its depthwise step through ``_depthwise``."""
  dw = mod.get_variable("params", "depthwise_kernel")
  pw = mod.get_variable("params", "pointwise_kernel")
  if x.ndim != 4 or dw is None or pw is None:
    return None
  kernel = tuple(dw.shape[:2])
  strides = mod.strides
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  pads = _pads(mod.padding.upper(), x.shape[1:3], kernel, strides)
  if pads is None:
    return None
  y = _depthwise(x, dw, strides, pads)
  # The pointwise step stays a native 1x1 convolution: as dot_general it was
  # no faster in Xception (benchmarks/RESULTS.md).
  y = jax.lax.conv_general_dilated(y, pw, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if mod.has_variable("params", "bias"):
    y = y + mod.get_variable("params", "bias")
  return y


def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 stride-1 convolution: ``dot_general`` on CPU (if ``_DOT_1X1``
  and the fast path is allowed), native elsewhere."""

  def native(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def dot(x, kernel):
    return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))

  if not _DOT_1X1 or not fast_path_allowed():
    return native(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=dot, default=native)


def conv_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                pads: Sequence[tuple[int, int]]) -> jax.Array:
  """A dense (one-group) convolution as im2col and one ``dot_general``.

  The ``kh * kw`` shifted, strided windows of the zero-padded input are
  concatenated along channels (``(n, ho, wo, kh * kw * c)``, window-major,
  the order of ``kernel.reshape(kh * kw * c, o)``) and multiplied by the
  reshaped kernel. Computes what ``lax.conv_general_dilated(x, kernel,
  strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, up
  to float rounding; a 1x1 kernel is a strided slice and a dot.
  """
  n, h, w, c = x.shape
  kh, kw, _, o = kernel.shape
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (h + sum(pads[0]) - kh) // sh + 1
  wo = (w + sum(pads[1]) - kw) // sw + 1
  cols = [jax.lax.slice(x, (0, i, j, 0),
                        (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                        (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jax.lax.dot_general(patches, kernel.reshape(kh * kw * c, o),
                             (((3,), (0,)), ((), ())))


def _fast_dense_conv(mod: nn.Conv, x: jax.Array) -> jax.Array | None:
  """A one-group ``nn.Conv`` other than 1x1 stride 1 through
  ``conv_im2col`` on CPU, where its output is small (at most
  ``_IM2COL_MAX_PIXELS`` pixels per image; or None: run it natively)."""
  kernel = mod.get_variable("params", "kernel")
  geometry = _plain_conv(mod, x, kernel)
  if (not _IM2COL_MAX_PIXELS or geometry is None
      or mod.feature_group_count != 1 or not fast_path_allowed()):
    return None
  strides, pads = geometry
  ho = (x.shape[1] + sum(pads[0]) - kernel.shape[0]) // strides[0] + 1
  wo = (x.shape[2] + sum(pads[1]) - kernel.shape[1]) // strides[1] + 1
  if ho * wo > _IM2COL_MAX_PIXELS:
    return None

  def native(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, [tuple(p) for p in pads],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y = jax.lax.platform_dependent(
      x, kernel, cpu=lambda x, k: conv_im2col(x, k, strides, pads),
      default=native)
  if mod.has_variable("params", "bias"):
    y = y + mod.get_variable("params", "bias")
  return y


def _fast_pointwise_conv(mod: nn.Conv, x: jax.Array) -> jax.Array | None:
  """A 1x1, stride-1 ``nn.Conv`` as one ``dot_general`` over channels (or
  None). Measured faster on XLA CPU at batch 1, which is what the per-sample
  loop of ``Inference`` runs (``benchmarks/RESULTS.md``)."""
  kernel = mod.get_variable("params", "kernel")
  if (not _DOT_1X1 or x.ndim != 4 or kernel is None or kernel.ndim != 4
      or tuple(kernel.shape[:2]) != (1, 1) or mod.feature_group_count != 1
      or not mod.shared_weights
      or (mod.strides or 1) not in (1, (1, 1))
      or mod.input_dilation not in (None, 1, (1, 1))
      or getattr(mod, "mask", None) is not None
      or _pads(mod.padding, x.shape[1:3], (1, 1), (1, 1)) != [(0, 0)] * 2):
    return None

  if not fast_path_allowed():
    return None
  y = _pointwise(x, kernel)
  if mod.has_variable("params", "bias"):
    y = y + mod.get_variable("params", "bias")
  return y


def _folded(next_fun, args, kwargs, context):
  mod = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(mod, nn.BatchNorm) and not mod.has_variable(
      "batch_stats", "mean") and not mod.is_initializing():
    return args[0]  # folded into the preceding convolution
  if (isinstance(mod, (nn.Conv, SeparableConv)) and len(args) == 1
      and not kwargs and not mod.is_initializing()):
    if isinstance(mod, SeparableConv):
      fast = _fast_separable_conv(mod, args[0])
    else:
      fast = _fast_depthwise_conv(mod, args[0])
      if fast is None:
        fast = _fast_pointwise_conv(mod, args[0])
      if fast is None:
        fast = _fast_dense_conv(mod, args[0])
    if fast is not None:
      return fast
  if isinstance(mod, nn.Conv) and not mod.use_bias and mod.has_variable(
      "params", "bias"):
    return next_fun(*args, **kwargs) + mod.get_variable("params", "bias")
  return next_fun(*args, **kwargs)


class Inference(nn.Module):
  """Runs ``inner`` with folded BatchNorms (same scope, same names), and on
  CPU with the fast depthwise form (see the module docstring)."""

  inner: nn.Module

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    if train:
      raise ValueError("the inference form (folded BatchNorm) cannot train; "
                       "use models.create(..., inference=False)")
    if (not _PER_SAMPLE or type(self.inner).__name__ in _WHOLE_BATCH
        or self.is_initializing() or x.ndim != 4
        or x.shape[0] < 2 or not fast_path_allowed()):
      with nn.intercept_methods(_folded):
        return self.inner(x)
    variables = self.variables
    inner = self.inner.clone(parent=None)

    def whole(x):
      with nn.intercept_methods(_folded):
        return inner.apply(variables, x)

    def per_sample(x):
      out = jax.lax.map(lambda xi: whole(xi[None]), x)
      return jax.tree.map(lambda a: a[:, 0], out)

    return jax.lax.platform_dependent(x, cpu=per_sample, default=whole)
