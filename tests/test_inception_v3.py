"""InceptionV3: auto-named layers translate whatever the session counter."""

import keras
import pytest
import numpy as np

import models
import translate
from translate import core, keras_io


def _shift_keras_counters():
  """Builds a model with unnamed Conv2D/BatchNormalization layers, so the
  next model's auto names start at conv2d_3, batch_normalization_2, …"""
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(4, 3)(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.Conv2D(4, 3)(x)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.Conv2D(4, 3)(x)
  return keras.Model(inputs, x)


@pytest.mark.slow  # two InceptionV3 builds, 7 s
def test_translation_ignores_the_session_counter():
  keras.backend.clear_session()
  _shift_keras_counters()
  conv = translate.convert("inceptionv3", weights="random", seed=3)
  names = [l.name for l in conv.keras_model.layers]
  assert "conv2d" not in names and "conv2d_3" in names  # really shifted
  assert conv.report.renamed == 94 + 94  # every conv2d_bn conv and BN
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "inceptionv3", seed=4)
  assert report.passed, report.summary()


def test_canonical_names_on_a_shifted_model():
  keras.backend.clear_session()
  _shift_keras_counters()
  model = translate.build_keras("inceptionv3", None, include_top=False)
  layers = keras_io.read_weights(model)
  mapping = keras_io.canonical_names(layers)
  first_conv = next(l.name for l in layers if l.cls == "Conv2D")
  assert first_conv == "conv2d_3" and mapping[first_conv] == "conv2d"
  assert sorted(set(mapping.values())) == sorted(mapping.values())  # unique
  assert mapping["conv2d_96"] == "conv2d_93"  # the last of 94, in order
  # Every canonical Keras name is a Flax leaf of the same shape (BN: no gamma).
  shapes = core.variable_shapes(models.create("inceptionv3", include_top=False),
                                (299, 299, 3))
  flax = {**shapes["params"], **shapes["batch_stats"]}
  assert set(flax) == set(mapping.values())
  keras_spelling = {"kernel": "kernel", "scale": "gamma", "bias": "beta",
                    "mean": "moving_mean", "var": "moving_variance"}
  for layer in layers:
    name = mapping[layer.name]
    leaf = {**shapes["params"].get(name, {}),
            **shapes["batch_stats"].get(name, {})}
    got = {keras_spelling[k]: tuple(v.shape) for k, v in leaf.items()}
    assert got == {k: v.shape for k, v in layer.weights.items()}, name


@pytest.mark.slow  # the README tier has InceptionV3's native-size parity
def test_no_top_avg_pooling_parity():
  conv = translate.convert("inceptionv3", weights="random", seed=6,
                           include_top=False, pooling="avg")
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "inceptionv3", seed=7)
  assert not report.logits
  assert conv.keras_model.output_shape == (None, 2048)
  assert report.passed, report.summary()


@pytest.mark.slow  # 12 s
def test_weights_file_from_another_session_loads(tmp_path):
  """A .weights.h5 saved in a fresh session loads into a shifted one."""
  keras.backend.clear_session()
  src = translate.build_keras("inceptionv3", "random", seed=5,
                              include_top=False, pooling="avg")
  path = str(tmp_path / "inception.weights.h5")
  src.save_weights(path)
  want = np.asarray(src(np.ones((1, 299, 299, 3), np.float32)))
  keras.backend.clear_session()
  _shift_keras_counters()
  conv = translate.convert("inceptionv3", weights=path, include_top=False,
                           pooling="avg")
  got = conv.module.apply(conv.variables, np.ones((1, 299, 299, 3),
                                                  np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(
      want).max())
