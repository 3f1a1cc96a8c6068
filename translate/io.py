"""Saving and loading translated variables: msgpack plus a JSON sidecar.

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


def save_variables(path: str | os.PathLike, variables: Any,
                   metadata: dict[str, Any] | None = None) -> tuple[str, str]:
  """Writes ``variables`` as msgpack and ``metadata`` as a JSON sidecar.

  Args:
    path: the ``.msgpack`` file; the sidecar is the same name with ``.json``.
    variables: ``{"params": ..., "batch_stats": ...}``.
    metadata: JSON-serializable facts (model name, versions, input shape,
      preprocess mode, parity figures, source weights sha256).

  Returns:
    The two paths written.
  """
  path = os.fspath(path)
  side = sidecar_path(path)
  data = serialization.msgpack_serialize(to_numpy(variables))
  text = json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n"
  write_files_atomically([path, side], [data, text.encode()])
  return path, side


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a saved msgpack back into a dict usable with ``module.apply``."""
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the JSON sidecar of a saved msgpack."""
  with open(sidecar_path(path)) as f:
    return json.load(f)
