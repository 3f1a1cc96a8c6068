"""DenseNet121/169/201: Keras names, BatchNorm settings, concatenation order,
widths and no-top parity at sizes other than the native one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import translate
from models import densenet
from flax_spy import batchnorm_settings


def _log(name, kwargs, report):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": report.max_rel}) + "\n")


@pytest.fixture(scope="module")
def keras_densenet121():
  spec = models.get_spec("densenet121")
  return spec.keras_constructor()(weights=None)


def test_flax_names_are_exactly_the_keras_layer_names(keras_densenet121):
  keras_names = {l.name for l in keras_densenet121.layers if l.weights}
  shapes = translate.variable_shapes(models.create("densenet121"),
                                     (224, 224, 3))
  assert set(shapes["params"]) == keras_names
  # Same shapes too (the merge would catch it; this names the layer).
  for layer in keras_densenet121.layers:
    for v in layer.weights:
      leaf = {"kernel": "kernel", "bias": "bias", "gamma": "scale",
              "beta": "bias", "moving_mean": "mean",
              "moving_variance": "var"}[v.name.split("/")[-1].split(":")[0]]
      coll = "batch_stats" if leaf in ("mean", "var") else "params"
      assert shapes[coll][layer.name][leaf].shape == tuple(v.shape), (
          layer.name, leaf)


def test_batchnorm_settings_are_keras(keras_densenet121):
  seen = batchnorm_settings(models.create("densenet121"), (224, 224, 3))
  keras_bn = {l.name: l for l in keras_densenet121.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  for name, (eps, momentum, frozen) in seen.items():
    assert eps == keras_bn[name].epsilon == 1.001e-5, name
    assert momentum == pytest.approx(keras_bn[name].momentum), name
    assert frozen, f"{name} must use the moving statistics at inference"
  assert models.get_spec("densenet121").bn_epsilon == 1.001e-5


@pytest.mark.parametrize("name,channels", [
    ("densenet121", 1024), ("densenet169", 1664), ("densenet201", 1920)])
def test_feature_widths(name, channels):
  # Final widths of DenseNet-121/169/201 (paper, Table 1, k=32, theta=0.5).
  module = models.create(name, include_top=False)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(module.init_with_output, jax.random.PRNGKey(0), x)[0]
  assert out.shape == (1, 7, 7, channels)


def test_new_features_are_concatenated_last():
  """Keras ``Concatenate()([x, x1])``: the last block's 32 new channels are
  the last 32 channels. Zeroing that block's 3x3 kernel must make exactly
  those channels of the pre-``bn`` features zero."""
  module = models.create("densenet121", include_top=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
  # Random variables without tracing init (one compilation, not two).
  shapes = translate.variable_shapes(module, x.shape[1:])
  normal = lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32)
  variables = {"params": jax.tree_util.tree_map(normal, shapes["params"]),
               "batch_stats": {
                   k: {"mean": normal(v["mean"]),
                       "var": 1 + np.abs(normal(v["var"]))}
                   for k, v in shapes["batch_stats"].items()}}
  params = variables["params"]
  params["conv5_block16_2_conv"]["kernel"] = np.zeros_like(
      params["conv5_block16_2_conv"]["kernel"])
  # Identity final BN (scale 1, bias 0, mean 0, var 1 - eps): relu(features).
  params["bn"]["scale"] = np.ones_like(params["bn"]["scale"])
  params["bn"]["bias"] = np.zeros_like(params["bn"]["bias"])
  stats = variables["batch_stats"]["bn"]
  stats["mean"] = np.zeros_like(stats["mean"])
  stats["var"] = np.full_like(stats["var"], 1 - densenet.EPSILON)
  out = np.asarray(jax.jit(module.apply)(variables, x))
  assert np.all(np.isfinite(out))
  assert np.all(out[..., -densenet.GROWTH_RATE:] == 0)
  # The earlier channels are not all zero (random init, ReLU).
  assert np.count_nonzero(out[..., :-densenet.GROWTH_RATE]) > 0


@pytest.mark.parametrize("kwargs", [
    # Odd sizes: every 2x2/2 transition pool floors, as Keras' 'valid' pool.
    pytest.param({"include_top": False, "pooling": None,
                  "input_shape": (97, 97, 3)}, marks=pytest.mark.slow),
    pytest.param({"include_top": False, "pooling": "max",
                  "input_shape": (131, 96, 3)}, marks=pytest.mark.slow),
], ids=["features-97", "max-131x96"])
def test_densenet121_no_top_parity(kwargs):
  conv = translate.convert("densenet121", weights="random", seed=11,
                           **kwargs)
  assert set(conv.report.match_counts) == {"exact"}
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "densenet121", seed=12,
                                  input_shape=kwargs["input_shape"])
  _log("densenet121", kwargs, report)
  assert report.passed, report.summary()
