"""Weights files as hostile input: what they may make the readers do.

An HDF5 file can name other files whose bytes HDF5 then reads as its own: a
dataset with *external storage* (its raw data in any local file), an
*external link* (an object in another HDF5 file), a *virtual dataset*
(values mapped from other files' datasets), and filters that HDF5 loads as
shared-library plugins. A ``.keras`` zip can hold members with hostile names
or sizes. Every reader of a user's weights file goes through this module:

* ``open_hdf5`` opens an HDF5 file (a path, or bytes in memory) read-only
  and, before any dataset is read, walks every link with ``H5Lvisit``
  (``links.visit``), which follows hard links only: any soft, external or
  user-defined link is refused (Keras' savers write none; a soft link's
  target is not resolved, since resolving it could cross an external link),
  and every dataset must have a compact, contiguous or chunked layout with
  no external storage, only HDF5's built-in filters (deflate, shuffle,
  fletcher32, szip, nbit, scale-offset) and h5py's LZF (no plugin is ever
  looked up), a numeric dtype (bool, integer, float, or the 2-byte opaque
  type Keras 3 tags ``dtype="bfloat16"``), and stored bytes within
  ``_DATASET_MAX_EXPANSION`` of its declared size once that size passes
  ``_DATASET_BOMB_FLOOR`` (a "shape bomb" declares gigabytes and stores
  nothing). Named datatypes and other object types are refused too.
* ``read_array`` reads one dataset of a file so opened, re-checking it and
  opening it with a dataset access property list whose external-file
  prefix (``H5Pset_efile_prefix``) lies under ``os.devnull``, a file, so no
  *relative* external-storage name resolves to anything (without it HDF5
  resolves them against the working directory). HDF5 applies the prefix to
  relative names only, and the environment variable ``HDF5_EXTFILE_PREFIX``
  takes precedence over it: it is a second line, the walk is the guard.
* ``check_finite`` / ``check_finite_tree`` refuse NaN or Inf in float
  arrays (bfloat16 included), naming the array and the counts.
* ``read_keras_zip`` checks every member of a ``.keras`` zip from its
  central directory before reading any (names ``config.json``,
  ``metadata.json``, ``model.weights.h5`` / ``.npz`` and ``assets/...``, as
  Keras 3's ``saving_lib`` writes them; no absolute path, ``..``, backslash,
  drive, symlink, encryption or duplicate; sizes within bounds), then reads
  the members asked for into memory with a bounded read; nothing is
  extracted to disk.

Library-level guards not used, and why: ``H5Pset_virtual_prefix`` guards
nothing, since HDF5 falls back to the virtual dataset's own directory (and to
absolute names) when the prefix does not resolve; the link access properties
(``H5Pset_elink_prefix``, ``H5Pset_elink_fapl``, ``H5Pset_nlinks``) would
bound link traversal, but h5py's high-level objects pass no link access
list (``CommonStateObject._lapl`` is a module-wide None) and ``h5d.open``
takes none, so they cannot guard the reads; ``H5Pset_nlinks`` refuses 0;
``H5Pset_elink_cb`` and ``H5Lunregister`` (which could switch external
links off) are not exposed by h5py; ``HDF5_PLUGIN_PRELOAD=::`` switches
plugins off only if set before HDF5 initializes; ``locking`` concerns
concurrent writers, not content. Nothing here unpickles or evaluates
anything: attributes and JSON are read as data.

Only the standard library and numpy are imported at module level; h5py is
imported when a file is opened.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np


class UnsafeFileError(ValueError):
  """A weights file would make a reader use other files or bytes than its
  own, or holds values no translation should carry (NaN, Inf)."""


# A dataset declaring more than this many bytes must store at least
# 1/_DATASET_MAX_EXPANSION of them: Keras' savers store every array whole
# (ratio 1); gzip on real weights stays under 2x. Mirrors Keras 3's own
# shape-bomb guard (saving_lib._H5_DATASET_MAX_EXPANSION), with a lower
# floor since the file is read whole into memory here.
_DATASET_BOMB_FLOOR = 256 << 20
_DATASET_MAX_EXPANSION = 1000

# HDF5's built-in filters and h5py's LZF (compiled into h5py): any other
# filter id would make HDF5 search HDF5_PLUGIN_PATH and load a shared
# library.
_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip",
            5: "nbit", 6: "scaleoffset", 32000: "lzf"}

# A prefix no path can lie under: os.devnull is a file, not a directory.
_NO_SUCH_DIR = os.path.join(os.devnull, "refused")


def _h5py():
  import h5py  # pylint: disable=g-import-not-at-top
  return h5py


def attr_text(v: Any) -> str:
  """An HDF5 attribute (bytes or str) as text."""
  return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _refuse(label: str, what: str) -> UnsafeFileError:
  return UnsafeFileError(f"weights file {label}: {what}; refused (see "
                         "docs/security.md)")


def _dtype_problem(h5py: Any, dsid: Any) -> str | None:
  """Why the dataset's type is not a plain number, or None."""
  tid = dsid.get_type()
  cls = tid.get_class()
  t = h5py.h5t
  if cls in (t.INTEGER, t.FLOAT):
    return None
  if cls == t.ENUM and dsid.dtype.kind == "b":  # h5py stores bool as enum
    return None
  if cls == t.OPAQUE and tid.get_size() == 2:
    # Keras 3's H5IOStore writes bfloat16 as 2-byte opaque, tagged.
    if attr_text(h5py.Dataset(dsid).attrs.get("dtype", "")) == "bfloat16":
      return None
  names = {t.STRING: "strings", t.COMPOUND: "compound records",
           t.VLEN: "variable-length data", t.REFERENCE: "object references",
           t.ARRAY: "array-typed elements", t.OPAQUE: "opaque bytes",
           t.ENUM: "enum values", t.BITFIELD: "bit fields"}
  return (f"holds {names.get(cls, f'HDF5 type class {cls}')}, not numbers "
          "(Keras stores weights as bool, integer or float)")


