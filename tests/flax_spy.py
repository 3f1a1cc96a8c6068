"""Which Flax submodules a model calls, and with what settings: one spy for
every family's tests (BatchNorm epsilon/momentum, Dropout rates, conv
groups...), traced with ``jax.eval_shape`` so nothing is computed."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def flax_calls(module, shape, cls, *, train=False, inputs=False):
  """Every ``cls`` submodule whose ``__call__`` runs in ``module``'s forward
  pass on one ``shape`` image, by Flax name.

  Args:
    module: the Flax model.
    shape: ``(h, w, c)`` of the traced image (batch 1).
    cls: a module class (``nn.BatchNorm``, ``nn.Dropout``...) or a tuple.
    train: trace the training-mode call (``train=True``, a dropout key).
    inputs: also give the shape of each call's first argument.

  Returns:
    ``{name: submodule}``, or ``{name: (submodule, input shape)}`` with
    ``inputs=True``.
  """
  seen = {}

  def spy(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, cls) and context.method_name == "__call__":
      seen[m.name] = (m, tuple(args[0].shape)) if inputs else m
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  init = functools.partial(module.init, train=True) if train else module.init
  with nn.intercept_methods(spy):
    jax.eval_shape(init, {"params": jax.random.PRNGKey(0),
                          "dropout": jax.random.PRNGKey(1)}, x)
  return seen


def batchnorm_settings(module, shape):
  """``{name: (epsilon, momentum, use_running_average)}`` of every
  BatchNorm ``module`` calls in inference mode."""
  return {name: (m.epsilon, m.momentum, m.use_running_average)
          for name, m in flax_calls(module, shape, nn.BatchNorm).items()}
