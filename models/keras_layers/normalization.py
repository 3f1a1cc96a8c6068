"""Keras' LayerNormalization (any axes, center/scale, rms_scaling),
UnitNormalization, GroupNormalization and Normalization, in Keras'
arithmetic (``keras/src/ops/nn.py _layer_normalization``,
``keras/src/layers/normalization/``, ``layers/preprocessing/
normalization.py``)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


class LayerNormalization(nn.Module):
  """``keras.layers.LayerNormalization``: the variables ``scale`` (Keras'
  ``gamma``) and ``bias`` (``beta``) have the shape of the normalized axes.

  Attributes:
    axis: the normalized axis or axes (Keras default -1).
    epsilon: Keras' default 1e-3.
    center: add ``bias``.
    scale: multiply by ``scale``.
    rms_scaling: Keras' RMS form: ``x * rsqrt(var(x) + eps) * gamma`` (Keras
      takes the centered variance here too).
  """

  axis: int | Sequence[int] = -1
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  rms_scaling: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axes = _axes(self.axis, x.ndim)
    shape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    gamma = (self.param("scale", nn.initializers.ones, shape).reshape(bshape)
             if self.scale or self.rms_scaling else None)
    beta = (self.param("bias", nn.initializers.zeros, shape).reshape(bshape)
            if self.center and not self.rms_scaling else None)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.rms_scaling:
      out = x * inv
      return out * gamma if gamma is not None else out
    if gamma is not None:
      inv = inv * gamma
    res = -mean * inv
    if beta is not None:
      res = res + beta
    return x * inv + res


def unit_normalization(x: jax.Array, axis: int | Sequence[int] = -1
                       ) -> jax.Array:
  """``keras.layers.UnitNormalization``: ``x * min(rsqrt(sum(x²)), 1e12)``
  over ``axis`` (``keras.ops.normalize(order=2, epsilon=1e-12)``)."""
  axes = _axes(axis, x.ndim)
  square_sum = jnp.sum(jnp.square(x), axis=axes, keepdims=True)
  return x * jnp.minimum(jax.lax.rsqrt(square_sum), 1.0 / 1e-12)


class GroupNormalization(nn.Module):
  """``keras.layers.GroupNormalization``: the channels of ``axis`` split
  into ``groups`` consecutive groups, each normalized over itself and every
  axis but the batch; ``scale`` (Keras' ``gamma``) and ``bias`` (``beta``)
  are per channel.

  Attributes:
    groups: Keras default 32 (-1: one group per channel).
    axis: the channel axis (Keras default -1).
    epsilon: Keras' default 1e-3.
    center: add ``bias``.
    scale: multiply by ``scale``.
  """

  groups: int = 32
  axis: int = -1
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = self.axis % x.ndim
    c = x.shape[axis]
    groups = c if self.groups == -1 else self.groups
    if c % groups:
      raise ValueError(f"{c} channels do not split into {groups} groups")
    shape = (*x.shape[:axis], groups, c // groups, *x.shape[axis + 1:])
    grouped = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(shape)
    axes = tuple(a for a in range(1, grouped.ndim) if a != axis)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.var(grouped, axis=axes, keepdims=True)
    bshape = [1] * grouped.ndim
    bshape[axis], bshape[axis + 1] = groups, c // groups
    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.scale:
      inv = inv * self.param("scale", nn.initializers.ones, (c,)).reshape(
          bshape)
    res = -mean * inv
    if self.center:
      res = res + self.param("bias", nn.initializers.zeros, (c,)).reshape(
          bshape)
    return (grouped * inv + res).reshape(x.shape).astype(x.dtype)


class Normalization(nn.Module):
  """``keras.layers.Normalization`` whose mean and variance are weights
  (the layer was adapted or built without ``mean=``): ``(x - mean) /
  max(sqrt(variance), 1e-7)``, or with ``invert`` ``mean + x * max(...)``.

  The statistics are ``batch_stats`` ``mean`` and ``var`` with the shape of
  the kept axes (Keras' ``mean``/``variance``); they never change in
  training (Keras only sets them in ``adapt``).

  Attributes:
    axis: the kept axes (Keras default -1); the statistics are per position
      of these axes and broadcast over the others.
    invert: the inverse transformation.
  """

  axis: int | Sequence[int] = -1
  invert: bool = False
  epsilon: float = 1e-7  # keras.backend.epsilon()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axes = _axes(self.axis, x.ndim)
    shape = tuple(x.shape[a] for a in axes)
    bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape,
                         jnp.float32).value.reshape(bshape)
    var = self.variable("batch_stats", "var", jnp.ones, shape,
                        jnp.float32).value.reshape(bshape)
    return normalize(x, mean, var, self.invert, self.epsilon)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array,
              invert: bool = False, epsilon: float = 1e-7) -> jax.Array:
  """``keras.layers.Normalization``'s arithmetic on given statistics
  (broadcastable to ``x``): the layer built with ``mean=``/``variance=``."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  std = jnp.maximum(jnp.sqrt(var), epsilon)
  return mean + x * std if invert else (x - mean) / std
