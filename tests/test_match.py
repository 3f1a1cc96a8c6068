"""The layer-name matcher: exact, normalized, fuzzy; refuses ambiguity."""

import pytest

from translate import keras_io
from translate.match import MatchError, match, normalize


def _pairs(matches):
  return {m.flax: (m.keras, m.kind) for m in matches}


def test_exact_names_pair_exactly():
  got = _pairs(match(["conv1_conv", "conv1_bn"], ["conv1_bn", "conv1_conv"]))
  assert got == {"conv1_conv": ("conv1_conv", "exact"),
                 "conv1_bn": ("conv1_bn", "exact")}


def test_normalized_names_ignore_case_underscores_and_suffix():
  assert normalize("Conv1_BN:0") == "conv1bn"
  got = _pairs(match(["Conv1_BN:0", "stem"], ["conv1bn", "stem"]))
  assert got["conv1bn"] == ("Conv1_BN:0", "normalized")
  assert got["stem"] == ("stem", "exact")


def test_fuzzy_match_with_a_clear_winner():
  got = match(["expanded_conv_depthwise_bn", "predictions"],
              ["expanded_conv_depthwse_bn", "predictions"])
  fuzzy = [m for m in got if m.kind == "fuzzy"]
  assert len(fuzzy) == 1
  assert fuzzy[0].keras == "expanded_conv_depthwise_bn"
  assert 90 <= fuzzy[0].score < 100


def test_ambiguous_fuzzy_match_is_refused_with_candidates():
  # "block1_conv" is equally close to "block11_conv" and "block1_conv2".
  with pytest.raises(MatchError, match="ambiguous") as e:
    match(["block11_conv", "block1_conv2"], ["block1_conv"])
  assert "block11_conv" in str(e.value)


def test_ambiguous_normalized_names_are_refused():
  with pytest.raises(MatchError, match="ambiguous"):
    match(["conv_1", "conv1_"], ["Conv1", "other"])


def test_missing_layer_is_refused_listing_both_sides():
  with pytest.raises(MatchError) as e:
    match(["conv1_conv", "conv1_bn"], ["conv1_conv", "conv9_gamma"])
  msg = str(e.value)
  assert "conv9_gamma" in msg and "conv1_bn" in msg
  assert "no Keras layer" in msg and "no Flax module" in msg


def test_low_scores_are_never_paired():
  with pytest.raises(MatchError):
    match(["dense"], ["predictions"])


def test_duplicate_names_are_refused():
  with pytest.raises(MatchError, match="duplicate"):
    match(["a", "a"], ["a"])


def test_canonical_names_renumber_auto_named_layers_by_rank():
  layer = lambda name, cls: keras_io.KerasLayer(name, cls, {})
  layers = [layer("conv2d_7", "Conv2D"), layer("conv2d_12", "Conv2D"),
            layer("conv2d_9", "Conv2D"), layer("batch_normalization_3",
                                               "BatchNormalization"),
            layer("predictions", "Dense"), layer("dense_4", "Dense")]
  assert keras_io.canonical_names(layers) == {
      "conv2d_7": "conv2d", "conv2d_9": "conv2d_1", "conv2d_12": "conv2d_2",
      "batch_normalization_3": "batch_normalization",
      "predictions": "predictions", "dense_4": "dense"}
