"""MobileNetV3Small/Large: Keras names, BatchNorm settings, hard-sigmoid and
hard-swish, every Keras option (alpha, minimalistic, include_preprocessing,
dropout_rate), the conv classifier and no-top parity at odd sizes."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import translate
from models import mobilenet_v3
from translate import keras_build, keras_io
from translate.rules import RULES
from flax_spy import flax_calls

SMALL = "mobilenetv3small"
LARGE = "mobilenetv3large"


def _log(name, kwargs, max_rel):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": max_rel}) + "\n")


def _feature_parity(conv, name, seed):
  """Max relative difference of the no-top outputs (feature map or pooled).

  Not ``translate.check_parity``: it turns a final Keras ``Activation``
  layer linear to compare a classifier on logits, and without the top
  MobileNetV3's final layer is the ``Activation("hard_swish")`` after
  ``conv_1_bn``, which must stay.
  """
  shape = conv.keras_model.input_shape[1:]
  images = translate.random_images(shape, batch=2, seed=seed)
  x = np.asarray(models.get_spec(name).keras_preprocess_input()(images))
  ref = np.asarray(conv.keras_model(x, training=False), np.float64)
  out = np.asarray(jax.jit(conv.module.apply)(conv.variables, x), np.float64)
  assert out.shape == ref.shape
  return float(np.max(np.abs(out - ref)) / max(1.0, np.max(np.abs(ref))))


def _parity(name, seed, **kwargs):
  conv = translate.convert(name, weights="random", seed=seed, **kwargs)
  assert conv.keras_model.input_shape[1:] == kwargs["input_shape"]
  assert set(conv.report.match_counts) == {"exact"}
  if kwargs.get("include_top", True):
    report = translate.check_parity(conv.module, conv.variables,
                                    conv.keras_model, name, seed=seed + 1)
    _log(name, kwargs, report.max_rel)
    assert report.logits and report.passed, report.summary()
  else:
    max_rel = _feature_parity(conv, name, seed + 1)
    _log(name, kwargs, max_rel)
    assert max_rel <= translate.TOLERANCE, max_rel
  # Flax params + batch_stats are every Keras weight.
  assert conv.report.params + conv.report.stats == (
      conv.keras_model.count_params())
  return conv


def _keras(name, **kwargs):
  return keras_build.build(models.get_spec(name), None, **kwargs)


def flax_fields(module, shape, cls, fields, train=False):
  """``{name: (fields..., input shape)}`` of every ``cls`` submodule
  ``module`` calls (traced, nothing computed)."""
  return {name: tuple(getattr(m, f) for f in fields) + (in_shape,)
          for name, (m, in_shape) in flax_calls(
              module, shape, cls, train=train, inputs=True).items()}


@pytest.fixture(scope="module")
def keras_small():
  return _keras(SMALL, input_shape=(224, 224, 3))


def test_flax_names_and_shapes_are_exactly_keras(keras_small):
  layers = keras_io.read_weights(keras_small)
  names = keras_io.canonical_names(layers)
  shapes = translate.variable_shapes(models.create(SMALL), (224, 224, 3))
  assert set(shapes["params"]) == {names[l.name] for l in layers}
  # Every Keras weight, rearranged by its class rule, has its Flax shape.
  n = 0
  for layer in layers:
    for key, value in layer.weights.items():
      rule = RULES[layer.cls][key]
      leaf = shapes[rule.collection][names[layer.name]][rule.leaf]
      assert leaf.shape == rule.apply(value).shape, (layer.name, key)
      n += 1
  assert n == len(keras_small.weights)
  # The classifier is a 1x1 conv named like Keras' ("logits"), with a bias.
  assert shapes["params"]["logits"]["kernel"].shape == (1, 1, 1024, 1000)
  assert shapes["params"]["logits"]["bias"].shape == (1000,)


def test_batchnorm_settings_are_keras(keras_small):
  seen = flax_fields(models.create(SMALL), (224, 224, 3), nn.BatchNorm,
                    ("epsilon", "momentum", "use_running_average"))
  keras_bn = {l.name: l for l in keras_small.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  for name, (eps, momentum, frozen, _) in seen.items():
    assert eps == keras_bn[name].epsilon == 1e-3, name
    assert momentum == pytest.approx(keras_bn[name].momentum), name
    assert momentum == pytest.approx(0.999), name
    assert frozen, f"{name} must use the moving statistics at inference"
  assert models.get_spec(SMALL).bn_epsilon == 1e-3


def test_hard_sigmoid_and_hard_swish_are_keras():
  from keras.src.applications import mobilenet_v3 as keras_v3  # pylint: disable=g-import-not-at-top
  x = np.concatenate([np.linspace(-6, 6, 241), [-3, 3, -3 - 1e-6, 3 + 1e-6,
                                                -2.9999, 2.9999, 0, 1e-8]]
                     ).astype(np.float32)
  got_sig = np.asarray(mobilenet_v3.hard_sigmoid(jnp.asarray(x)))
  got_swish = np.asarray(mobilenet_v3.hard_swish(jnp.asarray(x)))
  # Keras' own functions, eagerly (hard_sigmoid is the module's helper,
  # hard_swish its Activation("hard_swish")).
  want_sig = np.asarray(keras_v3.hard_sigmoid(x))
  want_swish = np.asarray(keras_v3.hard_swish(x))
  np.testing.assert_allclose(got_sig, want_sig, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_swish, want_swish, rtol=1e-6, atol=1e-7)
  # The kinks at -3 and 3, and the linear piece in between.
  at = dict(zip(x.tolist(), zip(got_sig.tolist(), got_swish.tolist())))
  assert at[-3.0] == (0.0, 0.0) and at[3.0] == (1.0, 3.0)
  assert at[-6.0] == (0.0, 0.0) and at[6.0] == (1.0, 6.0)
  assert at[0.0] == (0.5, 0.0)
  assert at[1.5] == pytest.approx((0.75, 1.125))


def test_no_top_feature_map_parity_at_odd_non_square_size():
  # 97 x 75: the stride-2 blocks see odd and even sizes (correct_pad).
  kwargs = dict(include_top=False, input_shape=(97, 75, 3))
  conv = _parity(SMALL, 11, **kwargs)
  assert conv.keras_model.output_shape[1:] == (4, 3, 576)


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0.75},
    {"minimalistic": True},
    {"include_preprocessing": False, "classes": 7},
], ids=["alpha-0.75", "minimalistic", "no-preprocessing"])
def test_option_parity(kwargs):
  conv = _parity(SMALL, 21, input_shape=(64, 48, 3), **kwargs)
  params = conv.variables["params"]
  se = [k for k in params if "squeeze_excite" in k]
  if kwargs.get("minimalistic"):
    assert not se
    assert params["expanded_conv_3_depthwise"]["kernel"].shape[:2] == (3, 3)
  else:
    assert len(se) == 2 * 9  # blocks 0 and 3 ... 10
    assert params["expanded_conv_3_depthwise"]["kernel"].shape[:2] == (5, 5)
  if "classes" not in kwargs:
    return
  # ``logits`` conv, ``Flatten``, ``Activation``: by default both return
  # the softmax of those logits.
  x = translate.random_images((64, 48, 3), batch=2, seed=22)
  probs = np.asarray(jax.jit(conv.module.apply)(conv.variables, x))
  want = np.asarray(conv.keras_model(x, training=False))
  assert probs.shape == want.shape == (2, kwargs["classes"])
  np.testing.assert_allclose(probs, want, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("rate", [0.2, 0.35, 0.0])  # 0.2: Keras' default
def test_dropout_rate_is_keras(rate):
  kwargs = {} if rate == 0.2 else {"dropout_rate": rate}
  keras_model = _keras(SMALL, input_shape=(32, 32, 3), **kwargs)
  keras_rates = [l.rate for l in keras_model.layers
                 if type(l).__name__ == "Dropout"]
  seen = flax_fields(models.create(SMALL, **kwargs), (32, 32, 3), nn.Dropout,
                    ("rate", "deterministic"))
  assert [r for r, _, _ in seen.values()] == keras_rates
  assert keras_rates == ([rate] if rate else [])
  for _, deterministic, shape in seen.values():
    assert deterministic  # inference
    assert shape == (1, 1, 1, 1024)  # after conv_2, before the logits conv


def test_dropout_and_batchnorm_train_mode():
  module = models.create(SMALL, dropout_rate=0.5)
  drop = flax_fields(module, (32, 32, 3), nn.Dropout, ("deterministic",),
                    train=True)
  assert [d for d, _ in drop.values()] == [False]
  bn = flax_fields(module, (32, 32, 3), nn.BatchNorm, ("use_running_average",),
                  train=True)
  assert bn and not any(frozen for frozen, _ in bn.values())


@pytest.mark.parametrize("name,alpha", [
    (SMALL, 0.75), (SMALL, 1.25),
    pytest.param(LARGE, 1.25, marks=pytest.mark.slow)])
def test_last_conv_widths_follow_keras(name, alpha):
  """``conv_1`` is ``_depth(6 * channels)``; ``conv_2`` (1024 Small, 1280
  Large) widens only when ``alpha > 1``."""
  keras_model = _keras(name, input_shape=(32, 32, 3), alpha=alpha)
  shapes = translate.variable_shapes(models.create(name, alpha=alpha),
                                     (32, 32, 3))["params"]
  for layer in ("conv_1", "conv_2", "logits"):
    assert shapes[layer]["kernel"].shape == tuple(
        keras_model.get_layer(layer).kernel.shape), layer
  base = {SMALL: 1024, LARGE: 1280}[name]
  want = mobilenet_v3.depth(base * alpha) if alpha > 1 else base
  assert shapes["conv_2"]["kernel"].shape[-1] == want


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [
    {"include_top": False, "input_shape": (97, 75, 3)},
    {"alpha": 0.75, "input_shape": (96, 80, 3)},
    {"minimalistic": True, "input_shape": (96, 80, 3)},
    {"include_preprocessing": False, "input_shape": (64, 48, 3)},
], ids=["no-top-97x75", "alpha-0.75", "minimalistic", "no-preprocessing"])
def test_large_parity(kwargs):
  _parity(LARGE, 41, **kwargs)


@pytest.mark.slow
def test_small_alpha_above_one_parity():
  _parity(SMALL, 51, alpha=1.25, pooling="max", include_top=False,
          input_shape=(65, 64, 3))
