"""How each Keras layer class's weights become Flax variables.

One table, keyed by the Keras layer class name. Each entry maps a Keras weight
name to ``Rule(collection, leaf, pattern)``: the Flax collection and leaf name
it fills and an einops ``rearrange`` pattern (``None``: same layout). A
weight mapped to ``DROP`` is read and deliberately not carried over. Later
families extend this table; translation never looks at model names.
"""

from __future__ import annotations

import dataclasses
import re

import einops
import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  collection: str
  leaf: str
  pattern: str | None = None

  def apply(self, array: np.ndarray) -> np.ndarray:
    return array if self.pattern is None else einops.rearrange(
        array, self.pattern)

  def invert(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The Keras array of ``shape`` that ``apply`` maps to ``array``.

    The pattern read right to left, with the axis sizes taken from the Keras
    ``shape`` (``h w 1 (c m) -> h w c m`` needs ``c`` and ``m``); a pure
    reshape/transpose, so the values are bit-exact.
    """
    if self.pattern is None:
      return array
    source, target = (s.strip() for s in self.pattern.split("->"))
    axes = re.findall(r"\([^)]*\)|\S+", source)
    if len(axes) != len(shape):
      raise ValueError(f"Keras shape {tuple(shape)} does not fit the "
                       f"pattern {self.pattern!r}")
    sizes = {a: int(n) for a, n in zip(axes, shape) if a.isidentifier()}
    return einops.rearrange(array, f"{target} -> {source}", **sizes)


DROP = None  # a Keras weight with no Flax counterpart, dropped on purpose


class _Unnamed(dict):
  """A rule table for a layer whose weight Keras 3 creates without a name:
  it is ``variable``, ``variable_1``, ``variable_2``, … from a counter
  shared by the whole session; every numbered name uses the ``variable``
  rule."""

  @staticmethod
  def _key(name: str) -> str:
    head, _, tail = name.rpartition("_")
    return head if head == "variable" and tail.isdigit() else name

  def __contains__(self, name: object) -> bool:
    return dict.__contains__(self, self._key(str(name)))

  def __getitem__(self, name: str) -> Rule | None:
    return dict.__getitem__(self, self._key(name))


_KERNEL_BIAS = {
    "kernel": Rule("params", "kernel"),  # Keras and Flax: (h, w, in, out)
    "bias": Rule("params", "bias"),
}

_RECURRENT = {
    "kernel": Rule("params", "kernel"),
    "recurrent_kernel": Rule("params", "recurrent_kernel"),
    "bias": Rule("params", "bias"),
}

RULES: dict[str, dict[str, Rule | None]] = {
    "Conv2D": _KERNEL_BIAS,
    "Dense": _KERNEL_BIAS,
    "DepthwiseConv2D": {
        # Keras (h, w, in, multiplier); Flax grouped conv (h, w, 1, in * m),
        # output channel c * m + j is input channel c's j-th filter.
        "kernel": Rule("params", "kernel", "h w c m -> h w 1 (c m)"),
        "depthwise_kernel": Rule("params", "kernel",  # tf-keras' name
                                 "h w c m -> h w 1 (c m)"),
        "bias": Rule("params", "bias"),
    },
    "SeparableConv2D": {
        # One Flax module (models.layers.SeparableConv; dilated: models
        # .keras_layers.conv.SeparableConv2D) with Keras' names.
        "depthwise_kernel": Rule("params", "depthwise_kernel",
                                 "h w c m -> h w 1 (c m)"),
        "pointwise_kernel": Rule("params", "pointwise_kernel"),
        "bias": Rule("params", "bias"),
    },
    "DepthwiseConv1D": {  # as DepthwiseConv2D, one spatial axis
        "kernel": Rule("params", "kernel", "w c m -> w 1 (c m)"),
        "depthwise_kernel": Rule("params", "kernel",  # tf-keras' name
                                 "w c m -> w 1 (c m)"),
        "bias": Rule("params", "bias"),
    },
    "SeparableConv1D": {  # models.keras_layers.conv.SeparableConv1D
        "depthwise_kernel": Rule("params", "depthwise_kernel",
                                 "w c m -> w 1 (c m)"),
        "pointwise_kernel": Rule("params", "pointwise_kernel"),
        "bias": Rule("params", "bias"),
    },
    "LayerNormalization": {
        "gamma": Rule("params", "scale"),
        "beta": Rule("params", "bias"),
    },
    "LayerScale": _Unnamed({
        # Keras 3 ConvNeXt's LayerScale adds its weight without a name, so
        # Keras calls it "variable", "variable_1", … (session counter);
        # tf-keras names it "gamma".
        "variable": Rule("params", "gamma"),
        "gamma": Rule("params", "gamma"),
    }),
    "BatchNormalization": {
        "gamma": Rule("params", "scale"),
        "beta": Rule("params", "bias"),
        "moving_mean": Rule("batch_stats", "mean"),
        "moving_variance": Rule("batch_stats", "var"),
    },
    # models.recurrent keeps Keras' fused layouts, so these are copies:
    # kernel (in, G * units) and recurrent_kernel (units, G * units) with the
    # gates side by side in Keras' order (LSTM i f c o, GRU z r h); bias
    # (G * units,), or GRU reset_after=True's (2, 3 * units) (input and
    # recurrent rows). Keras 3 and tf-keras name them
    # lstm/lstm_cell/kernel(:0); Bidirectional's parts arrive as LSTM/GRU/
    # SimpleRNN layers "bidirectional/forward_lstm" (keras_io.read_weights).
    "LSTM": _RECURRENT,
    "GRU": _RECURRENT,
    "SimpleRNN": _RECURRENT,
    "Embedding": {"embeddings": Rule("params", "embeddings")},
    "Normalization": {
        "mean": Rule("batch_stats", "mean"),
        "variance": Rule("batch_stats", "var"),
        "count": DROP,  # number of samples adapt() saw; not used at inference
    },
}


def rule_for(layer_cls: str, layer_name: str) -> dict[str, Rule | None]:
  """The rule table of a Keras layer class, or a clear error."""
  try:
    return RULES[layer_cls]
  except KeyError:
    raise KeyError(
        f"no translation rule for Keras layer class {layer_cls!r} (layer "
        f"{layer_name!r}); add one to translate.rules.RULES") from None
