"""Keras' attention layers in Flax linen: EinsumDense, MultiHeadAttention,
and ``dot`` (``keras.layers.Dot``).

Ported from ``keras/src/layers/core/einsum_dense.py``,
``keras/src/layers/attention/multi_head_attention.py`` and
``keras/src/layers/merging/dot.py``: the same einsum equations (built by the
same helpers from the input ranks), the same weight shapes, so a Keras
layer's weights are copies. ``MultiHeadAttention``'s submodules are named
like Keras' sublayers (``query``, ``key``, ``value``, ``attention_output``,
``gate``), each an ``EinsumDense`` with ``kernel`` and ``bias``: the
variables are ``<layer>/query/kernel``, as ``translate.keras_io.read_layer``
names the Keras parts.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers as L

# Keras' Softmax puts -1e9 where the mask is False (-3e4 for float16).
_LARGE_NEGATIVE = -1e9


# --- EinsumDense -------------------------------------------------------------

def einsum_weight_shapes(equation: str, bias_axes: str | None,
                         input_shape: Sequence[int | None],
                         output_shape: int | Sequence[int | None]
                         ) -> tuple[list[int], list[int] | None]:
  """``(kernel shape, bias shape or None)`` of a Keras ``EinsumDense``:
  ``_analyze_einsum_string`` of ``keras/src/layers/core/einsum_dense.py``
  (equations ``ab,bc->ac``, ``...ab,bc->...ac`` or ``ab...,bc->ac...``)."""
  dotted = re.sub(r"\.\.\.", "0", equation)
  left_elided = False
  split = re.match("([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", dotted)
  if not split:
    split = re.match("0([a-zA-Z]+),([a-zA-Z]+)->0([a-zA-Z]+)", dotted)
    left_elided = bool(split)
  if not split:
    split = re.match("([a-zA-Z]{2,})0,([a-zA-Z]+)->([a-zA-Z]+)0", dotted)
  if not split:
    raise ValueError(f"Invalid einsum equation {equation!r}: Keras takes "
                     "[X],[Y]->[Z], ...[X],[Y]->...[Z] or [X]...,[Y]->[Z]...")
  input_spec, weight_spec, output_spec = split.groups()
  input_shape = list(input_shape)
  elided = len(input_shape) - len(input_spec)
  out = [output_shape] if isinstance(output_shape, int) else list(
      output_shape)
  out.insert(0, input_shape[0])
  if elided > 0 and left_elided:
    for i in range(1, elided):
      out.insert(1, input_shape[i])
  elif elided > 0:
    out.extend(input_shape[len(input_shape) - elided:])
  if left_elided:
    in_map = {d: i + elided - len(input_shape)
              for i, d in enumerate(input_spec)}
    out_map = {d: i + elided for i, d in enumerate(output_spec)}
  else:
    in_map = {d: i for i, d in enumerate(input_spec)}
    out_map = {d: i for i, d in enumerate(output_spec)}
  kernel = []
  for d in weight_spec:
    if d in out_map:
      kernel.append(out[out_map[d]])
    elif d in in_map:
      kernel.append(input_shape[in_map[d]])
    else:
      raise ValueError(f"weight dimension {d!r} of {equation!r} is in "
                       "neither the input nor the output")
  if bias_axes is None:
    return kernel, None
  first = elided if left_elided else 0
  sizes = {c: out[i + first] for i, c in enumerate(output_spec)}
  start = min(output_spec.find(c) for c in bias_axes)
  bias = [sizes[c] if c in bias_axes else 1 for c in output_spec[start:]]
  if not left_elided:
    bias += [1] * max(elided, 0)
  return kernel, bias


class EinsumDense(nn.Module):
  """``keras.layers.EinsumDense(equation, output_shape, activation=None,
  bias_axes=None)``: ``activation(einsum(equation, x, kernel) + bias)``.

  ``kernel`` and ``bias`` have Keras' shapes (``einsum_weight_shapes``).
  The initializers matter only for a fresh layer (a translated one gets
  Keras' weights): Glorot-uniform kernel, zero bias, as Keras.
  """

  equation: str
  output_shape: Any
  activation: Any = None
  bias_axes: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_shape, bias_shape = einsum_weight_shapes(
        self.equation, self.bias_axes, inputs.shape, self.output_shape)
    kernel = self.param("kernel", nn.initializers.glorot_uniform(),
                        tuple(kernel_shape))
    y = jnp.einsum(self.equation, inputs, kernel)
    if bias_shape is not None:
      y = y + self.param("bias", nn.initializers.zeros, tuple(bias_shape))
    return L.activation(self.activation, "activation")(y)


# --- MultiHeadAttention ------------------------------------------------------

def _letter(i: int) -> str:
  return string.ascii_lowercase[i]


def build_proj_equation(free_dims: int, bound_dims: int, output_dims: int
                        ) -> tuple[str, str, int]:
  """Keras' ``_build_proj_equation``: ``(equation, bias axes, output
  rank)``."""
  inp = "".join(_letter(i) for i in range(free_dims))
  out = inp
  kernel = "".join(_letter(free_dims + i) for i in range(bound_dims))
  inp += kernel
  offset = free_dims + bound_dims
  tail = "".join(_letter(offset + i) for i in range(output_dims))
  return f"{inp},{kernel + tail}->{out + tail}", tail, len(out + tail)


def _output_shape(output_rank: int, known_last_dims: Sequence[int]
                  ) -> list[int | None]:
  return [None] * (output_rank - len(known_last_dims)) + list(known_last_dims)


def build_attention_equation(rank: int, attn_axes: tuple[int, ...]
                             ) -> tuple[str, str, int]:
  """Keras' ``_build_attention_equation``: ``(dot product equation,
  combine equation, rank of the scores)``."""
  target = "".join(_letter(i) for i in range(rank))
  batch_dims = tuple(np.delete(range(rank), attn_axes + (rank - 1,)))
  offset = rank
  source = ""
  for i in range(rank):
    if i in batch_dims or i == rank - 1:
      source += target[i]
    else:
      source += _letter(offset)
      offset += 1
  product = "".join([target[i] for i in batch_dims]
                    + [target[i] for i in attn_axes]
                    + [source[i] for i in attn_axes])
  return (f"{source},{target}->{product}", f"{product},{source}->{target}",
          len(product))


class MultiHeadAttention(nn.Module):
  """``keras.layers.MultiHeadAttention``: Keras' arguments and defaults.

  Attributes:
    num_heads: number of heads.
    key_dim: size of each head of query and key.
    value_dim: size of each head of value (default ``key_dim``).
    dropout: dropout rate on the attention probabilities (training only,
      as Keras; the random mask is JAX's, not Keras').
    use_bias: biases in the four projections.
    output_shape: the output's shape besides batch and the query's
      non-feature axes (default: the query's feature size).
    attention_axes: the axes attention runs over (default: every axis but
      batch, heads and features), as Keras counts them.
    sliding_window: each query position sees keys within
      ``sliding_window - 1`` positions (rank-3 inputs), or None.
    use_gate: a sigmoid gate from the query multiplies the attention
      output before the output projection (Keras' ``gate`` sublayer).
  """

  num_heads: int
  key_dim: int
  value_dim: int | None = None
  dropout: float = 0.0
  use_bias: bool = True
  output_shape: Any = None
  attention_axes: Any = None
  sliding_window: int | None = None
  use_gate: bool = False

  def _dense(self, rank: int, bound: int, last: Sequence[int],
             name: str, activation: Any = None) -> EinsumDense:
    equation, bias_axes, out_rank = build_proj_equation(rank - 1, bound,
                                                        len(last))
    return EinsumDense(equation, tuple(_output_shape(out_rank - 1, last)),
                       activation=activation,
                       bias_axes=bias_axes if self.use_bias else None,
                       name=name)

  @nn.compact
  def __call__(self, query: jax.Array, value: jax.Array,
               key: jax.Array | None = None, *,
               use_causal_mask: bool = False,
               return_attention_scores: bool = False,
               train: bool = False) -> Any:
    """Attends ``query`` ``(B, T, dim)`` to ``value`` ``(B, S, dim)``
    (``key`` defaults to ``value``). Returns ``(B, T, E)``, with the
    attention probabilities ``(B, heads, T, S)`` when
    ``return_attention_scores``."""
    key = value if key is None else key
    h = self.num_heads
    value_dim = self.value_dim or self.key_dim
    q_rank = query.ndim
    gate = None
    if self.use_gate:
      gate = self._dense(q_rank, 1, (h, value_dim), "gate", "sigmoid")(query)
    q = self._dense(q_rank, 1, (h, self.key_dim), "query")(query)
    k = self._dense(key.ndim, 1, (h, self.key_dim), "key")(key)
    v = self._dense(value.ndim, 1, (h, value_dim), "value")(value)

    rank = v.ndim  # projected rank: inputs' rank + 1 (the heads axis)
    axes = self.attention_axes
    if isinstance(axes, int):
      axes = (axes,)
    if axes is None:
      axes = tuple(range(1, rank - 2))
    else:
      axes = tuple(a if a >= 0 else (rank - 1) + a for a in axes)
    dot_eq, combine_eq, scores_rank = build_attention_equation(rank, axes)
    norm_axes = tuple(range(scores_rank - len(axes), scores_rank))

    mask = None
    if use_causal_mask or self.sliding_window is not None:
      if q_rank != 3:
        raise ValueError("use_causal_mask and sliding_window take (batch, "
                         "time, features) inputs")
      rows = jnp.arange(query.shape[1])[:, None]
      cols = jnp.arange(value.shape[1])[None, :]
      mask = jnp.ones((query.shape[1], value.shape[1]), bool)
      if use_causal_mask:
        mask = rows >= cols  # Keras' _compute_causal_mask: lower triangle
      if self.sliding_window is not None:
        mask = mask & (jnp.abs(rows - cols) < self.sliding_window)
      mask = mask[None, None]  # (1, 1, T, S): over batch and heads

    q = q * jnp.asarray(1.0 / math.sqrt(float(self.key_dim)), q.dtype)
    scores = jnp.einsum(dot_eq, k, q)
    if mask is not None:
      scores = jnp.where(mask, scores, _LARGE_NEGATIVE)
    probs = jax.nn.softmax(scores, axis=norm_axes)
    dropped = probs
    if self.dropout > 0.0:
      dropped = nn.Dropout(self.dropout, deterministic=not train)(probs)
    out = jnp.einsum(combine_eq, dropped, v)
    if gate is not None:
      out = out * gate

    if self.output_shape:
      last = ((self.output_shape,) if isinstance(self.output_shape, int)
              else tuple(self.output_shape))
    else:
      last = (query.shape[-1],)
    out = self._dense(q_rank, 2, last, "attention_output")(out)
    return (out, probs) if return_attention_scores else out


# --- Dot ---------------------------------------------------------------------

def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  """``keras.ops.normalize(x, axis)`` (order 2): ``x * min(rsqrt(sum x^2),
  1 / epsilon)``, Keras' epsilon 1e-7."""
  inv = jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x * jnp.minimum(inv, 1.0 / 1e-7)


def dot(x1: jax.Array, x2: jax.Array, axes: int | Sequence[int],
        normalize: bool = False) -> jax.Array:
  """``keras.layers.Dot(axes, normalize)([x1, x2])``: Keras' ``batch_dot``.

  Contracts axis ``axes[0]`` of ``x1`` with axis ``axes[1]`` of ``x2``
  (an int: the same axis of both; negative axes count from the end),
  batched over axis 0. The result has ``x1``'s other axes, then ``x2``'s
  other non-batch axes; two rank-2 inputs give ``(batch, 1)``. With
  ``normalize`` both are L2-normalized along their axis first (cosine
  proximity).
  """
  if isinstance(axes, int):
    axes = (axes, axes)
  a1, a2 = (a % x.ndim for a, x in zip(axes, (x1, x2)))
  if normalize:
    x1, x2 = l2_normalize(x1, a1), l2_normalize(x2, a2)
  letters = iter(string.ascii_lowercase[2:])
  s1 = ["a"] + [next(letters) for _ in range(x1.ndim - 1)]
  s2 = ["a"] + [next(letters) for _ in range(x2.ndim - 1)]
  s1[a1] = s2[a2] = "b"
  out = [s for s in s1 if s != "b"] + [s for s in s2[1:] if s != "b"]
  y = jnp.einsum(f"{''.join(s1)},{''.join(s2)}->{''.join(out)}", x1, x2)
  return y[:, None] if y.ndim == 1 else y  # Keras keeps rank >= 2
