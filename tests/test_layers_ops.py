"""``keras.ops`` operations in Keras 3 functional graphs, one case per
registered operation, through ``translate.from_keras`` against Keras
(``graph_check.check``, the emitted source run from a file for a few);
int inputs that Keras keeps int stay int; a multi-input, multi-output
model with a shared layer."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
from keras import ops

from translate.from_keras import from_keras
from translate.graph import read_graph
from translate.keras_io import UnsupportedLayerError
from translate.layer_table import TABLE, supported_classes

from graph_check import check  # pylint: disable=g-bad-import-order

# Inputs (without batch): x and y (3, 4) floats, m (4, 5), ids (3,) int32.
SPECS = {"x": ((3, 4), "float32"), "y": ((3, 4), "float32"),
         "m": ((4, 5), "float32"), "ids": ((3,), "int32")}

# op class: (function of the named inputs, its inputs). Each case must
# produce its class in the graph (checked).
CASES = {
    "Add": (lambda x: ops.add(x, 1.5), "x"),
    "Subtract": (lambda x, y: 2.0 - x - y, "xy"),
    "Multiply": (lambda x, y: ops.multiply(x, y), "xy"),
    "Divide": (lambda x, y: ops.divide(x, ops.exp(y)), "xy"),
    "TrueDivide": (lambda x: x / 4.0, "x"),
    "Power": (lambda x: ops.power(x, 3), "x"),
    "Maximum": (lambda x, y: ops.maximum(x, y), "xy"),
    "Minimum": (lambda x: ops.minimum(x, 0.25), "x"),
    "Matmul": (lambda x, m: ops.matmul(x, m), "xm"),
    "FloorDivide": (lambda x: x // 0.5, "x"),
    "Mod": (lambda x: x % 0.7, "x"),
    "Greater": (lambda x, y: ops.cast(x > y, "float32"), "xy"),
    "GreaterEqual": (lambda x: ops.cast(x >= 0.1, "float32"), "x"),
    "Less": (lambda x, y: ops.cast(x < y, "float32"), "xy"),
    "LessEqual": (lambda x: ops.cast(x <= 0.1, "float32"), "x"),
    "Equal": (lambda ids: ops.cast(ops.equal(ids, 3), "int32"), "i"),
    "NotEqual": (lambda ids: ops.cast(ops.not_equal(ids, 3), "int32"), "i"),
    "LogicalAnd": (lambda x, y: ops.cast(ops.logical_and(x > 0, y > 0),
                                         "float32"), "xy"),
    "LogicalOr": (lambda x, y: ops.cast(ops.logical_or(x > 0, y > 0),
                                        "float32"), "xy"),
    "LogicalNot": (lambda x: ops.cast(ops.logical_not(x > 0), "float32"),
                   "x"),
    "Absolute": (lambda x: ops.abs(x), "x"),
    "Exp": (lambda x: ops.exp(x), "x"),
    "Log": (lambda x: ops.log(ops.square(x) + 0.5), "x"),
    "Sqrt": (lambda x: ops.sqrt(ops.square(x) + 0.5), "x"),
    "Square": (lambda x: ops.square(x), "x"),
    "Negative": (lambda x: -x, "x"),
    "Rsqrt": (lambda x: ops.rsqrt(ops.square(x) + 0.5), "x"),
    "Reciprocal": (lambda x: ops.reciprocal(ops.square(x) + 0.5), "x"),
    "Sin": (lambda x: ops.sin(x), "x"),
    "Cos": (lambda x: ops.cos(x), "x"),
    "Floor": (lambda x: ops.floor(x * 3.0), "x"),
    "Sign": (lambda x: ops.sign(x), "x"),
    "Erf": (lambda x: ops.erf(x), "x"),
    "Tanh": (lambda x: ops.tanh(x), "x"),
    "Relu": (lambda x: ops.relu(x), "x"),
    "Relu6": (lambda x: ops.relu6(x * 4.0), "x"),
    "Sigmoid": (lambda x: ops.sigmoid(x), "x"),
    "Silu": (lambda x: ops.silu(x), "x"),
    "Softplus": (lambda x: ops.softplus(x), "x"),
    "Gelu": (lambda x: ops.gelu(x), "x"),  # approximate=True by default
    "LeakyRelu": (lambda x: ops.leaky_relu(x, negative_slope=0.1), "x"),
    "Softmax": (lambda x: ops.softmax(x, axis=1), "x"),
    "LogSoftmax": (lambda x: ops.log_softmax(x), "x"),
    "Cast": (lambda x: ops.cast(x * 3.0, "int32"), "x"),
    "Clip": (lambda x: ops.clip(x, -0.5, 0.75), "x"),
    "Where": (lambda x, y: ops.where(x > 0, x, y), "xy"),
    "OnesLike": (lambda x: ops.ones_like(x) + x, "x"),
    "ZerosLike": (lambda ids: ops.zeros_like(ids, dtype="float32"), "i"),
    "Cumsum": (lambda x: ops.cumsum(x, axis=1), "x"),
    "Mean": (lambda x: ops.mean(x, axis=1), "x"),
    "Sum": (lambda x: ops.sum(x, axis=(1, 2), keepdims=True), "x"),
    "Max": (lambda x: ops.max(x, axis=-1), "x"),
    "Min": (lambda x: ops.min(x, axis=1, keepdims=True, initial=0.0), "x"),
    "Any": (lambda x: ops.cast(ops.any(x > 1.0, axis=1), "int32"), "x"),
    "All": (lambda x: ops.cast(ops.all(x > -1.0, axis=2), "int32"), "x"),
    "Var": (lambda x: ops.var(x, axis=1), "x"),
    "Std": (lambda x: ops.std(x, axis=-1, keepdims=True), "x"),
    "Argmax": (lambda x: ops.argmax(x, axis=-1), "x"),
    "Argmin": (lambda x: ops.argmin(x, axis=1), "x"),
    "GetItem": (lambda x: x[:, 1:, ::2], "x"),
    "ExpandDims": (lambda x: ops.expand_dims(x, 2), "x"),
    "Squeeze": (lambda x: ops.squeeze(ops.expand_dims(x, 1), axis=1), "x"),
    "Reshape": (lambda x: ops.reshape(x, (-1, 2, 6)), "x"),
    "Transpose": (lambda x: ops.transpose(x, (0, 2, 1)), "x"),
    "Moveaxis": (lambda x: ops.moveaxis(x, 1, 2), "x"),
    "Flip": (lambda x: ops.flip(x, axis=2), "x"),
    "Repeat": (lambda x: ops.repeat(x, 2, axis=1), "x"),
    "Tile": (lambda x: ops.tile(x, (1, 2, 3)), "x"),
    "Stack": (lambda x, y: ops.stack([x, y], axis=1), "xy"),
    "Concatenate": (lambda x, y: ops.concatenate([x, y], axis=-1), "xy"),
    "Split": (lambda x: ops.split(x, 2, axis=-1)[1], "x"),
    "Einsum": (lambda x, m: ops.einsum("btc,bcd->bdt", x, m), "xm"),
    "OneHot": (lambda ids: ops.one_hot(ids, 5), "i"),
}

FULL_CHECKS = ("Add", "GetItem", "Einsum", "Split", "Cast")  # also from a file
_INPUT = {"x": "x", "y": "y", "m": "m", "i": "ids"}


def _model(cls):
  fn, names = CASES[cls]
  inputs = [keras.Input(SPECS[_INPUT[n]][0], dtype=SPECS[_INPUT[n]][1],
                        name=_INPUT[n]) for n in names]
  return keras.Model(inputs if len(inputs) > 1 else inputs[0], fn(*inputs))


def test_every_op_of_the_ops_group_has_a_case():
  ours = {k[len("ops."):] for k, t in TABLE.items()
          if t.call.__module__ == "translate.layer_table.ops"}
  assert ours == set(CASES)
  assert ours <= set(supported_classes()["ops"])


@pytest.mark.parametrize("cls", list(CASES))
def test_op(cls, tmp_path):
  model = _model(cls)
  assert cls in {c.cls for c in read_graph(model).calls}
  rng = np.random.default_rng(0)
  inputs = [rng.integers(0, 5, (2, *t.shape[1:])).astype("int32")
            if "int" in str(t.dtype) else
            rng.normal(0, 1, (2, *t.shape[1:])).astype("float32")
            for t in model.inputs]
  c = check(model, inputs, tmp_path=tmp_path if cls in FULL_CHECKS else None)
  want = np.asarray(model(inputs if len(inputs) > 1 else inputs[0]))
  assert c.outputs[0].dtype == want.dtype, (c.outputs[0].dtype, want.dtype)


def test_gelu_exact_from_config():
  x = keras.Input((3, 4))
  c = check(keras.Model(x, ops.gelu(x, approximate=False)))
  assert "approximate=False" in c.source


@pytest.mark.parametrize("key", [
    lambda x: x[:, 0], lambda x: x[..., -1], lambda x: x[:, None, 1:3],
    lambda x: x[:, ::-1], lambda x: x[1:, :], lambda x: x[:, 2, 1::2]])
def test_get_item_keys(key):
  x = keras.Input((3, 4))
  check(keras.Model(x, key(x)))


def test_int_inputs_stay_int(tmp_path):
  """Token ids through integer ops stay int32 (as in Keras), into an
  Embedding, and ops that Keras makes float are float."""
  ids = keras.Input((5,), dtype="int32", name="ids")
  shifted = ops.add(ids, 1)
  positions = ops.cumsum(ops.ones_like(ids), axis=1) - 1
  emb = keras.layers.Embedding(8, 3)(ops.minimum(shifted, 7))
  pos = keras.layers.Embedding(5, 3)(positions)
  model = keras.Model(ids, [shifted, positions, emb + pos, ops.mean(ids)])
  tokens = np.random.default_rng(2).integers(0, 8, (2, 5)).astype("int32")
  c = check(model, [tokens], tmp_path=tmp_path)
  assert c.report.input_specs == [((5,), "int32")]
  dtypes = [o.dtype for o in c.outputs]
  assert dtypes == [np.int32, np.int32, np.float32, np.float32], dtypes
  np.testing.assert_array_equal(c.outputs[0], c.keras_outputs[0])


def test_multi_input_multi_output_with_shared_dense(tmp_path):
  a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
  shared = keras.layers.Dense(4, activation="tanh", name="shared")
  ha, hb = shared(a), shared(b)
  joined = ops.concatenate([ha, hb], axis=-1)
  out1 = keras.layers.Dense(3, name="left")(joined)
  out2 = ops.sum(ha * hb, axis=-1, keepdims=True)
  c = check(keras.Model([a, b], [out1, out2, ha]), tmp_path=tmp_path)
  assert "# shared: 2 calls" in c.source
  assert len(c.outputs) == 3


def test_large_constant_argument_is_refused():
  x = keras.Input((100, 50))
  model = keras.Model(x, ops.add(x, ops.ones((100, 50))))
  with pytest.raises(UnsupportedLayerError, match=r"\(Add\): a constant"):
    from_keras(model)

