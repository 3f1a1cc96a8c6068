"""MultiHeadAttention, the recurrent layers and their wrappers, Dot, and
whole models of them, through ``translate.from_keras`` against Keras
(``graph_check.check``: randomized weights, the emitted source run from a
file, training mode where it is deterministic).

Shapes are small and unequal (query 6 features, value 7, key 3; 2 heads of
3, value heads of 4) so a swapped or transposed layout fails.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax  # pylint: disable=g-import-not-at-top
import keras
import numpy as np
import pytest
from flax import traverse_util
from keras import ops

from translate import random_weights
from translate.from_keras import from_keras
from translate.keras_io import UnsupportedLayerError
from translate.layer_table import TABLE
from translate.to_keras import to_keras_model

from graph_check import assert_close, check, random_inputs  # pylint: disable=g-bad-import-order

Q, V, K = (5, 6), (4, 7), (4, 3)  # (time, features) of query, value, key


def _qvk():
  return keras.Input(Q), keras.Input(V), keras.Input(K)


# --- MultiHeadAttention ------------------------------------------------------

MHA_CASES = {
    # name: (layer kwargs, call: (mha, q, v, k) -> outputs)
    "query_value": ({}, lambda m, q, v, k: m(q, v)),
    "query_value_key": ({}, lambda m, q, v, k: m(q, v, k)),
    "key_keyword": ({}, lambda m, q, v, k: m(q, v, key=k)),
    "all_keywords": ({}, lambda m, q, v, k: m(query=q, value=v, key=k)),
    "self_attention": ({}, lambda m, q, v, k: m(q, q)),
    "causal": ({}, lambda m, q, v, k: m(q, v, k, use_causal_mask=True)),
    "causal_self": ({}, lambda m, q, v, k: m(q, q, use_causal_mask=True)),
    "value_dim_no_bias": (dict(value_dim=4, use_bias=False),
                          lambda m, q, v, k: m(q, v, k)),
    "output_shape_int": (dict(output_shape=5), lambda m, q, v, k: m(q, v)),
    "output_shape_tuple": (dict(value_dim=4, output_shape=(2, 5)),
                           lambda m, q, v, k: m(q, v, k)),
    "scores": ({}, lambda m, q, v, k: list(
        m(q, v, k, return_attention_scores=True))),
    "gate": (dict(use_gate=True, value_dim=4), lambda m, q, v, k: m(q, v)),
    "sliding_window": (dict(sliding_window=2), lambda m, q, v, k: m(q, q)),
    "sliding_window_causal": (dict(sliding_window=2), lambda m, q, v, k: m(
        q, v, use_causal_mask=True)),
}


# Cases also checked in training mode and through the emitted file (each
# path compiles again: the others keep the file's time down).
FULL_CHECKS = ("query_value_key", "causal", "scores", "gate")


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention(case, tmp_path):
  kwargs, call = MHA_CASES[case]
  q, v, k = _qvk()
  mha = keras.layers.MultiHeadAttention(2, 3, name="mha", **kwargs)
  out = call(mha, q, v, k)
  full = case in FULL_CHECKS
  c = check(keras.Model([q, v, k], out), train=full,
            tmp_path=tmp_path if full else None)
  params = c.variables["params"]["mha"]
  parts = {"query", "key", "value", "attention_output"} | (
      {"gate"} if kwargs.get("use_gate") else set())
  assert set(params) == parts
  for part in parts:  # Keras' shapes, copied
    sub = getattr(mha, {"attention_output": "_output_dense"}.get(
        part, f"_{part}_dense"))
    assert params[part]["kernel"].shape == tuple(sub.kernel.shape)
    assert ("bias" in params[part]) == kwargs.get("use_bias", True)


@pytest.mark.parametrize("axes", [None, (2,), (1, 2)])
def test_multi_head_attention_axes_of_4d_inputs(axes):
  q, v = keras.Input((3, 4, 6)), keras.Input((3, 4, 7))
  mha = keras.layers.MultiHeadAttention(2, 3, attention_axes=axes)
  check(keras.Model([q, v], mha(q, v)))


def test_multi_head_attention_dropout():
  q, v, _ = _qvk()
  model = keras.Model([q, v], keras.layers.MultiHeadAttention(
      2, 3, dropout=0.5)(q, v))
  c = check(model)  # inference: dropout is the identity, as in Keras
  assert "dropout=0.5" in c.source
  xs = random_inputs(model, 1)
  trained = c.module.apply(c.variables, *xs, train=True,
                           rngs={"dropout": jax.random.PRNGKey(0)})
  # Training drops attention probabilities (JAX's random mask, not Keras').
  assert np.all(np.isfinite(trained))
  assert np.max(np.abs(np.asarray(trained) - c.outputs[0])) > 1e-3


def test_multi_head_attention_round_trip_to_keras():
  q, v, k = _qvk()
  model = keras.Model([q, v, k], keras.layers.MultiHeadAttention(
      2, 3, value_dim=4, name="mha")(q, v, k))
  random_weights.randomize(model, 3)
  _, variables, _ = from_keras(model)
  want = [w.numpy() for w in model.weights]
  random_weights.randomize(model, 4)
  to_keras_model(model, variables)
  for w, a in zip(model.weights, want):
    np.testing.assert_array_equal(w.numpy(), a)


def test_multi_head_attention_refuses_attention_mask():
  q, v, _ = _qvk()
  mask = keras.Input((Q[0], V[0]), dtype="bool")
  out = keras.layers.MultiHeadAttention(2, 3, name="mha")(
      q, v, attention_mask=mask)
  with pytest.raises(UnsupportedLayerError,
                     match=r"'mha' \(MultiHeadAttention\): attention_mask"):
    from_keras(keras.Model([q, v, mask], out))


def test_multi_head_attention_refuses_causal_mask_of_4d_inputs():
  q = keras.Input((3, 4, 6))
  out = keras.layers.MultiHeadAttention(2, 3, name="mha")(
      q, q, use_causal_mask=True)
  with pytest.raises(UnsupportedLayerError,
                     match=r"'mha' \(MultiHeadAttention\): use_causal_mask"):
    from_keras(keras.Model(q, out))


# --- LSTM, GRU, SimpleRNN ----------------------------------------------------

RNN_CASES = [
    ("LSTM", {}),
    ("LSTM", dict(return_sequences=True)),
    ("LSTM", dict(return_state=True)),
    ("LSTM", dict(return_sequences=True, return_state=True,
                  go_backwards=True)),
    ("LSTM", dict(activation="relu", recurrent_activation="hard_sigmoid")),
    ("LSTM", dict(use_bias=False, unroll=True)),
    ("GRU", {}),
    ("GRU", dict(reset_after=False)),
    ("GRU", dict(reset_after=False, use_bias=False, return_sequences=True)),
    ("GRU", dict(return_state=True, go_backwards=True)),
    ("GRU", dict(activation="sigmoid", recurrent_activation="tanh",
                 unroll=True)),
    ("SimpleRNN", {}),
    ("SimpleRNN", dict(return_sequences=True, return_state=True,
                       go_backwards=True)),
    ("SimpleRNN", dict(activation="relu", use_bias=False, unroll=True)),
]


@pytest.mark.parametrize("cls,kwargs", RNN_CASES,
                         ids=[f"{c}-{'-'.join(k) or 'default'}"
                              for c, k in RNN_CASES])
def test_recurrent_layer(cls, kwargs, tmp_path):
  x = keras.Input((6, 5))
  out = getattr(keras.layers, cls)(3, **kwargs)(x)
  full = kwargs.get("return_state", False)  # several outputs
  c = check(keras.Model(x, out), train=full,
            tmp_path=tmp_path if full else None)
  if kwargs.get("return_state"):
    assert len(c.outputs) == (3 if cls == "LSTM" else 2)


@pytest.mark.parametrize("cls,keyword", [("LSTM", True), ("GRU", True),
                                         ("SimpleRNN", False)])
def test_recurrent_initial_state(cls, keyword):
  x, h = keras.Input((6, 5)), keras.Input((3,))
  states = [h, keras.layers.Dense(3)(h)] if cls == "LSTM" else [h]
  layer = getattr(keras.layers, cls)(3, return_sequences=True)
  out = layer(x, initial_state=states) if keyword else layer(x, states)
  check(keras.Model([x, h], out))


@pytest.mark.parametrize("kwargs,what", [
    (dict(dropout=0.2), "dropout=0.2"),
    (dict(recurrent_dropout=0.1), "recurrent_dropout=0.1"),
    (dict(activation="elu"), "activation='elu'"),
])
def test_recurrent_refusals(kwargs, what):
  x = keras.Input((6, 5))
  model = keras.Model(x, keras.layers.LSTM(3, name="rnn", **kwargs)(x))
  with pytest.raises(UnsupportedLayerError,
                     match=rf"'rnn' \(LSTM\): {what}"):
    from_keras(model)


def test_mask_zero_is_refused():
  ids = keras.Input((6,), dtype="int32")
  x = keras.layers.Embedding(10, 4, mask_zero=True, name="emb")(ids)
  model = keras.Model(ids, keras.layers.LSTM(3)(x))
  with pytest.raises(UnsupportedLayerError,
                     match=r"'emb' \(Embedding\) has mask_zero=True: "
                     r"masking is not supported"):
    from_keras(model)


def test_masking_layer_is_refused():
  x = keras.Input((6, 5))
  y = keras.layers.Masking(name="masking")(x)
  model = keras.Model(x, keras.layers.GRU(3)(y))
  with pytest.raises(UnsupportedLayerError, match=r"'masking' \(Masking\) "
                     r"masks: masking is not supported"):
    from_keras(model)


# --- Bidirectional -----------------------------------------------------------

BI_CASES = [
    ("LSTM", "concat", {}),
    ("GRU", "sum", dict(return_sequences=True)),
    ("SimpleRNN", "mul", dict(return_sequences=True)),
    ("LSTM", "ave", dict(return_sequences=True)),
    ("GRU", None, dict(return_sequences=True)),
    ("LSTM", "concat", dict(return_state=True)),
    ("GRU", None, dict(return_state=True, reset_after=False)),
]


@pytest.mark.parametrize("cls,merge,kwargs", BI_CASES,
                         ids=[f"{c}-{m}-{'-'.join(k)}"
                              for c, m, k in BI_CASES])
def test_bidirectional(cls, merge, kwargs, tmp_path):
  x = keras.Input((6, 5))
  out = keras.layers.Bidirectional(getattr(keras.layers, cls)(3, **kwargs),
                                   merge_mode=merge, name="bi")(x)
  full = kwargs.get("return_state", False)
  c = check(keras.Model(x, out), train=full,
            tmp_path=tmp_path if full else None)
  assert {k.split("_")[0] for k in c.variables["params"]["bi"]} == {
      "forward", "backward"}


def test_bidirectional_of_named_layer_round_trips_to_keras():
  x = keras.Input((6, 5))
  model = keras.Model(x, keras.layers.Bidirectional(
      keras.layers.LSTM(3, name="enc"), name="bi")(x))
  c = check(model)
  assert set(c.variables["params"]["bi"]) == {"forward_enc", "backward_enc"}
  want = [w.numpy() for w in model.weights]
  random_weights.randomize(model, 9)
  to_keras_model(model, c.variables)
  for w, a in zip(model.weights, want):
    np.testing.assert_array_equal(w.numpy(), a)


def test_bidirectional_refuses_a_different_backward_layer():
  x = keras.Input((6, 5))
  out = keras.layers.Bidirectional(
      keras.layers.LSTM(3, name="f"), name="bi",
      backward_layer=keras.layers.LSTM(3, go_backwards=True,
                                       activation="relu", name="b"))(x)
  with pytest.raises(UnsupportedLayerError, match=r"'bi' \(Bidirectional\)"):
    from_keras(keras.Model(x, out))


# --- TimeDistributed ---------------------------------------------------------

def test_time_distributed_dense(tmp_path):
  x = keras.Input((6, 5))
  out = keras.layers.TimeDistributed(keras.layers.Dense(4, activation="relu"),
                                     name="td")(x)
  check(keras.Model(x, out), train=True, tmp_path=tmp_path)


def test_time_distributed_dense_free_time_axis():
  x = keras.Input((None, 5))
  out = keras.layers.TimeDistributed(keras.layers.Dense(4))(x)
  model = keras.Model(x, out)
  c = check(model)
  longer = random_inputs(model, 2)[0][:, :3]  # another length than traced
  assert_close(c.module.apply(c.variables, longer), model(longer))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_time_distributed_conv2d(data_format, tmp_path):
  shape = (3, 7, 6, 2) if data_format == "channels_last" else (3, 2, 7, 6)
  x = keras.Input(shape)
  conv = keras.layers.Conv2D(4, (3, 2), strides=2, padding="same",
                             data_format=data_format)
  model = keras.Model(x, keras.layers.TimeDistributed(conv)(x))
  check(model, tmp_path=tmp_path)


@pytest.mark.parametrize("inner,what", [
    (keras.layers.Flatten, r"Flatten \(a layer without weights\)"),
    # Keras runs it per time step: per-step batch statistics.
    (keras.layers.BatchNormalization, "BatchNormalization is"),
])
def test_time_distributed_refusals(inner, what):
  x = keras.Input((3, 4, 2))
  out = keras.layers.TimeDistributed(inner(), name="td")(x)
  with pytest.raises(UnsupportedLayerError,
                     match=rf"'td' \(TimeDistributed\): wrapping {what}"):
    from_keras(keras.Model(x, out))


# --- Dot ---------------------------------------------------------------------

DOT_CASES = [
    ((5,), (5,), 1, False),
    ((5,), (5,), -1, True),
    ((4, 5), (3, 5), (2, 2), False),
    ((4, 5), (4, 3), (1, 1), True),
    ((4, 5), (5, 3), (2, 1), False),
    ((5,), (3, 5), (1, 2), False),
    ((4, 5), (5,), (2, 1), True),
    ((2, 4, 5), (3, 5), (3, 2), False),
]


@pytest.mark.parametrize("a,b,axes,normalize", DOT_CASES)
def test_dot(a, b, axes, normalize):
  x, y = keras.Input(a), keras.Input(b)
  out = keras.layers.Dot(axes=axes, normalize=normalize)([x, y])
  check(keras.Model([x, y], out))


# --- Whole models ------------------------------------------------------------

def _layer_norm(name):
  # LayerNormalization's translation is another group's; until it is
  # registered the block is checked without it.
  if "LayerNormalization" in TABLE:
    return keras.layers.LayerNormalization(epsilon=1e-6, name=name)
  return keras.layers.Activation("linear", name=name)


def transformer_classifier(vocab=20, steps=6, dim=8, heads=2, causal=False):
  """Token and position embeddings (positions from keras.ops), one encoder
  block (self-attention, feed-forward, residual Adds, LayerNorm), a
  pooled Dense head."""
  ids = keras.Input((steps,), dtype="int32", name="ids")
  positions = ops.cumsum(ops.ones_like(ids), axis=1) - 1
  x = keras.layers.Embedding(vocab, dim, name="tokens")(ids)
  x = x + keras.layers.Embedding(steps, dim, name="positions")(positions)
  att = keras.layers.MultiHeadAttention(heads, dim // heads, name="mha")(
      x, x, use_causal_mask=causal)
  x = _layer_norm("ln1")(keras.layers.Add()([x, att]))
  ff = keras.layers.Dense(16, activation="gelu", name="ff1")(x)
  ff = keras.layers.Dense(dim, name="ff2")(ff)
  x = _layer_norm("ln2")(keras.layers.Add()([x, ff]))
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(ids, keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_encoder_block(causal, tmp_path):
  """Checked in training mode and through the file once (causal)."""
  model = transformer_classifier(causal=causal)
  ids = np.random.default_rng(0).integers(0, 20, (2, 6)).astype("int32")
  c = check(model, [ids], train=causal, tmp_path=tmp_path if causal else None)
  assert c.report.input_specs == [((6,), "int32")]
  assert set(c.variables["params"]) >= {"tokens", "positions", "mha",
                                        "ff1", "ff2", "head"}


def test_eager_position_embedding_is_a_constant(tmp_path):
  """``Embedding(...)(ops.arange(T))`` runs eagerly (no graph node): its
  output is a constant the graph's Add holds, written into the source."""
  ids = keras.Input((4,), dtype="int32")
  tok = keras.layers.Embedding(10, 3)(ids)
  pos = keras.layers.Embedding(4, 3)(ops.arange(4))
  c = check(keras.Model(ids, tok + pos), tmp_path=tmp_path)
  assert "np.asarray(" in c.source


