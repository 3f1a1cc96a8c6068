"""Whole Keras models through ``translate.from_keras``: each kind the issue
names, against Keras (``tests/graph_check.check``: randomized weights and
BatchNorm statistics, 1e-5 of max(1, max |out|), the emitted source run from
a file), the files users have, the refusals, ``register_layer``, the round
trip back to Keras and TFLite."""

import os
import re
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest
import tf_keras

import translate
from translate import random_weights
from translate.graph import GraphError
from translate.keras_io import UnsupportedLayerError

from graph_check import assert_close, check, random_inputs  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_roots(source: str) -> set[str]:
  """The top-level packages a source file imports."""
  import ast  # pylint: disable=g-import-not-at-top
  roots = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      roots |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      roots.add(node.module.split(".")[0])
  return roots


def transfer_model(flat: bool = False) -> keras.Model:
  """MobileNetV2 (alpha 0.35, 96x96, no top) with a new 5-class head: the
  backbone nested as one layer, or flattened into one graph."""
  base = keras.applications.MobileNetV2(include_top=False, weights=None,
                                        input_shape=(96, 96, 3), alpha=0.35)
  if flat:
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    return keras.Model(base.input, keras.layers.Dense(5, name="head")(x))
  return keras.Sequential([
      keras.Input((96, 96, 3)), base,
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dropout(0.2), keras.layers.Dense(5, name="head")])


@pytest.mark.slow  # README tier: tests/test_readme.py's section does this
def test_transfer_learning_nested_is_one_models_create_line(tmp_path):
  c = check(transfer_model(), tmp_path=tmp_path)
  assert c.report.applications == {"mobilenetv2_0.35_96": "mobilenetv2"}
  calls = re.findall(r"models\.create\((.*?)module_name", c.source, re.S)
  assert len(calls) == 1 and "'mobilenetv2'" in calls[0], calls
  assert "alpha=0.35" in calls[0] and "include_top=False" in calls[0]
  assert max(len(l) for l in c.source.splitlines()) <= 90
  assert imported_roots(c.source) <= {"numpy", "jax", "flax", "models"}
  # A few dozen lines a person reads, not the backbone inlined.
  assert len(c.source.splitlines()) < 60


@pytest.mark.slow
def test_transfer_learning_flattened_into_one_graph(tmp_path):
  c = check(transfer_model(flat=True), tmp_path=tmp_path)
  assert c.report.applications == {}
  assert "DepthwiseConv" in c.source or "feature_group_count" in c.source


def _cnn(package=keras) -> keras.Model:
  layers = package.layers
  inputs = package.Input((20, 18, 3))
  x = layers.Conv2D(6, (3, 2), padding="same", activation="relu")(inputs)
  x = layers.BatchNormalization()(x)
  x = layers.MaxPooling2D()(x)
  x = layers.Conv2D(8, 3, strides=2, padding="same")(x)
  x = layers.BatchNormalization(center=False)(x)
  x = layers.Activation("gelu")(x)
  x = layers.Flatten()(x)
  return package.Model(inputs, layers.Dense(4, activation="softmax")(x))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_cnn_from_keras3_files(tmp_path, suffix):
  model = _cnn()
  random_weights.randomize(model, 3)
  path = str(tmp_path / f"cnn{suffix}")
  model.save(path)
  module, variables, report = translate.from_keras(path)
  x = random_inputs(model, 4)[0]
  assert_close(module.apply(variables, x), model(x, training=False))
  assert report.input_specs == [((20, 18, 3), "float32")]


def test_cnn_from_a_tf_keras_h5(tmp_path):
  model = _cnn(tf_keras)
  random_weights.randomize(model, 5)
  path = str(tmp_path / "cnn_tf_keras.h5")
  model.save(path)
  module, variables, _ = translate.from_keras(path)
  x = random_inputs(model, 6)[0]
  assert_close(module.apply(variables, x), model(x, training=False))
  # The tf-keras model object itself, in training mode too.
  check(model, [x], randomize=False, train=True)


