"""Saving and loading translated variables: msgpack or an orbax checkpoint,
plus a JSON sidecar.

The msgpack holds ``{"params": ..., "batch_stats": ...}`` exactly as
``flax.serialization.to_bytes`` would write it; ``msgpack_restore`` reads it
back into a dict usable directly with ``module.apply``. Writes are atomic:
both files are written to temporary files in the target directory, fsynced
and renamed, so the pair is either both present or both absent. Nothing is
ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from flax import serialization
from flax import traverse_util
import numpy as np


def sidecar_path(path: str | os.PathLike) -> str:
  """``translated/resnet50.msgpack`` -> ``translated/resnet50.json``."""
  root, ext = os.path.splitext(os.fspath(path))
  return (root if ext == ".msgpack" else os.fspath(path)) + ".json"


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def to_numpy(variables: Any) -> dict[str, Any]:
  """A plain nested dict of numpy arrays (from jax arrays or FrozenDicts)."""
  flat = traverse_util.flatten_dict(
      serialization.to_state_dict(variables))
  return traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flat.items()})


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _atomic_files(paths: list[str]):
  """Yields temporary file objects, one per path, in the same directories;
  on success fsyncs and renames them all into place, otherwise removes them.
  """
  tmps = []
  try:
    for p in paths:
      fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(p) + ".",
                                 suffix=".tmp",
                                 dir=os.path.dirname(p) or ".")
      os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
      tmps.append((os.fdopen(fd, "wb"), tmp, p))
    yield [f for f, _, _ in tmps]
    for f, _, _ in tmps:
      f.flush()
      os.fsync(f.fileno())
      f.close()
    done = []
    try:
      for _, tmp, p in tmps:
        os.replace(tmp, p)
        done.append(p)
    except BaseException:
      for p in done:
        with contextlib.suppress(OSError):
          os.remove(p)
      raise
  finally:
    for f, tmp, _ in tmps:
      f.close()
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)


def write_files_atomically(paths: list[str], contents: list[bytes]) -> None:
  """Writes each ``contents[i]`` to ``paths[i]``: all of them or none."""
  with _atomic_files([os.fspath(p) for p in paths]) as files:
    for f, data in zip(files, contents):
      f.write(data)


FORMATS = ("msgpack", "orbax")


def format_of(path: str | os.PathLike, format: str | None = None) -> str:  # pylint: disable=redefined-builtin
  """``format``, or the one ``path`` implies: ``.msgpack`` is msgpack,
  anything else (a directory) an orbax checkpoint."""
  if format is None:
    return "msgpack" if os.fspath(path).endswith(".msgpack") else "orbax"
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  return format


def save_variables(path: str | os.PathLike, variables: Any,
                   metadata: dict[str, Any] | None = None,
                   format: str | None = None) -> tuple[str, str]:  # pylint: disable=redefined-builtin
  """Writes ``variables`` and a JSON sidecar of ``metadata``, atomically.

  Args:
    path: a ``.msgpack`` file, or the directory of an orbax checkpoint
      (``orbax.checkpoint.PyTreeCheckpointer().restore(path)`` gives the same
      tree and bit-identical arrays). The sidecar is ``path`` with ``.json``
      instead of ``.msgpack``, or ``path + ".json"`` for a directory.
    variables: ``{"params": ..., "batch_stats": ...}``.
    metadata: JSON-serializable facts (model name, versions, input shape,
      preprocess mode, parity figures, source weights sha256).
    format: ``"msgpack"`` or ``"orbax"``; default from ``path``.

  Returns:
    The two paths written.
  """
  path = os.fspath(path)
  side = sidecar_path(path)
  text = (json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n").encode()
  if format_of(path, format) == "orbax":
    _save_orbax(path, to_numpy(variables), side, text)
    return path, side
  data = serialization.msgpack_serialize(to_numpy(variables))
  write_files_atomically([path, side], [data, text])
  return path, side


def _save_orbax(path: str, tree: dict[str, Any], side: str,
                text: bytes) -> None:
  """The checkpoint goes to a temporary directory beside ``path`` and the
  sidecar to a temporary file; both are renamed into place, or neither (an
  existing checkpoint is moved aside first and put back on failure)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(os.path.abspath(path))
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".",
                         suffix=".tmp", dir=parent)
  try:
    checkpoint = os.path.join(tmp, "checkpoint")
    ocp.PyTreeCheckpointer().save(checkpoint, tree)
    sidecar_tmp = os.path.join(tmp, "sidecar.json")
    with open(sidecar_tmp, "wb") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(sidecar_tmp, 0o666 & ~_umask())
    backup = None
    if os.path.exists(path):
      backup = os.path.join(tmp, "previous")
      os.replace(path, backup)
    try:
      os.replace(checkpoint, path)
      os.replace(sidecar_tmp, side)
    except BaseException:
      if os.path.isdir(path) and not os.path.exists(checkpoint):
        shutil.rmtree(path, ignore_errors=True)  # the new one, half placed
      if backup is not None:
        os.replace(backup, path)
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads saved variables (a msgpack file or an orbax checkpoint
  directory) back into a dict usable with ``module.apply``."""
  if os.path.isdir(path):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    return to_numpy(ocp.PyTreeCheckpointer().restore(os.path.abspath(path)))
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the JSON sidecar of a saved msgpack."""
  with open(sidecar_path(path)) as f:
    return json.load(f)
