"""Our TFLite export of an LSTM model against Keras' own fused-LSTM file.

  python benchmarks/rnn_tflite.py [--units 128] [--seq_len 32]
                                  [--vocab 1000] [--embed 64]
                                  [--threads 1,2] [--rounds 5] [--reps 50]
                                  [--schedule blocks] [--keras keras]

The model: Embedding -> LSTM(return_sequences) -> LSTM -> Dense, Keras (3 or
tf-keras) with randomized weights, translated into ``models.recurrent``
modules. Contestants, all run in the LiteRT interpreter (its default
XNNPACK delegate, the same for every file) at batch 1:

- ``keras``: ``tf.lite.TFLiteConverter.from_keras_model`` (Keras 3's
  ``model.export(format="litert")`` if that refuses); tf-keras' file fuses
  each LSTM into one ``UNIDIRECTIONAL_SEQUENCE_LSTM`` op;
- ``ours``: ``translate.export_tflite`` of the Flax model as it is written
  (``unroll=None``: the export's choice, ``models.recurrent.export_unroll``);
- ``ours loop`` / ``ours unrolled``: the same with ``unroll=False`` (one
  ``WHILE`` loop per layer) / ``unroll=True`` (every step in straight-line
  builtin ops);
- ``fused contract + jax2tf`` / ``+ TF ops``: the stretch, see
  ``fused_contract_tflite``: our weights through tf-keras' LSTM
  ``api_implements`` function, the rest jax2tf (no fused op comes out with
  TF 2.21: a graph holding an ``XlaCallModule`` is converted without the
  composite-function fusion) or plain TF (fused).

Timing (``--schedule blocks``, the default): ``--rounds`` rounds; in each,
every file in turn (the order rotating) runs 5 warm-up invocations and then
``--reps`` timed ones, and the block's median is kept; a file's latency is
the median of its blocks. ``--schedule invokes`` interleaves single
invocations of all the files instead, as this script did before: with the
machine's cores shared, each interpreter's XNNPACK thread pool then starts
cold behind the others' and the files made of many small ops (ours) lose
up to several times their latency, Keras' one-op-per-layer file little.

Prints op counts, sizes, latencies per thread count, ratios ours / Keras'
(lower is better), every file's max |Δ| against Flax and the load average.
No assertions: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.tflite_vs_keras import keras_tflite


def build(package, args):
  """The Keras model, explicitly named layers."""
  k = package
  ids = k.Input((args.seq_len,), dtype="int32", batch_size=1)
  x = k.layers.Embedding(args.vocab, args.embed, name="embedding")(ids)
  x = k.layers.LSTM(args.units, return_sequences=True, name="lstm")(x)
  x = k.layers.LSTM(args.units, name="lstm_1")(x)
  return k.Model(ids, k.layers.Dense(10, name="dense")(x))


def flax_model(args, unroll: bool | None):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from models import recurrent as R  # pylint: disable=g-import-not-at-top

  class Model(nn.Module):

    @nn.compact
    def __call__(self, ids):
      x = R.Embedding(args.vocab, args.embed, name="embedding")(ids)
      x = R.LSTM(args.units, return_sequences=True, unroll=unroll,
                 name="lstm")(x)
      x = R.LSTM(args.units, unroll=unroll, name="lstm_1")(x)
      return nn.Dense(10, name="dense")(x)

  return Model()


def fused_contract_tflite(args, variables, jax_parts: bool) -> bytes:
  """The stretch: our translated weights through the Keras LSTM
  ``api_implements`` contract (the seed guide's option 1).

  Each LSTM is tf-keras' own ``tf.function`` carrying the contract
  (``api_implements="lstm_<uuid>"``, ``time_major``, ``go_backwards``;
  arguments ``inputs, init_h, init_c, kernel, recurrent_kernel, bias``),
  fed our variables as constants. The embedding and the dense head are
  jax2tf-converted JAX (``jax_parts=True``: what ``export_tflite`` would
  have to produce) or plain TF ops (``jax_parts=False``).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from tf_keras.src.layers.rnn import gru_lstm_utils  # pylint: disable=g-import-not-at-top

  from models.backend import quiet_native_stderr  # pylint: disable=g-import-not-at-top

  p = {k: {n: np.asarray(a) for n, a in v.items()}
       for k, v in variables["params"].items()}
  if jax_parts:
    convert = lambda f: jax2tf.convert(
        f, with_gradient=False, native_serialization_platforms=("cpu",))
    embed = convert(lambda t, i: jnp.take(t, i, axis=0))
    dense = convert(lambda k, b, x: x @ k + b)
  else:
    embed = tf.gather
    dense = lambda k, b, x: tf.matmul(x, k) + b

  # Created outside the traced function, as a Keras layer does: a
  # tf.function made while tracing is inlined and loses its attributes.
  lstms = {name: gru_lstm_utils.DefunWrapper(False, False, "lstm").defun_layer
           for name in ("lstm", "lstm_1")}

  @tf.function(input_signature=[tf.TensorSpec((1, args.seq_len), tf.int32)],
               autograph=False)
  def serve(ids):
    x = embed(tf.constant(p["embedding"]["embeddings"]), ids)
    for name, sequences in (("lstm", True), ("lstm_1", False)):
      w, zeros = p[name], tf.zeros((1, args.units))
      _, outputs, _, _, _ = lstms[name](
          inputs=x, init_h=zeros, init_c=zeros,
          kernel=tf.constant(w["kernel"]),
          recurrent_kernel=tf.constant(w["recurrent_kernel"]),
          bias=tf.constant(w["bias"]), mask=None, time_major=False,
          go_backwards=False, sequence_lengths=None,
          zero_output_for_mask=False, return_sequences=True)
      x = outputs if sequences else outputs[:, -1]
    return dense(tf.constant(p["dense"]["kernel"]),
                 tf.constant(p["dense"]["bias"]), x)

  with quiet_native_stderr():
    # With a trackable object the converter keeps the functions (and their
    # attributes) instead of freezing them inline.
    holder = tf.Module()
    holder.serve = serve
    return tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], holder).convert()


