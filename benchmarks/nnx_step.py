"""One jitted training step of a translated model in NNX
(``translate.to_nnx`` + ``nnx.Optimizer``) against the same step in linen
(``module.apply`` with ``mutable=["batch_stats"]`` + optax), same model,
variables, batch and optimizer.

Three steps, timed interleaved after a warm-up, medians printed with the
ratios to linen (lower is better; wall and CPU time):

- linen: ``jax.jit`` of value_and_grad and the optax update, the state
  donated;
- nnx.jit: the NNX step as NNX documents it, ``@nnx.jit`` on
  ``(model, optimizer, x, y)``; each call splits and merges the module
  graph in Python;
- nnx cached: the same step through ``nnx.cached_partial``, which caches
  that graph traversal (NNX's advice for small, fast steps).

  python benchmarks/nnx_step.py --model mobilenetv2 --batch 8 --size 96
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import translate
# pylint: enable=g-import-not-at-top,wrong-import-position


def random_variables(module, shape, seed=0):
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in traverse_util.flatten_dict(shapes).items():
    if k[-1] == "var":
      v = rng.uniform(0.5, 2.0, s.shape)
    elif len(s.shape) > 1:
      v = rng.normal(0, np.sqrt(1 / np.prod(s.shape[:-1])), s.shape)
    else:
      v = rng.normal(0, 0.3, s.shape)
    flat[k] = v.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="mobilenetv2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=96)
  p.add_argument("--repeats", type=int, default=15)
  args = p.parse_args()
  spec = models.get_spec(args.model)
  options = {"alpha": 0.35} if "alpha" in spec.options else {}
  shape = (args.size, args.size, 3)
  module = models.create(args.model, input_shape=shape, classes=10,
                         classifier_activation=None, **options)
  variables = jax.device_put(random_variables(module, shape))
  rng = np.random.default_rng(1)
  x = jax.device_put(rng.normal(size=(args.batch, *shape)).astype(np.float32))
  y = jax.device_put(rng.integers(0, 10, args.batch).astype(np.int32))
  tx = optax.sgd(1e-3, momentum=0.9)

  @jax.jit
  def linen_step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, upd = module.apply({"params": params, "batch_stats": stats}, x,
                                 train=True, mutable=["batch_stats"])
      return _loss(logits, y), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  linen_state = [variables["params"], variables["batch_stats"],
                 tx.init(variables["params"])]

  def run_linen():
    *new, loss = linen_step(*linen_state, x, y)
    linen_state[:] = new
    return loss

  def nnx_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: _loss(m(x, train=True), y))(model)
    opt.update(model, grads)
    return loss

  model = translate.to_nnx(module, variables)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  jitted = nnx.jit(nnx_step)
  model2 = translate.to_nnx(module, variables)
  opt2 = nnx.Optimizer(model2, tx, wrt=nnx.Param)
  cached = nnx.cached_partial(nnx.jit(nnx_step), model2, opt2)

  steps = {"linen": run_linen,
           "nnx.jit": lambda: jitted(model, opt, x, y),
           "nnx cached": lambda: cached(x, y)}
  for fn in steps.values():  # compile and warm up
    for _ in range(2):
      jax.block_until_ready(fn())
  wall = {k: [] for k in steps}
  cpu = {k: [] for k in steps}
  for _ in range(args.repeats):
    for name, fn in steps.items():
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  base_w, base_c = (statistics.median(wall["linen"]),
                    statistics.median(cpu["linen"]))
  print(f"{args.model} batch {args.batch} at {args.size}x{args.size}, "
        f"{args.repeats} interleaved steps each, medians")
  print(f"{'step':<12}{'wall ms':>9}{'cpu ms':>9}{'wall/linen':>12}"
        f"{'cpu/linen':>11}")
  for name in steps:
    w, c = statistics.median(wall[name]), statistics.median(cpu[name])
    print(f"{name:<12}{w * 1e3:>9.1f}{c * 1e3:>9.1f}{w / base_w:>12.3f}"
          f"{c / base_c:>11.3f}")


if __name__ == "__main__":
  main()
