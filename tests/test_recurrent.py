"""models.recurrent against Keras 3 and tf-keras: parity on randomized
weights, every Flax leaf filled once from its Keras weight, Bidirectional's
nested names, masking refused, TFLite export, the README example."""

import os
import runpy
import subprocess
import sys

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest
import tf_keras
from flax import traverse_util

import translate
from models import recurrent as R
from translate import keras_io, random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 7
PACKAGES = [pytest.param(keras, id="keras3"),
            pytest.param(tf_keras, id="tf_keras")]


def _rel(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(out - ref)) / max(1.0, np.max(np.abs(ref))))


def _translate(module, keras_model, shape, dtype="float32", seed=1):
  random_weights.randomize(keras_model, seed)
  variables, report = translate.translate(module, keras_model, shape,
                                          dtype=dtype)
  return variables, report


def _assert_filled_once(variables, keras_model):
  """Every Flax leaf is exactly one Keras weight (the rules are copies) and
  every Keras weight is used once."""
  layers = keras_io.read_weights(keras_model)
  canonical = keras_io.canonical_names(layers)
  keras_arrays = {(canonical[l.name], w): a for l in layers
                  for w, a in l.weights.items()}
  leaves = traverse_util.flatten_dict(variables["params"])
  assert len(leaves) == len(keras_arrays)
  for key, value in leaves.items():
    np.testing.assert_array_equal(
        value, keras_arrays[("/".join(key[:-1]), key[-1])])


def _tokens(batch=3, vocab=50, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, T)).astype(
      np.int32)


def _floats(batch=3, channels=4, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, T, channels)).astype(
      np.float32)


class Stacked(nn.Module):
  """Embedding -> LSTM -> LSTM (return_sequences) -> GRU -> Dense."""

  unroll: bool | int | None = None

  @nn.compact
  def __call__(self, ids):
    u = self.unroll
    x = R.Embedding(50, 8, name="embedding")(ids)
    x = R.LSTM(6, return_sequences=True, unroll=u, name="lstm")(x)
    x = R.LSTM(5, return_sequences=True, unroll=u, name="lstm_1")(x)
    x = R.GRU(4, reset_after=True, unroll=u, name="gru")(x)
    return nn.Dense(3, name="dense")(x)


def _keras_stacked(k):
  ids = k.Input((T,), dtype="int32")
  x = k.layers.Embedding(50, 8, name="embedding")(ids)
  x = k.layers.LSTM(6, return_sequences=True, name="lstm")(x)
  x = k.layers.LSTM(5, return_sequences=True, name="lstm_1")(x)
  x = k.layers.GRU(4, reset_after=True, name="gru")(x)
  return k.Model(ids, k.layers.Dense(3, name="dense")(x))


@pytest.mark.parametrize("k", PACKAGES)
def test_stacked_lstm_gru_dense_on_int_tokens(k):
  keras_model = _keras_stacked(k)
  variables, report = _translate(Stacked(), keras_model, (T,), "int32")
  assert report.match_counts == {"exact": 5}
  _assert_filled_once(variables, keras_model)
  x = _tokens()
  ref = np.asarray(keras_model(x))
  assert np.max(np.abs(ref)) > 0.1  # not a vanishing signal
  assert _rel(Stacked().apply(variables, x), ref) <= 1e-5


def test_names_as_the_model_prints_them_pair_exactly():
  # A user names the Flax modules after model.summary(): an auto-named
  # layer from a shifted session counter (lstm_5) keeps its number.
  for _ in range(3):
    keras.layers.LSTM(2)
  inputs = keras.Input((T, 4))
  layer = keras.layers.LSTM(3)
  keras_model = keras.Model(inputs, layer(inputs))
  assert layer.name != "lstm"

  class Module(nn.Module):

    @nn.compact
    def __call__(self, x):
      return R.LSTM(3, name=layer.name)(x)

  variables, report = _translate(Module(), keras_model, (T, 4))
  assert report.match_counts == {"exact": 1} and report.renamed == 0
  x = _floats()
  assert _rel(Module().apply(variables, x), keras_model(x)) <= 1e-5


def test_float_tracing_of_a_token_model_is_refused():
  # Embedding takes integer ids only: translate traces with its dtype.
  with pytest.raises(TypeError, match="integer token ids"):
    translate.variable_shapes(Stacked(), (T,), "float32")
  with pytest.raises(TypeError, match="integer token ids"):
    translate.translate(Stacked(), _keras_stacked(keras), (T,))
  shapes = translate.variable_shapes(Stacked(), (T,), "int32")
  assert shapes["params"]["embedding"]["embeddings"].shape == (50, 8)


