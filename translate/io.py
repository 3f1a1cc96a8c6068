"""Saving and loading translated variables: msgpack or an orbax checkpoint,
plus a JSON sidecar.

The msgpack holds ``{"params": ..., "batch_stats": ...}`` exactly as
``flax.serialization.to_bytes`` would write it; ``msgpack_restore`` reads it
back into a dict usable directly with ``module.apply``. Nothing is ever
pickled.

What a write (``save_variables``, ``write_files_atomically``) guarantees:

* **All or nothing.** The new files are written to hidden temporaries in the
  target directory (``.<name>.<random>.tmp``) and fsynced. Then each existing
  destination file is hard-linked to a hidden backup
  (``.<name>.<random>.bak``; it stays in place meanwhile; an orbax checkpoint
  directory is renamed there instead), and the new files are renamed in. If
  any step fails or the write is interrupted (any ``BaseException``), every
  destination is put back as it was (the same inode, so byte-identical), or
  removed if it did not exist before (only if it is still the one this
  write put there); temporaries and backups are removed on success and on
  failure. Should a restoring rename itself fail, the error names the backup
  that holds the previous file, and that backup is kept.
* **One writer at a time.** Each destination has a lock file
  ``.<name>.lock`` beside it, locked with ``fcntl.flock`` (destinations in
  sorted order) from before the existence checks to after the last rename.
  A second writer, thread or process, waits for the first to finish, for at
  most ``LOCK_TIMEOUT_S`` seconds, then raises ``TimeoutError``; two runs
  never leave a msgpack from one and a sidecar from the other. The lock
  file is removed on release (held while unlinking; a waiter that then
  holds an unlinked file retries); one left by a killed process
  (``SIGKILL``) is empty and harmless. Without ``fcntl`` (Windows) nothing
  is locked.
* **No clobbering when asked.** With ``overwrite=False`` an existing
  destination raises ``FileExistsError`` ("X already exists; pass
  --overwrite ...") and stays byte-identical, also against one created after
  the check by a program that takes no lock: files are placed with
  ``os.link``, which refuses an existing name atomically; a checkpoint
  directory with ``os.rename`` after a check under the lock (a rename never
  replaces a file or a non-empty directory; it would replace an empty one).
* **Signals.** In the main thread, SIGTERM and SIGINT raise an exception
  while the temporaries are written (so the clean-up runs) and are held back
  during the renames, their rollback and the clean-up (so those complete);
  then the previous handlers are restored and the signal is re-delivered to
  them: a default SIGTERM still ends the process (status -15), without
  leaving temporaries, backups or locks. A previous Python handler that
  returns makes the interrupted write raise ``InterruptedError`` (a write
  that had completed returns normally).
* **A checksum.** The sidecar records ``"variables_sha256"``, computed by
  ``variables_sha256`` from the bytes written (an orbax checkpoint's files
  are read back after orbax wrote them). ``load_variables`` checks it, so a
  changed file or a pair from two runs is a ``VariablesFileError``, never
  loaded silently; a msgpack without a sidecar, or with a sidecar that
  records no checksum (older outputs), loads unchecked. ``load_metadata``
  returns the sidecar without this key, i.e. the metadata as given.

Renames within one directory are atomic on POSIX filesystems. Replacing an
existing file and ``overwrite=False`` need hard links (every local POSIX
filesystem, NTFS); without them (FAT) those writes fail with the previous
files intact. A reader takes no lock: racing a writer, it may see the new
msgpack with the previous sidecar, and ``load_variables`` then raises
``VariablesFileError`` rather than load a mixed pair.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Iterator

from flax import serialization
from flax import traverse_util
import numpy as np

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows: no locking, everything else holds
  fcntl = None

SHA256_KEY = "variables_sha256"
# How long a second writer of the same output waits for the first.
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.01


class VariablesFileError(ValueError):
  """Saved variables that cannot be loaded: missing, damaged, not Flax
  variables, or not the file their sidecar describes."""


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


def variables_sha256(path: str | os.PathLike) -> str:
  """The checksum ``save_variables`` records in the sidecar.

  Args:
    path: a msgpack file, or an orbax checkpoint directory.

  Returns:
    For a file, the hex sha256 of its bytes. For a directory, the hex sha256
    of the text ``sha256sum`` prints for its regular files in sorted order of
    relative POSIX path, one line ``<hex sha256>  <relative path>\\n`` each:
    ``cd ck && find . -type f -printf '%P\\n' | LC_ALL=C sort |
    xargs -d '\\n' sha256sum | sha256sum``.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    return sha256_file(path)
  files = []
  for directory, _, names in os.walk(path):
    for name in names:
      full = os.path.join(directory, name)
      files.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
  h = hashlib.sha256()
  for rel, full in sorted(files):
    h.update(f"{sha256_file(full)}  {rel}\n".encode())
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


