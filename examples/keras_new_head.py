"""A translated backbone inside Keras, with a new head trained by ``fit``.

``models.keras_layer`` wraps the Flax port as a ``keras.layers.FlaxLayer``
(Keras' JAX backend): its weights are the translated variables, and it goes
into a Keras functional model like any layer. Here a MobileNetV2 backbone
(no top, average pooling) gets a new 3-class ``Dense`` head and the whole
model is fine-tuned on a toy task (which third of the image is brightest).

  python examples/keras_new_head.py                    # offline, translates here
  python main.py --model mobilenetv2 --weights random --noinclude_top --pooling avg --alpha 0.35 --input_shape 96,96,3
  python examples/keras_new_head.py --variables translated/mobilenetv2_notop_avg_alpha0.35_96x96.msgpack

``--variables`` takes a msgpack written by ``main.py`` without the top and
with average pooling; the options it was translated with (alpha, input
size) are read from its JSON sidecar. Without it the backbone is translated
here from randomized Keras weights with ``--alpha`` and ``--size``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import keras  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

import models  # noqa: E402  pylint: disable=g-import-not-at-top
import translate  # noqa: E402  pylint: disable=g-import-not-at-top

NAME = "mobilenetv2"


def toy_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images in [0, 255] whose label is the brightest vertical third."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 128, (n, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, 3, n)
  third = size // 3
  for i, label in enumerate(labels):
    images[i, :, label * third:(label + 1) * third] += 127.0
  return images, labels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variables", help="msgpack from main.py (no top, "
                      "pooling avg; its sidecar gives alpha and the size); "
                      "default: translate random weights")
  parser.add_argument("--alpha", type=float, default=0.35)
  parser.add_argument("--size", type=int, default=96)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--samples", type=int, default=96)
  args = parser.parse_args()
  shape = (args.size, args.size, 3)
  options = dict(include_top=False, pooling="avg", alpha=args.alpha,
                 input_shape=shape)
  if args.variables:
    variables = translate.load_variables(args.variables)
    saved = translate.load_metadata(args.variables)
    if saved.get("model") != NAME:
      sys.exit(f"error: {args.variables} holds {saved.get('model')!r}, not "
               f"{NAME}; translate {NAME} with main.py (see this file's "
               "docstring)")
    kwargs = saved["create_kwargs"]
    if kwargs.get("include_top") or kwargs.get("pooling") != "avg":
      sys.exit(f"error: {args.variables} was translated with include_top="
               f"{kwargs.get('include_top')}, pooling={kwargs.get('pooling')}"
               "; pass --noinclude_top --pooling avg to main.py")
    shape = tuple(kwargs["input_shape"])
    options = dict(include_top=False, pooling="avg",
                   alpha=kwargs.get("alpha", 1.0), input_shape=shape)
  else:
    _, variables, _, _ = translate.convert(NAME, "random", **options)

  backbone = models.keras_layer(NAME, variables, **options)
  inputs = keras.Input(shape)
  # MobileNetV2's preprocess_input ("tf" mode) as a Keras layer.
  x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
  features = backbone(x)  # training=True inside fit: BatchNorm updates
  outputs = keras.layers.Dense(3, name="head")(features)
  model = keras.Model(inputs, outputs)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True), metrics=["accuracy"])
  model.summary()

  images, labels = toy_data(args.samples, args.size, seed=0)
  test_images, test_labels = toy_data(48, args.size, seed=1)
  before = model.evaluate(test_images, test_labels, verbose=0)
  model.fit(images, labels, epochs=args.epochs, batch_size=16, verbose=2)
  after = model.evaluate(test_images, test_labels, verbose=0)
  print(f"held-out loss {before[0]:.3f} -> {after[0]:.3f}, accuracy "
        f"{before[1]:.0%} -> {after[1]:.0%}")


if __name__ == "__main__":
  main()
