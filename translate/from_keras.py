"""Any Keras model in Flax: ``from_keras`` and ``emit_source``.

A built model (Keras 3 or tf-keras, functional or Sequential, nested models
included) or a whole-model file (``.keras``, ``.h5``) is read as a graph
(``translate.graph``), written as Flax linen source (``translate.emit``, one
line per Keras call, submodules named like the Keras layers, a nested
registered application as one ``models.create`` line), and the source is
executed to give the module; the variables come from the model's weights
through the strict merge (every weight used once, every leaf filled once).
``emit_source`` writes the same source to a file a person reads and owns.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
import types
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import models
from models.backend import ensure_backend
from translate import keras_io, safe_files
from translate.core import merge
from translate.emit import Application, Emitted, emit
from translate.emit_nnx import emit_nnx
from translate.graph import Graph, GraphError, read_graph
from translate.keras_io import UnsupportedLayerError
from translate.weights_files import WeightsFileError


@dataclasses.dataclass
class FromKerasReport:
  """What ``from_keras`` did.

  Attributes:
    source: the generated Python source of ``module``.
    class_name: the module's class in it.
    input_specs: ``(shape without batch, dtype)`` per input, in
      ``model.inputs`` order (None for a dimension Keras leaves free).
    applications: ``{flax path: registry name}`` of nested applications.
    layers: number of Keras layers translated outside applications.
    params, stats: scalars in ``params`` and in the other collections.
    seconds: wall time.
  """

  source: str
  class_name: str
  input_specs: list[tuple[tuple[int | None, ...], str]]
  applications: dict[str, str]
  layers: int
  params: int
  stats: int
  seconds: float


def load_keras(model_or_path: Any) -> Any:
  """A built Keras model, or the one a whole-model file holds.

  Files are checked as hostile input first (``translate.safe_files``), then
  loaded with Keras' safe mode (no code from the file runs): ``.keras`` and
  Keras 3's ``.h5`` by Keras 3, a tf-keras ``.h5`` by tf-keras (after its
  config is checked for ``Lambda`` layers, whose code tf-keras would load).

  Raises:
    WeightsFileError: not a whole-model file, unreadable, or unsafe.
  """
  if not isinstance(model_or_path, (str, os.PathLike)):
    return model_or_path
  path = os.fspath(model_or_path)
  ensure_backend()
  if not os.path.isfile(path):
    raise WeightsFileError(f"{path} is not an existing file")
  if path.endswith(".weights.h5"):
    raise WeightsFileError(
        f"{path} holds weights only, no architecture: save the whole model "
        "(model.save('model.keras')), or pass --model NAME for a registered "
        "application")
  from translate import weights_files  # pylint: disable=g-import-not-at-top
  config = weights_files.model_config(path)  # checks the file first
  if config is None:
    raise WeightsFileError(
        f"{path} holds no model config (weights only?): save the whole "
        "model (model.save('model.keras'))")
  if "Lambda" in set(weights_files.layer_classes(config)):
    raise UnsupportedLayerError(
        f"{path} contains a Lambda layer (arbitrary Python code), which "
        "cannot be translated or loaded safely; rewrite it with Keras layers "
        "or keras.ops calls")
  if path.endswith(".keras"):
    members = safe_files.read_keras_zip(path, ("model.weights.h5",))
    safe_files.check_hdf5(io.BytesIO(members["model.weights.h5"]), path)
  else:
    safe_files.check_hdf5(path, path)
  try:
    if path.endswith(".h5") and _saved_by_tf_keras(path):
      import tf_keras  # pylint: disable=g-import-not-at-top
      model = tf_keras.models.load_model(path, compile=False)
    else:
      import keras  # pylint: disable=g-import-not-at-top
      model = keras.saving.load_model(path, compile=False, safe_mode=True)
  except (UnsupportedLayerError, WeightsFileError, safe_files.UnsafeFileError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsFileError(
        f"Keras could not rebuild the model in {path}: "
        f"{' '.join(str(e).split())[:300]} (a custom layer class? build the "
        "model in Python, register a Flax version with "
        "translate.register_layer, and pass the model object)") from e
  for layer in keras_io.iter_layers(model):
    if layer.weights and hasattr(layer, "finalize_state"):
      # Keras 3's legacy .h5 loader assigns Normalization's mean/variance
      # without deriving the tensors it computes with (EfficientNet's
      # output was 6.7 off); finalize_state() does, as after adapt().
      layer.finalize_state()
    for v in layer.weights:
      safe_files.check_finite(path, f"{layer.name}/{keras_io.weight_name(v)}",
                              np.asarray(v.numpy()))
  return model


def _saved_by_tf_keras(path: str) -> bool:
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "r") as f:
    version = f.attrs.get("keras_version", b"")
  version = version.decode() if isinstance(version, bytes) else str(version)
  return not version.startswith("3.")


def detect_application(model: Any) -> Application | None:
  """The registered application a nested Keras model is, found by its
  structure and config (not its name): the candidates nearest by name are
  built in Flax with the options the model's config fixes, and one is taken
  when its variables take every weight of the model exactly (strict merge
  by layer name, the registry's own path) and it computes what the model
  computes on random inputs. None when no candidate fits (the model is then
  translated layer by layer)."""
  from translate import weights_files  # pylint: disable=g-import-not-at-top
  try:
    options = weights_files.options_from_config(
        {"class_name": type(model).__name__, "config": model.get_config()})
  except (WeightsFileError, KeyError, TypeError, ValueError):
    return None
  if not options or "input_shape" not in options:
    return None
  layers = keras_io.read_weights(model)
  for name in _candidates(model):
    spec = models.get_spec(name)
    for extra in _option_variants(spec):
      kwargs = {**options, **extra}
      try:
        module = models.create(name, **kwargs)
        shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                jax.ShapeDtypeStruct(
                                    (1, *options["input_shape"]),
                                    jnp.float32))
        variables, _, _ = merge(layers, shapes)
      except Exception:  # pylint: disable=broad-except
        continue  # not this model, or not with these options
      if _computes_the_same(module, variables, model, options["input_shape"]):
        return Application(name, {k: v for k, v in kwargs.items()
                                  if v != _CREATE_DEFAULTS.get(k, object())
                                  and v != spec.options.get(k, object())})
  return None


def _option_variants(spec: Any) -> list[dict[str, Any]]:
  """The family options to try, the defaults first: every combination of
  ``spec.option_choices``, each also with the ImageNet-only options (Keras
  builds EfficientNet with one more Rescaling for ImageNet weights)."""
  import itertools  # pylint: disable=g-import-not-at-top
  keys = list(spec.option_choices)
  combos = [dict(zip(keys, values)) for values in itertools.product(
      *(spec.option_choices[k] for k in keys))] or [{}]
  extras = [{}] + ([dict(spec.imagenet_options)] if spec.imagenet_options
                   else [])
  return [{**c, **e} for c in combos for e in extras]


_CREATE_DEFAULTS = dict(include_top=True, classes=1000, pooling=None,
                        classifier_activation="softmax")


def _candidates(model: Any, limit: int = 4) -> list[str]:
  """Registry names to try: nearest by name first (rapidfuzz)."""
  return models.suggest(model.name, limit=limit)


def _computes_the_same(module, variables, model, input_shape) -> bool:
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, *input_shape)).astype(np.float32)
  try:
    want = np.asarray(model(x, training=False))
    got = np.asarray(jax.jit(module.apply)(variables, x))
  except Exception:  # pylint: disable=broad-except
    return False
  if want.shape != got.shape:
    return False
  scale = max(1.0, float(np.max(np.abs(want))))
  return float(np.max(np.abs(want - got))) <= 1e-4 * scale


def _header(model: Any, graph: Graph) -> str:
  return (f"Flax linen translation of the Keras model {graph.name!r}.\n\n"
          "Generated by keras2flax (translate.emit_source); edit freely. "
          "Load its variables\nwith translate.load_variables (or any msgpack "
          "reader) and call\n``create().apply(variables, *inputs)``; "
          "``train=True`` with\n``mutable=['batch_stats']`` and a "
          "``'dropout'`` rng is Keras' training mode.")


def emitted_graph(model: Any) -> tuple[Graph, Emitted]:
  graph = read_graph(model)
  return graph, emit(graph, detect_application, _header(model, graph))


def instantiate(source: str, class_name: str) -> Any:
  """Executes generated source as a module and returns its ``create()``."""
  module = types.ModuleType(f"keras2flax_generated_{class_name}")
  module.__file__ = f"<keras2flax {class_name}>"
  exec(compile(source, module.__file__, "exec"), module.__dict__)  # pylint: disable=exec-used
  sys.modules.setdefault(module.__name__, module)
  return module.create()


def input_specs(graph: Graph) -> list[tuple[tuple[int | None, ...], str]]:
  return [(tuple(v.shape[1:]), v.dtype) for v in graph.inputs]


def trace_inputs(specs, free: int = 8) -> list[jax.ShapeDtypeStruct]:
  """One abstract input per spec, batch 1 (``free`` for free dimensions)."""
  return [jax.ShapeDtypeStruct((1, *[free if d is None else d for d in s]),
                               jnp.dtype(dtype)) for s, dtype in specs]


def _subtree(flat: dict, path: tuple[str, ...]) -> dict:
  n = len(path)
  return {k: v for k, v in flat.items() if k[1:1 + n] == path}


def from_keras(model_or_path: Any) -> tuple[Any, dict[str, Any],
                                            FromKerasReport]:
  """Translates a whole Keras model into a Flax linen module and variables.

  Args:
    model_or_path: a built Keras 3 or tf-keras model (functional or
      Sequential; nested models and shared layers included), or the path of
      a ``.keras`` file or a whole-model ``.h5`` (Keras 3's or tf-keras').

  Returns:
    ``(module, variables, report)``: ``module.apply(variables, *inputs)``
    (inputs positional in ``model.inputs`` order) returns what
    ``model(inputs, training=False)`` returns, one array or a list in
    Keras' order; ``train=True`` with ``mutable=["batch_stats"]`` and a
    ``"dropout"`` rng is training mode.

  Raises:
    UnsupportedLayerError: a layer, operation or option without a Flax
      translation (one line naming the layer, its class and the way out).
    GraphError: the model has no graph (subclassed, or unbuilt).
    WeightsFileError: the file cannot be read safely.
  """
  start = time.perf_counter()
  model = load_keras(model_or_path)
  graph, emitted = emitted_graph(model)
  module = instantiate(emitted.source, emitted.class_name)
  specs = input_specs(graph)
  shapes = jax.eval_shape(
      lambda *xs: module.init({"params": jax.random.PRNGKey(0),
                               "dropout": jax.random.PRNGKey(1)}, *xs),
      *trace_inputs(specs))
  variables = merge_variables(emitted, shapes)
  leaves = traverse_util.flatten_dict(variables)
  params = sum(v.size for k, v in leaves.items() if k[0] == "params")
  report = FromKerasReport(
      source=emitted.source, class_name=emitted.class_name,
      input_specs=specs,
      applications={"/".join(p): a.spec_name
                    for p, _, a in emitted.applications},
      layers=len(emitted.layers), params=int(params),
      stats=int(sum(v.size for v in leaves.values()) - params),
      seconds=time.perf_counter() - start)
  return module, variables, report


def merge_variables(emitted: Emitted, shapes: Any) -> dict[str, Any]:
  """Fills the variable tree ``shapes`` from the Keras weights, strictly:
  each application's subtree from its model by the registry's path
  (``translate.merge``: names, then the matcher), the rest by exact path."""
  flat = traverse_util.flatten_dict(shapes)
  filled: dict[tuple[str, ...], np.ndarray] = {}
  for path, app_model, _ in emitted.applications:
    sub = _subtree(flat, path)
    sub_shapes = traverse_util.unflatten_dict(
        {(k[0], *k[1 + len(path):]): v for k, v in sub.items()})
    values, _, _ = merge(keras_io.read_weights(app_model), sub_shapes)
    for k, v in traverse_util.flatten_dict(values).items():
      filled[(k[0], *path, *k[1:])] = v
  rest_keys = [k for k in flat if k not in filled]
  layers = []
  for path, layer, _ in emitted.layers:
    for part in _read_parts(layer, "/".join(path)):
      layers.append(part)
  rest = traverse_util.unflatten_dict({k: flat[k] for k in rest_keys})
  if layers or rest_keys:
    values, _, _ = merge(layers, rest, exact=True)
    filled.update(traverse_util.flatten_dict(values))
  return traverse_util.unflatten_dict({k: filled[k] for k in flat})


def _read_parts(layer: Any, name: str) -> list[keras_io.KerasLayer]:
  """A layer's weights as ``KerasLayer``s named by their Flax path."""
  return list(keras_io.read_layer(layer, name))


def _nnx_header(graph: Graph) -> str:
  return (f"Flax NNX translation of the Keras model {graph.name!r}.\n\n"
          "Generated by keras2flax (translate.emit_source(..., api=\"nnx\"));"
          " edit freely.\nLoad its variables with translate.load_variables "
          "(or any msgpack reader)\nand call ``create(variables)(*inputs)``;"
          " ``train=True`` is Keras' training\nmode, in place. "
          "``to_variables()`` gives the linen variables back.")


def nnx_source(model: Any) -> str:
  """The Flax NNX source of a built Keras model (``emit_source``'s
  ``api="nnx"``), translated by the linen emitter first (which refuses
  what has no translation, and finds the nested applications once)."""
  graph, emitted = emitted_graph(model)
  apps = {id(m): app for _, m, app in emitted.applications}
  return emit_nnx(graph, lambda m: apps.get(id(m)), _nnx_header(graph))


APIS = ("linen", "nnx")


def emit_source(model_or_path: Any, path: str | os.PathLike,
                api: str = "linen") -> str:
  """Writes the Flax source of a Keras model to ``path`` (atomically) and
  returns it. The file imports numpy, jax, flax and this project's
  ``models`` only.

  ``api="linen"`` (default): the module class (submodules named like the
  Keras layers) and ``create()``; ``create().apply(
  translate.load_variables(OUT), *inputs)`` equals Keras for the variables
  ``from_keras`` (or ``main.py``) wrote to ``OUT``.

  ``api="nnx"``: ``nnx.Module`` classes (``nnx.Linear``, ``nnx.Conv``,
  ``nnx.BatchNorm``, ... for the common layers, the linen module in
  ``models.nnx_bridge`` for the others) and ``create(variables)``;
  ``create(translate.load_variables(OUT))(*inputs)`` equals Keras, with
  ``train=True`` training mode (statistics updated in place) and
  ``to_variables()`` the linen variables back.

  Raises:
    ValueError: ``api`` is neither "linen" nor "nnx".
  """
  if api not in APIS:
    raise ValueError(f"emit_source: api must be 'linen' or 'nnx', got "
                     f"{api!r}")
  from translate import io as io_lib  # pylint: disable=g-import-not-at-top
  model = load_keras(model_or_path)
  if api == "nnx":
    source = nnx_source(model)
  else:
    source = emitted_graph(model)[1].source
  io_lib.write_files_atomically([os.fspath(path)], [source.encode()])
  return source


__all__ = ["FromKerasReport", "GraphError", "detect_application",
           "emit_source", "from_keras", "load_keras"]