def _dataset_problem(h5py: Any, dsid: Any) -> str | None:
  """Why a dataset is refused, or None. Reads its header only."""
  dcpl = dsid.get_create_plist()
  layout = dcpl.get_layout()
  if layout == h5py.h5d.VIRTUAL:
    sources = sorted({(attr_text(dcpl.get_virtual_filename(i)),
                       attr_text(dcpl.get_virtual_dsetname(i)))
                      for i in range(dcpl.get_virtual_count())})
    shown = ", ".join(f"{f}:{d}" for f, d in sources[:3])
    return f"is a virtual dataset (its values mapped from {shown})"
  if dcpl.get_external_count():
    name = attr_text(dcpl.get_external(0)[0])
    return (f"has external storage in {name!r} (its values would be read "
            "from that file)")
  if layout not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS,
                    h5py.h5d.CHUNKED):
    return f"has storage layout {layout}, not compact, contiguous or chunked"
  for i in range(dcpl.get_nfilters()):
    code = dcpl.get_filter(i)[0]
    if code not in _FILTERS:
      return (f"uses HDF5 filter {code}, a plugin HDF5 would load as a "
              f"shared library (allowed: {', '.join(_FILTERS.values())})")
  problem = _dtype_problem(h5py, dsid)
  if problem:
    return problem
  shape = dsid.get_space().shape  # None for a null dataspace
  declared = 0 if shape is None else (math.prod(shape)
                                      * dsid.get_type().get_size())
  stored = dsid.get_storage_size()
  if (declared > _DATASET_BOMB_FLOOR
      and declared > _DATASET_MAX_EXPANSION * stored):
    return (f"declares {declared} bytes but stores {stored} (a shape "
            "bomb: reading it would allocate the declared size)")
  return None


def _walk(f: Any, label: str) -> None:
  """Raises on the first link or object a weights file must not have.

  ``links.visit`` (``H5Lvisit``) recurses through hard links only and
  visits each group once, so nothing is followed out of the file; each
  object is opened by a path of hard links."""
  h5py = _h5py()
  found: list[str] = []

  def visit(name: bytes, info: Any) -> Any:
    path = "/" + attr_text(name)
    if info.type == h5py.h5l.TYPE_SOFT:
      target = attr_text(f.id.links.get_val(name))
      found.append(f"{path} is a soft link to {target!r} (Keras' savers "
                   "write no links; its target is not followed)")
    elif info.type == h5py.h5l.TYPE_EXTERNAL:
      file, obj = (attr_text(v) for v in f.id.links.get_val(name))
      found.append(f"{path} is an external link to {obj!r} in {file!r} "
                   "(it would open that file)")
    elif info.type != h5py.h5l.TYPE_HARD:
      found.append(f"{path} is a user-defined link (type {info.type})")
    else:
      kind = h5py.h5o.get_info(f.id, name).type
      if kind == h5py.h5o.TYPE_DATASET:
        problem = _dataset_problem(h5py, h5py.h5d.open(f.id, name))
        if problem:
          found.append(f"dataset {path} {problem}")
      elif kind != h5py.h5o.TYPE_GROUP:
        found.append(f"{path} is an HDF5 object of type {kind} (a named "
                     "datatype?), not a group or dataset")
    return True if found else None  # not None stops the visit

  f.id.links.visit(visit, info=True)
  if found:
    raise _refuse(label, found[0])


