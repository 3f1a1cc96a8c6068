"""Strict merge: every Keras weight used once, every Flax leaf filled once.

Each test feeds ``translate.merge`` hand-made Keras layers against the traced
variable tree of a tiny Flax module, so each guard is exercised alone and its
error must name both sides.
"""

import flax.linen as nn
import numpy as np
import pytest

import translate
from translate import keras_io, random_weights
from translate.rules import rule_for


class Tiny(nn.Module):
  """conv (3x3, 2 -> 4, bias) -> BatchNorm -> Dense(3)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3,  # Keras
                     name="bn")(x)
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


SHAPES = translate.variable_shapes(Tiny(), (5, 5, 2))


def _layers(**changes):
  rng = np.random.default_rng(0)
  conv = {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
          "bias": rng.normal(size=(4,)).astype(np.float32)}
  bn = {"gamma": np.full(4, 1.5, np.float32), "beta": np.full(4, .5, np.float32),
        "moving_mean": np.full(4, .25, np.float32),
        "moving_variance": np.full(4, 2.0, np.float32)}
  fc = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "bias": np.zeros(3, np.float32)}
  weights = {"conv": conv, "bn": bn, "fc": fc}
  for layer, w in changes.items():
    weights[layer] = w(weights[layer])
  classes = {"conv": "Conv2D", "bn": "BatchNormalization", "fc": "Dense"}
  return [keras_io.KerasLayer(n, classes[n], w) for n, w in weights.items()]


def test_a_complete_fit_fills_every_leaf_with_its_own_array():
  variables, matches, renamed = translate.merge(_layers(), SHAPES)
  assert renamed == 0 and {m.kind for m in matches} == {"exact"}
  assert variables["params"]["bn"]["scale"][0] == 1.5
  assert variables["params"]["bn"]["bias"][0] == 0.5
  assert variables["batch_stats"]["bn"]["mean"][0] == 0.25
  assert variables["batch_stats"]["bn"]["var"][0] == 2.0
  np.testing.assert_array_equal(variables["params"]["conv"]["kernel"],
                                _layers()[0].weights["kernel"])


def test_a_weight_without_a_rule_is_an_error_not_skipped():
  layers = _layers(bn=lambda w: {**w, "renorm_mean": np.zeros(4, np.float32)})
  with pytest.raises(translate.MergeError) as e:
    translate.merge(layers, SHAPES)
  msg = str(e.value)
  assert "bn/renorm_mean: no rule for weight 'renorm_mean'" in msg
  assert "BatchNormalization" in msg and "1 Keras-side" in msg


def test_a_leaf_filled_twice_is_an_error_and_the_first_value_is_not_lost():
  # DepthwiseConv2D maps both Keras 3's "kernel" and tf-keras'
  # "depthwise_kernel" to Flax's kernel: a layer carrying both is ambiguous.
  class Dw(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(2, (3, 3), feature_group_count=2, name="dw")(x)

  k = np.ones((3, 3, 2, 1), np.float32)
  layers = [keras_io.KerasLayer("dw", "DepthwiseConv2D", {
      "kernel": k, "depthwise_kernel": 2 * k, "bias": np.zeros(2, np.float32)})]
  with pytest.raises(translate.MergeError, match="params/dw/kernel filled "
                     r"twice \(again by dw/depthwise_kernel\)"):
    translate.merge(layers, translate.variable_shapes(Dw(), (5, 5, 2)))


def test_a_flax_leaf_no_keras_weight_fills_is_named():
  layers = _layers(conv=lambda w: {"kernel": w["kernel"]})  # no bias
  with pytest.raises(translate.MergeError) as e:
    translate.merge(layers, SHAPES)
  msg = str(e.value)
  assert "Flax params/conv/bias (4,) not filled by any Keras weight" in msg
  assert "0 Keras-side and 1 Flax-side" in msg


def test_a_shape_mismatch_names_both_shapes():
  layers = _layers(fc=lambda w: {"kernel": np.zeros((4, 5), np.float32),
                                 "bias": np.zeros(5, np.float32)})
  with pytest.raises(translate.MergeError) as e:
    translate.merge(layers, SHAPES)
  msg = str(e.value)
  assert "fc/kernel (4, 5) -> params/fc/kernel: shape (4, 5) != Flax (4, 3)" \
      in msg
  assert "fc/bias (5,) -> params/fc/bias: shape (5,) != Flax (3,)" in msg


def test_errors_list_both_sides_at_once():
  layers = _layers(conv=lambda w: {"kernel": w["kernel"]},
                   bn=lambda w: {**w, "extra": np.zeros(4, np.float32)})
  with pytest.raises(translate.MergeError) as e:
    translate.merge(layers, SHAPES)
  msg = str(e.value)
  assert "1 Keras-side and 1 Flax-side" in msg
  assert "bn/extra" in msg and "params/conv/bias" in msg


def test_a_weight_that_maps_to_no_flax_variable_is_named():
  # A Keras Conv2D with a bias into a Flax conv without one.
  class NoBias(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)

  layers = _layers()[:1]
  with pytest.raises(translate.MergeError,
                     match=r"conv/bias -> params/conv/bias: no such Flax "
                     r"variable \(Flax has \['params/conv/kernel'\]\)"):
    translate.merge(layers, translate.variable_shapes(NoBias(), (5, 5, 2)))


def test_dropped_weights_are_read_but_not_carried():
  assert rule_for("Normalization", "n")["count"] is translate.DROP

  class Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
      from models.layers import Normalization  # pylint: disable=g-import-not-at-top
      return Normalization(name="normalization")(x)

  layers = [keras_io.KerasLayer("normalization", "Normalization", {
      "mean": np.ones(2, np.float32), "variance": np.full(2, 4., np.float32),
      "count": np.array(7, np.int64)})]
  variables, _, _ = translate.merge(
      layers, translate.variable_shapes(Norm(), (5, 5, 2)))
  assert set(variables["batch_stats"]["normalization"]) == {"mean", "var"}


def test_a_keras_class_without_rules_names_the_class_and_layer():
  layers = [keras_io.KerasLayer("act", "MyScaledAct", {"alpha": np.zeros(3)})]
  with pytest.raises(KeyError, match="no translation rule for Keras layer "
                     "class 'MyScaledAct' \\(layer 'act'\\)"):
    translate.merge(layers, {"params": {"act": {
        "alpha": np.zeros(3)}}})


def test_translate_a_tiny_keras_model_end_to_end():
  import keras  # pylint: disable=g-import-not-at-top
  inp = keras.Input((5, 5, 2))
  x = keras.layers.Conv2D(4, 3, name="conv")(inp)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(3, name="fc")(x)
  model = keras.Model(inp, out)
  random_weights.randomize(model, seed=3)
  variables, report = translate.translate(Tiny(), model, (5, 5, 2))
  assert report.match_counts == {"exact": 3}
  assert report.keras_weights == 8
  assert report.params == 2 * 9 * 4 + 4 + 4 + 4 + 4 * 3 + 3
  assert report.stats == 8
  x = np.random.default_rng(1).normal(size=(2, 5, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(Tiny().apply(variables, x), model(x),
                             rtol=1e-5, atol=1e-5)