class BiThenSimple(nn.Module):
  merge_mode: str | None = "concat"

  @nn.compact
  def __call__(self, x):
    x = R.Bidirectional(R.LSTM(6, return_sequences=True),
                        merge_mode=self.merge_mode, name="bidirectional")(x)
    return R.SimpleRNN(4, name="simple_rnn")(x)


def _keras_bi_then_simple(k, merge_mode="concat"):
  inputs = k.Input((T, 4))
  # Auto names: Keras' counters make them bidirectional_N/forward_lstm_M.
  x = k.layers.Bidirectional(k.layers.LSTM(6, return_sequences=True),
                             merge_mode=merge_mode)(inputs)
  return k.Model(inputs, k.layers.SimpleRNN(4, name="simple_rnn")(x))


@pytest.mark.parametrize("k", PACKAGES)
def test_bidirectional_lstm_then_simple_rnn(k):
  _keras_bi_then_simple(k)  # shifts the session's name counters
  keras_model = _keras_bi_then_simple(k)
  names = [l.name for l in keras_io.read_weights(keras_model)]
  assert names[0].startswith("bidirectional_") and "/forward_lstm" in names[0]
  variables, report = _translate(BiThenSimple(), keras_model, (T, 4))
  assert set(variables["params"]["bidirectional"]) == {"forward_lstm",
                                                       "backward_lstm"}
  assert report.renamed >= 1
  # Flax's own auto name of the LSTM built in the compact method (LSTM_0)
  # is not taken for a Keras name: forward_lstm pairs exactly.
  assert report.match_counts == {"exact": 3}
  _assert_filled_once(variables, keras_model)
  x = _floats()
  assert _rel(BiThenSimple().apply(variables, x), keras_model(x)) <= 1e-5


@pytest.mark.parametrize("merge_mode", ["sum", "ave", "mul"])
def test_bidirectional_merge_modes(merge_mode):
  keras_model = _keras_bi_then_simple(keras, merge_mode)
  module = BiThenSimple(merge_mode)
  variables, _ = _translate(module, keras_model, (T, 4))
  x = _floats()
  assert _rel(module.apply(variables, x), keras_model(x)) <= 1e-5


def test_bidirectional_return_state_and_no_merge():
  inputs = keras.Input((T, 4))
  outs = keras.layers.Bidirectional(
      keras.layers.GRU(3, return_sequences=True, return_state=True),
      merge_mode=None, name="bi")(inputs)
  keras_model = keras.Model(inputs, list(outs))

  class Module(nn.Module):

    @nn.compact
    def __call__(self, x):
      return R.Bidirectional(R.GRU(3, return_sequences=True,
                                   return_state=True, name="enc"),
                             merge_mode=None, name="bi")(x)

  # The wrapped layer's own name: Keras' forward_gru vs Flax's forward_enc.
  shapes = translate.variable_shapes(Module(), (T, 4))
  assert set(shapes["params"]["bi"]) == {"forward_enc", "backward_enc"}

  class Named(Module):

    @nn.compact
    def __call__(self, x):
      return R.Bidirectional(R.GRU(3, return_sequences=True,
                                   return_state=True),
                             merge_mode=None, name="bi")(x)

  variables, _ = _translate(Named(), keras_model, (T, 4))
  x = _floats()
  ours, theirs = Named().apply(variables, x), keras_model(x)
  assert len(ours) == len(theirs) == 4  # y, y_rev, h_forward, h_backward
  for a, b in zip(ours, theirs):
    assert _rel(a, b) <= 1e-5


class BackwardGRU(nn.Module):

  @nn.compact
  def __call__(self, x):
    return R.GRU(5, reset_after=False, go_backwards=True,
                 return_sequences=True, name="gru")(x)


