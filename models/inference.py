"""The inference form of any model: convolutions carry folded BatchNorms.

``Inference(module)`` has the same variable tree as ``module`` minus what
``translate.fold_batchnorm`` removed: a BatchNorm whose variables are gone is
skipped, and a convolution with a folded ``bias`` adds it even where the
original had ``use_bias=False``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def _folded(next_fun, args, kwargs, context):
  mod = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(mod, nn.BatchNorm) and not mod.has_variable(
      "batch_stats", "mean") and not mod.is_initializing():
    return args[0]  # folded into the preceding convolution
  if isinstance(mod, nn.Conv) and not mod.use_bias and mod.has_variable(
      "params", "bias"):
    return next_fun(*args, **kwargs) + mod.get_variable("params", "bias")
  return next_fun(*args, **kwargs)


class Inference(nn.Module):
  """Runs ``inner`` with folded BatchNorms (same scope, same names)."""

  inner: nn.Module

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    if train:
      raise ValueError("the inference form (folded BatchNorm) cannot train; "
                       "use models.create(..., inference=False)")
    with nn.intercept_methods(_folded):
      return self.inner(x)
