"""The forms a convolution takes on each platform.

Every convolution of the ported models (``models.layers.Conv``, the
``nn.Conv`` the families build through ``layers.conv``, and
``layers.SeparableConv``) computes the same function on every platform, but
on CPU it is lowered in the form XLA CPU runs fastest, in training and in
inference alike (``benchmarks/RESULTS.md`` has the measurements):

- a depthwise convolution (one group per input channel) as ``kh * kw``
  strided slices times per-channel weights, summed (``depthwise_shifted``):
  XLA CPU runs a grouped convolution as a slow generic loop, while this fuses
  into one elementwise loop; 5 to 15 times faster at MobileNetV2's and
  EfficientNet's shapes, and 3.5 times less time for a MobileNetV2 training
  step, whose backward pass is made of the same slices;
- a 1x1 stride-1 convolution as one ``dot_general`` over channels;
- another one-group convolution whose output has at most
  ``_IM2COL_MAX_PIXELS`` pixels (14x14) as im2col and one ``dot_general``
  (``conv_im2col``).

In the inference form (``inference_forms()``, which
``models.inference.Inference`` traces in; their backward passes are slow, so
training keeps the forms above):

- a stride-2 convolution on at most 4 input channels (the image stems) as a
  stride-1 one on the space-to-depth input, in Eigen's form below
  (``conv_space_to_depth``);
- a 3x3 stride-1 one-group convolution with at least 64 input and at most
  64 output channels and an output larger than im2col's and at most 56x56
  (ResNet's first stage, DenseNet's growth convolutions) as one
  ``dot_general`` to every tap's
  outputs and a sum of shifted slices (``conv_tap_dots``): XLA CPU runs
  such a native convolution on one thread (its YNNPACK kernel splits work
  by blocks of 64 output channels), the dot runs on all of them;
- another stride-1 one-group kxk convolution with at least 16 input and 32
  output channels and at most ``_EIGEN_MAX_MACS`` multiply-adds per image
  (Inception's, Xception's and ResNet-RS's stems, Inception's 5x5, 1x7 and
  7x1) computed one row taller than its input (``native_conv_eigen``): XLA
  CPU then runs it in Eigen's convolution on every thread instead of
  YNNPACK's. Heavier ones (VGG16's) stay native, where YNNPACK is faster;
- another strided one-group convolution with a kernel of at most 3x3 (the
  strided shortcuts, Inception's reductions) as im2col at any size.
- a residual block's output computed once into memory (``materialize``,
  which the residual families call), not again in every consumer;
- max and average pooling (``models.layers.max_pool`` and ``avg_pool``) as
  strided slices, one axis at a time (``pool_separable``): XLA CPU's
  ``reduce_window`` took 5 to 10 times as long at Inception's and ResNet's
  shapes. (The gradient of a maximum of slices splits ties, where Keras'
  goes to one input: training keeps ``reduce_window``.)

RegNet's grouped convolutions and ``SeparableConv``'s pointwise step stay
native: the alternatives measured were no faster.

The choice is made per platform at lowering time with
``jax.lax.platform_dependent``: GPU and TPU keep the native convolution
(cuDNN's are fast), and so does anything traced into a TensorFlow graph
(``jax2tf``, hence ``translate.export_tflite``), so that the TFLite converter
still sees one ``CONV_2D`` or ``DEPTHWISE_CONV_2D`` per kernel.
``native_convolutions()`` forces the native form for other exporters.

Why a context and not an argument: the two switches (``inference_forms()``,
``native_convolutions()``) are read by the leaf helpers
(``models.layers.Conv``, ``max_pool``, ``block_output``) while a module is
*traced*, and they hold for every convolution in that trace. Passing them as
an argument would thread a flag through every family's ``__call__`` and
every block function, and a user's own module wrapping a port would have to
forward it too; and they are not attributes of the model (the variables and
the function computed are the same in every form). So they are thread-local
(``_STATE`` below, the one place they live): entered by
``models.inference.Inference.__call__`` and by exporters, read only through
``fast_path_allowed()`` and ``_inference()`` here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np

_STATE = threading.local()  # the switches: see the module docstring
DN = ("NHWC", "HWIO", "NHWC")
# Switches for the measurements in benchmarks/RESULTS.md only.
_DOT_1X1 = True     # 1x1 stride-1 convolutions as dot_general
_IM2COL_MAX_PIXELS = 196  # im2col + dot for dense convs with outputs
                          # of at most this many pixels (14x14)
_TAP_DOTS = True  # few-output-channel kxk stride-1 convs as tap dots
_STRIDED_IM2COL = True  # strided convs up to 3x3 as im2col at any size
_S2D_STEM = True  # stride-2 convs on <= 4 channels via space-to-depth
_EIGEN = True  # other kxk stride-1 convs in Eigen's convolution, up to
_EIGEN_MAX_MACS = 800e6  # this many multiply-adds per image
_SEPARABLE_POOLS = True  # max / average pooling one axis at a time
_MATERIALIZE = True  # residual block outputs computed once (materialize)


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
  """Sets the thread-local switch ``name`` for the block (nesting keeps the
  outer value)."""
  prev = getattr(_STATE, name, False)
  setattr(_STATE, name, True)
  try:
    yield
  finally:
    setattr(_STATE, name, prev)


@contextlib.contextmanager
def native_convolutions() -> Iterator[None]:
  """Within this block the models trace native convolutions only.

  For exporters that lower for CPU but want the convolution ops themselves
  (``translate.export_tflite`` needs none of this: a trace into a TensorFlow
  graph is detected).
  """
  with _flag("native"):
    yield


@contextlib.contextmanager
def inference_forms() -> Iterator[None]:
  """Within this block convolutions may also take the forms measured for
  inference only (``"tap_dots"``, ``"eigen"``, ``"space_to_depth"`` and
  strided im2col): faster forward passes, whose backward passes XLA CPU
  runs slowly (a ResNet50 training step took 2.4 times as long, an
  InceptionV3 one 3.4 times); and so may pools (``pool_separable``, whose
  gradient splits a maximum's ties) and residual block outputs
  (``materialize``). ``models.inference.Inference`` traces inside it;
  training and the plain modules keep the other forms.
  """
  with _flag("inference"):
    yield


def _tracing_into_tensorflow() -> bool:
  """True while a TensorFlow graph is being built (jax2tf inside a
  ``tf.function``, which is how ``translate.export_tflite`` converts)."""
  tf = sys.modules.get("tensorflow")
  return tf is not None and not tf.executing_eagerly()


def fast_path_allowed() -> bool:
  """Whether the CPU forms may be traced here (they are then chosen per
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


def _out_size(size: int, pads: tuple[int, int], k: int, s: int) -> int:
  return (size + sum(pads) - k) // s + 1


def _windows(x: jax.Array, kh: int, kw: int, strides: Sequence[int],
             pads: Sequence[tuple[int, int]]) -> list[jax.Array]:
  """The ``kh * kw`` shifted, strided windows of the zero-padded ``x``
  (row-major over the kernel), each ``(n, ho, wo, c)``: what a kernel tap
  ``(i, j)`` sees at every output pixel."""
  n, h, w, c = x.shape
  sh, sw = strides
  ho = _out_size(h, pads[0], kh, sh)
  wo = _out_size(w, pads[1], kw, sw)
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  return [jax.lax.slice(x, (0, i, j, 0),
                        (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                        (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def native_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                pads: Sequence[tuple[int, int]], groups: int = 1
                ) -> jax.Array:
  """XLA's own convolution (NHWC, HWIO), what GPU and TPU run."""
  return jax.lax.conv_general_dilated(
      x, kernel, tuple(strides), [tuple(p) for p in pads],
      dimension_numbers=DN, feature_group_count=groups)


def native_conv_eigen(x: jax.Array, kernel: jax.Array,
                      pads: Sequence[tuple[int, int]]) -> jax.Array:
  """A stride-1 native convolution computed one or more rows taller than its
  input, the extra rows sliced away: the same values, in the kernel XLA CPU
  picks for it then.

  XLA CPU (jaxlib 0.10) hands a convolution to YNNPACK unless its output is
  larger than its input; YNNPACK splits the work by blocks of 64 output
  channels, so that a convolution with few of them runs on one thread. The
  taller one runs in Eigen's convolution on every thread (``cpu_form``
  says where that measured faster).
  """
  kh = kernel.shape[0]
  h = x.shape[1]
  ho = h + sum(pads[0]) - kh + 1
  extra = max(0, h + 1 - ho)
  taller = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), [(pads[0][0], pads[0][1] + extra), tuple(pads[1])],
      dimension_numbers=DN)
  return taller[:, :ho] if extra else taller


def conv_space_to_depth(x: jax.Array, kernel: jax.Array,
                        pads: Sequence[tuple[int, int]]) -> jax.Array:
  """A stride-2 convolution as a stride-1 one on the space-to-depth input:
  each 2x2 block of the zero-padded input becomes one pixel of ``4 * c``
  channels, the kernel (zero-padded to even size) ``(kh/2, kw/2, 4c, o)``,
  and that stride-1 convolution runs in ``native_conv_eigen``'s form.

  Computes what ``lax.conv_general_dilated(x, kernel, (2, 2), pads,
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, up to float
  rounding. For the image stems (3 input channels), which XLA CPU runs on
  one thread.
  """
  kh, kw, c, o = kernel.shape
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  n, h, w, _ = x.shape
  ho, wo = (h - kh) // 2 + 1, (w - kw) // 2 + 1
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  x = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h + 1) // 2, (w + 1) // 2,
                                            4 * c)
  kernel = jnp.pad(kernel, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
  kernel = kernel.reshape((kh + 1) // 2, 2, (kw + 1) // 2, 2, c, o)
  kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(
      (kh + 1) // 2, (kw + 1) // 2, 4 * c, o)
  out = native_conv_eigen(x, kernel, ((0, 0), (0, 0)))
  return out[:, :ho, :wo]


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
  c = x.shape[-1]
  kh, kw, _, cm = kernel.shape
  if cm != c:
    x = jnp.repeat(x, cm // c, axis=-1)  # depth multiplier m > 1
  taps = kernel.reshape(kh * kw, cm)
  out = None
  for window, tap in zip(_windows(x, kh, kw, strides, pads), taps):
    term = window * tap
    out = term if out is None else out + term
  return out


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
  kh, kw, c, o = kernel.shape
  cols = _windows(x, kh, kw, strides, pads)
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jax.lax.dot_general(patches, kernel.reshape(kh * kw * c, o),
                             (((3,), (0,)), ((), ())))


def conv_tap_dots(x: jax.Array, kernel: jax.Array,
                  pads: Sequence[tuple[int, int]]) -> jax.Array:
  """A dense stride-1 convolution as one ``dot_general`` from the input's
  channels to every kernel tap's outputs, then the taps' outputs summed over
  shifted windows: ``(n, h, w, c) @ (c, kh * kw * o)``, and tap ``(i, j)``'s
  block of ``o`` channels read at rows ``i + y`` and columns ``j + x``.

  Computes what ``lax.conv_general_dilated(x, kernel, (1, 1), pads,
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` computes, up to float
  rounding. XLA CPU runs a native convolution with at most 64 output
  channels on one thread; this dot has ``kh * kw`` times as many outputs
  and runs on all of them.
  """
  kh, kw, c, o = kernel.shape
  taps = jax.lax.dot_general(
      jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0))),
      kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * o),
      (((3,), (0,)), ((), ())))
  n, h, w, _ = taps.shape
  ho, wo = h - kh + 1, w - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      t = (i * kw + j) * o
      term = jax.lax.slice(taps, (0, i, j, t), (n, i + ho, j + wo, t + o))
      out = term if out is None else out + term
  return out


def pointwise_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 1x1 stride-1 convolution as one ``dot_general`` over channels."""
  return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _inference() -> bool:
  """Whether the inference-only forms apply here (``inference_forms()``)."""
  return getattr(_STATE, "inference", False)


def _cpu_else(cpu: Callable[..., Any], other: Callable[..., Any],
              *args: jax.Array) -> Any:
  """``cpu(*args)`` where the program runs on CPU, ``other(*args)``
  elsewhere (and wherever ``fast_path_allowed()`` is False)."""
  if not fast_path_allowed():
    return other(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=other)


def on_cpu(cpu: Callable[..., jax.Array], x: jax.Array, kernel: jax.Array,
           strides: Sequence[int], pads: Sequence[tuple[int, int]],
           groups: int = 1) -> jax.Array:
  """``cpu(x, kernel)`` where the program runs on CPU, the native
  convolution elsewhere (and wherever ``fast_path_allowed()`` is False)."""

  def native(x, kernel):
    return native_conv(x, kernel, strides, pads, groups)

  return _cpu_else(cpu, native, x, kernel)


def depthwise(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
              pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution: the shifted form on CPU, native elsewhere."""
  return on_cpu(lambda x, k: depthwise_shifted(x, k, strides, pads),
                x, kernel, strides, pads, groups=x.shape[-1])


def pool_separable(x: jax.Array, kind: str, window: Sequence[int],
                   strides: Sequence[int], pads: Sequence[tuple[int, int]]
                   ) -> jax.Array:
  """Max or average pooling of NHWC ``x`` (the average over the window's
  cells inside ``x``: padding is not counted, as in Keras) one axis at a
  time: ``k`` strided slices combined along the rows, then ``k`` along the
  columns. XLA fuses each axis into one loop, and the pool's elementwise
  producers with it (which is why the residual families ``materialize``
  their block outputs: InceptionResNetV2's pool after 20 block17s took
  6.6 ms per image, recomputing all their sums).
  """
  fill, combine = ((-jnp.inf, jax.lax.max) if kind == "max"
                   else (0.0, jax.lax.add))
  counts = []  # per axis: how many of each window's cells are inside x
  for size, k, s, (lo, hi) in zip(x.shape[1:3], window, strides, pads):
    start = np.arange((size + lo + hi - k) // s + 1) * s - lo
    counts.append(np.minimum(start + k, size) - np.maximum(start, 0))
  x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)),
              constant_values=fill)
  for axis, k, s in zip((1, 2), window, strides):
    n = (x.shape[axis] - k) // s + 1
    parts = [jax.lax.slice_in_dim(x, j, j + (n - 1) * s + 1, s, axis)
             for j in range(k)]
    x = parts[0]
    for part in parts[1:]:
      x = combine(x, part)
  if kind == "max":
    return x
  count = (counts[0][:, None] * counts[1][None, :]).astype(np.float32)
  return x / count[None, :, :, None]