@pytest.mark.parametrize("k", PACKAGES)
def test_gru_reset_after_false_go_backwards(k):
  inputs = k.Input((T, 4))
  keras_model = k.Model(inputs, k.layers.GRU(
      5, reset_after=False, go_backwards=True, return_sequences=True,
      name="gru")(inputs))
  variables, _ = _translate(BackwardGRU(), keras_model, (T, 4))
  assert variables["params"]["gru"]["bias"].shape == (15,)
  _assert_filled_once(variables, keras_model)
  x = _floats()
  ref = np.asarray(keras_model(x))
  out = np.asarray(BackwardGRU().apply(variables, x))
  assert _rel(out, ref) <= 1e-5
  # The outputs come in reading order (last time step first), as in Keras.
  assert _rel(out[:, ::-1], ref) > 1e-3


def test_gru_variant_mismatch_is_a_merge_error():
  inputs = keras.Input((T, 4))
  keras_model = keras.Model(inputs, keras.layers.GRU(5, name="gru")(inputs))
  with pytest.raises(translate.MergeError, match=r"bias.*\(2, 15\)"):
    _translate(BackwardGRU(), keras_model, (T, 4))


def test_lstm_return_state_and_options_match_keras():
  inputs = keras.Input((T, 4))
  outs = keras.layers.LSTM(
      5, return_state=True, go_backwards=True, use_bias=False,
      activation="relu", recurrent_activation="hard_sigmoid",
      name="lstm")(inputs)
  keras_model = keras.Model(inputs, list(outs))

  class Module(nn.Module):

    @nn.compact
    def __call__(self, x):
      return R.LSTM(5, return_state=True, go_backwards=True, use_bias=False,
                    activation="relu", recurrent_activation="hard_sigmoid",
                    name="lstm")(x)

  variables, _ = _translate(Module(), keras_model, (T, 4))
  assert set(variables["params"]["lstm"]) == {"kernel", "recurrent_kernel"}
  x = _floats()
  ours, theirs = Module().apply(variables, x), keras_model(x)
  assert len(ours) == 3  # output, h, c
  for a, b in zip(ours, theirs):
    assert _rel(a, b) <= 1e-5
  np.testing.assert_array_equal(ours[0], ours[1])  # output is the last h


def test_simple_rnn_sequences_unrolled_match_keras():
  inputs = keras.Input((T, 4))
  keras_model = keras.Model(inputs, keras.layers.SimpleRNN(
      6, return_sequences=True, unroll=True, name="simple_rnn")(inputs))

  class Module(nn.Module):

    @nn.compact
    def __call__(self, x):
      return R.SimpleRNN(6, return_sequences=True, unroll=True,
                         name="simple_rnn")(x)

  variables, _ = _translate(Module(), keras_model, (T, 4))
  x = _floats()
  assert _rel(Module().apply(variables, x), keras_model(x)) <= 1e-5


def _scan_unrolls(module, variables, x):
  """``lax.scan``'s ``unroll`` for every scan ``module.apply`` traces."""
  jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x)
  return [e.params["unroll"] for e in jaxpr.eqns
          if e.primitive.name == "scan"]


@pytest.mark.parametrize("cls,kwargs", [
    # The unroll logic is _RNN's, shared: SimpleRNN, the cheapest, in the
    # README tier.
    (R.SimpleRNN, {}),
    pytest.param(R.LSTM, {}, marks=pytest.mark.slow),
    pytest.param(R.GRU, {}, marks=pytest.mark.slow),
    pytest.param(R.GRU, {"reset_after": False}, marks=pytest.mark.slow)],
                         ids=["simple_rnn", "lstm", "gru", "gru_v1"])
def test_unroll_forms_match_the_loop(cls, kwargs):
  """An int that does not divide T and the export's choice (unroll=None
  inside tflite_export: every step) give the loop's outputs and states,
  every step of them, reading backwards too."""
  x = _floats(2, 3)
  make = lambda u: cls(5, return_sequences=True, return_state=True,
                       go_backwards=True, unroll=u, **kwargs)
  rng = np.random.default_rng(1)  # eval_shape: no compiled init
  variables = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(make(False).init, jax.random.key(0), x))
  ref = make(False).apply(variables, x)
  assert _scan_unrolls(make(None), variables, x) == [1]  # JAX: the loop
  assert _scan_unrolls(make(True), variables, x) == [T]
  assert _scan_unrolls(make(3), variables, x) == [3]
  with R.tflite_export():
    assert _scan_unrolls(make(None), variables, x) == [T]
    assert _scan_unrolls(make(False), variables, x) == [1]
    outs = {None: make(None).apply(variables, x)}
  outs[3] = make(3).apply(variables, x)
  for unroll, out in outs.items():
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
      assert a.shape == b.shape, unroll
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                 err_msg=f"unroll={unroll}")
  with pytest.raises(ValueError, match="unroll"):
    make(0).apply(variables, x)


