"""Keras' recurrent layers in Flax linen: Embedding, LSTM, GRU, SimpleRNN,
Bidirectional.

Each module takes the Keras constructor's argument names and defaults and is
batch-major ``(N, T, C)`` like Keras. The variables keep Keras' names and
fused layouts (``kernel`` ``(C, G * units)``, ``recurrent_kernel``
``(units, G * units)``, ``bias``; gates side by side in Keras' order: LSTM
``i f c o``, GRU ``z r h``), so translating a Keras model is a copy and the
input projection of every time step is one matrix product before the scan.
Formulas follow ``keras/src/layers/rnn/{lstm,gru,simple_rnn}.py``.

Name a module like its Keras layer (``LSTM(64, name="lstm")``) and
``translate.translate`` fills it from the Keras model. Masking is not
supported: ``Embedding(mask_zero=True)`` raises (and so does translating a
Keras model that masks).

``unroll``: ``False`` or ``True`` as in Keras, or an int (steps per loop
iteration). Left at ``None``, JAX runs the loop (Keras' ``unroll=False``:
unrolling makes XLA's compile and gradient slower) and
``translate.export_tflite`` chooses with ``export_unroll``: every step
unrolled into straight-line builtin ops for short sequences and small
recurrent kernels, where the loop's per-step cost dominates, else one
``WHILE`` loop (``benchmarks/rnn_tflite.py``, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers as L

Initializer = Callable[..., jax.Array]

MASKING_UNSUPPORTED = (
    "masking is not supported: the Flax recurrent modules run every time "
    "step, so padded steps would change the outputs; build the Keras model "
    "with mask_zero=False (and without a Masking layer)")


# translate.export_tflite traces under tflite_export(): layers left at
# unroll=None then take export_unroll's choice.
_TFLITE_EXPORT = contextvars.ContextVar("recurrent_tflite_export",
                                        default=False)

# Measured with benchmarks/rnn_tflite.py (LiteRT with XNNPACK, x86, 1 and 2
# threads): the unrolled file is faster than the WHILE loop while steps x
# recurrent kernel bytes stays within a few MiB (LSTM(32) x 32 steps: about
# 0.5x the loop's latency; LSTM(64) x 64 steps, 4 MiB: about 0.7x) and
# slower past it (LSTM(128) x 32 steps, 8 MiB: 1.2-1.3x; LSTM(256) x 32:
# 2.6x), probably as XNNPACK packs a copy of the kernel for every step's
# FULLY_CONNECTED.
UNROLL_MAX_BYTES = 4 * 2**20
UNROLL_MAX_STEPS = 256


@contextlib.contextmanager
def tflite_export() -> Iterator[None]:
  """Layers traced inside take ``export_unroll``'s form when their
  ``unroll`` is ``None`` (``translate.export_tflite`` enters this)."""
  token = _TFLITE_EXPORT.set(True)
  try:
    yield
  finally:
    _TFLITE_EXPORT.reset(token)


def export_unroll(steps: int, recurrent_kernel_bytes: int) -> int:
  """Steps per loop iteration for a TFLite export: all ``steps`` (no
  ``WHILE``) when ``steps <= UNROLL_MAX_STEPS`` and ``steps *
  recurrent_kernel_bytes <= UNROLL_MAX_BYTES``, else 1 (one ``WHILE``
  loop)."""
  if (steps <= UNROLL_MAX_STEPS
      and steps * recurrent_kernel_bytes <= UNROLL_MAX_BYTES):
    return max(1, steps)
  return 1


def _activation(name: Any) -> Callable[[jax.Array], jax.Array]:
  return L.activation(name, what="recurrent activation")


class Embedding(nn.Module):
  """``keras.layers.Embedding``: integer ids ``(N, T)`` -> ``(N, T, D)``.

  Attributes:
    input_dim: vocabulary size.
    output_dim: embedding width.
    embeddings_initializer: Keras' default, uniform in [-0.05, 0.05].
    mask_zero: must stay ``False`` (masking is out of scope).
  """

  input_dim: int
  output_dim: int
  embeddings_initializer: Initializer = nn.initializers.uniform(0.1)
  mask_zero: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.mask_zero:
      raise ValueError(f"Embedding(mask_zero=True): {MASKING_UNSUPPORTED}")
    init = self.embeddings_initializer
    if init is Embedding.embeddings_initializer:
      init = lambda k, s, d=jnp.float32: (
          nn.initializers.uniform(0.1)(k, s, d) - 0.05)
    ids = jnp.asarray(inputs)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      # Keras casts floats to int32; a float id above 2**24 is already
      # wrong, so here they are refused.
      raise TypeError(f"Embedding takes integer token ids, got {ids.dtype} "
                      "(trace with translate.translate(..., dtype='int32'))")
    table = self.param("embeddings", init, (self.input_dim, self.output_dim))
    # Ids outside [0, input_dim) are clipped (Keras' TF backend raises).
    return jnp.take(table, ids.astype(jnp.int32), axis=0, mode="clip")


class _RNN(nn.Module):
  """Shared loop of LSTM, GRU and SimpleRNN (one cell, ``G`` gates)."""

  units: int
  return_sequences: bool = False
  return_state: bool = False
  go_backwards: bool = False
  activation: Any = "tanh"
  use_bias: bool = True
  unroll: bool | int | None = None
  kernel_initializer: Initializer = nn.initializers.glorot_uniform()
  recurrent_initializer: Initializer = nn.initializers.orthogonal()
  bias_initializer: Initializer = nn.initializers.zeros

  gates = 1
  num_states = 1

  def _bias(self) -> jax.Array | None:
    if not self.use_bias:
      return None
    return self.param("bias", self.bias_initializer,
                      (self.gates * self.units,))

  def _steps_per_iteration(self, steps: int,
                           recurrent_kernel: jax.Array) -> int:
    """``lax.scan``'s ``unroll`` for ``self.unroll`` (see the module
    docstring)."""
    unroll = self.unroll
    if unroll is None:
      if not _TFLITE_EXPORT.get():
        return 1
      return export_unroll(
          steps, recurrent_kernel.size * recurrent_kernel.dtype.itemsize)
    if isinstance(unroll, bool):
      return max(1, steps) if unroll else 1
    if not isinstance(unroll, int) or unroll < 1:
      raise ValueError(f"unroll must be a bool, a positive int or None, "
                       f"got {unroll!r}")
    return unroll

  def _input_projection(self, x: jax.Array, kernel: jax.Array,
                        bias: jax.Array | None) -> jax.Array:
    xw = x @ kernel
    return xw if bias is None else xw + bias

  def _step(self, states: tuple[jax.Array, ...], xw: jax.Array,
            recurrent_kernel: jax.Array, bias: jax.Array | None
            ) -> tuple[jax.Array, ...]:
    raise NotImplementedError

  @nn.compact
  def __call__(self, inputs: jax.Array,
               initial_state: Sequence[jax.Array] | None = None) -> Any:
    """Runs the layer over ``inputs`` ``(N, T, C)``.

    Returns:
      Like Keras: ``(N, T, units)`` with ``return_sequences`` else the last
      output ``(N, units)``; with ``return_state``, a tuple ``(output,
      *states)`` (LSTM: ``h, c``; GRU and SimpleRNN: ``h``). With
      ``go_backwards`` the sequence is read from the end and the outputs are
      in that reversed order, as in Keras.
    """
    x = jnp.asarray(inputs)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    if x.ndim != 3:
      raise ValueError(f"{type(self).__name__} expects (batch, time, "
                       f"features) inputs, got shape {x.shape}")
    g = self.gates * self.units
    kernel = self.param("kernel", self.kernel_initializer, (x.shape[-1], g))
    recurrent_kernel = self.param("recurrent_kernel",
                                  self.recurrent_initializer,
                                  (self.units, g))
    bias = self._bias()
    if self.go_backwards:
      x = jnp.flip(x, axis=1)
    xw = self._input_projection(x, kernel, bias)  # every step at once
    if initial_state is None:
      states = tuple(jnp.zeros((x.shape[0], self.units), xw.dtype)
                     for _ in range(self.num_states))
    else:
      states = tuple(jnp.asarray(s, xw.dtype) for s in initial_state)
      if len(states) != self.num_states:
        raise ValueError(f"{type(self).__name__} takes {self.num_states} "
                         f"initial state(s), got {len(states)}")

    def step(carry, xw_t):
      carry = self._step(carry, xw_t, recurrent_kernel, bias)
      return carry, carry[0]

    states, ys = jax.lax.scan(
        step, states, jnp.swapaxes(xw, 0, 1),
        unroll=self._steps_per_iteration(x.shape[1], recurrent_kernel))
    out = jnp.swapaxes(ys, 0, 1) if self.return_sequences else states[0]
    return (out, *states) if self.return_state else out


class LSTM(_RNN):
  """``keras.layers.LSTM``: gates ``i, f, c, o`` side by side.

  ``c = f * c + i * activation(x_c)``, ``h = o * activation(c)``; the gates
  use ``recurrent_activation``. ``unit_forget_bias`` (initialization only):
  the forget gate's bias starts at 1.
  """

  recurrent_activation: Any = "sigmoid"
  unit_forget_bias: bool = True

  gates = 4
  num_states = 2

  def _bias(self) -> jax.Array | None:
    if not self.use_bias:
      return None
    u = self.units

    def init(key, shape, dtype=jnp.float32):
      b = self.bias_initializer(key, shape, dtype)
      return b.at[u:2 * u].set(1.0) if self.unit_forget_bias else b

    return self.param("bias", init, (4 * u,))

  def _step(self, states, xw, recurrent_kernel, bias):
    h, c = states
    z = xw + h @ recurrent_kernel
    act, rec = (_activation(self.activation),
                _activation(self.recurrent_activation))
    # recurrent_activation over all four gates at once (the cell gate's
    # share unused): one op instead of three in a TFLite step, 8% less
    # latency unrolled (LSTM(32) x 128 steps, 1 thread).
    gates = rec(z)
    u = self.units
    i, f, o = gates[..., :u], gates[..., u:2 * u], gates[..., 3 * u:]
    c = f * c + i * act(z[..., 2 * u:3 * u])
    h = o * act(c)
    return h, c


class GRU(_RNN):
  """``keras.layers.GRU``: gates ``z, r, h`` side by side.

  ``reset_after=True`` (Keras 3's default, cuDNN-compatible): ``bias`` is
  ``(2, 3 * units)``, the input bias in row 0 and the recurrent bias in
  row 1, and the reset gate multiplies ``h @ recurrent_kernel_h + b_h``.
  ``reset_after=False``: ``bias`` is ``(3 * units,)`` and the reset gate
  multiplies ``h`` before its product with ``recurrent_kernel_h``.
  ``h = z * h_prev + (1 - z) * activation(x_h + recurrent_h)``.
  """

  recurrent_activation: Any = "sigmoid"
  reset_after: bool = True

  gates = 3

  def _bias(self) -> jax.Array | None:
    if not self.use_bias:
      return None
    shape = ((2, 3 * self.units) if self.reset_after else (3 * self.units,))
    return self.param("bias", self.bias_initializer, shape)

  def _input_projection(self, x, kernel, bias):
    xw = x @ kernel
    if bias is None:
      return xw
    return xw + (bias[0] if self.reset_after else bias)

  def _step(self, states, xw, recurrent_kernel, bias):
    (h,) = states
    u = self.units
    act, rec = (_activation(self.activation),
                _activation(self.recurrent_activation))
    x_z, x_r, x_h = jnp.split(xw, 3, axis=-1)
    if self.reset_after:
      inner = h @ recurrent_kernel
      if bias is not None:
        inner = inner + bias[1]
      r_z, r_r, r_h = jnp.split(inner, 3, axis=-1)
      z, r = rec(x_z + r_z), rec(x_r + r_r)
      hh = act(x_h + r * r_h)
    else:
      inner = h @ recurrent_kernel[:, :2 * u]
      r_z, r_r = jnp.split(inner, 2, axis=-1)
      z, r = rec(x_z + r_z), rec(x_r + r_r)
      hh = act(x_h + (r * h) @ recurrent_kernel[:, 2 * u:])
    return (z * h + (1.0 - z) * hh,)


class SimpleRNN(_RNN):
  """``keras.layers.SimpleRNN``: ``h = activation(x @ kernel + bias +
  h_prev @ recurrent_kernel)``."""

  def _step(self, states, xw, recurrent_kernel, bias):
    (h,) = states
    return (_activation(self.activation)(xw + h @ recurrent_kernel),)


_MERGES = {
    "concat": lambda y, r: jnp.concatenate([y, r], axis=-1),
    "sum": lambda y, r: y + r,
    "ave": lambda y, r: (y + r) / 2,
    "mul": lambda y, r: y * r,
    None: lambda y, r: (y, r),
}


class Bidirectional(nn.Module):
  """``keras.layers.Bidirectional(layer, merge_mode="concat")``.

  Runs a copy of ``layer`` forwards and one with ``go_backwards`` flipped,
  named like Keras' sublayers: ``forward_<name>`` and ``backward_<name>``,
  ``<name>`` being ``layer``'s own name if it was given one, else Keras'
  auto name of its class (``lstm``, ``gru``, ``simple_rnn``). With
  ``return_sequences`` the backward outputs are flipped back into time
  order before merging; ``return_state`` returns ``(output, *forward
  states, *backward states)``.

  Attributes:
    layer: an ``LSTM``, ``GRU`` or ``SimpleRNN`` (unbound; not called).
    merge_mode: ``"concat"``, ``"sum"``, ``"ave"``, ``"mul"`` or ``None``
      (a pair of outputs).
  """

  layer: _RNN
  merge_mode: str | None = "concat"

  def __post_init__(self):
    # Flax renames a submodule field after the field ("layer") when it
    # adopts it; keep the name the user gave, as Keras does. A layer built
    # inside a compact method has Flax's auto name (LSTM_0): not a name.
    name = getattr(self.layer, "name", None)
    auto = re.fullmatch(rf"{type(self.layer).__name__}_\d+", name or "")
    if name is not None and name != "layer" and not auto:
      object.__setattr__(self, "_keras_name", name)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> Any:
    if self.merge_mode not in _MERGES:
      raise ValueError(f"merge_mode must be one of {list(_MERGES)}, got "
                       f"{self.merge_mode!r}")
    base = self.__dict__.get("_keras_name") or L.snake_case(
        type(self.layer).__name__)
    forward = self.layer.clone(parent=self, name=f"forward_{base}")
    backward = self.layer.clone(parent=self, name=f"backward_{base}",
                                go_backwards=not self.layer.go_backwards)
    y, y_rev = forward(inputs), backward(inputs)
    states: tuple[jax.Array, ...] = ()
    if self.layer.return_state:
      states = (*y[1:], *y_rev[1:])
      y, y_rev = y[0], y_rev[0]
    if self.layer.return_sequences:
      y_rev = jnp.flip(y_rev, axis=1)
    out = _MERGES[self.merge_mode](y, y_rev)
    if not states:
      return out
    return (*out, *states) if self.merge_mode is None else (out, *states)