def pool(x: jax.Array, kind: str, window: Sequence[int],
         strides: Sequence[int], padding: str) -> jax.Array:
  """Keras ``MaxPooling2D`` (``kind="max"``) or ``AveragePooling2D``
  (``"avg"``, padding not counted): in the inference form on CPU as
  ``pool_separable``, elsewhere ``reduce_window`` (Flax's pools)."""

  def native(x):
    if kind == "max":
      return nn.max_pool(x, tuple(window), strides=tuple(strides),
                         padding=padding)
    return nn.avg_pool(x, tuple(window), strides=tuple(strides),
                       padding=padding, count_include_pad=False)

  if not (_SEPARABLE_POOLS and _inference() and x.ndim == 4):
    return native(x)
  pads = _pads(padding, x.shape[1:3], window, strides)
  return _cpu_else(lambda x: pool_separable(x, kind, window, strides, pads),
                   native, x)


def materialize(x: jax.Array) -> jax.Array:
  """``x``, computed once into memory, in the inference form on CPU.

  For a residual block's output, ``relu(shortcut + f(x))``: XLA CPU fuses
  such an elementwise result into each consumer, the next block's sum
  included, so every block recomputes the sums of the blocks before it in
  its stage (InceptionResNetV2's 20th block17 read 20 convolution outputs).
  XLA drops ``optimization_barrier`` before it fuses; the result of a
  conditional is a buffer, so ``x`` goes through one whose branches both
  return it (its predicate, one element equal to itself, is known only at
  run time). Elsewhere, and in training, ``x`` as it is.
  """
  if not (_MATERIALIZE and _inference()):
    return x

  def cpu(x):
    first = jax.lax.slice(x, (0,) * x.ndim, (1,) * x.ndim).reshape(())
    return jax.lax.cond(first == first, lambda v: v, lambda v: v + 0, x)

  return _cpu_else(cpu, lambda x: x, x)


