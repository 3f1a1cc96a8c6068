"""NASNetMobile/NASNetLarge: Keras names on a shifted session, BatchNorm
momentum 0.9997 / epsilon 1e-3, the variants' NASNet settings, parity of
small NASNets (both ``skip_reduction`` wirings, odd and even sides through
``correct_pad``, Cropping2D and both adjust blocks) and no-top parity."""

import json
import os

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest

import models
import translate
from models import nasnet
from translate import keras_build, keras_io, random_weights
from translate.rules import RULES
from flax_spy import flax_calls

MOBILE = "nasnetmobile"
LARGE = "nasnetlarge"


def _log(name, kwargs, max_rel):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": max_rel}) + "\n")


def _shift_keras_counters():
  """Unnamed Conv2D/BatchNormalization/SeparableConv2D/Dense layers, so the
  next model's auto names are not those of a fresh session."""
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(2, 3)(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.SeparableConv2D(2, 3)(x)
  x = keras.layers.Dense(2)(x)
  return keras.Model(inputs, x)


def _feature_parity(module, variables, keras_model, name, shape, seed):
  """Max relative difference of the model outputs on preprocessed images.

  Not ``translate.check_parity``: it turns a final Keras ``Activation``
  layer linear to compare classifiers on logits, and without the top
  NASNet's last layer is the final ``Activation("relu")``, which must stay.
  """
  images = translate.random_images(shape, batch=2, seed=seed)
  x = np.asarray(models.get_spec(name).keras_preprocess_input()(images))
  ref = np.asarray(keras_model(x, training=False), np.float64)
  out = np.asarray(jax.jit(module.apply)(variables, x), np.float64)
  assert out.shape == ref.shape
  return float(np.max(np.abs(out - ref)) / max(1.0, np.max(np.abs(ref))))


def _assert_names_and_shapes(keras_model, name, shape, **create_kwargs):
  """Every Keras layer with weights is a Flax module of the same name
  (no auto names: renumbering changes nothing) with the same shapes."""
  layers = keras_io.read_weights(keras_model)
  mapping = keras_io.canonical_names(layers)
  assert all(k == v for k, v in mapping.items())  # all named by Keras
  shapes = translate.variable_shapes(models.create(name, **create_kwargs),
                                     shape)
  flax = {**shapes["params"], **shapes["batch_stats"]}
  assert set(flax) == {l.name for l in layers}
  for layer in layers:
    want = {}
    for wname, array in layer.weights.items():  # as translate lays them out
      rule = RULES[layer.cls][wname]
      want[(rule.collection, rule.leaf)] = rule.apply(array).shape
    got = {(c, k): tuple(v.shape) for c in ("params", "batch_stats")
           for k, v in shapes[c].get(layer.name, {}).items()}
    assert got == want, layer.name
  return layers


@pytest.fixture(scope="module")
def mobile_keras():
  """NASNetMobile with its top at Keras' minimum size (32), built after
  another model so the session counters are shifted."""
  keras.backend.clear_session()
  _shift_keras_counters()
  return keras_build.build(models.get_spec(MOBILE), None, include_top=True,
                        input_shape=(32, 32, 3))


def test_mobile_flax_names_are_the_keras_names(mobile_keras):
  layers = _assert_names_and_shapes(mobile_keras, MOBILE, (32, 32, 3))
  by_cls = {}
  for l in layers:
    by_cls[l.cls] = by_cls.get(l.cls, 0) + 1
  # 4 + 2 reduction cells (5 separable blocks each), 12 normal cells (5).
  assert by_cls["SeparableConv2D"] == 2 * 5 * (4 + 12)
  assert "adjust_conv_projection_1" in {l.name for l in layers}
  assert "adjust_conv_1_stem_2" in {l.name for l in layers}
  # NASNetMobile takes any size from 32 with its top (weights=None).
  assert models.get_spec(MOBILE).min_size == 32
  with pytest.raises(ValueError, match="at least 32"):
    keras.applications.NASNetMobile(weights=None, input_shape=(31, 32, 3))
  with pytest.raises(ValueError, match="too small"):
    models.resolve_input_shape(MOBILE, (31, 32, 3))


def test_batchnorm_settings_are_keras(mobile_keras):
  seen = flax_calls(models.create(MOBILE), (32, 32, 3), nn.BatchNorm)
  keras_bn = {l.name: l for l in mobile_keras.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  for name, m in seen.items():
    k = keras_bn[name]
    assert m.epsilon == k.epsilon == 1e-3, name
    assert m.momentum == pytest.approx(k.momentum) == 0.9997, name
    assert m.use_scale and m.use_bias and k.scale and k.center, name
    assert m.use_running_average, name
  assert models.get_spec(MOBILE).bn_epsilon == nasnet.EPSILON == 1e-3


@pytest.mark.parametrize("variant,settings,size", [
    ("NASNetMobile", nasnet.MOBILE, 224), ("NASNetLarge", nasnet.LARGE, 331)])
def test_variant_settings_are_keras(monkeypatch, variant, settings, size):
  """The arguments Keras' NASNetMobile/NASNetLarge pass to NASNet(...)."""
  from keras.src.applications import nasnet as keras_nasnet  # pylint: disable=g-import-not-at-top
  captured = {}
  monkeypatch.setattr(keras_nasnet, "NASNet",
                      lambda *args, **kwargs: captured.update(kwargs))
  getattr(keras_nasnet, variant)(weights=None)
  assert {k: captured[k] for k in settings} == settings
  assert captured["default_size"] == size
  spec = models.get_spec(variant)
  assert spec.input_shape == (size, size, 3)
  module = spec.flax_cls(include_top=False)
  assert {k: getattr(module, k) for k in settings} == settings


@pytest.mark.parametrize("skip_reduction", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_small_nasnet_parity(skip_reduction):
  """A NASNet with one normal cell per stage, against Keras' own NASNet(...)
  with the same settings, at 63 x 45: odd and even sides go through
  correct_pad, the three adjust cases (halving with Cropping2D, 1x1
  projection, none) and both previous-path wirings after a reduction."""
  from keras.src.applications import nasnet as keras_nasnet  # pylint: disable=g-import-not-at-top
  settings = {"penultimate_filters": 96, "num_blocks": 1,
              "stem_block_filters": 8, "skip_reduction": skip_reduction,
              "filter_multiplier": 2}
  shape = (63, 45, 3)
  model = keras_nasnet.NASNet(input_shape=shape, weights=None, classes=10,
                              classifier_activation=None, **settings)
  module = nasnet.NASNet(classes=10, classifier_activation=None, **settings)
  rng = np.random.default_rng(int(skip_reduction))
  data = rng.uniform(-1, 1, (2, *shape)).astype(np.float32)
  # Random BatchNorm statistics (no calibration: small enough to stay O(10)).
  random_weights.randomize(model, seed=3)
  variables, report = translate.translate(module, model, shape)
  assert set(report.match_counts) == {"exact"}
  names = {l.name for l in model.layers}
  # Halving (stem_2, 2), projection (reduce_2) and none at all (reduce_1:
  # its previous path already has 8 channels).
  assert {"adjust_conv_1_stem_2", "adjust_conv_1_2",
          "adjust_conv_projection_reduce_2"} <= names
  assert "reduction_conv_1_reduce_1" in names
  assert not any(n.endswith("_reduce_1") and n.startswith("adjust")
                 for n in names)
  ref = np.asarray(model(data, training=False))
  out = np.asarray(jax.jit(module.apply)(variables, data))
  assert 1 < np.abs(ref).max() < 1e3
  np.testing.assert_allclose(out, ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_mobile_no_top_parity_odd_size_on_a_shifted_session():
  kwargs = {"include_top": False, "input_shape": (97, 75, 3)}
  keras.backend.clear_session()
  _shift_keras_counters()
  conv = translate.convert(MOBILE, weights="random", seed=5, **kwargs)
  assert conv.report.match_counts == {"exact": len(conv.variables["params"])}
  assert conv.report.renamed == 0
  assert conv.keras_model.output_shape == (None, 3, 3, 1056)
  max_rel = _feature_parity(conv.module, conv.variables, conv.keras_model,
                            MOBILE, kwargs["input_shape"], seed=6)
  _log(MOBILE, kwargs, max_rel)
  assert max_rel <= translate.TOLERANCE, max_rel


@pytest.mark.slow
def test_mobile_avg_pooling_parity():
  kwargs = {"include_top": False, "pooling": "avg",
            "input_shape": (130, 99, 3)}
  conv = translate.convert(MOBILE, weights="random", seed=7, **kwargs)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, MOBILE, seed=8,
                                  input_shape=kwargs["input_shape"])
  _log(MOBILE, kwargs, report.max_rel)
  assert conv.keras_model.output_shape == (None, 1056)
  assert not report.logits and report.passed, report.summary()


@pytest.mark.slow
def test_large_no_top_names_and_parity_odd_size():
  kwargs = {"include_top": False, "input_shape": (75, 97, 3)}
  conv = translate.convert(LARGE, weights="random", seed=9, **kwargs)
  layers = _assert_names_and_shapes(conv.keras_model, LARGE,
                                    kwargs["input_shape"], include_top=False)
  # 6 normal cells per stage; skip_reduction: the cell after a reduction
  # halves the input of the last normal cell.
  assert sum(l.cls == "SeparableConv2D" for l in layers) == 2 * 5 * (4 + 18)
  assert conv.keras_model.output_shape == (None, 3, 3, 4032)
  max_rel = _feature_parity(conv.module, conv.variables, conv.keras_model,
                            LARGE, kwargs["input_shape"], seed=10)
  _log(LARGE, kwargs, max_rel)
  assert max_rel <= translate.TOLERANCE, max_rel