def check_hdf5(source: str | os.PathLike | BinaryIO, label: str) -> None:
  """Checks an HDF5 file without reading any dataset.

  Args:
    source: a path or a binary file-like object (``io.BytesIO``).
    label: how messages name the file (its path, or ``x.keras
      (model.weights.h5)``).

  Raises:
    UnsafeFileError: one line naming the file, the link or dataset and why
      (external storage, external/soft/user-defined link, virtual dataset,
      plugin filter, non-numeric dtype, shape bomb, other object type).
    OSError: not an HDF5 file.
  """
  with open_hdf5(source, label):
    pass


@contextlib.contextmanager
def open_hdf5(source: str | os.PathLike | BinaryIO, label: str
              ) -> Iterator[Any]:
  """Opens an HDF5 file read-only and checks it (see ``check_hdf5``) before
  yielding the ``h5py.File``; read its datasets with ``read_array``.

  Raises:
    UnsafeFileError: as ``check_hdf5``.
    OSError: not an HDF5 file.
  """
  with _h5py().File(source, "r") as f:
    _walk(f, label)
    yield f


def _dataset_access() -> Any:
  """A dataset access property list under which no relative
  external-storage name resolves (see the module docstring)."""
  h5py = _h5py()
  dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
  dapl.set_efile_prefix(_NO_SUCH_DIR.encode())
  return dapl


def read_array(group: Any, name: str, label: str) -> np.ndarray:
  """Reads dataset ``name`` of ``group`` (of a file from ``open_hdf5``).

  The dataset is checked again and opened under ``_dataset_access``; the
  values are returned as read (a bfloat16 dataset as 2-byte void).

  Raises:
    UnsafeFileError: the dataset is refused (see ``check_hdf5``).
    KeyError: no such dataset. ValueError: not a dataset.
  """
  h5py = _h5py()
  if h5py.h5o.get_info(group.id, name.encode()).type != h5py.h5o.TYPE_DATASET:
    raise ValueError(f"{group.name.rstrip('/')}/{name} is not a dataset")
  dsid = h5py.h5d.open(group.id, name.encode(), dapl=_dataset_access())
  dataset = h5py.Dataset(dsid)
  problem = _dataset_problem(h5py, dsid)
  if problem:
    raise _refuse(label, f"dataset {dataset.name} {problem}")
  return np.asarray(dataset[()])


def _nonfinite_counts(a: np.ndarray) -> tuple[int, int]:
  """(NaN count, Inf count) of a float array; (0, 0) for other dtypes."""
  if a.dtype.kind in "fc" or (a.dtype.kind == "V" and
                              "float" in a.dtype.name):  # ml_dtypes
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())
  if a.dtype.kind == "V" and a.dtype.itemsize == 2 and not a.dtype.names:
    # bfloat16 as h5py reads it (opaque): exponent all ones is NaN or Inf.
    bits = a.view(np.uint16) & 0x7FFF
    return int((bits > 0x7F80).sum()), int((bits == 0x7F80).sum())
  return 0, 0


def check_finite(label: str, name: str, array: Any) -> None:
  """Refuses NaN or Inf in a float array (other dtypes always pass).

  Args:
    label: the file, as messages name it.
    name: the array, e.g. ``conv1/kernel``.
    array: a numpy (or numpy-convertible) array.

  Raises:
    UnsafeFileError: ``weights file {label} holds NaN in conv1/kernel (3 of
      864 values)`` (``Inf``, or ``NaN and Inf`` with both counts).
  """
  a = np.asarray(array)
  if a.dtype.kind in "biu" or (a.dtype.kind in "fc" and
                               np.isfinite(a).all()):
    return
  nan, inf = _nonfinite_counts(a)
  if not nan and not inf:
    return
  if nan and inf:
    what, counts = "NaN and Inf", f"{nan} NaN and {inf} Inf of {a.size}"
  else:
    what, counts = ("NaN", f"{nan} of {a.size}") if nan else (
        "Inf", f"{inf} of {a.size}")
  raise UnsafeFileError(
      f"weights file {label} holds {what} in {name} ({counts} values); "
      "refused: a translation of non-finite weights cannot be checked")