def _timings(interps, ids, rounds: int, reps: int,
             schedule: str) -> dict[str, float]:
  """Median latency (s) of each interpreter; see the module docstring."""
  inputs = {k: i.get_input_details()[0]["index"] for k, i in interps.items()}

  def once(k):
    start = time.perf_counter()
    interps[k].set_tensor(inputs[k], ids)
    interps[k].invoke()
    return time.perf_counter() - start

  keys = list(interps)
  if schedule == "invokes":
    times = {k: [] for k in keys}
    for _ in range(3):
      for k in keys:
        once(k)
    for _ in range(rounds * reps):
      for k in keys:
        times[k].append(once(k))
    return {k: statistics.median(v) for k, v in times.items()}
  blocks = {k: [] for k in keys}
  for r in range(rounds):
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
      for _ in range(5):
        once(k)
      blocks[k].append(statistics.median(once(k) for _ in range(reps)))
  return {k: statistics.median(v) for k, v in blocks.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--units", type=int, default=128)
  parser.add_argument("--seq_len", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=1000)
  parser.add_argument("--embed", type=int, default=64)
  parser.add_argument("--threads", default="1,2",
                      help="comma-separated thread counts")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--reps", type=int, default=50)
  parser.add_argument("--schedule", choices=("blocks", "invokes"),
                      default="blocks")
  parser.add_argument("--keras", choices=("keras", "tf_keras"),
                      default="keras")
  parser.add_argument("--no_contract", action="store_true",
                      help="skip the fused-contract files")
  args = parser.parse_args()
  import importlib  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  import translate  # pylint: disable=g-import-not-at-top
  from models import backend, recurrent  # pylint: disable=g-import-not-at-top
  from translate import export, random_weights  # pylint: disable=g-import-not-at-top

  backend.ensure_backend()
  package = importlib.import_module(args.keras)
  keras_model = build(package, args)
  random_weights.randomize(keras_model, seed=0)
  ids = np.random.default_rng(1).integers(
      0, args.vocab, (1, args.seq_len)).astype(np.int32)
  spec = [((1, args.seq_len), np.int32)]

  files, export_s = {}, {}
  start = time.perf_counter()
  files["keras"] = keras_tflite(keras_model)
  export_s["keras"] = time.perf_counter() - start
  ref = variables = None
  for key, unroll in (("ours", None), ("ours loop", False),
                      ("ours unrolled", True)):
    module = flax_model(args, unroll)
    variables, _ = translate.translate(module, keras_model, (args.seq_len,),
                                       dtype="int32")
    if ref is None:
      ref = np.asarray(module.apply(variables, ids))
    start = time.perf_counter()
    files[key] = export.export_tflite(module.apply, variables, spec)
    export_s[key] = time.perf_counter() - start
  contracts = () if args.no_contract else (
      ("fused contract + jax2tf", True), ("fused contract + TF ops", False))
  for key, jax_parts in contracts:
    start = time.perf_counter()
    files[key] = fused_contract_tflite(args, variables, jax_parts)
    export_s[key] = time.perf_counter() - start

  kernel_bytes = args.units * 4 * args.units * 4
  steps = recurrent.export_unroll(args.seq_len, kernel_bytes)
  print(f"{args.keras} Embedding({args.vocab}, {args.embed}) -> "
        f"LSTM({args.units}, return_sequences) -> LSTM({args.units}) -> "
        f"Dense(10), sequence length {args.seq_len}; LiteRT (XNNPACK), "
        f"batch 1, schedule {args.schedule}: medians of {args.rounds} "
        f"rounds x {args.reps} runs; ratios are against Keras' file. The "
        f"export's choice (ours): "
        f"{'unrolled' if steps > 1 else 'loop'} ({args.seq_len} steps x "
        f"{kernel_bytes / 2**20:.2f} MiB recurrent kernel).")
  diffs = {}
  for k, f in files.items():
    out = export.run_tflite(export.load_interpreter(f, 1), ids)[0]
    diffs[k] = export.compare(out, ref)["max_abs"]
  latency = {}
  for threads in (int(t) for t in args.threads.split(",")):
    interps = {k: export.load_interpreter(f, threads)
               for k, f in files.items()}
    load = os.getloadavg()[0]
    latency[threads] = _timings(interps, ids, args.rounds, args.reps,
                                args.schedule)
    print(f"{threads} thread(s): load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
    del interps
  cols = " | ".join(f"{t} thr. ms (ratio)" for t in latency)
  print(f"| file | ops | size (KiB) | size ratio | {cols} | "
        "max |Δ| vs Flax | export (s) |")
  print("|---|---|---|---|" + "---|" * len(latency) + "---|---|")
  for k, f in files.items():
    ops = export.tflite_ops(f)
    top = ", ".join(f"{n} {c}" for n, c in ops.most_common(4))
    lat = " | ".join(f"{m[k] * 1e3:.3f} ({m[k] / m['keras']:.2f})"
                     for m in latency.values())
    print(f"| {k} | {sum(ops.values())} ({top}) | {len(f) / 1024:.0f} | "
          f"{len(f) / len(files['keras']):.3f} | {lat} | {diffs[k]:.2g} | "
          f"{export_s[k]:.1f} |")
  print()
  for k, f in files.items():
    ops = export.tflite_ops(f)
    print(f"{k}: {ops['UNIDIRECTIONAL_SEQUENCE_LSTM']} "
          f"UNIDIRECTIONAL_SEQUENCE_LSTM op(s), {ops['WHILE']} WHILE")


if __name__ == "__main__":
  main()
