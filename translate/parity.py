"""Parity of a translated Flax model against its Keras model."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import models

TOLERANCE = 1e-4  # max |Δlogit| <= TOLERANCE * max(1, max |logit|)
# The same bound in float64: an exact translation agrees to ~1e-13 even
# where a model amplifies rounding 1000-fold; a wrong epsilon, layout or
# activation stays at 1e-3 or more.
FLOAT64_TOLERANCE = 1e-8


@dataclasses.dataclass
class ParityReport:
  """Flax vs Keras on the same preprocessed random images.

  Attributes:
    max_abs: max |Flax − Keras| over all outputs.
    max_rel: ``max_abs / max(1, max |Keras output|)``, the figure the
      tolerance bounds.
    max_ref: max |Keras output|.
    top1_agreement: fraction of images whose argmax agrees (classifiers).
    tolerance: the bound on ``max_rel``.
    logits: whether the compared outputs are pre-softmax logits.
    batch: number of images compared.
    float64: whether both sides ran in float64 (``check_parity``).
  """

  max_abs: float
  max_rel: float
  max_ref: float
  top1_agreement: float
  tolerance: float
  logits: bool
  batch: int
  float64: bool = False

  @property
  def passed(self) -> bool:
    return bool(np.isfinite(self.max_rel) and self.max_rel <= self.tolerance)

  def summary(self) -> str:
    what = "logits" if self.logits else "outputs"
    top1 = ("" if np.isnan(self.top1_agreement) else
            f", top-1 agreement {self.top1_agreement:.0%}")
    return (f"max |Δ{what}| {self.max_abs:.3g} (max |{what}| "
            f"{self.max_ref:.3g}), relative {self.max_rel:.3g} "
            f"(tolerance {self.tolerance:g}){top1} on {self.batch} inputs"
            f"{' in float64' if self.float64 else ''}: "
            f"{'PASS' if self.passed else 'FAIL'}")


def random_images(input_shape: tuple[int, ...], batch: int = 2,
                  seed: int = 0) -> np.ndarray:
  """Random RGB images in [0, 255], float32, NHWC."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 255, (batch, *input_shape)).astype(np.float32)


@contextlib.contextmanager
def _keras_logits(keras_model: Any, include_top: bool = True):
  """Temporarily makes a final ``Dense`` (or ``Activation``, as after
  MobileNet's 1x1 ``Logits`` conv) layer linear, so Keras returns logits;
  yields whether it did. Without the top the final layer is not a
  classifier (MobileNetV3 ends with an ``Activation("hard_swish")``) and
  stays as it is."""
  last = keras_model.layers[-1]
  act = getattr(last, "activation", None)
  if not include_top or type(last).__name__ not in (
      "Dense", "Activation") or act is None or (
      getattr(act, "__name__", "") == "linear"):
    yield False
    return
  last.activation = _keras_of(keras_model).activations.linear
  try:
    yield True
  finally:
    last.activation = act


def _as_logits(module: nn.Module) -> nn.Module:
  """The module with ``classifier_activation=None`` (through wrappers such
  as ``models.inference.Inference``)."""
  if hasattr(module, "inner"):
    return module.clone(inner=_as_logits(module.inner))
  return module.clone(classifier_activation=None)


@contextlib.contextmanager
def full_float32():
  """Float32 matrix products and convolutions at full precision, in JAX and
  in TensorFlow, within the block.

  On recent NVIDIA GPUs both default to TF32-like products (JAX's default
  matmul precision; TensorFlow's ``enable_tensor_float_32_execution``):
  measured on an H200, the inference form's logits then differ from the
  float32 CPU result by up to 1.1e-3 relative (Xception), against 1.4e-6
  at full precision (``benchmarks/gpu_check.py``), which would fail the
  1e-4 parity bound for reasons that have nothing to do with translation.
  CPUs compute in full float32 either way.
  """
  tf = None
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:  # a JAX-only install: nothing to switch on that side
    pass
  tf32 = tf.config.experimental.tensor_float_32_execution_enabled() if tf \
      else None
  try:
    if tf:
      tf.config.experimental.enable_tensor_float_32_execution(False)
    with jax.default_matmul_precision("highest"):
      yield
  finally:
    if tf:
      tf.config.experimental.enable_tensor_float_32_execution(tf32)


