"""Folding BatchNorm into the preceding convolution, for inference.

Which BatchNorm follows which convolution is read from the module itself: one
abstract trace (``jax.eval_shape``) with a Flax method interceptor records
every ``BatchNorm`` whose input is exactly the output of an ``nn.Conv`` (no op
in between). Nothing here knows a model by name.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from translate.io import to_numpy


def conv_bn_pairs(module: nn.Module, variables: Any,
                  input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
  """The (conv, BatchNorm) pairs that can be folded, from one abstract trace.

  Returns:
    One dict per pair: ``conv`` and ``bn`` module paths (tuples), the
    convolution's ``kernel`` leaf (``kernel``, or the leaf a module names in
    its ``FOLD_KERNEL``: ``SeparableConv``'s ``pointwise_kernel``), and the
    BatchNorm's ``epsilon``.
  """
  produced: dict[int, tuple[str, ...]] = {}
  pairs: list[dict[str, Any]] = []
  keep: list[Any] = []  # keeps conv outputs alive so ids stay unique

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.BatchNorm) and args:
      conv = produced.pop(id(args[0]), None)
      if conv is not None and not mod.is_initializing():
        pairs.append({"conv": conv[0], "kernel": conv[1],
                      "bn": tuple(mod.scope.path),
                      "epsilon": float(mod.epsilon)})
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    kernel = getattr(type(mod), "FOLD_KERNEL",
                     "kernel" if isinstance(mod, nn.Conv) else None)
    if kernel is not None:  # a convolution: nn.Conv, or one that says so
      produced[id(out)] = (tuple(mod.scope.path), kernel)
      keep.append(out)
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(module.apply, variables, x)
  return pairs


def fold_batchnorm(variables: Any, module: nn.Module,
                   input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Folds each BatchNorm that directly follows a convolution into it.

  ``kernel' = kernel * s`` and ``bias' = (bias - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``; the BatchNorm's variables are removed.
  Use the result with ``models.create(..., inference=True)``, which runs the
  convolutions with their folded bias and skips the removed BatchNorms.
  A BatchNorm that follows anything else (ResNetV2's pre-activation) stays.

  Args:
    variables: ``{"params", "batch_stats"}`` of ``module``.
    module: the (non-inference) module the variables belong to; its
      structure says which BatchNorm follows which convolution, and with
      which epsilon.
    input_shape: ``(height, width, channels)`` to trace the module at.

  Returns:
    New variables (numpy), with fewer leaves.
  """
  flat = traverse_util.flatten_dict(to_numpy(variables))
  for pair in conv_bn_pairs(module, variables, input_shape):
    conv, bn, eps = pair["conv"], pair["bn"], pair["epsilon"]
    mean = flat.pop(("batch_stats", *bn, "mean")).astype(np.float64)
    var = flat.pop(("batch_stats", *bn, "var")).astype(np.float64)
    gamma = flat.pop(("params", *bn, "scale"), None)
    beta = flat.pop(("params", *bn, "bias"), None)
    s = (1.0 if gamma is None else gamma.astype(np.float64)) / np.sqrt(
        var + eps)
    kernel_key = ("params", *conv, pair["kernel"])
    kernel = flat[kernel_key]
    bias = flat.get(("params", *conv, "bias"))
    bias = 0.0 if bias is None else bias.astype(np.float64)
    flat[kernel_key] = (kernel * s).astype(kernel.dtype)
    flat[("params", *conv, "bias")] = ((bias - mean) * s + (
        0.0 if beta is None else beta)).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)