# --- signals -----------------------------------------------------------------


class _Interrupted(BaseException):
  """Raised by a write's signal handler so that its clean-up runs."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class _SignalGuard:
  """SIGTERM/SIGINT handling for one write (see the module docstring).

  Outside ``critical()`` the first signal raises ``_Interrupted``; inside,
  it is recorded, and raised when the section ends (``then_raise``) or only
  re-delivered on exit. Handlers are installed in the main thread only,
  and not over an ignored signal or a handler set outside Python.
  """

  def __init__(self, what: str):
    self._what = what
    self._previous: dict[int, Any] = {}
    self._depth = 0
    self._received: int | None = None
    self._deferred = False

  def __enter__(self) -> _SignalGuard:
    if threading.current_thread() is not threading.main_thread():
      return self
    for name in ("SIGTERM", "SIGINT"):
      signum = getattr(signal, name, None)
      previous = None if signum is None else signal.getsignal(signum)
      if previous is None or previous == signal.SIG_IGN:
        continue
      signal.signal(signum, self._handle)
      self._previous[signum] = previous
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self._received is not None:
      return  # already on the way out
    self._received = signum
    if self._depth:
      self._deferred = True
    else:
      raise _Interrupted(signum)

  @contextlib.contextmanager
  def critical(self, then_raise: bool = True) -> Iterator[None]:
    self._depth += 1
    try:
      yield
    finally:
      self._depth -= 1
    if then_raise and self._deferred and not self._depth:
      self._deferred = False
      raise _Interrupted(self._received)

  def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    if self._received is None:
      return False
    signal.raise_signal(self._received)  # SIG_DFL: the process ends here
    if isinstance(exc, _Interrupted):  # a Python handler that returned
      name = signal.Signals(self._received).name
      raise InterruptedError(f"writing {self._what} was interrupted by "
                             f"{name}; the previous files are unchanged"
                             ) from None
    return False


# --- locks -------------------------------------------------------------------


def _hidden(path: str, tag: str) -> str:
  """``d/name`` -> ``d/.name.<tag>``: beside it, so renames stay atomic."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.{tag}")


def _ident(path: str) -> tuple[int, int] | None:
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    return None
  return st.st_dev, st.st_ino


@contextlib.contextmanager
def _flock(lock: str, guard: _SignalGuard) -> Iterator[None]:
  """Holds an exclusive ``flock`` on the file ``lock``; removes it after."""
  if fcntl is None:
    yield
    return
  deadline = time.monotonic() + LOCK_TIMEOUT_S
  fd, held = -1, False
  try:
    while True:
      with guard.critical():  # so that holding it and knowing it go together
        if fd < 0:
          fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          busy = False
        except BlockingIOError:
          busy = True
        if not busy:
          st = os.fstat(fd)
          held = (st.st_dev, st.st_ino) == _ident(lock)
          if not held:  # the previous holder unlinked it: lock the new one
            os.close(fd)
            fd = -1
      if held:
        break
      if busy:
        if time.monotonic() > deadline:
          raise TimeoutError(
              f"{lock} is held by another writer of the same output for "
              f"over {LOCK_TIMEOUT_S:g} s; wait for it to finish or choose "
              "another --output")
        time.sleep(_LOCK_POLL_S)
    yield
  finally:
    with guard.critical(then_raise=False):
      if held:
        with contextlib.suppress(OSError):
          os.unlink(lock)
      if fd >= 0:
        with contextlib.suppress(OSError):
          os.close(fd)


