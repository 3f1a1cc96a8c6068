"""Test support for ``translate.from_keras``: a Keras model against its Flax
translation, in inference and training mode, and through the emitted source.

``check(model, inputs)`` randomizes every weight (BatchNorm moving statistics
included, ``translate.random_weights``) unless told not to, translates the
model, and asserts the outputs agree within ``TOLERANCE`` of
``max(1, max |Keras output|)``: through ``module.apply``, through the source
``emit_source`` writes (executed from a file, with the variables loaded back
from a msgpack), and, with ``train=True``, in training mode (outputs and the
updated BatchNorm statistics against Keras' own training step on the same
batch). Returns what it computed, for further assertions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

import translate
from translate import random_weights
from translate.from_keras import emit_source, from_keras

TOLERANCE = 1e-5


@dataclasses.dataclass
class Checked:
  module: Any
  variables: dict[str, Any]
  report: Any
  outputs: list[np.ndarray]
  keras_outputs: list[np.ndarray]
  source: str


def as_list(out: Any) -> list[np.ndarray]:
  if isinstance(out, (list, tuple)):
    return [np.asarray(o) for o in out]
  if isinstance(out, dict):
    return [np.asarray(out[k]) for k in sorted(out)]
  return [np.asarray(out)]


def assert_close(got: Any, want: Any, tol: float = TOLERANCE,
                 what: str = "output") -> float:
  """max |got - want| <= tol * max(1, max |want|), shapes equal."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  if want.size == 0:
    return 0.0
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol} * {scale:.3g}"
  return err


def random_inputs(model: Any, seed: int = 0, batch: int = 2,
                  high: int | None = None) -> list[np.ndarray]:
  """One random batch per model input: float inputs normal, int inputs ids
  in ``[0, high)`` (default 10)."""
  rng = np.random.default_rng(seed)
  out = []
  for t in model.inputs:
    shape = (batch, *[8 if d is None else int(d) for d in t.shape[1:]])
    dtype = str(getattr(t.dtype, "name", t.dtype))
    if "int" in dtype:
      out.append(rng.integers(0, high or 10, shape).astype(dtype))
    else:
      out.append(rng.normal(0, 1, shape).astype(dtype))
  return out


def load_emitted(path: str) -> Any:
  spec = importlib.util.spec_from_file_location(
      "emitted_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check(model: Any, inputs: Sequence[np.ndarray] | None = None, *,
          randomize: bool = True, seed: int = 0, tol: float = TOLERANCE,
          train: bool = False, tmp_path: Any = None) -> Checked:
  """Asserts the translation of ``model`` computes what it computes.

  Args:
    model: a built Keras model.
    inputs: one array per model input (default ``random_inputs``).
    randomize: overwrite every weight first (seeded).
    train: also compare training mode: outputs, and every BatchNorm's
      moving statistics after one step, against Keras' ``training=True``
      call (dropout off: use models without Dropout here).
    tmp_path: a directory; when given, the emitted source is written there,
      imported from the file and run on variables saved to and loaded from
      a msgpack.
  """
  if randomize:
    random_weights.randomize(model, seed)
  if inputs is None:
    inputs = random_inputs(model, seed + 1)
  module, variables, report = from_keras(model)
  want = as_list(model(list(inputs) if len(inputs) > 1 else inputs[0],
                       training=False))
  got = as_list(jax.jit(module.apply)(variables, *inputs))
  assert len(got) == len(want), (len(got), len(want))
  for i, (g, w) in enumerate(zip(got, want)):
    assert_close(g, w, tol, f"output {i}")
  source = report.source
  if tmp_path is not None:
    path = os.path.join(str(tmp_path), "generated_model.py")
    source = emit_source(model, path)
    assert source == report.source
    saved = os.path.join(str(tmp_path), "generated_model.msgpack")
    translate.save_variables(saved, variables)
    emitted = load_emitted(path).create()
    again = as_list(emitted.apply(translate.load_variables(saved), *inputs))
    for i, (g, w) in enumerate(zip(again, want)):
      assert_close(g, w, tol, f"emitted source, output {i}")
  if train:
    check_training(model, module, variables, inputs, tol)
  return Checked(module, variables, report, got, want, source)


def check_training(model, module, variables, inputs, tol=TOLERANCE) -> None:
  """Training mode: Keras' ``training=True`` outputs and BatchNorm moving
  statistics after that call, against ``apply(train=True,
  mutable=["batch_stats"])``."""
  out, state = module.apply(variables, *inputs, train=True,
                            mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(0)})
  want = as_list(model(list(inputs) if len(inputs) > 1 else inputs[0],
                       training=True))
  for i, (g, w) in enumerate(zip(as_list(out), want)):
    assert_close(g, w, tol, f"training output {i}")
  stats = traverse_util.flatten_dict(state.get("batch_stats", {}))
  from translate import keras_io  # pylint: disable=g-import-not-at-top
  moved = 0
  for layer in keras_io.iter_layers(model):
    if type(layer).__name__ != "BatchNormalization":
      continue
    keys = [k for k in stats if k[-2] == layer.name and k[-1] == "mean"]
    assert len(keys) == 1, (layer.name, keys)
    path = keys[0][:-1]
    assert_close(stats[(*path, "mean")], layer.moving_mean.numpy(), tol,
                 f"{layer.name} moving mean")
    assert_close(stats[(*path, "var")], layer.moving_variance.numpy(), tol,
                 f"{layer.name} moving variance")
    moved += 1
  del moved
