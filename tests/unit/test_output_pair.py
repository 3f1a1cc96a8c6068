"""The msgpack + JSON sidecar as one output: never a mixed pair (a second
writer, thread or process, waits for the first), ``overwrite=False`` never
clobbers (also what appears during the write), SIGTERM leaves no debris,
and ``load_variables`` refuses a file its sidecar's sha256 does not match,
with one clear ``VariablesFileError`` for every unreadable file."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
from flax import serialization

import translate
from translate import io as tio

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _vars(value):
  return {"params": {"fc": {"kernel": np.full((2, 3), value, np.float32)}},
          "batch_stats": {}}


def _old_pair(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, _vars(1), {"writer": 1})
  return out, {p: p.read_bytes() for p in (out, tmp_path / "m.json")}


def _bytes(before):
  return {p: p.read_bytes() for p in before}


def _consistent(out):
  """The sidecar records the sha256 of the msgpack beside it."""
  recorded = json.loads(open(tio.sidecar_path(out), "rb").read())
  return recorded["variables_sha256"] == hashlib.sha256(
      open(out, "rb").read()).hexdigest()


# --- the sidecar is a directory ----------------------------------------------


@pytest.mark.parametrize("early_check", [True, False])
def test_a_directory_at_the_sidecar_keeps_the_old_msgpack(
    tmp_path, monkeypatch, early_check):
  """The audit's case: the sidecar cannot be replaced, so the msgpack must
  not be either. Without the early check the hard-link backup of the
  directory fails and the msgpack's backup is undone."""
  out, _ = _old_pair(tmp_path)
  old = out.read_bytes()
  os.remove(tmp_path / "m.json")
  (tmp_path / "m.json").mkdir()
  (tmp_path / "m.json" / "keep").write_bytes(b"keep")
  if not early_check:
    monkeypatch.setattr(tio, "_check_destinations", lambda *args: None)
  with pytest.raises(OSError,
                     match="is a directory, not a file" if early_check else None):
    translate.save_variables(out, _vars(2))
  assert out.read_bytes() == old
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]
  assert os.listdir(tmp_path / "m.json") == ["keep"]


# --- two writers -------------------------------------------------------------


def test_a_second_writer_thread_waits_for_the_first(tmp_path, monkeypatch):
  """The second writer starts between the first one's two renames; unlocked,
  it would leave its msgpack with the first one's sidecar."""
  out = tmp_path / "m.msgpack"
  first_placed, second_done = threading.Event(), threading.Event()
  real, errors = os.replace, []

  def slow_replace(a, b):
    real(a, b)
    if (threading.current_thread().name == "first"
        and os.fspath(b).endswith(".msgpack")):
      first_placed.set()
      second_done.wait(0.5)  # unlocked, the second writer runs now

  def write(value):
    try:
      translate.save_variables(out, _vars(value), {"writer": value})
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  def second():
    assert first_placed.wait(10)
    write(2)
    second_done.set()

  monkeypatch.setattr(tio.os, "replace", slow_replace)
  threads = [threading.Thread(target=write, args=(1,), name="first"),
             threading.Thread(target=second)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(20)
  assert not errors
  assert _consistent(out)
  assert translate.load_metadata(out) == {"writer": 2}  # it waited, then wrote
  np.testing.assert_array_equal(
      translate.load_variables(out)["params"]["fc"]["kernel"], 2.0)
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]


_RACER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from translate import io as tio
out, role, sync = sys.argv[2:5]
value = 1 if role == "first" else 2
mark = lambda name: open(os.path.join(sync, name), "w").close()
seen = lambda name: os.path.exists(os.path.join(sync, name))
real = os.replace
def slow_replace(a, b):
  real(a, b)
  if role == "first" and os.fspath(b).endswith(".msgpack"):
    mark("placed")
    deadline = time.monotonic() + 1.5
    while not seen("second_done") and time.monotonic() < deadline:
      time.sleep(0.01)  # unlocked, the second writer runs now
tio.os.replace = slow_replace
deadline = time.monotonic() + 60
while role == "second" and not seen("placed"):
  assert time.monotonic() < deadline
  time.sleep(0.01)
tio.save_variables(out, {"params": {"fc": {"kernel": np.full(
    (2, 3), value, np.float32)}}}, {"writer": value})
