"""Keras activation layers with weights: ``PReLU``."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class PReLU(nn.Module):
  """``keras.layers.PReLU``: ``relu(x) - alpha * relu(-x)``.

  ``alpha`` has the shape of one example (``x.shape[1:]``) with 1 on the
  ``shared_axes`` (counted with the batch axis as 0, as Keras counts them).
  Keras' default initializer is zeros.

  Attributes:
    shared_axes: axes along which ``alpha`` is shared.
  """

  shared_axes: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = [1 if i in self.shared_axes else d
             for i, d in enumerate(x.shape) if i > 0]
    alpha = self.param("alpha", nn.initializers.zeros, tuple(shape))
    return nn.relu(x) - alpha.astype(x.dtype) * nn.relu(-x)