@contextlib.contextmanager
def _locked(paths: list[str], guard: _SignalGuard) -> Iterator[None]:
  """Locks every path (``.<name>.lock`` beside it), in sorted order."""
  with contextlib.ExitStack() as stack:
    for lock in sorted({_hidden(os.path.abspath(p), "lock") for p in paths}):
      stack.enter_context(_flock(lock, guard))
    yield


# --- placing files -----------------------------------------------------------


def _exists(path: str) -> FileExistsError:
  return FileExistsError(f"{path} already exists; pass --overwrite to replace "
                         "it or choose another --output")


def _is_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.path.islink(path)


def _check_destinations(dests: list[tuple[str, bool]],
                        overwrite: bool) -> None:
  """Refuses, before any work, what the renames would refuse later.

  Args:
    dests: ``(path, is_directory)`` for each destination.
    overwrite: whether an existing destination may be replaced.
  """
  for path, want_dir in dests:
    if not os.path.lexists(path):
      continue
    if not overwrite:
      raise _exists(path)
    if want_dir and not _is_dir(path):
      raise NotADirectoryError(f"{path} is a file, not an orbax checkpoint "
                               "directory; remove it or choose another "
                               "--output")
    if not want_dir and _is_dir(path):
      raise IsADirectoryError(f"{path} is a directory, not a file; remove it "
                              "or choose another --output")


def _place_new(src: str, dest: str) -> None:
  """Moves ``src`` to ``dest`` unless ``dest`` exists (``FileExistsError``)."""
  if not _is_dir(src):
    try:
      os.link(src, dest)  # atomic: EEXIST if anything has that name
    except FileExistsError:
      raise _exists(dest) from None
    return
  if os.path.lexists(dest):
    raise _exists(dest)
  try:
    os.rename(src, dest)
  except OSError as e:
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
      raise _exists(dest) from None
    raise