def cpu_form(x_shape: Sequence[int], kernel_shape: Sequence[int],
             strides: Sequence[int], pads: Sequence[tuple[int, int]],
             groups: int) -> str:
  """Which form a plain NHWC convolution takes on CPU (the rules in the
  module docstring): ``"depthwise"``, ``"dot"``, ``"im2col"``,
  ``"tap_dots"``, ``"eigen"``, ``"space_to_depth"`` or ``"native"``."""
  kh, kw, cin, cout = kernel_shape
  if groups == x_shape[-1] and cin == 1 and groups > 1:
    return "depthwise"
  if groups != 1:
    return "native"
  if (_DOT_1X1 and (kh, kw) == (1, 1) and tuple(strides) == (1, 1)
      and all(tuple(p) == (0, 0) for p in pads)):
    return "dot"
  pixels = (_out_size(x_shape[1], pads[0], kh, strides[0])
            * _out_size(x_shape[2], pads[1], kw, strides[1]))
  if _IM2COL_MAX_PIXELS and pixels <= _IM2COL_MAX_PIXELS:
    return "im2col"
  if not _inference():
    return "native"
  if tuple(strides) == (2, 2) and cin <= 4 and kh * kw > 1 and _S2D_STEM:
    return "space_to_depth"
  if tuple(strides) != (1, 1):
    return "im2col" if _STRIDED_IM2COL and kh * kw <= 9 else "native"
  if kh * kw == 1:
    return "native"
  if (_TAP_DOTS and (kh, kw) == (3, 3) and cout <= 64 and cin >= 64
      and pixels <= 56 * 56):
    return "tap_dots"
  if (_EIGEN and cin >= 16 and cout >= 32
      and pixels * kh * kw * cin * cout <= _EIGEN_MAX_MACS):
    return "eigen"
  return "native"


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
         pads: Sequence[tuple[int, int]], groups: int = 1) -> jax.Array:
  """A plain NHWC/HWIO convolution (no dilation) in the platform's form:
  on CPU the one ``cpu_form`` names, native elsewhere."""
  form = cpu_form(x.shape, kernel.shape, strides, pads, groups)
  if form == "depthwise":
    return depthwise(x, kernel, strides, pads)
  if form == "dot":
    return on_cpu(pointwise_dot, x, kernel, strides, pads)
  if form == "im2col":
    return on_cpu(lambda x, k: conv_im2col(x, k, strides, pads),
                  x, kernel, strides, pads)
  if form == "tap_dots":
    return on_cpu(lambda x, k: conv_tap_dots(x, k, pads),
                  x, kernel, strides, pads)
  if form == "space_to_depth":
    return on_cpu(lambda x, k: conv_space_to_depth(x, k, pads),
                  x, kernel, strides, pads)
  if form == "eigen":
    return on_cpu(lambda x, k: native_conv_eigen(x, k, pads),
                  x, kernel, strides, pads)
  return native_conv(x, kernel, strides, pads, groups)


