"""Keras weights files on disk, read by layer name without Keras.

Formats: Keras 3 ``.weights.h5`` (``layers/<key>/vars/<i>``), legacy HDF5
``.h5`` (``layer_names``/``weight_names``, optionally under
``model_weights``) as Keras 2, tf-keras and Keras 3's legacy saver write it.
``load_weights_file`` loads such a file into a built model strictly.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from translate.keras_io import (_snake_case, canonical_names_by_base,
                                iter_layers)


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
