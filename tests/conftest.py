"""Shared test set-up: repository root on sys.path, Keras' TF backend."""

import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from translate import keras_io  # noqa: E402

keras_io.ensure_backend()


@pytest.fixture(autouse=True)
def _free_keras_models():
  """Keeps memory flat across dozens of models."""
  yield
  import keras
  keras.backend.clear_session()
  gc.collect()
