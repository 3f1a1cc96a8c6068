"""The inference form of any model: convolutions carry folded BatchNorms.

``Inference(module)`` has the same variable tree as ``module`` minus what
``translate.fold_batchnorm`` removed: a BatchNorm whose variables are gone is
skipped, and a convolution with a folded ``bias`` adds it even where the
original had ``use_bias=False``.

Its convolutions take the platform's form as in every module
(``models.conv_forms``: on CPU shifted multiply-adds for depthwise kernels,
matrix products for 1x1 and small-output ones), plus the forms measured for
inference only (``conv_forms.inference_forms``: tap dots, Eigen's
convolution, space-to-depth stems, strided im2col, pools as slices, block
outputs computed once). One more CPU choice is made here, the same way and
because the measurements support it
(``benchmarks/RESULTS.md``): a batch of more than one image runs as a loop
over single images (``lax.map``; each image's activations stay in cache:
1.2 to 2.3 times less CPU time at batch 8), two images per step (5-19%
less again) except in the families in ``_ONE_PER_STEP``, and the families
in ``_WHOLE_BATCH`` run it whole (EfficientNetV2: 20% less CPU time). The
loop stops at the head, the first layer that takes flat ``(batch,
features)`` inputs, which runs once on the whole batch: its weights are read
once, not once a step (VGG16 at batch 8: 0.90 of the time with its 400 MB
``fc1`` in the loop). GPU and TPU lowerings, and traces into TensorFlow
(``translate.export_tflite``), run the batch whole.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import conv_forms
from models import layers

_PER_SAMPLE = True  # batch > 1 as a loop over single images (cache-sized);
                    # a switch for the measurements in RESULTS.md only
# Families whose batches run whole on CPU: measured faster than the
# per-image loop (EfficientNetV2's fused-MBConv stages run dense 3x3
# convolutions on few channels at large sizes).
_WHOLE_BATCH = frozenset({"EfficientNetV2"})
# The per-image loop takes two images per iteration: measured 5-19% less
# time at batch 8 than one image (ResNet 0.92, ResNetRS 0.85, DenseNet
# 0.89, MobileNet 0.86, MobileNetV2 0.78-0.86, MobileNetV3 0.81-0.88,
# EfficientNet 0.88, InceptionV3 0.94-0.98, NASNet 0.86, ConvNeXt 0.95,
# RegNet 0.97), except in these families, which were not faster with two
# (Xception 1.02-1.15, InceptionResNetV2 0.97-1.05, VGG16 1.00 with its head
# out of the loop, 4.1 with it in; benchmarks/RESULTS.md).
_ONE_PER_STEP = frozenset({"Xception", "InceptionResNetV2", "VGG"})


class _AtHead(Exception):
  """Stops a trace of the model at its head; carries the head's input."""


def _flat(args) -> bool:
  """A layer's input is flat: (batch, features), the head's."""
  return bool(args) and getattr(args[0], "ndim", None) == 2


def _folded(next_fun, args, kwargs, context):
  mod = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if isinstance(mod, nn.BatchNorm) and not mod.has_variable(
      "batch_stats", "mean") and not mod.is_initializing():
    return args[0]  # folded into the preceding convolution
  # models.layers.Conv and SeparableConv add a folded bias themselves.
  if (isinstance(mod, nn.Conv) and not isinstance(mod, layers.Conv)
      and not mod.use_bias and mod.has_variable("params", "bias")):
    return next_fun(*args, **kwargs) + mod.get_variable("params", "bias")
  return next_fun(*args, **kwargs)


class Inference(nn.Module):
  """Runs ``inner`` with folded BatchNorms (same scope, same names), and on
  CPU a batch as a loop over single images (see the module docstring)."""

  inner: nn.Module

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    if train:
      raise ValueError("the inference form (folded BatchNorm) cannot train; "
                       "use models.create(..., inference=False)")
    with conv_forms.inference_forms():
      return self._call(x)

  def _call(self, x: jax.Array) -> Any:
    if (not _PER_SAMPLE or type(self.inner).__name__ in _WHOLE_BATCH
        or self.is_initializing() or x.ndim != 4
        or x.shape[0] < 2 or not conv_forms.fast_path_allowed()):
      with nn.intercept_methods(_folded):
        return self.inner(x)
    variables = self.variables
    inner = self.inner.clone(parent=None)

    def whole(x):
      with nn.intercept_methods(_folded):
        return inner.apply(variables, x)

    step = 1 if type(self.inner).__name__ in _ONE_PER_STEP else 2
    at_head = []  # set while the loop's body is traced: the model has a head

    def trunk(x):
      """The layers before the head, or the whole model if it has none."""
      def stop(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _flat(args):
          at_head.append(True)
          raise _AtHead(args[0])
        return next_fun(*args, **kwargs)
      try:
        with nn.intercept_methods(_folded), nn.intercept_methods(stop):
          return inner.apply(variables, x)
      except _AtHead as head_input:
        return head_input.args[0]

    def per_sample(x):
      n = x.shape[0] // step * step  # a last odd image runs on its own
      out = jax.lax.map(trunk, x[:n].reshape(n // step, step, *x.shape[1:]))
      out = jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)
      if n < x.shape[0]:
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out,
                           trunk(x[n:]))
      if not at_head:
        return out
      # The head on the whole batch: its weights are read once, not once a
      # step. The model is traced again with the first flat input swapped
      # for the loop's; XLA drops the trunk of this trace, which nothing
      # uses then.
      swapped = []

      def swap(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _flat(args):
          if not swapped:
            swapped.append(args[0])
          if args[0] is swapped[0]:
            args = (out,) + tuple(args[1:])
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(_folded), nn.intercept_methods(swap):
        return inner.apply(variables, x)

    return jax.lax.platform_dependent(x, cpu=per_sample, default=whole)