mark(role + "_done")
"""


def test_a_second_writer_process_waits_for_the_first(tmp_path):
  """As above, across processes: the lock is a file lock, not a lock in
  memory."""
  out, sync = tmp_path / "out" / "m.msgpack", tmp_path / "sync"
  out.parent.mkdir()
  sync.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, REPO, str(out),
                             role, str(sync)], stderr=subprocess.PIPE)
           for role in ("first", "second")]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
  assert _consistent(out)
  assert translate.load_metadata(out) == {"writer": 2}
  assert sorted(os.listdir(out.parent)) == ["m.json", "m.msgpack"]


def test_a_lock_held_too_long_is_a_clear_error(tmp_path, monkeypatch):
  fcntl = pytest.importorskip("fcntl")
  out, before = _old_pair(tmp_path)
  lock = tmp_path / ".m.msgpack.lock"  # the second of the two, sorted
  fd = os.open(lock, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  monkeypatch.setattr(tio, "LOCK_TIMEOUT_S", 0.2)
  try:
    with pytest.raises(TimeoutError, match="held by another writer"):
      translate.save_variables(out, _vars(2))
  finally:
    os.close(fd)
  assert _bytes(before) == before
  # The other writer's lock stays; the first lock, taken, is gone.
  assert sorted(os.listdir(tmp_path)) == [".m.msgpack.lock", "m.json",
                                          "m.msgpack"]


def test_without_fcntl_writes_still_work(tmp_path, monkeypatch):
  monkeypatch.setattr(tio, "fcntl", None)
  out, _ = _old_pair(tmp_path)
  translate.save_variables(out, _vars(2), {"writer": 2})
  assert translate.load_metadata(out) == {"writer": 2} and _consistent(out)


# --- overwrite=False ---------------------------------------------------------


@pytest.mark.parametrize("existing", ["m.msgpack", "m.json"])
def test_overwrite_false_refuses_an_existing_output(tmp_path, existing):
  (tmp_path / existing).write_bytes(b"theirs")
  out = tmp_path / "m.msgpack"
  with pytest.raises(FileExistsError) as e:
    translate.save_variables(out, _vars(2), overwrite=False)
  assert str(e.value) == (f"{tmp_path / existing} already exists; pass "
                          "--overwrite to replace it or choose another "
                          "--output")
  assert os.listdir(tmp_path) == [existing]
  assert (tmp_path / existing).read_bytes() == b"theirs"


@pytest.mark.parametrize("racer", ["m.msgpack", "m.json"])
def test_overwrite_false_keeps_a_file_created_during_the_write(
    tmp_path, monkeypatch, racer):
  """Another program (taking no lock) creates the msgpack or the sidecar
  after the existence check, while the temporaries are written."""
  real = os.fsync

  def create_then_fsync(fd):
    if not (tmp_path / racer).exists():
      (tmp_path / racer).write_bytes(b"theirs")
    return real(fd)

  monkeypatch.setattr(tio.os, "fsync", create_then_fsync)
  with pytest.raises(FileExistsError, match=f"{racer} already exists"):
    translate.save_variables(tmp_path / "m.msgpack", _vars(2),
                             overwrite=False)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == [racer]  # ours undone, no temporaries
  assert (tmp_path / racer).read_bytes() == b"theirs"


def test_overwrite_false_writes_a_new_pair(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, _vars(3), {"writer": 3}, overwrite=False)
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]
  assert _consistent(out) and translate.load_metadata(out) == {"writer": 3}
  assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~tio._umask())  # pylint: disable=protected-access


# --- signals -----------------------------------------------------------------


_WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from translate import io as tio
out, fmt, hook, seconds, ready = sys.argv[2:7]
real = getattr(os, hook)
def slow(*args, **kwargs):
  if not os.path.exists(ready):
    open(ready, "w").close()
    time.sleep(float(seconds))
  return real(*args, **kwargs)
setattr(tio.os, hook, slow)
tio.save_variables(out, {"params": {"fc": {"kernel": np.full(
    (2, 3), 2, np.float32)}}}, {"writer": 2}, format=fmt)
"""


def _terminate_during(tmp_path, out, fmt, hook, seconds):
  ready = tmp_path / "ready"
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, REPO, str(out), fmt,
                           hook, str(seconds), str(ready)],
                          stderr=subprocess.PIPE)
  deadline = time.monotonic() + 120
  while not ready.exists():
    assert proc.poll() is None, proc.communicate()[1].decode()
    assert time.monotonic() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  return proc.returncode, err.decode()