def float64_twin(keras_model: Any) -> Any:
  """A float64 copy of a built Keras 3 or tf-keras model: every layer
  rebuilt from its config with ``dtype="float64"`` (``clone_model``), then
  the model's own weights copied in (``set_weights``, so no translation
  rule is involved). ``check_parity(..., float64=True)`` compares it with
  the Flax module run in float64."""
  keras_lib = _keras_of(keras_model)

  def clone(layer: Any) -> Any:
    config = layer.get_config()
    config["dtype"] = "float64"
    return layer.__class__.from_config(config)

  twin = keras_lib.models.clone_model(keras_model, clone_function=clone)
  twin.set_weights([np.asarray(w, np.float64)
                    for w in keras_model.get_weights()])
  return twin


def _keras_of(keras_model: Any) -> Any:
  """The ``keras`` or ``tf_keras`` package the model was built with."""
  return importlib.import_module(type(keras_model).__module__.split(".")[0])


def run_keras(keras_model: Any, x: np.ndarray) -> np.ndarray:
  """Keras inference (``training=False``) as a numpy array."""
  return np.asarray(keras_model(x, training=False))


def check_parity(module: nn.Module, variables: Any, keras_model: Any,
                 name: str, *, input_shape: tuple[int, ...] | None = None,
                 batch: int = 2, seed: int = 0,
                 tolerance: float | None = None,
                 images: np.ndarray | None = None,
                 float64: bool = False) -> ParityReport:
  """Compares the Flax and Keras models on the same preprocessed inputs.

  Random images in [0, 255] (or ``images``) go through Keras' own
  ``preprocess_input`` of model ``name``; both models run on the result. A
  classifier is compared on its logits: the Keras ``Dense`` top is made
  linear for the call and the Flax module is cloned with
  ``classifier_activation=None``.

  Both sides run in full float32 (``full_float32``: no TF32 on a GPU).
  With ``float64=True`` both run in float64 instead (``keras_model`` a
  ``float64_twin``, the variables cast, JAX's x64 on for the call) on the
  same inputs, against ``FLOAT64_TOLERANCE``: it tells a translation error
  from float32 rounding that a model's weights amplify (a randomly
  initialised network fine-tuned a few steps can turn 1e-7 into 1e-2).

  Returns:
    A ``ParityReport``; ``report.passed`` applies the tolerance.
  """
  spec = models.get_spec(name)
  shape = tuple(input_shape or keras_model.input_shape[1:])
  if None in shape:  # Keras without include_top takes any size
    shape = spec.input_shape
  if images is None:
    images = random_images(shape, batch, seed)
  x = np.asarray(spec.keras_preprocess_input()(np.array(images, np.float32)),
                 np.float32)
  if tolerance is None:
    tolerance = FLOAT64_TOLERANCE if float64 else TOLERANCE
  top = getattr(getattr(module, "inner", module), "include_top", True)
  precision = (jax.enable_x64(True) if float64 else contextlib.nullcontext())
  if float64:
    x = x.astype(np.float64)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  with full_float32(), precision:
    with _keras_logits(keras_model, top) as logits:
      ref = run_keras(keras_model, x)
    if logits:
      module = _as_logits(module)
    out = np.asarray(jax.jit(module.apply)(variables, x))
  if out.shape != ref.shape:
    raise ValueError(f"Flax output shape {out.shape} != Keras {ref.shape}")
  diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
  max_ref = float(np.max(np.abs(ref)))
  max_abs = float(np.max(diff))
  top1 = (float(np.mean(out.reshape(len(x), -1).argmax(-1)
                        == ref.reshape(len(x), -1).argmax(-1)))
          if ref.ndim == 2 else float("nan"))
  if not np.all(np.isfinite(out)):
    max_abs = float("inf")
  return ParityReport(max_abs=max_abs, max_rel=max_abs / max(1.0, max_ref),
                      max_ref=max_ref, top1_agreement=top1,
                      tolerance=tolerance, logits=logits, batch=len(x),
                      float64=float64)


GRAPH_TOLERANCE = 1e-5  # any Keras model: max |Δ| <= this * max(1, max |out|)


