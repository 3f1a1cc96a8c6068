"""Flax versions of Keras convolutions that ``models.layers`` lacks:
transposed (``Conv1DTranspose``, ``Conv2DTranspose``) and separable beyond
``models.layers.SeparableConv`` (2D, undilated): ``SeparableConv1D`` and a
dilated ``SeparableConv2D``.

Semantics from ``keras/src/layers/convolutional/base_conv_transpose.py``,
``base_separable_conv.py`` and the backends' ``conv_transpose`` and
``separable_conv`` (``keras/src/backend/jax/nn.py``,
``keras/src/backend/tensorflow/nn.py``). Channels last; a translation
transposes around them for ``channels_first`` and applies the activation.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _tuple(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
  return (value,) * rank if isinstance(value, int) else tuple(value)


class _SeparableConv(nn.Module):
  """Keras ``SeparableConv{rank}D``, channels last.

  Variables keep Keras' names: ``depthwise_kernel`` in Flax's grouped
  layout ``(*kernel_size, 1, c * m)`` (Keras' is ``(*kernel_size, c, m)``;
  the translation rule rearranges it), ``pointwise_kernel``
  ``(1, ..., c * m, filters)`` as in Keras, and ``bias`` ``(filters,)``.

  Attributes:
    filters: output channels of the pointwise step.
    kernel_size: depthwise window (an int: the same on every axis).
    strides: depthwise strides (Keras default 1).
    padding: ``"valid"`` (Keras' default), ``"same"`` (TF's: the extra
      pixel after), or ``"causal"`` (tf-keras' ``SeparableConv1D``: all
      ``dilation * (kernel - 1)`` zeros before).
    dilation_rate: depthwise dilation (Keras default 1).
    depth_multiplier: depthwise filters per input channel (Keras default 1).
    use_bias: add ``bias`` after the pointwise step (Keras default True).
  """

  filters: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "valid"
  dilation_rate: int | Sequence[int] = 1
  depth_multiplier: int = 1
  use_bias: bool = True
  rank: ClassVar[int] = 2
  # translate.fold_batchnorm scales this kernel by a following BatchNorm.
  FOLD_KERNEL: ClassVar[str] = "pointwise_kernel"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.rank
    kernel = _tuple(self.kernel_size, n)
    dilation = _tuple(self.dilation_rate, n)
    c, m = x.shape[-1], self.depth_multiplier
    init = nn.initializers.lecun_normal()
    dw = self.param("depthwise_kernel", init, (*kernel, 1, c * m),
                    jnp.float32)
    pw = self.param("pointwise_kernel", init, (1,) * n + (c * m,
                                                          self.filters),
                    jnp.float32)
    padding = self.padding.lower()
    if padding == "causal":
      if n != 1:
        raise ValueError("padding='causal' is for 1D convolutions")
      pads = [(dilation[0] * (kernel[0] - 1), 0)]
    elif padding in ("valid", "same"):
      pads = padding.upper()  # lax's "SAME" is TF's, dilation and strides too
    else:
      raise ValueError(f"padding={self.padding!r}: use 'valid', 'same' or "
                       "'causal'")
    spatial = "HW"[-n:]
    dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    x = jax.lax.conv_general_dilated(
        x, dw.astype(x.dtype), _tuple(self.strides, n), pads,
        rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=c)
    x = jax.lax.conv_general_dilated(x, pw.astype(x.dtype), (1,) * n,
                                     "VALID", dimension_numbers=dn)
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.filters,),
                         jnp.float32)
    elif self.has_variable("params", "bias"):  # a folded BatchNorm's shift
      x = x + self.get_variable("params", "bias")
    return x


class SeparableConv1D(_SeparableConv):
  """Keras ``SeparableConv1D`` (see ``_SeparableConv``)."""

  rank: ClassVar[int] = 1


class SeparableConv2D(_SeparableConv):
  """Keras ``SeparableConv2D`` with any ``dilation_rate`` (see
  ``_SeparableConv``; undilated ones translate to the CPU-fast
  ``models.layers.SeparableConv``)."""

  rank: ClassVar[int] = 2


def transpose_pads(kernel_size: int, stride: int, dilation: int,
                   padding: str, output_padding: int | None
                   ) -> tuple[int, int]:
  """The ``(before, after)`` padding of ``jax.lax.conv_transpose`` that
  gives Keras' transposed convolution on one spatial axis.

  Keras' own arithmetic for its JAX backend
  (``keras/src/backend/common/backend_utils.py``
  ``_convert_conv_transpose_padding_args_from_keras_to_jax``): the output
  is ``(i - 1) * s + max(k, s)`` (``"valid"``) or ``i * s`` (``"same"``),
  or, with ``output_padding`` p, ``(i - 1) * s + k + p`` (``"valid"``) or
  ``(i - 1) * s + k % 2 + p`` (``"same"``), k the dilated kernel size.
  """
  k = (kernel_size - 1) * dilation + 1
  if padding == "valid":
    extra = max(k, stride) - k if output_padding is None else output_padding
    return k - 1, k - 1 + extra
  if padding != "same":
    raise ValueError(f"padding={padding!r}: use 'valid' or 'same'")
  if output_padding is None:
    total = stride + k - 2
  else:
    total = k + k % 2 - 2 + output_padding
  before = min(total // 2 + total % 2, k - 1)
  return before, total - before


class _ConvTranspose(nn.Module):
  """Keras ``Conv{rank}DTranspose``, channels last.

  Variables keep Keras' names and layouts: ``kernel``
  ``(*kernel_size, filters, in_channels)`` (output channels before input
  ones, unlike ``Conv``'s) and ``bias`` ``(filters,)``; the weight rule is
  the identity. Computed as Keras' JAX backend does
  (``keras/src/backend/jax/nn.py conv_transpose``): ``jax.lax
  .conv_transpose`` with ``transpose_kernel=True`` and ``transpose_pads``.

  Attributes:
    filters: output channels.
    kernel_size: the window (an int: the same on every axis).
    strides: the upsampling factors (Keras default 1).
    padding: ``"valid"`` (Keras' default) or ``"same"``.
    output_padding: extra output rows after, per axis, each less than its
      stride; None (Keras' default) lets the padding decide the size.
    dilation_rate: kernel dilation (Keras default 1; Keras refuses it with
      strides > 1).
    use_bias: add ``bias`` (Keras default True).
  """

  filters: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str = "valid"
  output_padding: int | Sequence[int] | None = None
  dilation_rate: int | Sequence[int] = 1
  use_bias: bool = True
  rank: ClassVar[int] = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.rank
    kernel_size = _tuple(self.kernel_size, n)
    strides = _tuple(self.strides, n)
    dilation = _tuple(self.dilation_rate, n)
    output_padding = ((None,) * n if self.output_padding is None
                      else _tuple(self.output_padding, n))
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*kernel_size, self.filters, x.shape[-1]),
                        jnp.float32)
    pads = [transpose_pads(*args, self.padding.lower(), p) for *args, p in
            zip(kernel_size, strides, dilation, output_padding)]
    # Strided: computed on TFLite's "VALID" padding (k - 1 each side),
    # then cropped (and zero-padded after, for an output_padding past the
    # window) to Keras' (before, after). TFLite's TRANSPOSE_CONV knows only
    # SAME and VALID: the converter turned a 3x3, stride-2 "same" layer's
    # asymmetric padding into a 34x34 output where 32x32 was due (XNNPack
    # refused to load it), and failed on padding past the window. The same
    # sums either way: the crop drops rows no output uses, and the rows
    # padded after take no input. Unstrided, it is a plain convolution.
    strided = any(s > 1 for s in strides)
    edges = [(k - 1) * d for k, d in zip(kernel_size, dilation)]
    spatial = "HW"[-n:]
    # Keras' kernel read as (*k, I, O) is (*k, out, in); transpose_kernel
    # swaps the two and flips the window, as Keras' JAX backend does.
    x = jax.lax.conv_transpose(
        x, kernel.astype(x.dtype), strides,
        [(e, e) for e in edges] if strided else pads, rhs_dilation=dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        transpose_kernel=True)
    if strided:
      x = x[(slice(None), *(slice(e - before, size - max(e - after, 0))
                            for (before, after), e, size in
                            zip(pads, edges, x.shape[1:-1])))]
      extra = [max(after - e, 0) for (_, after), e in zip(pads, edges)]
      if any(extra):
        x = jnp.pad(x, [(0, 0), *((0, h) for h in extra), (0, 0)])
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.filters,),
                         jnp.float32)
    return x


class Conv1DTranspose(_ConvTranspose):
  """Keras ``Conv1DTranspose`` (see ``_ConvTranspose``)."""

  rank: ClassVar[int] = 1


class Conv2DTranspose(_ConvTranspose):
  """Keras ``Conv2DTranspose`` (see ``_ConvTranspose``)."""

  rank: ClassVar[int] = 2