def test_export_unroll_limits():
  kernel = 32 * 4 * 32 * 4  # LSTM(32): (32, 128) float32
  assert R.export_unroll(32, kernel) == 32
  assert R.export_unroll(32, 16 * kernel) == 1  # LSTM(128) x 32 steps
  budget = R.UNROLL_MAX_BYTES
  assert R.export_unroll(8, budget // 8) == 8
  assert R.export_unroll(8, budget // 8 + 1) == 1
  assert R.export_unroll(R.UNROLL_MAX_STEPS, 4) == R.UNROLL_MAX_STEPS
  assert R.export_unroll(R.UNROLL_MAX_STEPS + 1, 4) == 1


def test_default_initialization_has_keras_shapes_and_forget_bias():
  v = jax.jit(R.LSTM(3).init)(jax.random.key(0), _floats(1, 2))["params"]
  assert v["kernel"].shape == (2, 12) and v["recurrent_kernel"].shape == (
      3, 12)
  np.testing.assert_array_equal(v["bias"], [0] * 3 + [1] * 3 + [0] * 6)
  e = R.Embedding(10, 4).init(jax.random.key(0), _tokens(1, 10))["params"]
  assert e["embeddings"].shape == (10, 4)
  assert -0.05 <= float(e["embeddings"].min()) < float(
      e["embeddings"].max()) <= 0.05


@pytest.mark.parametrize("k", PACKAGES)
def test_mask_zero_is_refused(k):
  ids = k.Input((T,), dtype="int32")
  x = k.layers.Embedding(50, 8, mask_zero=True, name="embedding")(ids)
  keras_model = k.Model(ids, k.layers.LSTM(4, name="lstm")(x))

  class Module(nn.Module):

    @nn.compact
    def __call__(self, ids):
      x = R.Embedding(50, 8, name="embedding")(ids)
      return R.LSTM(4, name="lstm")(x)

  with pytest.raises(keras_io.UnsupportedLayerError,
                     match=r"'embedding'.*mask_zero=True.*not supported"):
    translate.translate(Module(), keras_model, (T,), dtype="int32")
  with pytest.raises(ValueError, match="mask_zero=True"):
    R.Embedding(50, 8, mask_zero=True).init(jax.random.key(0), _tokens())


def test_masking_layer_is_refused():
  inputs = keras.Input((T, 4))
  x = keras.layers.Masking(name="masking")(inputs)
  keras_model = keras.Model(inputs, keras.layers.GRU(3, name="gru")(x))
  with pytest.raises(keras_io.UnsupportedLayerError, match="Masking layer"):
    translate.translate(BackwardGRU(), keras_model, (T, 4))


def test_canonical_names_of_container_parts():
  layers = [
      keras_io.KerasLayer("bidirectional_4/forward_lstm_9", "LSTM", {},
                          ("Bidirectional",)),
      keras_io.KerasLayer("bidirectional_4/backward_lstm_9", "LSTM", {},
                          ("Bidirectional",)),
      keras_io.KerasLayer("bidirectional_7/forward_enc", "GRU", {},
                          ("Bidirectional",)),
      keras_io.KerasLayer("lstm_12", "LSTM", {}),
  ]
  assert keras_io.canonical_names(layers) == {
      "bidirectional_4/forward_lstm_9": "bidirectional/forward_lstm",
      "bidirectional_4/backward_lstm_9": "bidirectional/backward_lstm",
      "bidirectional_7/forward_enc": "bidirectional_1/forward_enc",
      "lstm_12": "lstm",
  }


def test_read_weights_splits_only_containers():
  inputs = keras.Input((T, 4))
  x = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True),
                                 name="bi")(inputs)
  keras_model = keras.Model(inputs, keras.layers.LSTM(2, name="top")(x))
  layers = keras_io.read_weights(keras_model)
  assert [(l.name, l.cls, l.outer, sorted(l.weights)) for l in layers] == [
      ("bi/forward_lstm", "LSTM", ("Bidirectional",),
       ["bias", "kernel", "recurrent_kernel"]),
      ("bi/backward_lstm", "LSTM", ("Bidirectional",),
       ["bias", "kernel", "recurrent_kernel"]),
      ("top", "LSTM", (), ["bias", "kernel", "recurrent_kernel"]),
  ]