def test_batchnorm_model_in_training_mode():
  inputs = keras.Input((9, 7, 4))
  x = keras.layers.Conv2D(5, 3)(inputs)
  x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2)(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.BatchNormalization(scale=False)(x)
  out = keras.layers.GlobalMaxPooling2D()(x)
  check(keras.Model(inputs, out), train=True)


def test_multi_input_multi_output_with_a_shared_layer(tmp_path):
  a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
  shared = keras.layers.Dense(4, activation="tanh", name="shared")
  ha, hb = shared(a), shared(b)
  merged = keras.layers.Concatenate()([ha, hb])
  out1 = keras.layers.Dense(2, name="out1")(merged)
  out2 = keras.layers.Subtract()([ha, hb])
  model = keras.Model([a, b], [out1, out2])
  c = check(model, tmp_path=tmp_path)
  assert len(c.outputs) == 2
  # One submodule for the shared layer, one set of weights, two calls.
  assert set(c.variables["params"]) == {"shared", "out1"}
  assert c.source.count("name='shared'") == 1
  assert "shared_layer(a)" in c.source and "shared_layer(b)" in c.source


def test_inputs_in_model_inputs_order_and_int_inputs_stay_int():
  ids = keras.Input((5,), dtype="int32", name="ids")
  feats = keras.Input((3,), name="feats")
  emb = keras.layers.Embedding(11, 4)(ids)
  pooled = keras.layers.GlobalAveragePooling1D()(emb)
  out = keras.layers.Concatenate()([keras.layers.Dense(2)(feats), pooled])
  model = keras.Model([feats, ids], out)  # feats first
  c = check(model, random_inputs(model, 0, high=11))
  assert c.report.input_specs == [((3,), "float32"), ((5,), "int32")]


def test_nested_functional_model_keeps_its_prefix():
  inner_in = keras.Input((4,))
  inner = keras.Model(inner_in, keras.layers.Dense(3, name="d")(inner_in),
                      name="block")
  x = keras.Input((4,))
  out = keras.layers.Dense(2, name="d")(inner(x))  # the same name outside
  c = check(keras.Model(x, out))
  assert set(c.variables["params"]) == {"block", "d"}
  assert set(c.variables["params"]["block"]) == {"d"}


def test_lambda_is_refused_by_name():
  x = keras.Input((3,))
  y = keras.layers.Lambda(lambda t: t * 2, name="double")(x)
  with pytest.raises(UnsupportedLayerError, match="'double' is a Lambda"):
    translate.from_keras(keras.Model(x, y))


def test_subclassed_model_is_refused():
  class Net(keras.Model):

    def __init__(self):
      super().__init__()
      self.d = keras.layers.Dense(2)

    def call(self, x):
      return self.d(x)

  net = Net()
  net(np.zeros((1, 3), np.float32))
  with pytest.raises(GraphError, match="subclassed"):
    translate.from_keras(net)


def test_unknown_layer_class_is_refused_with_the_way_out():
  class Twice(keras.layers.Layer):

    def call(self, x):
      return x * 2

  x = keras.Input((3,))
  with pytest.raises(UnsupportedLayerError,
                     match=r"'twice' \(Twice\).*register_layer"):
    translate.from_keras(keras.Model(x, Twice(name="twice")(x)))


def test_masking_is_refused():
  ids = keras.Input((4,), dtype="int32")
  x = keras.layers.Embedding(10, 3, mask_zero=True)(ids)
  out = keras.layers.GlobalAveragePooling1D()(x)
  with pytest.raises(UnsupportedLayerError, match="mask"):
    translate.from_keras(keras.Model(ids, out))


@pytest.mark.slow  # README tier: docs/own-model.md registers a layer
def test_custom_layer_example_registers_and_matches():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples",
                                                      "custom_layer.py")],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "before register_layer: Keras layer 'scaled_softplus' " \
         "(ScaledSoftplus) has no Flax translation" in proc.stdout
  diff = float(proc.stdout.split("max |Flax - Keras| = ")[1].split()[0])
  assert diff < 1e-5
  assert "from my_layers import FlaxScaledSoftplus" in proc.stdout