def check_finite_tree(label: str, variables: Any) -> None:
  """``check_finite`` on every leaf of a nested dict (msgpack or orbax
  restored variables), naming the leaf by its path (``params/conv1/kernel``).

  Raises:
    UnsafeFileError: the first leaf with NaN or Inf.
  """
  def walk(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, (*path, str(key)))
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        walk(child, (*path, str(i)))
    elif node is not None:
      check_finite(label, "/".join(path), node)

  walk(variables, ())


# What Keras 3's saver writes into a .keras zip (saving_lib._CONFIG_FILENAME,
# _METADATA_FILENAME, _VARS_FNAME_H5 / _NPZ, _ASSETS_DIRNAME).
KERAS_ZIP_MEMBERS = ("config.json", "metadata.json", "model.weights.h5",
                     "model.weights.npz")
KERAS_ZIP_DIRS = ("assets/",)
# Keras writes members stored (ratio 1); a recompressed file has weights near
# 1x and JSON near 10-30x. A member over _ZIP_RATIO_FLOOR that expands more
# than _ZIP_MAX_RATIO times is a zip bomb (Keras' own guard uses 100x too).
_ZIP_MAX_RATIO = 100
_ZIP_RATIO_FLOOR = 16 << 20
# Absolute caps: the largest Keras application (ConvNeXtXLarge, 350M
# parameters) is 1.4 GB of float32, 4.2 GB more with Adam's slots; the
# largest config.json (NASNetLarge) about 1 MB.
_ZIP_MAX_MEMBER = 16 << 30
_ZIP_MAX_JSON = 64 << 20
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                zipfile.ZIP_LZMA)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
  """Why a member of a ``.keras`` zip is refused, or None (header only)."""
  name = info.filename
  parts = name.split("/")
  if (name.startswith("/") or "\\" in name or "\0" in name
      or ":" in parts[0]):
    return "has an absolute path (or a backslash, drive or NUL)"
  if ".." in parts:
    return "has a '..' component"
  if name not in KERAS_ZIP_MEMBERS and not name.startswith(KERAS_ZIP_DIRS):
    return (f"is not a member Keras writes (expected "
            f"{', '.join(KERAS_ZIP_MEMBERS)} or {KERAS_ZIP_DIRS[0]}...)")
  if stat.S_ISLNK(info.external_attr >> 16):
    return "is a symbolic link"
  if info.flag_bits & 0x1:
    return "is encrypted"
  if info.compress_type not in _ZIP_METHODS:
    return f"uses compression method {info.compress_type}"
  cap = _ZIP_MAX_JSON if name.endswith(".json") else _ZIP_MAX_MEMBER
  if info.file_size > cap:
    return f"declares {info.file_size} bytes (more than {cap})"
  if (info.file_size > _ZIP_RATIO_FLOOR
      and info.file_size > _ZIP_MAX_RATIO * info.compress_size):
    return (f"declares {info.file_size} bytes from {info.compress_size} "
            f"compressed (over {_ZIP_MAX_RATIO}x: a zip bomb)")
  return None


def read_keras_zip(path: str | os.PathLike,
                   names: tuple[str, ...] = ("config.json",
                                             "model.weights.h5")
                   ) -> dict[str, bytes]:
  """Reads members ``names`` of a ``.keras`` zip into memory.

  Every member's central-directory entry is checked first (see
  ``KERAS_ZIP_MEMBERS``); each member asked for is then read with a bound
  of its declared size, so a lying header cannot make it larger. Nothing is
  written to disk.

  Raises:
    UnsafeFileError: a member is refused (one line naming it and why).
    KeyError: a member of ``names`` is missing.
    zipfile.BadZipFile: not a zip, or a member fails its CRC.
  """
  label = os.fspath(path)
  with zipfile.ZipFile(path) as z:
    infos = z.infolist()
    seen = set()
    for info in infos:
      problem = _member_problem(info)
      if problem is None and info.filename in seen:
        problem = "appears twice"
      if problem:
        raise _refuse(label, f"zip member {info.filename!r} {problem}")
      seen.add(info.filename)
    by_name = {info.filename: info for info in infos}
    out = {}
    for name in names:
      if name not in by_name:
        raise KeyError(f"no {name} in the .keras zip")
      info = by_name[name]
      with z.open(info) as f:
        data = f.read(info.file_size + 1)
      if len(data) != info.file_size:
        raise _refuse(label, f"zip member {name!r} holds {len(data)} bytes, "
                      f"not the {info.file_size} its header declares")
      out[name] = data
  return out
