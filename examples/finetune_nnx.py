"""Fine-tune a translated Keras backbone in Flax NNX (the NNX twin of
``examples/finetune.py``).

The backbone is a registered model translated by ``translate.convert``
(``include_top=False, pooling="avg"``; default MobileNetV2, ``alpha=0.35``)
and turned into an NNX module holding those weights by ``translate.to_nnx``.
A user's own ``nnx.Module`` puts a new ``nnx.Linear`` head on it;
``nnx.Optimizer`` (optax) trains the whole network under ``nnx.jit``, and
``model(x, train=True)`` updates the BatchNorm statistics in place, as
Keras' ``fit`` does.

The data is the same as ``finetune.py``'s: scikit-learn's ``load_digits``
(1,797 real 8x8 handwritten digits, 10 classes, shipped in the wheel, so it
runs offline), upsampled to ``--size``, in [0, 255], through the model's own
preprocessing, with a stratified held-out split, the same batch order (a
function of the step) and the same optimizers.

Orbax checkpoints ``nnx.state`` of the model (parameters, statistics, the
dropout stream) and of the optimizer, plus the metric history, under
``--workdir``; ``--resume`` continues on the same curve. At the end it
reports held-out accuracy, writes the metrics as JSON and plots loss and
accuracy to a PNG. ``translate.from_nnx(model)`` then gives the backbone's
linen variables for everything downstream (``save_variables``,
``export_tflite``, ``--to_keras``); ``--save`` writes them.

  python examples/finetune_nnx.py                      # offline, random weights
  python examples/finetune_nnx.py --steps 600 --resume # continue the last run
  python examples/finetune_nnx.py --workdir run2 --save backbone.msgpack
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from tqdm import tqdm

from finetune import (UserError, batch_indices, cross_entropy, load_digits,
                      optimizer, plot, write_json)
import models
import translate
# pylint: enable=g-import-not-at-top,wrong-import-position


class Classifier(nnx.Module):
  """A translated backbone (no top, pooled) with a new ``nnx.Linear``
  head; takes RGB images in [0, 255], NHWC."""

  def __init__(self, model: str, backbone: nnx.Module, width: int,
               classes: int, rngs: nnx.Rngs):
    self.model = model
    self.backbone = backbone
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = self.backbone(models.preprocess(self.model, images), train=train)
    return self.head(x)


@nnx.jit
def train_step(model: Classifier, opt: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> dict[str, jax.Array]:
  def loss_fn(model):
    logits = model(images, train=True)
    return cross_entropy(logits, labels).mean(), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  opt.update(model, grads)
  return {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}


@nnx.jit
def eval_step(model: Classifier, images: jax.Array, labels: jax.Array
              ) -> dict[str, jax.Array]:
  logits = model(images)
  return {"loss": cross_entropy(logits, labels).sum(),
          "correct": (logits.argmax(-1) == labels).sum()}


def evaluate(model, images, labels, batch) -> tuple[float, float]:
  """Held-out (loss, accuracy); the last batch is simply smaller."""
  loss = correct = 0.0
  for start in range(0, len(images), batch):
    out = eval_step(model, images[start:start + batch],
                    labels[start:start + batch])
    loss, correct = loss + float(out["loss"]), correct + float(out["correct"])
  return loss / len(images), correct / len(images)


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
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--steps", type=int, default=300,
                 help="total optimizer steps (with --resume: up to this)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
  p.add_argument("--lr", type=float,
                 help="learning rate (default: 1e-3 adam, 1e-2 sgd)")
  p.add_argument("--test_fraction", type=float, default=0.2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_every", type=int, default=100,
                 help="held-out evaluation every N steps (0: only at the end)")
  p.add_argument("--checkpoint_every", type=int, default=100)
  p.add_argument("--workdir", default="finetune_nnx_run",
                 help="directory for checkpoints/, metrics and the plot")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in WORKDIR")
  p.add_argument("--save", help="write the trained backbone's linen "
                 "variables here (.msgpack, with translate.save_variables)")
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.steps < 1 or args.batch_size < 1:
    raise UserError("--steps and --batch_size must be positive")
  if args.save and not args.save.endswith(".msgpack"):
    raise UserError(f"--save {args.save}: give a .msgpack path")
  ckpt_dir = os.path.abspath(os.path.join(args.workdir, "checkpoints"))
  if not args.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume "
                    "to continue, or another --workdir")
  if args.resume and not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
  try:
    spec = models.get_spec(args.model)
  except models.UnknownModelError as e:
    raise UserError(str(e)) from None

  x_train, x_test, y_train, y_test = load_digits(
      args.size, args.test_fraction, args.seed)
  if len(x_train) < args.batch_size:
    raise UserError(f"--batch_size {args.batch_size} exceeds the "
                    f"{len(x_train)} training images")

  options = {"alpha": args.alpha} if "alpha" in spec.options else {}
  shape = (args.size, args.size, 3)
  conversion = translate.convert(args.model, args.weights, include_top=False,
                                 pooling="avg", input_shape=shape, **options)
  backbone = translate.to_nnx(conversion.module, conversion.variables,
                              rngs=nnx.Rngs(dropout=args.seed + 1))
  width = jax.eval_shape(conversion.module.apply, conversion.variables,
                         jnp.zeros((1,) + shape)).shape[-1]
  model = Classifier(args.model, backbone, width, 10,
                     nnx.Rngs(params=args.seed))
  opt = nnx.Optimizer(model, optimizer(args), wrt=nnx.Param)

  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  history = {"step": [], "loss": [], "accuracy": [], "eval_step": [],
             "eval_loss": [], "eval_accuracy": []}
  if args.resume:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.state(model)),
        opt=ocp.args.StandardRestore(nnx.state(opt)),
        history=ocp.args.JsonRestore()))
    nnx.update(model, restored.model)
    nnx.update(opt, restored.opt)
    history = restored.history
  start = int(opt.step.get_value())
  if start > args.steps:
    raise UserError(f"--steps {args.steps} is below the checkpoint's step "
                    f"{start}; pass --steps above it to continue")

  def checkpoint(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        opt=ocp.args.StandardSave(nnx.state(opt)),
        history=ocp.args.JsonSave(history)))

  def held_out(step: int) -> float:
    loss, acc = evaluate(model, x_test, y_test, args.batch_size)
    history["eval_step"].append(step)
    history["eval_loss"].append(loss)
    history["eval_accuracy"].append(acc)
    return acc

  bar = tqdm(range(start, args.steps), initial=start, total=args.steps,
             desc="fine-tune (nnx)")
  for step in bar:
    idx = batch_indices(step, len(x_train), args.batch_size, args.seed)
    out = train_step(model, opt, x_train[idx], y_train[idx])
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
  metrics_path = os.path.join(args.workdir, "metrics.json")
  plot_path = os.path.join(args.workdir, "finetune.png")
  result = {"model": args.model, "weights": args.weights, "api": "nnx",
            "held_out_accuracy": history["eval_accuracy"][-1],
            "history": history}
  write_json(metrics_path, result)
  plot(history, plot_path)
  if args.save:  # the sidecar main.py writes, so --to_keras reads it
    create_kwargs = dict(include_top=False, pooling="avg", classes=1000,
                         classifier_activation="softmax",
                         input_shape=list(shape), **options)
    translate.save_variables(args.save, translate.from_nnx(model), {
        "model": spec.name, "keras_name": spec.keras_name,
        "create_kwargs": create_kwargs, "input_shape": list(shape),
        "preprocess": spec.preprocess, "weights": args.weights,
        "trained_with": "examples/finetune_nnx.py"}, overwrite=True)
  print(f"held-out accuracy {result['held_out_accuracy']:.4f} on "
        f"{len(x_test)} images after {args.steps} steps; metrics "
        f"{metrics_path}, plot {plot_path}"
        + (f", backbone {args.save}" if args.save else ""))
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
