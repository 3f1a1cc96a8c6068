"""Test support: seeded random Keras weights with calibrated BatchNorm
statistics, so a parity check can tell every weight apart."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from translate.keras_io import iter_layers, weight_name


def _fan_in(layer_cls: str, shape: tuple[int, ...]) -> int:
  if layer_cls == "DepthwiseConv2D":
    return int(np.prod(shape[:2]))  # each output sees one input channel
  return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def randomize(model: Any, seed: int = 0,
              calibration: np.ndarray | None = None) -> None:
  """Overwrites every weight of ``model`` with seeded random values.

  Includes the BatchNormalization moving statistics (and a Normalization
  layer's mean/variance), so that a swapped mean/variance, scale/bias or a
  transposed kernel cannot pass a parity check. Variances stay positive;
  kernels are scaled by fan-in.

  Args:
    model: a built Keras model.
    seed: seed of every random draw.
    calibration: preprocessed inputs. When given, each BatchNormalization's
      moving statistics become the statistics its input really has on these
      inputs, given the random weights: random values, distinct per channel
      (a swapped mean/variance still fails parity), but the activations stay
      O(1) through deep models. Independent random statistics make them grow
      to 1e3-1e5 (even a 10% perturbation compounds through EfficientNet),
      where a real translation error hides under a relative tolerance and
      float32 rounding alone breaks it.
  """
  rng = np.random.default_rng(seed)
  for layer in iter_layers(model):
    for v in layer.weights:
      name, shape = weight_name(v), tuple(v.shape)
      dtype = np.dtype(getattr(v.dtype, "name", v.dtype))
      if not np.issubdtype(dtype, np.floating):
        continue  # e.g. Normalization's integer sample count
      if name in ("moving_variance", "variance"):
        value = rng.uniform(0.5, 2.0, shape)
      elif name == "gamma":
        value = rng.uniform(0.5, 1.5, shape)
      elif name in ("moving_mean", "mean"):
        value = rng.normal(0.0, 0.5, shape)
      elif name == "beta":
        # Positive shifts keep most ReLU/swish units active: the random
        # network is then contractive instead of at the edge of chaos, where
        # float32 rounding alone grows to 1e-3 over ResNetRS420's blocks.
        value = rng.uniform(0.5, 1.5, shape)
      elif name == "bias":
        value = rng.normal(0.0, 0.1, shape)
      else:
        std = np.sqrt(2.0 / _fan_in(type(layer).__name__, shape))
        # Drawn in float32: VGG's 103M-weight fc1 as float64 costs 0.8 GB.
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
      v.assign(value.astype(dtype, copy=False))
    if layer.weights and hasattr(layer, "finalize_state"):
      # Keras' Normalization computes its effective mean/variance from the
      # variables only in finalize_state() (as after adapt() or a load).
      layer.finalize_state()
  if calibration is not None:
    _calibrate_batchnorm(model, calibration)


def _calibrate_batchnorm(model: Any, x: np.ndarray) -> None:
  """Sets BN moving statistics to their inputs' real statistics on ``x``.

  One training-mode pass (each BN normalizes with its batch statistics,
  dropout off) computes every BN input's per-channel mean and variance
  inside the graph (only the reductions are returned, so EfficientNetB7 at
  600x600 does not hold hundreds of feature maps); inference then sees the
  same distributions.
  """
  bns = [l for l in iter_layers(model)
         if type(l).__name__ == "BatchNormalization"]
  if not bns:
    return
  package_name = type(model).__module__.split(".")[0]
  package = importlib.import_module(package_name)
  if package_name == "keras":
    mean_fn, var_fn = package.ops.mean, package.ops.var
  else:  # tf_keras: TF ops on symbolic tensors become layers
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    mean_fn, var_fn = tf.math.reduce_mean, tf.math.reduce_variance
  outputs = []
  for l in bns:
    rank = len(l.input.shape)
    axis = l.axis[0] if isinstance(l.axis, (list, tuple)) else l.axis
    if axis % rank != rank - 1:
      raise ValueError(f"BatchNormalization {l.name!r} normalizes axis "
                       f"{axis}; only channels-last models are supported")
    axes = list(range(rank - 1))
    outputs += [mean_fn(l.input, axis=axes), var_fn(l.input, axis=axes)]
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
  probe = package.Model(inputs, outputs)
  saved = [[np.asarray(v.numpy()) for v in l.weights] for l in bns]
  dropouts = [l for l in iter_layers(model) if hasattr(l, "rate")]
  rates = [l.rate for l in dropouts]
  for l in dropouts:  # the probe runs in training mode: no dropout
    l.rate = 0.0
  run = lambda batch: probe(batch, training=True)  # noqa: E731
  if package_name == "tf_keras" or package.backend.backend() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    run = tf.function(run)  # a graph frees dead feature maps as it goes
  try:
    # One image at a time (EfficientNetB7 at 600x600 needs 17 GB for four),
    # pooled: mean of the means, and E[x^2] - mean^2 for the variance.
    per_image = [[np.asarray(s, np.float64) for s in run(x[i:i + 1])]
                 for i in range(len(x))]
  finally:
    for l, r in zip(dropouts, rates):
      l.rate = r
  stats = []
  for j in range(0, len(outputs), 2):
    means = np.stack([p[j] for p in per_image])
    second = np.stack([p[j + 1] + p[j] ** 2 for p in per_image])
    mean = means.mean(0)
    stats += [mean, np.maximum(second.mean(0) - mean**2, 0.0)]
  for i, (layer, weights) in enumerate(zip(bns, saved)):
    for v, w in zip(layer.weights, weights):  # undo the training-mode update
      v.assign(w)
    mean, var = stats[2 * i], stats[2 * i + 1] + 1e-3
    for v in layer.weights:
      name = weight_name(v)
      if name == "moving_mean":
        v.assign(mean.astype(np.float32))
      elif name == "moving_variance":
        v.assign(var.astype(np.float32))