def _tree_bytes(root):
  return {os.path.relpath(os.path.join(d, f), root):
          open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("fmt,existing", [
    ("msgpack", False), ("msgpack", True), ("orbax", True)])
def test_sigterm_while_writing_leaves_no_debris(tmp_path, fmt, existing):
  """SIGTERM in the first fsync (the temporaries are written): the process
  still dies of SIGTERM (-15), after removing temporaries, backups and
  locks; an existing pair is byte-identical."""
  out = tmp_path / "out" / ("m.msgpack" if fmt == "msgpack" else "m")
  out.parent.mkdir()
  before = None
  if existing:
    translate.save_variables(out, _vars(1), {"writer": 1}, format=fmt)
    before = sorted(os.listdir(out.parent)), (
        _tree_bytes(out) if fmt == "orbax" else out.read_bytes()), (
            open(tio.sidecar_path(out), "rb").read())
  start = time.monotonic()
  code, err = _terminate_during(tmp_path, out, fmt, "fsync", 60)
  assert code == -signal.SIGTERM, err
  assert time.monotonic() - start < 50  # it did not wait for the slow write
  if not existing:
    assert os.listdir(out.parent) == []
  else:
    assert (sorted(os.listdir(out.parent)), (
        _tree_bytes(out) if fmt == "orbax" else out.read_bytes()), (
            open(tio.sidecar_path(out), "rb").read())) == before
    translate.load_variables(out)


def test_sigterm_during_the_renames_waits_for_them(tmp_path):
  """SIGTERM while the old pair is being backed up (os.link) is held back
  until the new pair is in place, then ends the process: the new pair,
  consistent, and no debris."""
  out = tmp_path / "out" / "m.msgpack"
  out.parent.mkdir()
  translate.save_variables(out, _vars(1), {"writer": 1})
  code, err = _terminate_during(tmp_path, out, "msgpack", "link", 1)
  assert code == -signal.SIGTERM, err
  assert sorted(os.listdir(out.parent)) == ["m.json", "m.msgpack"]
  assert _consistent(out) and translate.load_metadata(out) == {"writer": 2}


def _main_thread_only():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed in the main thread only")


def test_a_python_sigterm_handler_runs_after_the_cleanup(tmp_path,
                                                         monkeypatch):
  _main_thread_only()
  out, before = _old_pair(tmp_path)
  calls = []

  def handler(signum, frame):
    del frame
    calls.append(sorted(os.listdir(tmp_path)))  # clean when it runs

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    translate.save_variables(out, _vars(1), {"writer": 1})
    assert signal.getsignal(signal.SIGTERM) is handler and not calls
    real = os.fsync

    def kill_then_fsync(fd):
      os.kill(os.getpid(), signal.SIGTERM)
      return real(fd)

    monkeypatch.setattr(tio.os, "fsync", kill_then_fsync)
    with pytest.raises(InterruptedError, match="interrupted by SIGTERM"):
      translate.save_variables(out, _vars(2))
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert calls == [["m.json", "m.msgpack"]]
  assert _bytes(before) == before


def test_sigint_is_a_keyboard_interrupt_after_the_cleanup(tmp_path,
                                                          monkeypatch):
  _main_thread_only()
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    pytest.skip("SIGINT is not Python's default handler here")
  out, before = _old_pair(tmp_path)
  real = os.fsync

  def interrupt_then_fsync(fd):
    os.kill(os.getpid(), signal.SIGINT)
    return real(fd)

  monkeypatch.setattr(tio.os, "fsync", interrupt_then_fsync)
  with pytest.raises(KeyboardInterrupt):
    translate.save_variables(out, _vars(2))
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert sorted(os.listdir(tmp_path)) == ["m.json", "m.msgpack"]
  assert _bytes(before) == before


# --- the recorded sha256 -----------------------------------------------------


def test_the_sidecar_records_the_msgpack_sha256(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, _vars(1), {"model": "x",
                                           "variables_sha256": "stale"})
  record = json.loads((tmp_path / "m.json").read_text())
  assert record == {"model": "x", "variables_sha256": hashlib.sha256(
      out.read_bytes()).hexdigest()}
  assert record["variables_sha256"] == tio.variables_sha256(out)
  assert translate.load_metadata(out) == {"model": "x"}  # as given


def test_a_flipped_byte_is_refused(tmp_path):
  out = tmp_path / "m.msgpack"
  translate.save_variables(out, _vars(1))
  raw = bytearray(out.read_bytes())
  raw[-1] ^= 1  # inside the array: still a valid msgpack
  out.write_bytes(bytes(raw))
  serialization.msgpack_restore(bytes(raw))
  with pytest.raises(tio.VariablesFileError) as e:
    translate.load_variables(out)
  assert isinstance(e.value, ValueError)
  msg = str(e.value)
  assert msg.startswith(f"{out} does not match the sha256 its sidecar "
                        f"{tmp_path / 'm.json'} records (")
  assert msg.endswith("): the file was changed or the pair is from two runs; "
                      "re-run the translation")


def test_a_pair_from_two_runs_is_refused(tmp_path):
  a, b = tmp_path / "a.msgpack", tmp_path / "b.msgpack"
  translate.save_variables(a, _vars(1))
  translate.save_variables(b, _vars(2))
  (tmp_path / "a.json").write_bytes((tmp_path / "b.json").read_bytes())
  with pytest.raises(tio.VariablesFileError, match="pair is from two runs"):
    translate.load_variables(a)


@pytest.mark.parametrize("sidecar", [None, b"{}", b'{"model": "x"}', b"[1]"])
def test_without_a_recorded_sha256_the_msgpack_loads(tmp_path, sidecar):
  """A user's own msgpack (no sidecar), or a sidecar from before checksums."""
  out = tmp_path / "m.msgpack"
  out.write_bytes(serialization.msgpack_serialize(_vars(4)))
  if sidecar is not None:
    (tmp_path / "m.json").write_bytes(sidecar)
  np.testing.assert_array_equal(
      translate.load_variables(out)["params"]["fc"]["kernel"], 4.0)


# --- unreadable files --------------------------------------------------------


def _bad_input(tmp_path, case):
  out = tmp_path / "m.msgpack"
  good = serialization.msgpack_serialize(_vars(1))
  if case == "missing":
    pass
  elif case == "truncated":
    out.write_bytes(good[: len(good) // 2])
  elif case == "not msgpack":
    out.write_bytes(b"PK\x03\x04 this is a zip, not a msgpack")
  elif case == "a list":
    out.write_bytes(msgpack.packb([1, 2, 3]))
  elif case == "not arrays":
    out.write_bytes(msgpack.packb({"params": {"fc": {"kernel": "x"}}}))
  elif case == "sidecar not json":
    out.write_bytes(good)
    (tmp_path / "m.json").write_bytes(b'{"variables_sha256": ')
  elif case == "sidecar sha not a string":
    out.write_bytes(good)
    (tmp_path / "m.json").write_bytes(b'{"variables_sha256": 3}')
  elif case == "orbax garbage":
    out = tmp_path / "ck"
    out.mkdir()
    (out / "_METADATA").write_bytes(b"not a checkpoint")
  elif case == "orbax changed":
    out = tmp_path / "ck"
    translate.save_variables(out, _vars(1), format="orbax")
    (out / "extra").write_bytes(b"")
  return out


@pytest.mark.parametrize("case,words", [
    ("missing", "does not exist; pass the .msgpack"),
    ("truncated", "is not a Flax msgpack"),
    ("not msgpack", "is not a Flax msgpack"),
    ("a list", "holds a list, not a dict of arrays"),
    ("not arrays", "is not a dict of arrays: params/fc/kernel is a str"),
    ("sidecar not json", "is not valid JSON"),
    ("sidecar sha not a string", "not a hex string"),
    ("orbax garbage", "is not a readable orbax checkpoint"),
    ("orbax changed", "does not match the sha256"),
])
def test_an_unreadable_file_is_one_clear_error(tmp_path, case, words):
  path = _bad_input(tmp_path, case)
  with pytest.raises(tio.VariablesFileError) as e:
    translate.load_variables(path)
  msg = str(e.value)
  assert isinstance(e.value, ValueError)
  assert str(path) in msg and words in msg and "\n" not in msg
  assert any(fix in msg for fix in ("re-run", "pass ", "move "))
