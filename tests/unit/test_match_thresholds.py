"""The matcher's fuzzy thresholds, just above and just below each of them.

Every case first asserts the rapidfuzz scores it relies on, so it keeps
testing the threshold it names if rapidfuzz or ``normalize`` change. The
matcher is always called with its defaults, so a changed ``MIN_SCORE`` or
``MIN_MARGIN`` fails here.
"""

import importlib

import pytest
from rapidfuzz import fuzz

# The module (``translate.match`` the attribute is the function).
M = importlib.import_module("translate.match")

_r = lambda a, b: fuzz.ratio(M.normalize(a), M.normalize(b))  # noqa: E731


def test_the_documented_thresholds():
  assert (M.MIN_SCORE, M.MIN_MARGIN) == (90.0, 5.0)


def test_a_pair_scoring_exactly_the_minimum_is_paired():
  flax, keras = "block_conv_a", "block_conv_b"  # 10 letters, one differs
  assert _r(flax, keras) == pytest.approx(90.0)
  (m,) = M.match([keras], [flax])
  assert (m.flax, m.keras, m.kind) == (flax, keras, "fuzzy")
  assert m.score == pytest.approx(90.0)


def test_a_pair_just_below_the_minimum_is_refused():
  # The audit's case: conv2_bn vs conv1_bn scores 85.7; at MIN_SCORE 80
  # they would be paired and the wrong BatchNorm translated.
  assert 85 < _r("conv2_bn", "conv1_bn") < 90
  with pytest.raises(M.MatchError, match="no Keras layer"):
    M.match(["conv1_bn"], ["conv2_bn"])
  flax, keras = "conv_blka", "conv_blkb"  # 87.5: 8 letters, one differs
  assert 87 < _r(flax, keras) < 90
  with pytest.raises(M.MatchError):
    M.match([keras], [flax])


# Two Flax and two Keras names where every best pairing leads its runner-up
# by exactly MIN_MARGIN, in both directions.
F1, F2 = "blockconvbnlayerxyzw", "mlockconvbnlayerxyqq"
K1, K2 = "blockconvbnlayerxyzq", "blockconvbnlayerxyqq"


def test_a_lead_of_exactly_the_margin_pairs_both_ways():
  assert (_r(F1, K1), _r(F1, K2)) == (95.0, 90.0)  # F1's lead: 5
  assert (_r(F2, K2), _r(F2, K1)) == (95.0, 90.0)  # F2's lead: 5
  assert (_r(K1, F1), _r(K1, F2)) == (95.0, 90.0)  # K1's lead, reverse: 5
  assert (_r(K2, F2), _r(K2, F1)) == (95.0, 90.0)  # K2's lead, reverse: 5
  pairs = {m.flax: m.keras for m in M.match([K2, K1], [F1, F2])}
  assert pairs == {F1: K1, F2: K2}


def test_a_lead_just_under_the_margin_is_ambiguous():
  flax = "blockconvbnlayerxyzw"
  best, runner = "blockconvbnlayerxyzwa", "blockconvbnlayerxyzqa"
  assert _r(flax, best) > 90
  assert 4.5 < _r(flax, best) - _r(flax, runner) < 5.0
  with pytest.raises(M.MatchError, match="ambiguous among Keras"):
    M.match([best, runner], [flax])


def test_the_reverse_direction_must_agree():
  # F1's best Keras name is K1, clearly; but K1's best Flax name is F2, so
  # pairing F1 with K1 would be a guess. Without the reverse check both
  # Flax names would take K1.
  f1, f2 = "blockconvbnlayerxyzw", "blockconvbnlayerxyzqr"
  k1, k2 = "blockconvbnlayerxyzq", "completelydifferent"
  assert _r(f1, k1) - _r(f1, k2) > 5 and _r(f1, k1) >= 90
  assert _r(k1, f2) > _r(k1, f1)
  with pytest.raises(M.MatchError) as e:
    M.match([k1, k2], [f1, f2])
  assert f"Flax {f1!r} is ambiguous" in str(e.value)


def test_exact_names_win_before_fuzzy_ones():
  ms = M.match(["conv1_bn", "conv2_bn"], ["conv2_bn", "conv1_bn"])
  assert {(m.flax, m.keras, m.kind) for m in ms} == {
      ("conv2_bn", "conv2_bn", "exact"), ("conv1_bn", "conv1_bn", "exact")}


def test_normalized_names_pair_but_never_two_to_one():
  (m,) = M.match(["Conv1/BN:0"], ["conv1_bn"])
  assert m.kind == "normalized"
  with pytest.raises(M.MatchError, match="ambiguous"):
    M.match(["conv1/bn", "conv1_bn_"], ["conv1-bn", "Conv1BN"])
