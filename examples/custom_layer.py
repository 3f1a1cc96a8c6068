"""Your own Keras layer class in Flax: ``translate.register_layer``.

A model that uses a layer class Keras does not have is refused by name until
you give its Flax version. Here ``ScaledSoftplus`` (examples/my_layers.py)
is registered with ``FlaxScaledSoftplus`` and a rule saying which Keras
weight fills which Flax variable; then the whole model translates, its
source is written, and the outputs are checked against Keras.

  python examples/custom_layer.py
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.join(ROOT, "examples"))

import keras  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

import translate  # noqa: E402  pylint: disable=g-import-not-at-top
from my_layers import FlaxScaledSoftplus, ScaledSoftplus  # noqa: E402  pylint: disable=g-import-not-at-top


def build() -> keras.Model:
  inputs = keras.Input((12,))
  x = keras.layers.Dense(16, name="dense")(inputs)
  x = ScaledSoftplus(init_scale=0.5, name="scaled_softplus")(x)
  outputs = keras.layers.Dense(3, name="logits")(x)
  return keras.Model(inputs, outputs)


def main() -> None:
  model = build()
  rng = np.random.default_rng(0)
  for w in model.weights:  # stand-in for trained weights
    w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
  try:
    translate.from_keras(model)
  except translate.keras_io.UnsupportedLayerError as e:
    print(f"before register_layer: {e}")
  translate.register_layer(ScaledSoftplus, FlaxScaledSoftplus, {
      "scale": translate.Rule("params", "scale"),
      "shift": translate.Rule("params", "shift"),
  })
  module, variables, report = translate.from_keras(model)
  x = rng.normal(size=(4, 12)).astype("float32")
  diff = np.abs(np.asarray(module.apply(variables, x)) - np.asarray(model(x)))
  print(f"max |Flax - Keras| = {diff.max():.2g}")
  with tempfile.TemporaryDirectory() as d:
    source = translate.emit_source(model, os.path.join(d, "generated.py"))
  print(source[source.index("from my_layers"):])


if __name__ == "__main__":
  main()