def graph_inputs(keras_model: Any, batch: int = 2, seed: int = 0,
                 free: int = 8) -> list[np.ndarray]:
  """Random inputs for a whole Keras model, one per ``model.inputs``: float
  inputs uniform in [-1, 1], int inputs ids below the smallest
  ``input_dim`` of the Embeddings they feed (10 when they feed none).
  Dimensions Keras leaves free get ``free`` steps."""
  rng = np.random.default_rng(seed)
  limits = _embedding_limits(keras_model)
  out = []
  for i, t in enumerate(keras_model.inputs):
    shape = (batch, *[free if d is None else int(d) for d in t.shape[1:]])
    dtype = np.dtype(str(getattr(t.dtype, "name", t.dtype)))
    if np.issubdtype(dtype, np.integer):
      out.append(rng.integers(0, limits.get(i, 10), shape).astype(dtype))
    elif dtype == np.bool_:
      out.append(rng.integers(0, 2, shape).astype(bool))
    else:
      out.append(rng.uniform(-1, 1, shape).astype(dtype))
  return out


def _embedding_limits(keras_model: Any) -> dict[int, int]:
  """Input index -> the smallest ``input_dim`` among the Embedding layers
  its tensor reaches (through any layers), from the model's graph."""
  from translate.graph import read_graph  # pylint: disable=g-import-not-at-top
  graph = read_graph(keras_model)
  limits: dict[int, int] = {}

  def walk(g, sources: dict[str, set[int]]):
    for call in g.calls:
      reached = set()
      for v in _values(call.args) + _values(list(call.kwargs.values())):
        reached |= sources.get(v.var, set())
      if call.kind == "model":
        inner = {v.var: reached for v in call.graph.inputs}
        walk(call.graph, inner)
      if call.cls == "Embedding" and call.config:
        for i in reached:
          limits[i] = min(limits.get(i, 1 << 62), int(call.config[
              "input_dim"]))
      for o in call.outputs:
        sources[o.var] = reached

  walk(graph, {v.var: {i} for i, v in enumerate(graph.inputs)})
  return limits


def _values(x: Any) -> list[Any]:
  from translate.graph import Value  # pylint: disable=g-import-not-at-top
  if isinstance(x, Value):
    return [x]
  if isinstance(x, (list, tuple)):
    return [v for item in x for v in _values(item)]
  if isinstance(x, dict):
    return [v for item in x.values() for v in _values(item)]
  return []


def check_graph_parity(module: nn.Module, variables: Any, keras_model: Any,
                       *, batch: int = 2, seed: int = 0,
                       tolerance: float = GRAPH_TOLERANCE,
                       inputs: list[np.ndarray] | None = None
                       ) -> ParityReport:
  """A whole Keras model against its ``translate.from_keras`` module on the
  same random inputs (``graph_inputs``), every output compared, in full
  float32."""
  if inputs is None:
    inputs = graph_inputs(keras_model, batch, seed)
  with full_float32():
    ref = keras_model(inputs if len(inputs) > 1 else inputs[0],
                      training=False)
    out = jax.jit(module.apply)(variables, *inputs)
  refs = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple))
                                  else [ref])]
  outs = [np.asarray(o) for o in (out if isinstance(out, (list, tuple))
                                  else [out])]
  if len(outs) != len(refs) or any(o.shape != r.shape
                                   for o, r in zip(outs, refs)):
    raise ValueError(f"Flax output shapes {[o.shape for o in outs]} != "
                     f"Keras {[r.shape for r in refs]}")
  max_abs = max(float(np.max(np.abs(o.astype(np.float64) - r)))
                if r.size else 0.0 for o, r in zip(outs, refs))
  if not all(np.all(np.isfinite(o)) for o in outs):
    max_abs = float("inf")
  max_ref = max(float(np.max(np.abs(r))) if r.size else 0.0 for r in refs)
  first_o, first_r = outs[0], refs[0]
  top1 = (float(np.mean(first_o.argmax(-1) == first_r.argmax(-1)))
          if first_r.ndim == 2 else float("nan"))
  return ParityReport(max_abs=max_abs, max_rel=max_abs / max(1.0, max_ref),
                      max_ref=max_ref, top1_agreement=top1,
                      tolerance=tolerance, logits=False,
                      batch=len(inputs[0]))
