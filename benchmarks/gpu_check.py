"""GPU check of the inference form and of training, with no TensorFlow
(run on a machine with a GPU and JAX; Keras is not needed).

1. Inference form (``models.create(name, inference=True)`` with
   ``translate.fold_batchnorm`` variables) on the GPU: the program lowered for
   the device keeps one native grouped convolution per depthwise kernel (the
   CPU's shifted multiply-adds and per-image loop must not appear), and its
   logits match the plain port run on the CPU, at float32 "highest" matmul
   precision and at JAX's GPU default (TF32 on Hopper/Ampere).
2. Training: the loss and every parameter gradient of one jitted step in
   float32 on the GPU and on the CPU against the same step in float64 on the
   CPU (``--reference64``, a second process with ``jax_enable_x64``, so no
   float64 constant leaks into the float32 runs). The random networks are
   ill-conditioned (float32 is far off float64 on a few tensors, on the CPU,
   jitted or not), so the bound is the CPU's own float32 error: the GPU's
   worst tensor must be within 2x of the CPU's worst, or 1e-4 of scale.

  python benchmarks/gpu_check.py --out /tmp/g && \
  python benchmarks/gpu_check.py --reference64 --out /tmp/g
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if "--reference64" in sys.argv:
  jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

import models  # noqa: E402
from translate import fold  # noqa: E402

INFERENCE = ["mobilenetv2", "efficientnetb0", "xception", "mobilenetv3small",
             "convnexttiny", "resnet50", "regnetx002", "nasnetmobile"]
TRAINING = {"resnet50": (64, 64, 3), "mobilenetv2": (64, 64, 3)}
TRAIN_BATCH = 32


def _grouped(text: str) -> int:
  return sum(int(g) > 1 for g in re.findall(r"feature_group_count = (\d+)",
                                            text))


def _depthwise(variables) -> int:
  flat = traverse_util.flatten_dict(variables)
  return sum(1 for k, v in flat.items()
             if (k[-1] == "kernel" and v.ndim == 4 and v.shape[-2] == 1
                 and v.shape[-1] > 1) or k[-1] == "depthwise_kernel")


def _variables(module, shape, seed):
  """Random init with BatchNorm statistics moved off (0, 1), on the CPU."""
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    v = jax.jit(module.init)(jax.random.key(seed),
                             jnp.zeros((1, *shape), jnp.float32))
  v = jax.device_get(v)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(v)
  for k, a in flat.items():
    if k[0] == "batch_stats":
      flat[k] = (rng.normal(0, 0.1, a.shape) if k[-1] == "mean"
                 else rng.uniform(0.5, 1.5, a.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def inference_checks():
  gpu, cpu = jax.devices()[0], jax.devices("cpu")[0]
  print(f"device: {gpu.device_kind} ({gpu.platform})")
  worst = 0.0
  for name in INFERENCE:
    t0 = time.time()
    shape = models.resolve_input_shape(name)
    module = models.create(name)
    variables = _variables(module, shape, 0)
    x = np.random.default_rng(1).uniform(-1, 1, (4, *shape)).astype(
        np.float32)
    with jax.default_device(cpu):
      ref = np.asarray(jax.jit(module.apply)(variables, x), np.float64)
    fast = models.create(name, inference=True)
    folded = fold.fold_batchnorm(variables, module, shape)
    fv, xv = jax.device_put((folded, x), gpu)
    text = jax.jit(fast.apply).lower(fv, xv).as_text()
    n_dw = _depthwise(folded)
    if gpu.platform != "cpu":  # a dry run on a CPU has the CPU form
      assert _grouped(text) >= n_dw, (name, _grouped(text), n_dw)
      assert "stablehlo.while" not in text, name  # no per-image CPU loop
    errs = {}
    for precision in ("highest", "default"):
      with jax.default_matmul_precision(precision):
        out = np.asarray(jax.jit(fast.apply)(fv, xv), np.float64)
      errs[precision] = np.abs(out - ref).max() / np.abs(ref).max()
    worst = max(worst, errs["highest"])
    print(f"{name}: {n_dw} depthwise kernels, {_grouped(text)} grouped "
          f"convs on the GPU program; max rel logits vs CPU plain: "
          f"highest {errs['highest']:.1e}, default {errs['default']:.1e} "
          f"({time.time() - t0:.0f} s)", flush=True)
    assert errs["highest"] <= 1e-4, (name, errs)
  print(f"inference: worst max rel (highest precision) {worst:.1e}")


def _train_inputs(name):
  shape = TRAINING[name]
  module = models.create(name, classes=10)
  variables = _variables(module, shape, 2)
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (TRAIN_BATCH, *shape)).astype(np.float32)
  labels = rng.integers(0, 10, TRAIN_BATCH)
  return module, variables, x, labels


def _loss_and_grads(module, variables, x, labels):
  def loss_fn(params):
    logits, _ = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  return float(loss), {"/".join(k): np.asarray(v) for k, v in
                       traverse_util.flatten_dict(jax.device_get(grads)).items()}


RUNS = (("gpu", "highest"), ("gpu", "default"), ("cpu", "highest"))


def training_float32(out):
  for name in TRAINING:
    module, variables, x, labels = _train_inputs(name)
    for platform, precision in RUNS:
      dev = jax.devices()[0] if platform == "gpu" else jax.devices("cpu")[0]
      with jax.default_matmul_precision(precision), jax.default_device(dev):
        loss, grads = _loss_and_grads(
            module, jax.device_put(variables, dev), jax.device_put(x, dev),
            jax.device_put(labels, dev))
      np.savez(os.path.join(out, f"{name}_{platform}_{precision}.npz"),
               loss=loss, **grads)
    print(f"{name}: float32 steps done (loss {loss:.6f})", flush=True)


def training_reference64(out):
  cpu = jax.devices("cpu")[0]
  for name in TRAINING:
    module, variables, x, labels = _train_inputs(name)
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    with jax.default_device(cpu):
      loss64, g64 = _loss_and_grads(module, v64, x.astype(np.float64),
                                    labels)
    # A tensor's error against its own scale, floored at 1e-3 of the
    # model's largest gradient: conv biases before a BatchNorm have a true
    # gradient of zero (float64 gives 1e-17, float32 rounding noise).
    top = max(np.abs(g).max() for g in g64.values())
    scale = {k: max(np.abs(g).max(), 1e-3 * top) for k, g in g64.items()}
    runs = {f"{p}_{q}": np.load(os.path.join(out, f"{name}_{p}_{q}.npz"))
            for p, q in RUNS}
    err = {r: {k: np.abs(f[k] - g).max() / scale[k] for k, g in g64.items()}
           for r, f in runs.items()}
    for r, f in runs.items():
      rel_loss = abs(float(f["loss"]) - loss64) / abs(loss64)
      worst = sorted(((e, k) for k, e in err[r].items()), reverse=True)[:3]
      print(f"{name} float32 {r}: loss rel {rel_loss:.1e}; worst tensors "
            "(max |err| / scale): "
            + ", ".join(f"{k} {e:.1e}" for e, k in worst))
      if r.endswith("highest"):  # TF32 (the GPU default) rounds more
        assert rel_loss <= 1e-5, (name, r, rel_loss)
    # The GPU's float32 gradient is as accurate as the CPU's: the random
    # network is ill-conditioned (float32 itself is far off on a few
    # tensors, jitted or not), and which tensors are worst moves with the
    # order of the sums, so the bound is model-wide: the GPU's worst tensor
    # within 2x of the CPU's worst (or 1e-4 of scale). The per-tensor ratio
    # is printed for information.
    worst_gpu = max(err["gpu_highest"].values())
    worst_cpu = max(err["cpu_highest"].values())
    ratio = sorted(((err["gpu_highest"][k] / max(err["cpu_highest"][k],
                                                  1e-4), k) for k in g64),
                   reverse=True)
    print(f"{name}: worst tensor error GPU {worst_gpu:.1e}, CPU "
          f"{worst_cpu:.1e}; per tensor GPU / CPU error, largest: "
          + ", ".join(f"{k} {r:.2f}" for r, k in ratio[:3]))
    assert worst_gpu <= max(2 * worst_cpu, 1e-4), (name, worst_gpu,
                                                    worst_cpu)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--reference64", action="store_true")
  p.add_argument("--models", default=",".join(INFERENCE),
                 help="inference models (comma-separated)")
  args = p.parse_args()
  INFERENCE[:] = args.models.split(",")
  os.makedirs(args.out, exist_ok=True)
  if args.reference64:
    training_reference64(args.out)
    return
  inference_checks()
  training_float32(args.out)


if __name__ == "__main__":
  main()
