"""The translation engine end to end on ResNet: variants, files, strictness."""

import json
import os

import numpy as np
import pytest
from flax import serialization, traverse_util

import models
import translate
from translate import keras_io


# All slow: the README tier has ResNet50's native parity (tests/test_parity.py)
# and no-top options through the CLI.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,kwargs", [
    pytest.param("resnet50", dict(include_top=False), marks=_SLOW),
    pytest.param("resnet50", dict(include_top=False, pooling="avg"),
                 marks=_SLOW),
    pytest.param("resnet50v2", dict(include_top=False, pooling="max"),
                 marks=_SLOW),
    pytest.param("resnet50", dict(classes=10), marks=_SLOW),
    pytest.param("resnet50v2", dict(include_top=False, pooling="avg",
                                    input_shape=(160, 128, 3)), marks=_SLOW),
    pytest.param("densenet121", dict(classes=3, input_shape=(96, 96, 3)),
                 marks=_SLOW),
])
def test_variants_match_keras(name, kwargs):
  conv = translate.convert(name, weights="random", seed=5, **kwargs)
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, name, seed=6)
  assert report.passed, report.summary()
  shape = kwargs.get("input_shape", (224, 224, 3))
  x = np.zeros((1, *shape), np.float32)
  assert (conv.module.apply(conv.variables, x).shape
          == conv.keras_model(x).shape)


@pytest.mark.slow
def test_softmax_output_equals_keras_too():
  conv = translate.convert("resnet50v2", weights="random", seed=0)
  x = translate.random_images((224, 224, 3), 1, seed=1)
  x = models.preprocess("resnet50v2", x)
  got = np.asarray(conv.module.apply(conv.variables, x))
  want = np.asarray(conv.keras_model(np.asarray(x), training=False))
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_save_load_roundtrip_is_byte_identical(tmp_path):
  conv = translate.convert("resnet50", weights="random", seed=2,
                           include_top=False, pooling="avg")
  a, b = tmp_path / "a.msgpack", tmp_path / "b.msgpack"
  translate.save_variables(a, conv.variables, {"model": "resnet50"})
  translate.save_variables(b, conv.variables, {"model": "resnet50"})
  assert a.read_bytes() == b.read_bytes()
  assert translate.load_metadata(a) == {"model": "resnet50"}
  # flax.serialization.msgpack_restore gives a dict usable with apply.
  restored = serialization.msgpack_restore(a.read_bytes())
  assert set(restored) == {"params", "batch_stats"}
  loaded = traverse_util.flatten_dict(translate.load_variables(a))
  for key, value in traverse_util.flatten_dict(conv.variables).items():
    np.testing.assert_array_equal(loaded[key], value)
  x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  np.testing.assert_array_equal(conv.module.apply(restored, x),
                                conv.module.apply(conv.variables, x))
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_local_weights_h5_and_keras_files(tmp_path):
  src = translate.build_keras("resnet50", "random", seed=9)
  h5 = str(tmp_path / "r50.weights.h5")
  src.save_weights(h5)
  whole = str(tmp_path / "r50.keras")
  src.save(whole)
  base, _ = translate.translate(models.create("resnet50"), src,
                                (224, 224, 3))
  for path in (h5, whole):
    conv = translate.convert("resnet50", weights=path)
    flat = traverse_util.flatten_dict(conv.variables)
    for key, value in traverse_util.flatten_dict(base).items():
      np.testing.assert_array_equal(flat[key], value, err_msg=str(key))


def test_strict_merge_refuses_a_missing_weight():
  conv = translate.convert("resnet50", weights="random", include_top=False)
  layers = keras_io.read_weights(conv.keras_model)
  del layers[3].weights["moving_variance"]
  shapes = translate.variable_shapes(conv.module, (224, 224, 3))
  with pytest.raises(translate.MergeError) as e:
    translate.merge(layers, shapes)
  assert f"batch_stats/{layers[3].name}/var" in str(e.value)


def test_strict_merge_refuses_a_wrong_shape_and_names_both_sides():
  module = models.create("resnet50", include_top=False)
  src = translate.build_keras("resnet50", None, include_top=True, classes=7)
  shapes = translate.variable_shapes(module, (224, 224, 3))
  with pytest.raises(translate.MatchError) as e:
    translate.merge(keras_io.read_weights(src), shapes)
  assert "predictions" in str(e.value)  # a Keras layer with no Flax module
  module = models.create("resnet50", classes=5)
  shapes = translate.variable_shapes(module, (224, 224, 3))
  with pytest.raises(translate.MergeError, match=r"predictions.*\(2048, 7\)"):
    translate.merge(keras_io.read_weights(src), shapes)


def test_swapped_batchnorm_statistics_fail_parity():
  conv = translate.convert("resnet50", weights="random", seed=3)
  stats = conv.variables["batch_stats"]["conv2_block1_1_bn"]
  stats["mean"], stats["var"] = stats["var"], stats["mean"]
  report = translate.check_parity(conv.module, conv.variables,
                                  conv.keras_model, "resnet50")
  assert not report.passed


def test_report_counts_parameters_like_keras():
  conv = translate.convert("resnet50", weights=None)
  assert conv.report.params + conv.report.stats == conv.keras_model.count_params()
  assert conv.report.match_counts == {"exact": 107}
  assert conv.report.bytes == 4 * conv.keras_model.count_params()
  text = conv.report.table()
  assert "25,583,592" in text and "exact" in text


def test_json_metadata_is_plain_json(tmp_path):
  path = tmp_path / "m.msgpack"
  translate.save_variables(path, {"params": {"a": {"kernel": np.ones(2)}}},
                           {"parity": {"max_rel": 1e-7}})
  assert json.loads((tmp_path / "m.json").read_text())["parity"] == {
      "max_rel": 1e-7}
