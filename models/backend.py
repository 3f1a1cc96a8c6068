"""Keras backend selection, shared by ``models`` and ``translate``.

``models`` resolves Keras constructors lazily and ``translate`` builds and
reads Keras models; both select the backend here first, so the lower layer
(``models``) never imports the higher one (``translate``).
"""

from __future__ import annotations

import contextlib
import os
import sys


# tf-keras walks a functional model's graph recursively (a few Python frames
# per layer on the longest path): building ResNetRS270, 350 and 420 needs
# more than Python's default limit of 1000 frames. IPython's jedi raises the
# limit to 3000 when it is imported, which hid this wherever IPython is
# installed; in a fresh environment the build raised RecursionError.
MIN_RECURSION_LIMIT = 5000


def ensure_backend() -> None:
  """Selects Keras' TensorFlow backend unless the user set ``KERAS_BACKEND``,
  then imports Keras; raises Python's recursion limit to at least
  ``MIN_RECURSION_LIMIT`` (never lowers it) for tf-keras' deepest models.

  Keras' JAX backend builds EfficientNetB0 in 30 s instead of 1.4 s.
  TensorFlow 2.21 prints C++ start-up lines (oneDNN, CUDA) to stderr whatever
  ``TF_CPP_MIN_LOG_LEVEL`` says; they are silenced during the import unless
  ``TF_CPP_MIN_LOG_LEVEL`` is set to 0.
  """
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  if sys.getrecursionlimit() < MIN_RECURSION_LIMIT:
    sys.setrecursionlimit(MIN_RECURSION_LIMIT)
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
