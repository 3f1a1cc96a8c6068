"""One training step (forward, backward, optax update) of the Flax port
against Keras-JAX's, same model, weights, batch and optimizer, both jitted.

Keras' step is ``model.stateless_call(..., training=True)`` under
``jax.value_and_grad`` with the same optax update, which is what Keras'
JAX trainer jits (``keras/src/backend/jax/trainer.py``). A third step is
the Flax one traced under ``models.conv_forms.native_convolutions()``
(XLA's own convolutions, the form a GPU runs), to show what the CPU forms
bring. The steps are device_put first, warmed up, then timed interleaved;
the medians and the ratios (Flax / Keras, lower is better; wall and CPU
time) are printed.

  python benchmarks/train_step.py --model resnet50 --batch 8 --size 160
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import models  # noqa: E402
from models import conv_forms  # noqa: E402
import translate  # noqa: E402
from translate import keras_build  # noqa: E402


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet50")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=160)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--repeats", type=int, default=10)
  a = p.parse_args()

  shape = (a.size, a.size, 3)
  kw = dict(input_shape=shape, classes=a.classes, classifier_activation=None)
  spec = models.get_spec(a.model)
  keras_model = keras_build.build(spec, None, **kw)
  module = models.create(a.model, **kw)
  variables, _ = translate.translate(module, keras_model, shape)
  tx = optax.sgd(1e-3, momentum=0.9)

  def make_flax_step(native):
    @jax.jit
    def flax_step(params, stats, opt, x, y):
      def loss_fn(params):
        # native: XLA's own convolutions, as on GPU (to show what the CPU
        # forms of models.conv_forms bring).
        with (conv_forms.native_convolutions() if native
              else contextlib.nullcontext()):
          # Dropout and drop-connect on, as in Keras' training step.
          logits, new = module.apply({"params": params, "batch_stats": stats},
                                     x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(0)})
        return _loss(logits, y), new["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), stats, opt, loss
    return flax_step

  @jax.jit
  def keras_step(tv, ntv, opt, x, y):
    def loss_fn(tv):
      logits, ntv_new = keras_model.stateless_call(tv, ntv, x, training=True)
      return _loss(logits, y), ntv_new
    (loss, ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
    updates, opt = tx.update(grads, opt, tv)
    return optax.apply_updates(tv, updates), ntv, opt, loss

  rng = np.random.default_rng(0)
  x = jax.device_put(jnp.asarray(rng.normal(size=(a.batch, *shape)),
                                 jnp.float32))
  y = jax.device_put(jnp.asarray(rng.integers(0, a.classes, a.batch)))
  fstate = jax.device_put((variables["params"], variables["batch_stats"]))
  fstate = (*fstate, jax.device_put(tx.init(fstate[0])))
  tv = jax.device_put([v.value for v in keras_model.trainable_variables])
  ntv = jax.device_put([v.value for v in keras_model.non_trainable_variables])
  kstate = (tv, ntv, jax.device_put(tx.init(tv)))

  steps = {"flax": make_flax_step(False), "flax_native": make_flax_step(True)}
  states = {"flax": fstate, "flax_native": fstate, "keras": kstate}
  steps["keras"] = keras_step

  def runner(name):
    def run():
      *states[name], loss = steps[name](*states[name], x, y)
      jax.block_until_ready(loss)
    return run

  runs = {name: runner(name) for name in steps}
  for _ in range(2):  # compile, warm up
    for f in runs.values():
      f()
  times = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for _ in range(a.repeats):
    for name, f in runs.items():
      t, c = time.perf_counter(), time.process_time()
      f()
      times[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  med = {k: statistics.median(v) for k, v in times.items()}
  cmed = {k: statistics.median(v) for k, v in cpu.items()}
  print(f"{a.model} {a.size}x{a.size} batch {a.batch} on "
        f"{jax.devices()[0].device_kind}: flax {med['flax'] * 1e3:.1f} ms, "
        f"flax native convs {med['flax_native'] * 1e3:.1f} ms, "
        f"keras-jax {med['keras'] * 1e3:.1f} ms; ratio flax / keras-jax "
        f"{med['flax'] / med['keras']:.2f} (CPU time "
        f"{cmed['flax'] / cmed['keras']:.2f}), flax native / keras-jax "
        f"{med['flax_native'] / med['keras']:.2f} (CPU time "
        f"{cmed['flax_native'] / cmed['keras']:.2f})")


if __name__ == "__main__":
  main()
