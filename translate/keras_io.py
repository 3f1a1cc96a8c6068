"""Everything that touches Keras: building models, reading and randomizing
their weights.

Keras is imported lazily (and with the TensorFlow backend unless the user chose
another) so that ``import translate`` stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import sys
import zipfile
from typing import Any, Iterator

import numpy as np


def ensure_backend() -> None:
  """Selects Keras' TensorFlow backend unless the user set ``KERAS_BACKEND``,
  then imports Keras.

  Keras' JAX backend builds EfficientNetB0 in 30 s instead of 1.4 s.
  TensorFlow 2.21 prints C++ start-up lines (oneDNN, CUDA) to stderr whatever
  ``TF_CPP_MIN_LOG_LEVEL`` says; they are silenced during the import unless
  ``TF_CPP_MIN_LOG_LEVEL`` is set to 0.
  """
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  if "keras" in sys.modules:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  quiet = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"
  with quiet_native_stderr(quiet):
    import keras  # pylint: disable=g-import-not-at-top
    if keras.backend.backend() == "tensorflow":
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.list_physical_devices()  # logs the CUDA probe now, silenced


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool | None = None):
  """Points file descriptor 2 at /dev/null (native code ignores sys.stderr).

  ``enabled=None``: unless ``TF_CPP_MIN_LOG_LEVEL`` is set to 0.
  """
  if enabled is None:
    enabled = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "0"
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """The weights of one Keras layer, as read from the model.

  Attributes:
    name: the layer name in the model.
    cls: the layer class name (``"Conv2D"``); selects the translation rule.
    weights: weight name (``"kernel"``, ``"moving_mean"``) to array, in the
      layer's own order.
  """

  name: str
  cls: str
  weights: dict[str, np.ndarray]


def iter_layers(model: Any) -> Iterator[Any]:
  """Yields the leaf layers of ``model``, descending into nested models."""
  for layer in model.layers:
    if hasattr(layer, "layers") and layer.layers:
      yield from iter_layers(layer)
    else:
      yield layer


def weight_name(variable: Any) -> str:
  """``"conv1/kernel:0"`` or ``"kernel"`` -> ``"kernel"`` (Keras 3, tf-keras)."""
  return variable.name.split("/")[-1].split(":")[0]


def read_weights(model: Any) -> list[KerasLayer]:
  """Every weight of every layer that has weights, with its layer's name and
  class. Raises if a layer holds two weights of the same name."""
  out = []
  for layer in iter_layers(model):
    weights: dict[str, np.ndarray] = {}
    for v in layer.weights:
      key = weight_name(v)
      if key in weights:
        raise ValueError(f"Keras layer {layer.name!r} has two weights named "
                         f"{key!r}; cannot translate it unambiguously")
      weights[key] = np.asarray(v.numpy())
    if weights:
      out.append(KerasLayer(layer.name, type(layer).__name__, weights))
  return out


# Keras names an unnamed layer snake_case(class) + "_<session counter>".
def _snake_case(name: str) -> str:
  name = re.sub(r"\W+", "", name)
  name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def canonical_names(layers: list[KerasLayer]) -> dict[str, str]:
  """See ``canonical_names_by_base``; bases come from the layer classes."""
  return canonical_names_by_base([(l.name, _snake_case(l.cls))
                                  for l in layers])


def canonical_names_by_base(named: list[tuple[str, str]]) -> dict[str, str]:
  """Renames auto-named layers so the names do not depend on the session.

  Keras names an unnamed ``Conv2D`` ``conv2d``, ``conv2d_1``, … from a counter
  shared by the whole process, so building another model first shifts every
  number. Auto-named layers (``<snake_case class>[_N]``) are renumbered by the
  rank of ``N`` among the layers of that class in the model: the first becomes
  ``conv2d``, the next ``conv2d_1``, exactly the names of a fresh session.
  Explicitly named layers keep their names.

  Args:
    named: ``(layer name, snake_case class name)`` pairs.

  Returns:
    Original layer name -> canonical name.
  """
  groups: dict[str, list[tuple[int, str]]] = {}
  mapping = {}
  for name, base in named:
    m = re.fullmatch(re.escape(base) + r"(?:_(\d+))?", name)
    if m:
      groups.setdefault(base, []).append((int(m.group(1) or 0), name))
    else:
      mapping[name] = name
  for base, members in groups.items():
    for rank, (_, name) in enumerate(sorted(members)):
      mapping[name] = base if rank == 0 else f"{base}_{rank}"
  return mapping


class WeightsFileError(ValueError):
  """A local weights file cannot be read or does not fit the model."""


def read_weights_file(path: str) -> dict[str, list[np.ndarray]]:
  """Reads a Keras weights file by layer name, without Keras.

  Supports Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>`` groups whose
  ``name`` attribute is the layer name) and legacy ``.h5`` (``layer_names``
  / ``weight_names`` attributes, optionally under ``model_weights``), as
  written by Keras 2, tf-keras and Keras 3's legacy saver.

  Returns:
    Layer name -> arrays in the layer's variable order (layers with none
    are left out).

  Raises:
    WeightsFileError: not an HDF5 file, truncated, or of unknown layout.
  """
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(path, "r") as f:
      group = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in group.attrs:
        return _read_legacy_h5(group)
      if "layers" in f:
        return _read_keras3_h5(f["layers"])
  except (OSError, KeyError, ValueError) as e:
    raise WeightsFileError(
        f"cannot read weights file {path}: {' '.join(str(e).split())} (is it "
        "truncated or not a Keras weights file?)") from e
  raise WeightsFileError(f"{path} is an HDF5 file but not a Keras weights "
                         "file (no 'layers' group, no 'layer_names')")


def _text(v: Any) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def _read_legacy_h5(group: Any) -> dict[str, list[np.ndarray]]:
  out = {}
  for name in map(_text, group.attrs["layer_names"]):
    g = group[name]
    arrays = [np.asarray(g[_text(w)]) for w in g.attrs.get("weight_names", [])]
    if arrays:
      out[name] = arrays
  return out


def _read_keras3_h5(layers: Any) -> dict[str, list[np.ndarray]]:
  out = {}
  for key in layers:
    g = layers[key]
    if "vars" not in g:
      continue
    arrays = [np.asarray(g["vars"][i]) for i in
              sorted(g["vars"], key=int)]
    if arrays:
      out[_text(g["vars"].attrs.get("name", key))] = arrays
  return out


def load_weights_file(model: Any, path: str) -> None:
  """Loads a local weights file into ``model`` by layer name, strictly.

  Keras' own ``load_weights`` pairs ``.weights.h5`` layers by position and
  only warns on a mismatch (a no-top file loads into a model with a top);
  here every layer of the model must be in the file with the same number and
  shapes of arrays, and every layer of the file must be used. Auto-named
  layers are compared by their session-independent canonical names.

  Raises:
    WeightsFileError: naming the first layers that do not fit.
  """
  stored = read_weights_file(path)
  layers = [l for l in iter_layers(model) if l.weights]
  snakes = {_snake_case(type(l).__name__) for l in layers}

  def base_of(name: str) -> str:
    base = re.sub(r"_\d+$", "", name)
    return base if base in snakes else "\0"  # \0: never auto-named

  canon_model = canonical_names_by_base(
      [(l.name, _snake_case(type(l).__name__)) for l in layers])
  canon_file = canonical_names_by_base([(n, base_of(n)) for n in stored])
  file_by = {canon_file[n]: arrays for n, arrays in stored.items()}
  model_names = [canon_model[l.name] for l in layers]
  missing = [n for n in model_names if n not in file_by]
  extra = [n for n in file_by if n not in set(model_names)]
  misfit = []
  for layer, name in zip(layers, model_names):
    arrays = file_by.get(name)
    want = [tuple(v.shape) for v in layer.weights]
    if arrays is not None and [a.shape for a in arrays] != want:
      misfit.append(f"{name} (file {[a.shape for a in arrays]}, model {want})")
  if missing or extra or misfit:
    parts = []
    if missing:
      parts.append(f"{len(missing)} model layer(s) missing from the file, "
                   f"first: {', '.join(missing[:4])}")
    if extra:
      parts.append(f"{len(extra)} file layer(s) not in the model, first: "
                   f"{', '.join(extra[:4])}")
    if misfit:
      parts.append(f"{len(misfit)} layer(s) with other shapes, first: "
                   f"{'; '.join(misfit[:3])}")
    raise WeightsFileError(
        f"weights file {path} does not fit {model.name}: {'; '.join(parts)} "
        "(is it for another model, or with/without the top? check --model "
        "and --include_top)")
  for layer, name in zip(layers, model_names):
    for v, a in zip(layer.weights, file_by[name]):
      v.assign(a.astype(np.dtype(getattr(v.dtype, "name", v.dtype))))
    if hasattr(layer, "finalize_state"):
      layer.finalize_state()


class WeightsDownloadError(RuntimeError):
  """Keras could not download the ImageNet weights (no network)."""


_GET_FILE_HOMES = ("keras.src.utils.file_utils", "tf_keras.src.utils.data_utils")


@contextlib.contextmanager
def record_downloads():
  """Records the local paths of the files Keras' ``get_file`` returns while
  building a model (the cached ImageNet weights), to hash them."""
  paths: list[str] = []
  patched = []
  for home in _GET_FILE_HOMES:
    mod = sys.modules.get(home)
    if mod is None:
      continue
    original = mod.get_file

    def wrapper(*args, _original=original, **kwargs):
      path = _original(*args, **kwargs)
      paths.append(path)
      return path

    mod.get_file = wrapper
    patched.append((mod, original))
  try:
    yield paths
  finally:
    for mod, original in patched:
      mod.get_file = original


def build(spec: Any, weights: str | None, *, include_top: bool = True,
          classes: int = 1000, pooling: str | None = None,
          classifier_activation: Any = "softmax",
          input_shape: Any = None, **options: Any) -> Any:
  """Builds the Keras model of ``spec``.

  Args:
    spec: a ``models.ModelSpec``.
    weights: ``"imagenet"`` (downloaded and cached by Keras), ``None``
      (Keras' random initialization) or a local file: ``.weights.h5`` or
      legacy ``.h5`` (loaded strictly by layer name into the registry
      architecture, see ``load_weights_file``) or ``.keras`` (the saved
      model itself, loaded with ``safe_mode=True``).
  """
  ensure_backend()
  if isinstance(weights, (str, os.PathLike)) and str(weights).endswith(
      ".keras"):
    import keras  # pylint: disable=g-import-not-at-top
    try:
      return keras.saving.load_model(weights, compile=False, safe_mode=True)
    except ValueError as e:
      if "safe_mode" in str(e) or "Lambda" in str(e):
        raise WeightsFileError(
            f"{weights} contains a Lambda layer (arbitrary Python code); "
            "refused: Keras safe_mode=True forbids loading it. Save the "
            "weights alone (model.save_weights('x.weights.h5')) and pass "
            "that file") from e
      raise WeightsFileError(f"cannot load {weights}: "
                             f"{' '.join(str(e).split())}") from e
    except (OSError, zipfile.BadZipFile) as e:
      raise WeightsFileError(
          f"cannot read {weights}: {' '.join(str(e).split())} (is it "
          "truncated or not a .keras file?)") from e
  kwargs = dict(include_top=include_top, pooling=pooling, classes=classes,
                classifier_activation=classifier_activation,
                input_shape=None if input_shape is None else tuple(input_shape),
                **options)
  ctor = spec.keras_constructor()
  if weights is None:
    return ctor(weights=None, **kwargs)
  if weights == "imagenet":
    try:
      return ctor(weights="imagenet", **kwargs)
    except Exception as e:  # Keras raises a bare Exception on fetch failure
      if "fetch failure" in str(e) or isinstance(e, OSError):
        raise WeightsDownloadError(
            f"could not download the ImageNet weights of {spec.keras_name}: "
            "this machine seems to be offline; use --weights random (offline "
            "check) or --weights PATH (a local Keras weights file)") from e
      raise
  model = ctor(weights=None, **kwargs)
  load_weights_file(model, os.fspath(weights))
  return model


def _fan_in(layer_cls: str, shape: tuple[int, ...]) -> int:
  if layer_cls == "DepthwiseConv2D":
    return int(np.prod(shape[:2]))  # each output sees one input channel
  return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def randomize(model: Any, seed: int = 0,
              calibration: np.ndarray | None = None) -> None:
  """Overwrites every weight of ``model`` with seeded random values.

  Includes the BatchNormalization moving statistics (and a Normalization
  layer's mean/variance), so that a swapped mean/variance, scale/bias or a
  transposed kernel cannot pass a parity check. Variances stay positive;
  kernels are scaled by fan-in.

  Args:
    model: a built Keras model.
    seed: seed of every random draw.
    calibration: preprocessed inputs. When given, each BatchNormalization's
      moving statistics become the statistics its input really has on these
      inputs, given the random weights: random values, distinct per channel
      (a swapped mean/variance still fails parity), but the activations stay
      O(1) through deep models. Independent random statistics make them grow
      to 1e3-1e5 (even a 10% perturbation compounds through EfficientNet),
      where a real translation error hides under a relative tolerance and
      float32 rounding alone breaks it.
  """
  rng = np.random.default_rng(seed)
  for layer in iter_layers(model):
    for v in layer.weights:
      name, shape = weight_name(v), tuple(v.shape)
      dtype = np.dtype(getattr(v.dtype, "name", v.dtype))
      if not np.issubdtype(dtype, np.floating):
        continue  # e.g. Normalization's integer sample count
      if name in ("moving_variance", "variance"):
        value = rng.uniform(0.5, 2.0, shape)
      elif name == "gamma":
        value = rng.uniform(0.5, 1.5, shape)
      elif name in ("moving_mean", "mean"):
        value = rng.normal(0.0, 0.5, shape)
      elif name == "beta":
        # Positive shifts keep most ReLU/swish units active: the random
        # network is then contractive instead of at the edge of chaos, where
        # float32 rounding alone grows to 1e-3 over ResNetRS420's blocks.
        value = rng.uniform(0.5, 1.5, shape)
      elif name == "bias":
        value = rng.normal(0.0, 0.1, shape)
      else:
        std = np.sqrt(2.0 / _fan_in(type(layer).__name__, shape))
        value = rng.normal(0.0, std, shape)
      v.assign(value.astype(dtype))
    if layer.weights and hasattr(layer, "finalize_state"):
      # Keras' Normalization computes its effective mean/variance from the
      # variables only in finalize_state() (as after adapt() or a load).
      layer.finalize_state()
  if calibration is not None:
    _calibrate_batchnorm(model, calibration)


def _calibrate_batchnorm(model: Any, x: np.ndarray) -> None:
  """Sets BN moving statistics to their inputs' real statistics on ``x``.

  One training-mode pass (each BN normalizes with its batch statistics,
  dropout off) computes every BN input's per-channel mean and variance
  inside the graph (only the reductions are returned, so EfficientNetB7 at
  600x600 does not hold hundreds of feature maps); inference then sees the
  same distributions.
  """
  bns = [l for l in iter_layers(model)
         if type(l).__name__ == "BatchNormalization"]
  if not bns:
    return
  package_name = type(model).__module__.split(".")[0]
  package = importlib.import_module(package_name)
  if package_name == "keras":
    mean_fn, var_fn = package.ops.mean, package.ops.var
  else:  # tf_keras: TF ops on symbolic tensors become layers
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    mean_fn, var_fn = tf.math.reduce_mean, tf.math.reduce_variance
  outputs = []
  for l in bns:
    rank = len(l.input.shape)
    axis = l.axis[0] if isinstance(l.axis, (list, tuple)) else l.axis
    if axis % rank != rank - 1:
      raise ValueError(f"BatchNormalization {l.name!r} normalizes axis "
                       f"{axis}; only channels-last models are supported")
    axes = list(range(rank - 1))
    outputs += [mean_fn(l.input, axis=axes), var_fn(l.input, axis=axes)]
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
  probe = package.Model(inputs, outputs)
  saved = [[np.asarray(v.numpy()) for v in l.weights] for l in bns]
  dropouts = [l for l in iter_layers(model) if hasattr(l, "rate")]
  rates = [l.rate for l in dropouts]
  for l in dropouts:  # the probe runs in training mode: no dropout
    l.rate = 0.0
  run = lambda batch: probe(batch, training=True)  # noqa: E731
  if package_name == "tf_keras" or package.backend.backend() == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    run = tf.function(run)  # a graph frees dead feature maps as it goes
  try:
    # One image at a time (EfficientNetB7 at 600x600 needs 17 GB for four),
    # pooled: mean of the means, and E[x^2] - mean^2 for the variance.
    per_image = [[np.asarray(s, np.float64) for s in run(x[i:i + 1])]
                 for i in range(len(x))]
  finally:
    for l, r in zip(dropouts, rates):
      l.rate = r
  stats = []
  for j in range(0, len(outputs), 2):
    means = np.stack([p[j] for p in per_image])
    second = np.stack([p[j + 1] + p[j] ** 2 for p in per_image])
    mean = means.mean(0)
    stats += [mean, np.maximum(second.mean(0) - mean**2, 0.0)]
  for i, (layer, weights) in enumerate(zip(bns, saved)):
    for v, w in zip(layer.weights, weights):  # undo the training-mode update
      v.assign(w)
    mean, var = stats[2 * i], stats[2 * i + 1] + 1e-3
    for v in layer.weights:
      name = weight_name(v)
      if name == "moving_mean":
        v.assign(mean.astype(np.float32))
      elif name == "moving_variance":
        v.assign(var.astype(np.float32))


def keras_version(model: Any) -> str:
  """``keras 3.15.1`` or ``tf_keras 2.21.0``: the package that built model."""
  package = type(model).__module__.split(".")[0]
  return f"{package} {sys.modules[package].__version__}"