def _check_export(module, variables, x, dtype):
  # A fresh function each time: jax2tf caches its trace by function, and
  # the unroll choice is made while tracing.
  flatbuffer = translate.export_tflite(lambda v, x: module.apply(v, x),
                                       variables,
                                       [((1, *x.shape[1:]), dtype)])
  ops = translate.tflite_ops(flatbuffer)
  assert not [op for op in ops if op.startswith("CUSTOM")], ops
  out = np.concatenate([translate.run_tflite(flatbuffer, x[i:i + 1])[0]
                        for i in range(len(x))])
  ref = np.asarray(module.apply(variables, x))
  assert _rel(out, ref) <= 1e-5
  return ops


def test_tflite_export_of_stacked_token_model():
  keras_model = _keras_stacked(keras)
  variables, _ = _translate(Stacked(), keras_model, (T,), "int32")
  ops = _check_export(Stacked(), variables, _tokens(2), np.int32)
  # unroll=None: the export unrolls these short, small layers.
  assert ops["WHILE"] == 0
  assert ops["FULLY_CONNECTED"] >= 3 * (T - 1)  # a recurrent product a step
  assert ops["GATHER"] + ops["GATHER_ND"] == 1  # the embedding lookup


@pytest.mark.slow
def test_tflite_export_keeps_the_loop_when_asked_or_when_large():
  keras_model = _keras_stacked(keras)
  variables, _ = _translate(Stacked(), keras_model, (T,), "int32")
  ops = _check_export(Stacked(unroll=False), variables, _tokens(2), np.int32)
  assert ops["WHILE"] == 3  # one loop per recurrent layer
  # Past export_unroll's size limit the export keeps the loop by itself.
  module = R.LSTM(8, return_sequences=True)
  x = _floats(2, 3)
  variables = module.init(jax.random.key(0), x)
  budget = T * 8 * 4 * 8 * 4  # T times the (8, 32) float32 kernel
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(R, "UNROLL_MAX_BYTES", budget - 1)
    assert _check_export(module, variables, x, np.float32)["WHILE"] == 1
    mp.setattr(R, "UNROLL_MAX_BYTES", budget)
    assert _check_export(module, variables, x, np.float32)["WHILE"] == 0


@pytest.mark.slow
def test_tflite_export_of_bidirectional_and_backward_gru():
  keras_model = _keras_bi_then_simple(keras)
  variables, _ = _translate(BiThenSimple(), keras_model, (T, 4))
  _check_export(BiThenSimple(), variables, _floats(2), np.float32)
  inputs = keras.Input((T, 4))
  keras_model = keras.Model(inputs, keras.layers.GRU(
      5, reset_after=False, go_backwards=True, return_sequences=True,
      name="gru")(inputs))
  variables, _ = _translate(BackwardGRU(), keras_model, (T, 4))
  _check_export(BackwardGRU(), variables, _floats(2), np.float32)


def test_readme_example_runs(capsys):
  runpy.run_path(os.path.join(ROOT, "examples", "byo_keras_model.py"),
                 run_name="__main__")
  out = capsys.readouterr().out
  assert "matched exact                 4" in out
  assert "max |TFLite - Flax|" in out


@pytest.mark.slow
def test_rnn_tflite_benchmark_runs_and_the_fused_contract_fuses():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "rnn_tflite.py"),
       "--units", "8", "--seq_len", "5", "--vocab", "30", "--embed", "4",
       "--rounds", "2", "--reps", "2", "--keras", "tf_keras"],
      capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "| ours | " in out and "| ours unrolled | " in out
  assert "1 thr. ms (ratio) | 2 thr. ms (ratio)" in out
  # Keras' own file and our weights through the api_implements contract
  # (plain TF around it) both get the fused op.
  assert "keras: 2 UNIDIRECTIONAL_SEQUENCE_LSTM" in out
  assert "fused contract + TF ops: 2 UNIDIRECTIONAL_SEQUENCE_LSTM" in out
  # LSTM(8) x 5 steps: the export unrolls, no loop left.
  assert "The export's choice (ours): unrolled" in out
  assert "ours: 0 UNIDIRECTIONAL_SEQUENCE_LSTM op(s), 0 WHILE" in out
  assert "ours loop: 0 UNIDIRECTIONAL_SEQUENCE_LSTM op(s), 2 WHILE" in out
