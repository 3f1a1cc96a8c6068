"""Shared test set-up: repository root on sys.path, Keras' TF backend."""

import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from models import backend  # noqa: E402

backend.ensure_backend()

# Above this resident size, a test that grew the worker by more than
# _COLLECT_GROWTH_BYTES since the last collection has its leftovers
# garbage-collected at once. A full collection costs 0.3-2 s with
# TensorFlow loaded: run after every test once a worker passed 2 GB, it took
# 470 s of the README tier's 1240 s of test time; small tests leave little
# behind, and Python's own gc collects that in time. Past
# _CLEAR_JAX_ABOVE_BYTES (the slow tier's big models) it collects after
# every test again.
_COLLECT_ABOVE_BYTES = 2 << 30
_COLLECT_GROWTH_BYTES = 512 << 20
_CLEAR_JAX_ABOVE_BYTES = 6 << 30
_rss_after_collect = [0]


def _rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return _COLLECT_ABOVE_BYTES  # unknown: always collect


@pytest.fixture(autouse=True)
def _free_keras_models():
  """Keeps memory flat across dozens of models (peak RSS stays that of the
  largest model, not the sum)."""
  yield
  import keras
  keras.backend.clear_session(free_memory=False)
  rss = _rss_bytes()
  if (rss >= _COLLECT_ABOVE_BYTES
      and (rss >= _rss_after_collect[0] + _COLLECT_GROWTH_BYTES
           or rss >= _CLEAR_JAX_ABOVE_BYTES)):
    gc.collect()
    _rss_after_collect[0] = _rss_bytes()
  if rss >= _CLEAR_JAX_ABOVE_BYTES:
    # Compiled programs of big models (training steps most of all) stay in
    # JAX's caches; past this size a worker drops them, so two slow tests
    # on two workers cannot add up past the machine's memory.
    import jax
    jax.clear_caches()


# The slow tests that hold the most memory (several GB each: float64 Keras
# copies and training steps, the largest models at their native sizes) run
# on one xdist worker, one after another (``--dist loadgroup`` in
# pytest.ini): two of them at once took a 23 GB machine to 22 GB.
_MEMORY_GROUP_TESTS = ("test_training_mode_and_gradients_match_keras",
                       "test_gradients_as_accurate_as_tf_keras_float32")


def _memory_heavy(item) -> bool:
  if item.originalname in _MEMORY_GROUP_TESTS:
    return True
  if item.originalname != "test_parity_native_size":
    return False
  import models
  spec = models.get_spec(item.callspec.params["name"])
  return spec.params >= 80_000_000 or spec.input_shape[0] >= 380


def pytest_collection_modifyitems(items):
  for item in items:
    if _memory_heavy(item):
      item.add_marker(pytest.mark.xdist_group(name="memory"))


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
  """``cli(*flags)`` runs ``main.main`` in-process in ``tmp_path``; returns
  ``(exit code, stdout, stderr lines)``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)

  def run(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main.py", *map(str, args)])
    capsys.readouterr()
    code = main.main(["main.py"])
    out, err = capsys.readouterr()
    return code, out, [l for l in err.splitlines() if l.strip()]

  yield run
  flags.FLAGS.unparse_flags()