def test_recurrent_text_classifier(tmp_path):
  ids = keras.Input((7,), dtype="int32")
  x = keras.layers.Embedding(30, 6)(ids)
  x = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))(
      x)
  x = keras.layers.GRU(5)(x)
  model = keras.Model(ids, keras.layers.Dense(2, activation="softmax")(x))
  tokens = np.random.default_rng(1).integers(0, 30, (3, 7)).astype("int32")
  c = check(model, [tokens], train=True, tmp_path=tmp_path)
  assert c.report.input_specs == [((7,), "int32")]
  leaves = traverse_util.flatten_dict(c.variables["params"])
  assert len(leaves) == len(model.weights)


def test_tf_keras_attention_recurrent_and_wrappers():
  import tf_keras  # pylint: disable=g-import-not-at-top
  layers = tf_keras.layers
  q, v = tf_keras.Input(Q), tf_keras.Input(V)
  att = layers.MultiHeadAttention(2, 3, value_dim=4)(q, v,
                                                     use_causal_mask=True)
  seq = layers.Bidirectional(layers.GRU(3, return_sequences=True),
                             merge_mode="sum")(att)
  h, _, state_c = layers.LSTM(4, return_state=True)(seq)
  td = layers.TimeDistributed(layers.Dense(2))(seq)
  dot = layers.Dot(axes=(2, 2))([td, td])
  check(tf_keras.Model([q, v], [h, state_c, dot]))


@pytest.mark.parametrize("equation,output_shape,bias_axes,activation", [
    ("abc,cd->abd", (None, 4), "d", "relu"),
    ("abc,cde->abde", (None, 2, 3), None, None),
    ("ab,bc->ac", 4, "c", "gelu"),
])
def test_einsum_dense(equation, output_shape, bias_axes, activation):
  x = keras.Input((5, 6) if equation.startswith("abc") else (6,))
  y = keras.layers.EinsumDense(equation, output_shape=output_shape,
                               bias_axes=bias_axes, activation=activation,
                               name="ed")(x)
  c = check(keras.Model(x, y))
  assert set(c.variables["params"]["ed"]) == (
      {"kernel", "bias"} if bias_axes else {"kernel"})
