"""InceptionResNetV2: Keras names (auto-named conv2d_bn layers on a shifted
session), BatchNorm without gamma, the residual scales and the linear last
block, block parity against Keras' own ``inception_resnet_block`` and no-top
parity at an odd, non-square size."""

import json
import os

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest

import models
import translate
from models import inception_resnet_v2 as irv2
from translate import keras_build, keras_io, random_weights
from flax_spy import flax_calls

NAME = "inceptionresnetv2"
N_CONV2D_BN = 203  # unnamed conv2d_bn calls (conv_7b is the one named)


def _log(name, kwargs, max_rel):
  if os.environ.get("PARITY_LOG"):
    with open(os.environ["PARITY_LOG"], "a") as f:
      f.write(json.dumps({"model": name, **{k: str(v) for k, v in
                                            kwargs.items()},
                          "max_rel": max_rel}) + "\n")


def _shift_keras_counters():
  """A model with unnamed Conv2D/BatchNormalization layers, so the next
  model's auto names start at conv2d_2, batch_normalization_1, …"""
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(2, 3)(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.Conv2D(2, 3)(x)
  return keras.Model(inputs, x)


def _feature_parity(module, variables, keras_model, shape, seed):
  """Max relative difference of the model outputs on preprocessed images.

  Not ``translate.check_parity``: it turns a final Keras ``Activation``
  layer linear to compare classifiers on logits, and without the top the
  last layer is ``conv_7b_ac`` (ReLU), which must stay.
  """
  images = translate.random_images(shape, batch=2, seed=seed)
  x = np.asarray(models.get_spec(NAME).keras_preprocess_input()(images))
  ref = np.asarray(keras_model(x, training=False), np.float64)
  out = np.asarray(jax.jit(module.apply)(variables, x), np.float64)
  assert out.shape == ref.shape
  return float(np.max(np.abs(out - ref)) / max(1.0, np.max(np.abs(ref))))


@pytest.fixture(scope="module")
def shifted_keras():
  """InceptionResNetV2 (top included, minimum size) built after another
  model, so its auto names are not those of a fresh session."""
  keras.backend.clear_session()
  _shift_keras_counters()
  return keras_build.build(models.get_spec(NAME), None, include_top=True,
                        input_shape=(75, 75, 3))


def test_flax_names_are_the_canonical_keras_names(shifted_keras):
  layers = keras_io.read_weights(shifted_keras)
  names = [l.name for l in layers]
  assert "conv2d" not in names and "conv2d_2" in names  # really shifted
  mapping = keras_io.canonical_names(layers)
  renamed = [n for n, c in mapping.items() if n != c]
  assert len(renamed) == 2 * N_CONV2D_BN  # every unnamed conv and its BN
  # The first conv2d_bn is canonical "conv2d", the last "conv2d_202".
  convs = [l.name for l in layers if l.cls == "Conv2D"
           and l.name.startswith("conv2d")]
  assert mapping[convs[0]] == "conv2d"
  assert mapping[convs[-1]] == f"conv2d_{N_CONV2D_BN - 1}"
  shapes = translate.variable_shapes(models.create(NAME), (75, 75, 3))
  flax = {**shapes["params"], **shapes["batch_stats"]}
  assert set(flax) == set(mapping.values())
  keras_spelling = {"kernel": "kernel", "scale": "gamma", "bias": "beta",
                    "mean": "moving_mean", "var": "moving_variance"}
  for layer in layers:
    name = mapping[layer.name]
    leaf = {**shapes["params"].get(name, {}),
            **shapes["batch_stats"].get(name, {})}
    if layer.cls == "BatchNormalization":
      got = {keras_spelling[k]: tuple(v.shape) for k, v in leaf.items()}
    else:  # Conv2D, Dense: kernel and bias keep their names
      got = {k: tuple(v.shape) for k, v in leaf.items()}
    assert got == {k: v.shape for k, v in layer.weights.items()}, name
  # The residual projections have a bias and no BatchNorm; conv_7b is a
  # named conv2d_bn whose BN has no gamma.
  assert set(shapes["params"]["block35_1_conv"]) == {"kernel", "bias"}
  assert "block35_1_conv_bn" not in flax
  assert set(shapes["params"]["conv_7b_bn"]) == {"bias"}
  assert shapes["params"]["conv_7b"]["kernel"].shape == (1, 1, 2080, 1536)


def test_batchnorm_settings_are_keras(shifted_keras):
  seen = flax_calls(models.create(NAME), (75, 75, 3), nn.BatchNorm)
  canonical = keras_io.canonical_names(keras_io.read_weights(shifted_keras))
  keras_bn = {canonical[l.name]: l for l in shifted_keras.layers
              if type(l).__name__ == "BatchNormalization"}
  assert set(seen) == set(keras_bn)
  assert len(seen) == N_CONV2D_BN + 1  # + conv_7b_bn
  for name, m in seen.items():
    k = keras_bn[name]
    assert m.epsilon == k.epsilon == irv2.EPSILON == 1e-3, name
    assert m.momentum == pytest.approx(k.momentum) == 0.99, name
    assert m.use_scale is k.scale is False, name  # conv2d_bn: scale=False
    assert m.use_bias is k.center is True, name
    assert m.use_running_average, name
  assert models.get_spec(NAME).bn_epsilon == 1e-3


def test_residual_scales_and_activations_follow_keras(shifted_keras,
                                                      monkeypatch):
  """Block by block: Keras' CustomScaleLayer scale and whether a
  ``{block}_ac`` ReLU follows (not after block8_10)."""
  want = []
  names = {l.name for l in shifted_keras.layers}
  for l in shifted_keras.layers:
    if type(l).__name__ == "CustomScaleLayer":
      block = l.input[1]._keras_history[0].name[:-len("_conv")]
      want.append((block, l.scale, f"{block}_ac" in names))
  assert len(want) == 40 and want[-1] == ("block8_10", 1.0, False)

  seen = []
  original = irv2.inception_resnet_block

  def spy(cb, x, scale, block_type, block_idx, activation=True):
    seen.append((f"{block_type}_{block_idx}", scale, activation))
    return original(cb, x, scale, block_type, block_idx, activation)

  monkeypatch.setattr(irv2, "inception_resnet_block", spy)
  translate.variable_shapes(models.create(NAME), (75, 75, 3))
  assert seen == want


class _Blocks(nn.Module):
  """block35_1, block17_1 and the linear block8_10 on any input."""

  @nn.compact
  def __call__(self, x, train=False):
    cb = irv2._ConvBN(train)  # pylint: disable=protected-access
    x = irv2.inception_resnet_block(cb, x, 0.17, "block35", 1)
    x = irv2.inception_resnet_block(cb, x, 0.1, "block17", 1)
    return irv2.inception_resnet_block(cb, x, 1.0, "block8", 10,
                                       activation=False)


def test_blocks_match_keras_inception_resnet_block():
  """Parity with Keras' own ``inception_resnet_block`` (same three blocks,
  randomized weights and calibrated statistics) on a small odd input: the
  residual scale, the biased projection and the linear last block."""
  from keras.src.applications import inception_resnet_v2 as kirv2  # pylint: disable=g-import-not-at-top
  shape = (9, 7, 16)
  inputs = keras.Input(shape)
  x = kirv2.inception_resnet_block(inputs, 0.17, "block35", 1)
  x = kirv2.inception_resnet_block(x, 0.1, "block17", 1)
  x = kirv2.inception_resnet_block(x, 1.0, "block8", 10, activation=None)
  model = keras.Model(inputs, x)
  rng = np.random.default_rng(0)
  data = rng.normal(size=(6, *shape)).astype(np.float32)
  random_weights.randomize(model, seed=1, calibration=data[:4])
  variables, report = translate.translate(_Blocks(), model, shape)
  assert report.match_counts == {"exact": 2 * (6 + 4 + 4) + 3}
  ref = np.asarray(model(data[4:], training=False))
  out = np.asarray(jax.jit(_Blocks().apply)(variables, data[4:]))
  assert (ref < 0).any()  # no ReLU after block8_10
  np.testing.assert_allclose(out, ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_no_top_parity_odd_size_on_a_shifted_session():
  # 107 x 131: odd, non-square, and the last stage still 2 x 2 (at 97 x 75
  # it is 1 x 1 and random-weight statistics calibrated on 4 images blow the
  # features up to 1e21).
  kwargs = {"include_top": False, "input_shape": (107, 131, 3)}
  keras.backend.clear_session()
  _shift_keras_counters()
  conv = translate.convert(NAME, weights="random", seed=5, **kwargs)
  assert conv.report.renamed == 2 * N_CONV2D_BN
  assert set(conv.report.match_counts) == {"exact"}
  assert conv.keras_model.output_shape == (None, 2, 2, 1536)
  max_rel = _feature_parity(conv.module, conv.variables, conv.keras_model,
                            kwargs["input_shape"], seed=6)
  _log(NAME, kwargs, max_rel)
  assert max_rel <= translate.TOLERANCE, max_rel


@pytest.mark.slow
def test_max_pooling_parity():
  kwargs = {"include_top": False, "pooling": "max",
            "input_shape": (139, 111, 3)}
  conv = translate.convert(NAME, weights="random", seed=7, **kwargs)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, NAME, seed=8,
                                  input_shape=kwargs["input_shape"])
  _log(NAME, kwargs, report.max_rel)
  assert conv.keras_model.output_shape == (None, 1536)
  assert not report.logits and report.passed, report.summary()