def test_register_layer_refuses_a_taken_class_and_bad_factories():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="already has a translation"):
    translate.register_layer("Dense", nn.Dense, {})
  with pytest.raises(ValueError, match="linen.Module subclass"):
    translate.register_layer("NotALayer", lambda: None, {})


def test_back_to_keras_round_trip_is_bit_exact():
  model = _cnn()
  random_weights.randomize(model, 7)
  _, variables, _ = translate.from_keras(model)
  tuned = jax.tree_util.tree_map(lambda v: np.asarray(v) * 1.25 + 0.5,
                                 variables)
  back = translate.to_keras(model, tuned)
  assert back is model
  _, again, _ = translate.from_keras(model)
  flat = jax.tree_util.tree_leaves_with_path(tuned)
  assert len(flat) == len(jax.tree_util.tree_leaves(again)) == 13
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_tflite_export_of_a_translated_graph():
  model = _cnn()
  random_weights.randomize(model, 8)
  module, variables, report = translate.from_keras(model)
  specs = [((1, *s), np.dtype(d)) for s, d in report.input_specs]
  flatbuffer = translate.export_tflite(module.apply, variables, specs)
  ops = translate.tflite_ops(flatbuffer)
  assert not [o for o in ops if o.startswith("CUSTOM") or o == "FLEX"], ops
  x = random_inputs(model, 9, batch=1)[0]
  (out,) = translate.run_tflite(flatbuffer, x)
  assert_close(out, model(x, training=False))


def test_conv1d_text_model(tmp_path):
  """keras.io's text classifier: ids -> Embedding -> Conv1D blocks ->
  global max pool -> Dense, int ids below the vocabulary size."""
  ids = keras.Input((20,), dtype="int32")
  x = keras.layers.Embedding(50, 8)(ids)
  x = keras.layers.Conv1D(6, 5, strides=2, padding="same",
                          activation="relu")(x)
  x = keras.layers.MaxPooling1D(2)(x)
  x = keras.layers.Conv1D(7, 3, activation="relu")(x)
  x = keras.layers.GlobalMaxPooling1D()(x)
  x = keras.layers.Dropout(0.3)(x)
  model = keras.Model(ids, keras.layers.Dense(3, activation="sigmoid")(x))
  random_weights.randomize(model, 4)
  check(model, random_inputs(model, 5, high=50), randomize=False,
        tmp_path=tmp_path)


def _bn_cnn(rank: int) -> keras.Model:
  conv = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[rank]
  x = inputs = keras.Input((9,) * rank + (3,))
  x = conv(5, 3, use_bias=False)(x)
  x = keras.layers.BatchNormalization(epsilon=1e-2)(x)
  x = keras.layers.ReLU()(x)
  x = conv(4, 1, padding="same")(x)
  x = keras.layers.BatchNormalization()(x)
  pool = {1: keras.layers.GlobalAveragePooling1D,
          2: keras.layers.GlobalAveragePooling2D}[rank]
  return keras.Model(inputs, keras.layers.Dense(2)(pool()(x)))


@pytest.mark.parametrize("rank", [1, 2])
def test_fold_batchnorm_and_the_inference_form_of_a_translation(rank):
  import models  # pylint: disable=g-import-not-at-top
  model = _bn_cnn(rank)
  random_weights.randomize(model, 6)
  module, variables, _ = translate.from_keras(model)
  folded = translate.fold_batchnorm(variables, module, (9,) * rank + (3,))
  # Both BatchNorms fold (their epsilons differ: a fold with the default
  # epsilon misses the first); only the convolutions' kernels and biases
  # and the Dense remain.
  assert "batch_stats" not in folded or not jax.tree_util.tree_leaves(
      folded["batch_stats"])
  assert len(jax.tree_util.tree_leaves(folded)) == 6
  x = random_inputs(model, 7, batch=3)[0]
  assert_close(models.Inference(module).apply(folded, x),
               model(x, training=False))
