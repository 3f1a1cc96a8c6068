"""Keras' own float32 gradient on its JAX backend (run in a subprocess:
KERAS_BACKEND is fixed at import). argv: npz in, weights file, npz out,
model name, repr of build kwargs."""
import ast
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import models  # noqa: E402
from translate import keras_build  # noqa: E402


def main():
  data_in, weights, data_out, name, kwargs = sys.argv[1:6]
  kwargs = ast.literal_eval(kwargs)
  data = np.load(data_in)
  model = keras_build.build(models.get_spec(name), None, **kwargs)
  model.load_weights(weights)
  tv = [v.value for v in model.trainable_variables]
  ntv = [v.value for v in model.non_trainable_variables]

  def loss_fn(tv, x, labels):
    logits, _ = model.stateless_call(tv, ntv, x, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(
      tv, jnp.asarray(data["x"]), jnp.asarray(data["labels"]))
  np.savez(data_out, loss=np.asarray(loss),
           **{f"g{i}": np.asarray(g) for i, g in enumerate(grads)})


if __name__ == "__main__":
  main()