def _remove(path: str) -> None:
  if _is_dir(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def _fsync_dir(directory: str) -> None:
  with contextlib.suppress(OSError):  # not every filesystem syncs directories
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class _Step:
  """One ``src`` -> ``dest`` rename, and what a rollback needs to know."""

  def __init__(self, src: str, dest: str, token: str):
    self.src, self.dest = src, dest
    self.ours = _ident(src)
    self.backup = _hidden(dest, token + ".bak")
    self.backed_up = False  # set before the backup call, checked after
    self.placed = False  # set before the placement call, checked after


def _commit(moves: list[tuple[str, str]], overwrite: bool) -> None:
  """Renames each temporary ``src`` (a file or a directory) to its ``dest``:
  all of them, or none with every ``dest`` as it was. Signals must be held
  back by the caller."""
  token = secrets.token_hex(4)
  steps = [_Step(src, dest, token) for src, dest in moves]
  try:
    if overwrite:
      for s in steps:
        if not os.path.lexists(s.dest):
          continue
        s.backed_up = True
        if _is_dir(s.src):
          if not _is_dir(s.dest):
            raise NotADirectoryError(f"{s.dest} is not a directory")
          os.replace(s.dest, s.backup)  # a directory cannot be hard-linked
        else:  # the old file stays in place; fails for a directory
          os.link(s.dest, s.backup, follow_symlinks=False)
    for s in steps:
      s.placed = True
      if overwrite:
        os.replace(s.src, s.dest)
      else:
        _place_new(s.src, s.dest)
  except BaseException as e:
    _roll_back(steps, token, e)
    raise
  for directory in {os.path.dirname(s.dest) for s in steps}:
    _fsync_dir(directory)
  for s in steps:
    if s.backed_up:
      with contextlib.suppress(OSError):  # committed: a leftover is harmless
        _remove(s.backup)


def _roll_back(steps: list[_Step], token: str, cause: BaseException) -> None:
  """Puts every destination back as it was before ``_commit``."""
  problems, discard = [], []
  for s in reversed(steps):
    try:
      ours_in_place = s.placed and s.ours is not None and (
          _ident(s.dest) == s.ours)
      has_backup = s.backed_up and os.path.lexists(s.backup)
      if ours_in_place:
        if has_backup and not _is_dir(s.dest):
          os.replace(s.backup, s.dest)  # the old file back, in one step
          continue
        if _is_dir(s.dest):
          discard.append(_hidden(s.dest, token + ".new"))
          os.replace(s.dest, discard[-1])
        else:
          os.remove(s.dest)
      if not has_backup:
        continue
      if not os.path.lexists(s.dest):
        os.replace(s.backup, s.dest)  # a directory moved aside: back
      elif os.path.samestat(os.lstat(s.backup), os.lstat(s.dest)):
        os.remove(s.backup)  # a link to the file still in place
      else:
        raise FileExistsError(f"{s.dest} was replaced meanwhile")
    except OSError as e:
      problems.append(f"the previous {s.dest} is kept as {s.backup} "
                      f"({e.strerror or e}); move it back")
  for d in discard:
    shutil.rmtree(d, ignore_errors=True)
  if problems:
    raise OSError(f"{' '.join(str(cause).split()) or type(cause).__name__}; "
                  f"restoring then failed: {'; '.join(problems)}") from cause


@contextlib.contextmanager
def _atomic_files(paths: list[str], overwrite: bool = True):
  """Yields temporary file objects, one per path, in the same directories;
  on success fsyncs and places them all (see the module docstring), else
  removes them."""
  paths = [os.fspath(p) for p in paths]
  with _SignalGuard(paths[0]) as guard, _locked(paths, guard):
    _check_destinations([(p, False) for p in paths], overwrite)
    tmps = []
    try:
      for p in paths:
        with guard.critical():  # listed the moment it exists
          fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(p) + ".",
                                     suffix=".tmp",
                                     dir=os.path.dirname(p) or ".")
          tmps.append((os.fdopen(fd, "wb"), tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
      yield [f for f, _ in tmps]
      for f, _ in tmps:
        f.flush()
        os.fsync(f.fileno())
        f.close()
      with guard.critical(then_raise=False):
        _commit([(tmp, p) for (_, tmp), p in zip(tmps, paths)], overwrite)
    finally:
      with guard.critical(then_raise=False):
        for f, tmp in tmps:
          f.close()
          with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_files_atomically(paths: list[str], contents: list[bytes], *,
                           overwrite: bool = True) -> None:
  """Writes each ``contents[i]`` to ``paths[i]``: all of them or none.

  Args:
    paths: the destination files.
    contents: their bytes.
    overwrite: whether existing files may be replaced; if not, an existing
      one raises ``FileExistsError`` and nothing is written.

  The guarantees (locking, rollback, signals) are the module docstring's.
  """
  with _atomic_files([os.fspath(p) for p in paths], overwrite) as files:
    for f, data in zip(files, contents):
      f.write(data)


# --- variables ---------------------------------------------------------------


FORMATS = ("msgpack", "orbax")


def format_of(path: str | os.PathLike, format: str | None = None) -> str:  # pylint: disable=redefined-builtin
  """``format``, or the one ``path`` implies: ``.msgpack`` is msgpack,
  anything else (a directory) an orbax checkpoint."""
  if format is None:
    return "msgpack" if os.fspath(path).endswith(".msgpack") else "orbax"
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  return format


def _sidecar_text(metadata: dict[str, Any] | None, digest: str) -> bytes:
  record = {**(metadata or {}), SHA256_KEY: digest}
  return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def save_variables(path: str | os.PathLike, variables: Any,
                   metadata: dict[str, Any] | None = None,
                   format: str | None = None,  # pylint: disable=redefined-builtin
                   *, overwrite: bool = True) -> tuple[str, str]:
  """Writes ``variables`` and a JSON sidecar of ``metadata``, atomically.

  Args:
    path: a ``.msgpack`` file, or the directory of an orbax checkpoint
      (``orbax.checkpoint.PyTreeCheckpointer().restore(path)`` gives the same
      tree and bit-identical arrays). The sidecar is ``path`` with ``.json``
      instead of ``.msgpack``, or ``path + ".json"`` for a directory.
    variables: ``{"params": ..., "batch_stats": ...}``.
    metadata: JSON-serializable facts (model name, versions, input shape,
      preprocess mode, parity figures, source weights sha256). The sidecar
      adds ``"variables_sha256"`` (see ``variables_sha256``), replacing a
      value of that key in ``metadata``.
    format: ``"msgpack"`` or ``"orbax"``; default from ``path``.
    overwrite: whether an existing output may be replaced. If not, an
      existing ``path`` or sidecar raises ``FileExistsError`` and both are
      left byte-identical, also when created by another program during the
      write.

  Returns:
    The two paths written.

  Raises:
    FileExistsError: ``overwrite=False`` and the output exists.
    IsADirectoryError, NotADirectoryError: a destination of the wrong kind.
    TimeoutError: another writer held the output for ``LOCK_TIMEOUT_S``.
    InterruptedError: a signal whose (Python) handler returned.
  """
  path = os.fspath(path)
  side = sidecar_path(path)
  fmt = format_of(path, format)
  tree = to_numpy(variables)
  if fmt == "orbax":
    _save_orbax(path, tree, side, metadata, overwrite)
    return path, side
  data = serialization.msgpack_serialize(tree)
  text = _sidecar_text(metadata, hashlib.sha256(data).hexdigest())
  write_files_atomically([path, side], [data, text], overwrite=overwrite)
  return path, side


def _save_orbax(path: str, tree: dict[str, Any], side: str,
                metadata: dict[str, Any] | None, overwrite: bool) -> None:
  """The checkpoint and the sidecar go to a temporary directory beside
  ``path``, then are placed as ``_commit`` does (an existing checkpoint is
  moved aside first and put back on failure)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(os.path.abspath(path))
  with _SignalGuard(path) as guard, _locked([path, side], guard):
    _check_destinations([(path, True), (side, False)], overwrite)
    tmp = None
    try:
      with guard.critical():
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp", dir=parent)
      checkpoint = os.path.join(tmp, "checkpoint")
      ocp.PyTreeCheckpointer().save(checkpoint, tree)
      sidecar_tmp = os.path.join(tmp, "sidecar.json")
      with open(sidecar_tmp, "wb") as f:
        f.write(_sidecar_text(metadata, variables_sha256(checkpoint)))
        f.flush()
        os.fsync(f.fileno())
      os.chmod(sidecar_tmp, 0o666 & ~_umask())
      with guard.critical(then_raise=False):
        _commit([(checkpoint, path), (sidecar_tmp, side)], overwrite)
    finally:
      if tmp is not None:
        with guard.critical(then_raise=False):
          shutil.rmtree(tmp, ignore_errors=True)


def _brief(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if len(text) > 200:
    text = text[:200] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _recorded_sha256(path: str) -> str | None:
  """The checksum the sidecar of ``path`` records, or None if it has none."""
  side = sidecar_path(path)
  if not os.path.isfile(side):
    return None
  try:
    with open(side, "rb") as f:
      record = json.loads(f.read())
  except OSError as e:
    raise VariablesFileError(f"cannot read {side}, the sidecar of {path} "
                             f"({e.strerror or e}); check its permissions"
                             ) from e
  except ValueError as e:
    raise VariablesFileError(
        f"{side}, the sidecar of {path}, is not valid JSON ({_brief(e)}); "
        f"re-run the translation, or move {side} away to load {path} "
        "unchecked") from e
  if not isinstance(record, dict) or SHA256_KEY not in record:
    return None  # a user's own file, or written before checksums
  recorded = record[SHA256_KEY]
  if not isinstance(recorded, str):
    raise VariablesFileError(f"{side}, the sidecar of {path}, records "
                             f"{SHA256_KEY} = {recorded!r}, not a hex string; "
                             "re-run the translation")
  return recorded


def _check_sha256(path: str, recorded: str | None, digest: str) -> None:
  if recorded is not None and recorded != digest:
    raise VariablesFileError(
        f"{path} does not match the sha256 its sidecar {sidecar_path(path)} "
        f"records ({recorded[:12]}... recorded, {digest[:12]}... found): the "
        "file was changed or the pair is from two runs; re-run the "
        "translation")


def _check_tree(path: str, tree: Any) -> dict[str, Any]:
  fix = "pass a file that save_variables (main.py --output) wrote"
  if not isinstance(tree, dict):
    raise VariablesFileError(f"{path} holds a {type(tree).__name__}, not a "
                             f"dict of arrays (Flax variables); {fix}")
  for key, leaf in traverse_util.flatten_dict(tree).items():
    if not isinstance(leaf, np.ndarray):
      name = "/".join(map(str, key))
      raise VariablesFileError(f"{path} is not a dict of arrays: {name} is a "
                               f"{type(leaf).__name__}; {fix}")
  return tree


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads saved variables back into a dict usable with ``module.apply``.

  Args:
    path: a msgpack file or an orbax checkpoint directory. If its sidecar
      records ``"variables_sha256"``, the file (or directory) must match it.

  Returns:
    The nested dict of numpy arrays.

  Raises:
    VariablesFileError: ``path`` is missing or unreadable, truncated, not
      msgpack or not an orbax checkpoint, not a dict of arrays, or does not
      match the checksum its sidecar records; the message names the path
      and the likely fix.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    recorded = _recorded_sha256(path)
    if recorded is not None:
      try:
        digest = variables_sha256(path)
      except OSError as e:
        raise VariablesFileError(f"cannot read the checkpoint {path} "
                                 f"({_brief(e)}); check its permissions"
                                 ) from e
      _check_sha256(path, recorded, digest)
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    try:
      tree = to_numpy(ocp.PyTreeCheckpointer().restore(os.path.abspath(path)))
    except Exception as e:  # pylint: disable=broad-except
      raise VariablesFileError(
          f"{path} is not a readable orbax checkpoint ({_brief(e)}); it is "
          "incomplete or not one; re-run the translation") from e
    return _check_tree(path, tree)
  if not os.path.exists(path):
    raise VariablesFileError(f"{path} does not exist; pass the .msgpack file "
                             "or orbax checkpoint directory that "
                             "save_variables (main.py --output) wrote")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise VariablesFileError(f"cannot read {path} ({e.strerror or e}); check "
                             "its permissions") from e
  _check_sha256(path, _recorded_sha256(path), hashlib.sha256(data).hexdigest())
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise VariablesFileError(
        f"{path} is not a Flax msgpack ({_brief(e)}): it is truncated or not "
        "a file that save_variables or flax.serialization wrote; re-run the "
        "translation") from e
  return _check_tree(path, tree)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the JSON sidecar of a saved msgpack or checkpoint: the metadata
  as given to ``save_variables`` (without ``"variables_sha256"``)."""
  with open(sidecar_path(path)) as f:
    record = json.load(f)
  if isinstance(record, dict):
    record.pop(SHA256_KEY, None)
  return record