def plain_geometry(mod: nn.Conv, x: jax.Array, kernel: jax.Array | None
                   ) -> tuple[tuple[int, int], Any] | None:
  """``(strides, pads)`` of a plain 2D ``nn.Conv`` (NHWC, shared weights,
  default precision and lowering, no dilation or mask, a padding ``_pads``
  resolves), else None."""
  if (x.ndim != 4 or kernel is None or kernel.ndim != 4
      or not mod.shared_weights or mod.precision is not None
      or getattr(mod, "conv_general_dilated", None) is not None
      or mod.input_dilation not in (None, 1, (1, 1))
      or (mod.kernel_dilation not in (None, 1, (1, 1))
          and kernel.shape[:2] != (1, 1))  # a 1x1 kernel has no gaps
      or getattr(mod, "mask", None) is not None):
    return None
  strides = mod.strides or 1
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  pads = _pads(mod.padding, x.shape[1:3], kernel.shape[:2], strides)
  return None if pads is None else (strides, pads)


def conv_module(mod: nn.Conv, x: jax.Array) -> jax.Array | None:
  """``mod(x)`` without its bias, in the platform's form (``conv``), for a
  plain ``nn.Conv`` whose kernel exists; None where the module must run
  itself (initializing, or not a plain 2D convolution)."""
  if mod.is_initializing() or not mod.has_variable("params", "kernel"):
    return None
  kernel = mod.get_variable("params", "kernel")
  geometry = plain_geometry(mod, x, kernel)
  if geometry is None:
    return None
  x, kernel = promote_dtype(x, kernel, dtype=mod.dtype)
  return conv(x, kernel, *geometry, groups=mod.feature_group_count)
