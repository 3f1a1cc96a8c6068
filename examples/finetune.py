"""Fine-tune a translated Keras backbone in Flax, data-parallel over devices.

The backbone is a registered model translated by ``translate.convert`` with
``include_top=False, pooling="avg"`` (default MobileNetV2, ``alpha=0.35``).
A small Flax module wraps it (``models.create(..., module_name="backbone")``)
and puts a new ``nn.Dense`` head on it; optax trains the whole network.

The data is scikit-learn's ``load_digits``: 1,797 8x8 grey handwritten digits
with real labels (10 classes), shipped inside the scikit-learn wheel. It needs
no download, so the example runs offline and anywhere ``pip install
scikit-learn`` works, yet it is a real labelled task whose held-out accuracy
means something. The images are upsampled (bilinear) to ``--size`` and
repeated to 3 channels, in [0, 255], then passed through the model's own
Keras preprocessing. A stratified split holds out ``--test_fraction`` of them.

Data parallelism uses ``jax.sharding``: a 1-D ``Mesh`` over ``jax.devices()``,
each batch sharded over its ``data`` axis, the train state replicated.
``jax.jit`` then computes the global batch's loss, gradients and BatchNorm
statistics (so they equal a one-device run's), with the all-reduces inserted
by XLA. BatchNorm's moving statistics are updated with
``mutable=["batch_stats"]``. The curves of 1 and N devices differ only by the
order of float32 sums (1e-6 relative with ``--optimizer sgd --lr 1e-3``);
Adam's first steps, g / sqrt(v) ~ sign(g), turn that rounding in near-zero
gradients into whole steps, so with Adam they part after a few steps. On several hosts, start every process with
``--distributed`` (``jax.distributed.initialize()``); each one feeds its share
of the global batch (``jax.make_array_from_process_local_data``).

Orbax checkpoints the train state (params, batch_stats, opt_state, step) and
the metric history under ``--workdir``; ``--resume`` continues from the latest
one on the same curve (the batch order and dropout keys are functions of the
step). At the end it reports held-out accuracy, writes the metrics as JSON
(``--metrics``) and plots loss and accuracy to a PNG (``--plot``).

From ``--weights random`` the BatchNorm moving statistics start random, and
Keras' MobileNetV2 keeps them with momentum 0.999 (a memory of ~1,000 steps),
so held-out accuracy (inference mode) trails training accuracy for a while:
measured on 2 CPU cores, 300 steps give 94% on training batches and 49%
held out, 1,000 steps (``--resume --steps 1000``) 74% held out.

  python examples/finetune.py                      # offline, random weights
  python examples/finetune.py --weights imagenet --size 96 --steps 600
  python examples/finetune.py --steps 900 --resume # continue the last run
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python examples/finetune.py                    # 2 CPU "devices"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
from flax.training import train_state
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

import models
import translate
# pylint: enable=g-import-not-at-top,wrong-import-position


class UserError(Exception):
  """A mistake in the command line: one ``error:`` line, exit 1."""


class Classifier(nn.Module):
  """A registered backbone (no top, pooled) with a new ``Dense`` head."""
  model: str
  num_classes: int
  options: tuple[tuple[str, Any], ...] = ()  # family options, e.g. alpha

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits for RGB ``images`` in [0, 255], NHWC."""
    backbone = models.create(self.model, include_top=False, pooling="avg",
                             module_name="backbone", **dict(self.options))
    x = backbone(models.preprocess(self.model, images), train=train)
    return nn.Dense(self.num_classes, name="head")(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


def load_digits(size: int, test_fraction: float, seed: int):
  """scikit-learn's digits as (N, size, size, 3) float32 in [0, 255]."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 ink
  images = np.asarray(jax.image.resize(
      images, (len(images), size, size), "bilinear"))
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  return model_selection.train_test_split(
      images, labels, test_size=test_fraction, random_state=seed,
      stratify=labels)


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
  """Example indices of (0-based) ``step``: a function of the step alone.

  Every epoch is a fresh permutation seeded by (seed, epoch), so a resumed
  run sees exactly the batches the uninterrupted run would have seen.
  """
  per_epoch = n // batch
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[i * batch:(i + 1) * batch]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               key: jax.Array):
  """One optax step on a (sharded) global batch; returns (state, metrics)."""
  dropout_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    return cross_entropy(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates["batch_stats"])
  accuracy = (logits.argmax(-1) == labels).mean()
  return state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array,
              weights: jax.Array) -> dict[str, jax.Array]:
  """Summed loss and correct count over the real (weight 1) examples."""
  logits = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats}, images,
      train=False)
  return {"loss": (cross_entropy(logits, labels) * weights).sum(),
          "correct": ((logits.argmax(-1) == labels) * weights).sum()}


def global_batch(sharding: NamedSharding, *arrays: np.ndarray):
  """This process's slice of a global batch, as arrays sharded on ``data``.

  With one process the slice is the whole batch; with several (after
  ``jax.distributed.initialize``) each process passes its own rows.
  """
  n, k = jax.process_count(), jax.process_index()
  out = []
  for a in arrays:
    rows = len(a) // n
    out.append(jax.make_array_from_process_local_data(
        sharding, a[k * rows:(k + 1) * rows], (len(a),) + a.shape[1:]))
  return out


def evaluate(step_fn, state, images, labels, batch, sharding):
  """Held-out (loss, accuracy), padding the last batch with weight 0."""
  total = {"loss": 0.0, "correct": 0.0}
  for start in range(0, len(images), batch):
    x, y = images[start:start + batch], labels[start:start + batch]
    w = np.ones(len(x), np.float32)
    pad = batch - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y, w = np.pad(y, (0, pad)), np.pad(w, (0, pad))
    out = step_fn(state, *global_batch(sharding, x, y, w))
    for name in total:
      total[name] += float(out[name])
  return total["loss"] / len(images), total["correct"] / len(images)


def plot(history: dict[str, list], path: str) -> None:
  """Loss and accuracy against the step, training and held-out."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(history["step"], history["loss"], label="train (batch)")
  ax_acc.plot(history["step"], history["accuracy"], alpha=0.4,
              label="train (batch)")
  if history["eval_step"]:
    ax_loss.plot(history["eval_step"], history["eval_loss"], "o-",
                 label="held-out")
    ax_acc.plot(history["eval_step"], history["eval_accuracy"], "o-",
                label="held-out")
  for ax, name in ((ax_loss, "cross-entropy"), (ax_acc, "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
  """Adam, or SGD with momentum; see the module docstring on determinism."""
  if args.optimizer == "sgd":
    return optax.sgd(args.lr or 1e-2, momentum=0.9)
  return optax.adam(args.lr or 1e-3)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default="mobilenetv2",
                 help="registered model name (models.list_models())")
  p.add_argument("--alpha", type=float, default=0.35,
                 help="width of MobileNet-family models (ignored by others)")
  p.add_argument("--weights", default="random",
                 help="imagenet (needs the network once), random (offline) "
                 "or a Keras weights file")
  p.add_argument("--size", type=int, default=32,
                 help="height and width the 8x8 digits are upsampled to")
  p.add_argument("--steps", type=int, default=300,
                 help="total optimizer steps (with --resume: up to this)")
  p.add_argument("--batch_size", type=int, default=32,
                 help="global batch, divisible by the number of devices")
  p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                 help="optax.adam, or optax.sgd with momentum 0.9")
  p.add_argument("--lr", type=float,
                 help="learning rate (default: 1e-3 adam, 1e-2 sgd)")
  p.add_argument("--test_fraction", type=float, default=0.2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_every", type=int, default=100,
                 help="held-out evaluation every N steps (0: only at the end)")
  p.add_argument("--checkpoint_every", type=int, default=100,
                 help="orbax checkpoint every N steps (and at the end)")
  p.add_argument("--workdir", default="finetune_run",
                 help="directory for checkpoints/, metrics and the plot")
  p.add_argument("--metrics", help="JSON of the per-step history "
                 "(default: WORKDIR/metrics.json)")
  p.add_argument("--plot", help="PNG plot (default: WORKDIR/finetune.png)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in WORKDIR")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (multi-host)")
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.distributed:
    jax.distributed.initialize()  # coordinator etc. from the environment
  devices = jax.devices()  # every device of every process
  mesh = Mesh(np.array(devices), ("data",))
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  if args.steps < 1 or args.batch_size < 1:
    raise UserError("--steps and --batch_size must be positive")
  if args.batch_size % len(devices):
    raise UserError(f"--batch_size {args.batch_size} is not divisible by the "
                    f"{len(devices)} devices")
  ckpt_dir = os.path.abspath(os.path.join(args.workdir, "checkpoints"))
  if not args.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume "
                    "to continue, or another --workdir")
  metrics_path = args.metrics or os.path.join(args.workdir, "metrics.json")
  plot_path = args.plot or os.path.join(args.workdir, "finetune.png")
  main_process = jax.process_index() == 0
  try:
    spec = models.get_spec(args.model)
  except models.UnknownModelError as e:
    raise UserError(str(e)) from None
  if args.resume and not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    raise UserError(f"--resume: no checkpoint in {ckpt_dir}")

  x_train, x_test, y_train, y_test = load_digits(
      args.size, args.test_fraction, args.seed)
  if len(x_train) < args.batch_size:
    raise UserError(f"--batch_size {args.batch_size} exceeds the "
                    f"{len(x_train)} training images")
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  if args.resume and manager.latest_step() is None:
    raise UserError(f"--resume: no checkpoint in {ckpt_dir}")

  options = {"alpha": args.alpha} if "alpha" in spec.options else {}
  shape = (args.size, args.size, 3)
  _, translated, _, _ = translate.convert(
      args.model, args.weights, include_top=False, pooling="avg",
      input_shape=shape, **options)
  if args.weights == "imagenet":  # e.g. EfficientNet's ImageNet normalizer
    options.update(spec.imagenet_options)
  model = Classifier(args.model, num_classes=10,
                     options=tuple(sorted(options.items())))

  # The translated backbone and a fresh head. eval_shape gives the head's
  # input width without running (or compiling) the whole network's init.
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1,) + shape))
  width = shapes["params"]["head"]["kernel"].shape[0]
  head = nn.Dense(10).init(jax.random.key(args.seed), jnp.zeros((1, width)))
  params = {"backbone": translated["params"], "head": head["params"]}
  batch_stats = {"backbone": translated.get("batch_stats", {})}
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=optimizer(args), batch_stats=batch_stats)
  state = jax.device_put(state, replicated)
  history = {"step": [], "loss": [], "accuracy": [], "eval_step": [],
             "eval_loss": [], "eval_accuracy": []}

  if args.resume:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        history=ocp.args.JsonRestore()))
    state, history = restored.state, restored.history
  start = int(state.step)
  if start > args.steps:
    raise UserError(f"--steps {args.steps} is below the checkpoint's step "
                    f"{start}; pass --steps above it to continue")

  train = jax.jit(train_step, in_shardings=(replicated, data, data,
                                            replicated),
                  out_shardings=(replicated, replicated), donate_argnums=0)
  test = jax.jit(eval_step, in_shardings=(replicated, data, data, data),
                 out_shardings=replicated)
  key = jax.device_put(jax.random.key(args.seed + 1), replicated)

  def checkpoint(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        history=ocp.args.JsonSave(history)))

  def held_out(step: int) -> float:
    loss, acc = evaluate(test, state, x_test, y_test, args.batch_size, data)
    history["eval_step"].append(step)
    history["eval_loss"].append(loss)
    history["eval_accuracy"].append(acc)
    return acc

  bar = tqdm(range(start, args.steps), initial=start, total=args.steps,
             desc="fine-tune", disable=not main_process)
  for step in bar:
    idx = batch_indices(step, len(x_train), args.batch_size, args.seed)
    images, labels = global_batch(data, x_train[idx], y_train[idx])
    state, out = train(state, images, labels, key)
    done = step + 1
    history["step"].append(done)
    history["loss"].append(float(out["loss"]))
    history["accuracy"].append(float(out["accuracy"]))
    bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    if args.eval_every and done % args.eval_every == 0 and done < args.steps:
      bar.write(f"step {done}: held-out accuracy {held_out(done):.4f}")
    if done % args.checkpoint_every == 0 and done < args.steps:
      checkpoint(done)
  bar.close()

  if not history["eval_step"] or history["eval_step"][-1] != args.steps:
    held_out(args.steps)
  if manager.latest_step() != args.steps:
    checkpoint(args.steps)
  manager.wait_until_finished()
  manager.close()
  result = {"devices": len(devices), "model": args.model,
            "weights": args.weights, "held_out_accuracy":
            history["eval_accuracy"][-1], "history": history}
  if main_process:
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
    write_json(metrics_path, result)
    plot(history, plot_path)
    print(f"held-out accuracy {result['held_out_accuracy']:.4f} on "
          f"{len(x_test)} images after {args.steps} steps on {len(devices)} "
          f"device(s); metrics {metrics_path}, plot {plot_path}")
  return result


def main() -> None:
  args = parse_args()
  try:
    run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
