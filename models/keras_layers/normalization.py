"""Keras' LayerNormalization (any axes, center/scale, rms_scaling) and
UnitNormalization, in Keras' arithmetic (``keras/src/ops/nn.py
_layer_normalization``)."""

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
