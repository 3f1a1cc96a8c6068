"""Keras weights files on disk, read by layer name without Keras.

Formats: Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>``), legacy HDF5
``.h5`` (``layer_names``/``weight_names``, optionally under
``model_weights``) as Keras 2, tf-keras and Keras 3's legacy saver write it.
``load_weights_file`` loads such a file into a built model strictly.

Every file is read through ``translate.safe_files``: HDF5 files are walked
before any dataset is read (no external storage, links or virtual datasets),
``.keras`` zips are checked member by member and read in memory, and every
array read must be finite; a refusal is a ``safe_files.UnsafeFileError``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import numpy as np

from models.layers import snake_case
from translate.keras_io import canonical_names_by_base, iter_layers
from translate.safe_files import (UnsafeFileError, attr_text, check_finite,
                                  open_hdf5, read_array, read_keras_zip)


class WeightsFileError(ValueError):
  """A local weights file cannot be read or does not fit the model."""


def read_weights_file(path: str) -> dict[str, list[np.ndarray]]:
  """Reads a Keras weights file by layer name, without Keras.

  Supports Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>`` groups whose
  ``name`` attribute is the layer name, nested models included) and legacy
  ``.h5`` (``layer_names`` / ``weight_names`` attributes, optionally under
  ``model_weights``), as written by Keras 2, tf-keras and Keras 3's legacy
  saver. tf-keras' own ``.weights.h5`` has no layer names: its layers are
  returned under their saver paths (``layers/conv2d_3``); see
  ``load_weights_file``.

  Returns:
    Layer name (or saver path) -> arrays in the layer's variable order
    (layers with none are left out).

  Raises:
    WeightsFileError: not an HDF5 file, truncated, or of unknown layout.
    UnsafeFileError: the file would make HDF5 read other files, or holds
      NaN/Inf or non-numeric data (``translate.safe_files``).
  """
  return _read(path)[0]


def _read(path: str) -> tuple[dict[str, list[np.ndarray]], bool]:
  """``(layers, named)``: ``named`` is False for tf-keras' nameless
  ``.weights.h5``, whose keys are saver paths."""
  try:
    source, label = path, str(path)
    if str(path).endswith(".keras"):  # a zip: config.json + model.weights.h5
      source = io.BytesIO(
          read_keras_zip(path, ("model.weights.h5",))["model.weights.h5"])
      label = f"{path} (model.weights.h5)"
    with open_hdf5(source, label) as f:
      group = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in group.attrs:
        return _read_legacy_h5(group, label=label), True
      if "layers" in f:
        entries = _read_keras3_h5(f["layers"], "layers/", label=label)
        named = all(name is not None for name, _ in entries.values())
        if named:
          return {name: arrays for name, arrays in entries.values()}, True
        return {key: arrays for key, (_, arrays) in entries.items()}, False
  except UnsafeFileError:
    raise
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise WeightsFileError(
        f"cannot read weights file {path}: {' '.join(str(e).split())} (is it "
        "truncated or not a Keras weights file?)") from e
  raise WeightsFileError(f"{path} is an HDF5 file but not a Keras weights "
                         "file (no 'layers' group, no 'layer_names')")


def _read_legacy_h5(group: Any, *, label: str = ""
                    ) -> dict[str, list[np.ndarray]]:
  """Legacy HDF5: one group per top-level layer. A nested model's group
  holds its inner layers' weights, named ``<inner layer>/<weight>``; they
  are split back into their layers. ``label`` names the file in errors."""
  out: dict[str, list[np.ndarray]] = {}
  for name in map(attr_text, group.attrs["layer_names"]):
    g = group[name]
    names = [attr_text(w) for w in g.attrs.get("weight_names", [])]
    owners = [w.rsplit("/", 1)[0] if "/" in w else name for w in names]
    nested = any(o != name for o in owners) and not all(
        o.endswith(name) for o in owners)  # e.g. "model/conv1" vs "conv1"
    for w, owner in zip(names, owners):
      a = read_array(g, w, label)
      # tf-keras "conv1/kernel:0", Keras 3 "conv1/kernel": conv1/kernel
      check_finite(label, re.sub(r":\d+$", "", w if "/" in w
                                 else f"{name}/{w}"), a)
      out.setdefault(owner if nested else name, []).append(a)
  return out


def _read_keras3_h5(layers: Any, prefix: str, *, label: str = ""
                    ) -> dict[str, tuple[str | None, list[np.ndarray]]]:
  """``.weights.h5``: saver path -> (layer name or None, arrays), descending
  into nested models (``layers/<key>/layers/<key>``). ``label`` names the
  file in errors."""
  out = {}
  for key in layers:
    g = layers[key]
    if "vars" in g and len(g["vars"]):
      name = g["vars"].attrs.get("name")
      name = None if name is None else attr_text(name)
      arrays = []
      for i in sorted(g["vars"], key=int):
        arrays.append(read_array(g["vars"], i, label))
        check_finite(label, f"{name or prefix + key}/vars/{i}", arrays[-1])
      out[prefix + key] = (name, arrays)
    if "layers" in g:
      out.update(_read_keras3_h5(g["layers"], f"{prefix}{key}/layers/",
                                 label=label))
  return out


def saver_paths(model: Any, prefix: str = "layers/") -> dict[str, Any]:
  """The path each weighted leaf layer of ``model`` has in a
  ``.weights.h5``: ``layers/<snake_case class>[_<n>]``, numbered per class
  in the container's layer order, nested models as ``<path>/layers/...``,
  as the Keras 3 and tf-keras savers write them."""
  counts: dict[str, int] = {}
  out = {}
  for layer in model.layers:
    base = snake_case(type(layer).__name__)
    n = counts.get(base, 0)
    counts[base] = n + 1
    key = prefix + (base if n == 0 else f"{base}_{n}")
    if getattr(layer, "layers", None):
      out.update(saver_paths(layer, key + "/layers/"))
    elif layer.weights:
      out[key] = layer
  return out


def _misfit_parts(missing: list[str], extra: list[str],
                  misfit: list[str]) -> list[str]:
  """The clauses of a "does not fit" error: both sides, then the shapes."""
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
  return parts


def load_weights_file(model: Any, path: str,
                      aliases: tuple[tuple[str, str], ...] = ()) -> None:
  """Loads a local weights file into ``model`` by layer name, strictly.

  Keras' own ``load_weights`` pairs ``.weights.h5`` layers by position and
  only warns on a mismatch (a no-top file loads into a model with a top);
  here every layer of the model must be in the file with the same number and
  shapes of arrays, and every layer of the file must be used. Auto-named
  layers are compared by their session-independent canonical names, and
  ``aliases`` (the spec's ``name_aliases``) rewrite older Keras versions'
  names first.

  Raises:
    WeightsFileError: naming the first layers that do not fit.
    UnsafeFileError: as ``read_weights_file``.
  """
  stored, named = _read(path)
  if not named:
    _load_by_structure(model, path, stored)
    return
  layers = [l for l in iter_layers(model) if l.weights]
  snakes = {snake_case(type(l).__name__) for l in layers}

  def base_of(name: str) -> str:
    base = re.sub(r"_\d+$", "", name)
    return base if base in snakes else "\0"  # \0: never auto-named

  canon_model = canonical_names_by_base(
      [(l.name, snake_case(type(l).__name__)) for l in layers])
  if aliases:  # the family's names from older Keras versions
    renamed = {}
    for n, arrays in stored.items():
      for pattern, repl in aliases:
        n = re.sub(pattern, repl, n)
      renamed[n] = arrays
    if len(renamed) == len(stored):
      stored = renamed
  canon_file = canonical_names_by_base([(n, base_of(n)) for n in stored])
  file_by = {canon_file[n]: arrays for n, arrays in stored.items()}
  model_names = [canon_model[l.name] for l in layers]
  # Keras versions spell some names with "/" where others use "_" (tf-keras
  # DenseNet "conv1/conv", Keras 3 "conv1_conv") or in another case
  # (tf-keras MobileNetV3 "Logits", Keras 3 "logits"): compare the spellings
  # as one, where that stays one-to-one on each side.
  alias = lambda n: n.replace("/", "_").lower()  # noqa: E731
  model_alias = {alias(n): n for n in model_names}
  file_alias = {alias(n): n for n in file_by}
  if (len(model_alias) == len(model_names)
      and len(file_alias) == len(file_by)):
    file_by = {model_alias.get(k, v): file_by[v]
               for k, v in file_alias.items()}
  missing = [n for n in model_names if n not in file_by]
  extra = [n for n in file_by if n not in set(model_names)]
  misfit = []
  for layer, name in zip(layers, model_names):
    arrays = file_by.get(name)
    want = [tuple(v.shape) for v in layer.weights]
    if arrays is not None and [a.shape for a in arrays] != want:
      misfit.append(f"{name} (file {[a.shape for a in arrays]}, model {want})")
  if missing or extra or misfit:
    parts = _misfit_parts(missing, extra, misfit)
    raise WeightsFileError(
        f"weights file {path} does not fit {model.name}: {'; '.join(parts)} "
        "(is it for another model, or with/without the top? check --model "
        "and --include_top)")
  for layer, name in zip(layers, model_names):
    for v, a in zip(layer.weights, file_by[name]):
      v.assign(a.astype(np.dtype(getattr(v.dtype, "name", v.dtype))))
    if hasattr(layer, "finalize_state"):
      layer.finalize_state()


def _load_by_structure(model: Any, path: str,
                       stored: dict[str, list[np.ndarray]]) -> None:
  """tf-keras' ``.weights.h5`` names its groups by saver path, not by layer:
  pair them with the freshly built model's saver paths (what tf-keras itself
  does), strictly: the same paths (so the same layer classes in the same
  order), the same number and shapes of arrays."""
  expected = saver_paths(model)
  missing = [k for k in expected if k not in stored]
  extra = [k for k in stored if k not in expected]
  misfit = []
  for key, layer in expected.items():
    arrays = stored.get(key)
    want = [tuple(v.shape) for v in layer.weights]
    if arrays is not None and [a.shape for a in arrays] != want:
      misfit.append(f"{key} = {layer.name} (file {[a.shape for a in arrays]},"
                    f" model {want})")
  if missing or extra or misfit:
    parts = _misfit_parts(missing, extra, misfit)
    raise WeightsFileError(
        f"weights file {path} (a tf-keras .weights.h5, paired by layer "
        f"order) does not fit {model.name}: {'; '.join(parts)} (is it for "
        "another model, or with/without the top? check --model and "
        "--include_top)")
  for key, layer in expected.items():
    for v, a in zip(layer.weights, stored[key]):
      v.assign(a.astype(np.dtype(getattr(v.dtype, "name", v.dtype))))
    if hasattr(layer, "finalize_state"):
      layer.finalize_state()


# Layers that pass a classifier's output through unchanged in shape class:
# walking back from the model's output over these finds the classifier.
_PASS_THROUGH = ("Activation", "Flatten", "Reshape", "Dropout", "Softmax")
_GLOBAL_POOLING = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}
FILE_OPTIONS = ("include_top", "classes", "pooling", "classifier_activation",
                "input_shape")


def model_config(path: str) -> dict[str, Any] | None:
  """The architecture a whole-model file carries (``.keras``'s
  ``config.json``, a whole-model ``.h5``'s ``model_config``), or None for a
  weights-only file. Nothing is deserialized into code; the file is checked
  by ``translate.safe_files`` first."""
  path = str(path)
  try:
    if path.endswith(".keras"):
      return json.loads(read_keras_zip(path, ("config.json",))["config.json"])
    if path.endswith(".h5"):
      with open_hdf5(path, path) as f:
        text = f.attrs.get("model_config")
        return None if text is None else json.loads(attr_text(text))
  except UnsafeFileError:
    raise
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise WeightsFileError(
        f"cannot read weights file {path}: {' '.join(str(e).split())} (is it "
        "truncated or not a Keras weights file?)") from e
  return None


def layer_classes(config: dict[str, Any]):
  """Every layer class name in a model config, nested models included."""
  for layer in config.get("config", {}).get("layers", []):
    yield layer.get("class_name", "")
    if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
      yield from layer_classes(layer)


def file_options(path: str) -> dict[str, Any] | None:
  """The ``create`` options a whole-model file fixes, read from its config
  by Keras layer class (no code is loaded), or None for a weights-only file;
  see ``options_from_config``.

  Raises:
    WeightsFileError: the file holds a ``Lambda`` layer (arbitrary Python
      code), or its config is not a functional model.
  """
  config = model_config(path)
  if config is None:
    return None
  if "Lambda" in set(layer_classes(config)):
    raise WeightsFileError(
        f"{path} contains a Lambda layer (arbitrary Python code); refused: "
        "Keras safe_mode=True forbids loading it. Save the weights alone "
        "(model.save_weights('x.weights.h5')) and pass that file")
  try:
    return options_from_config(config)
  except WeightsFileError as e:
    raise WeightsFileError(f"{path} {e}") from None


def options_from_config(config: dict[str, Any]) -> dict[str, Any]:
  """The ``create`` options a functional model's config fixes.

  ``input_shape`` from the ``InputLayer``; the classifier is found walking
  back from the output layer over weightless pass-through layers
  (``Activation``, ``Flatten``, ``Reshape``, ``Dropout``): a ``Dense`` or
  ``Conv2D`` there is the top, with ``classes`` its width and
  ``classifier_activation`` the final activation (``linear``: None);
  otherwise there is no top and a final global pooling layer is ``pooling``.

  Raises:
    WeightsFileError: the config holds no layers (not a functional model).
  """
  layers = config.get("config", {}).get("layers")
  if not layers:
    raise WeightsFileError("does not hold a functional Keras model (no "
                           "layers in its config)")
  opts: dict[str, Any] = {}
  for layer in layers:
    if layer.get("class_name") == "InputLayer":
      c = layer["config"]
      shape = c.get("batch_shape") or c.get("batch_input_shape")
      if shape and all(isinstance(d, int) for d in shape[1:]):
        opts["input_shape"] = tuple(shape[1:])
      break
  final = layers[-1]
  activation = final["config"].get("activation")
  classifier = None
  for layer in reversed(layers):
    c = layer.get("config", {})
    if "units" in c or "filters" in c:
      classifier = layer
      break
    if layer.get("class_name") not in _PASS_THROUGH:
      break
  if classifier is None:
    opts.update(include_top=False,
                pooling=_GLOBAL_POOLING.get(final.get("class_name")))
  else:
    c = classifier["config"]
    opts.update(include_top=True, classes=int(c.get("units") or
                                                c.get("filters")),
                classifier_activation=None if activation in (
                    None, "linear") else activation)
  return opts


def merge_file_options(path: str, create_kwargs: dict[str, Any]
                       ) -> dict[str, Any]:
  """``create_kwargs`` completed with the options the file fixes.

  Raises:
    WeightsFileError: an explicit option contradicts the file (one line
      naming both values).
  """
  opts = file_options(path)
  if opts is None:
    return dict(create_kwargs)
  for key, value in opts.items():
    if key not in create_kwargs or (key == "pooling" and opts["include_top"]):
      continue  # pooling only applies without the top
    given = create_kwargs[key]
    if key == "input_shape" and given is not None:
      given = tuple(int(d) for d in given)
    if key == "classifier_activation" and given in ("linear", "none"):
      given = None
    if given != value:
      raise WeightsFileError(
          f"{path} was saved with {key}={value!r}, but {key}={given!r} was "
          "asked; drop that option (the file fixes it) or pass a file saved "
          "with it")
  return {**create_kwargs, **opts}
