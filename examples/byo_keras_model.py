"""Bring your own Keras model: Embedding -> LSTM -> GRU -> Dense.

The README's worked example, runnable (``python examples/byo_keras_model.py``
from the repository root; ``tests/test_recurrent.py`` runs it). Write
the Flax module with the Keras layer names, translate, compare, export.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras
# Run from a checkout without installing: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import flax.linen as nn  # noqa: E402  pylint: disable=g-import-not-at-top
import keras  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

import translate  # noqa: E402  pylint: disable=g-import-not-at-top
from models import recurrent  # noqa: E402  pylint: disable=g-import-not-at-top

VOCAB, SEQ_LEN = 1000, 20

# Your Keras model (trained, or loaded with keras.saving.load_model).
ids = keras.Input((SEQ_LEN,), dtype="int32")
x = keras.layers.Embedding(VOCAB, 32, name="embedding")(ids)
x = keras.layers.LSTM(64, return_sequences=True, name="lstm")(x)
x = keras.layers.GRU(32, name="gru")(x)  # reset_after=True, Keras 3's default
keras_model = keras.Model(ids, keras.layers.Dense(5, name="dense")(x))


# The same model in Flax: same arguments, each module named like its layer.
class TextClassifier(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = recurrent.Embedding(VOCAB, 32, name="embedding")(ids)
    x = recurrent.LSTM(64, return_sequences=True, name="lstm")(x)
    x = recurrent.GRU(32, name="gru")(x)
    return nn.Dense(5, name="dense")(x)


module = TextClassifier()
variables, report = translate.translate(module, keras_model, (SEQ_LEN,),
                                        dtype="int32")
print(report.table())

tokens = np.random.default_rng(0).integers(0, VOCAB, (4, SEQ_LEN),
                                           dtype=np.int32)
ours = np.asarray(module.apply(variables, tokens))
theirs = np.asarray(keras_model(tokens))
print("max |Flax - Keras|:", np.abs(ours - theirs).max())
assert np.allclose(ours, theirs, rtol=0, atol=1e-5)

# TFLite: a static sequence length, builtin ops only.
flatbuffer = translate.export_tflite(module.apply, variables,
                                     [((1, SEQ_LEN), np.int32)])
print(translate.tflite_ops(flatbuffer).most_common(5))
lite = translate.run_tflite(flatbuffer, tokens[:1])[0]
print("max |TFLite - Flax|:", np.abs(lite - ours[:1]).max())
assert np.allclose(lite, ours[:1], rtol=0, atol=1e-5)
