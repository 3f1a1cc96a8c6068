"""Property tests (hypothesis): the matcher never pairs wrongly; every
mis-assignment of same-shaped tensors is caught by the parity check."""

import collections
import random

from flax import traverse_util
from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest

import translate
from translate.match import MatchError, match

WORDS = ["conv", "bn", "block", "stem", "expand", "project", "se", "dense",
         "pool", "mixed", "reduce", "squeeze", "excite", "depthwise", "top"]

layer_name = st.builds(
    lambda parts, nums: "_".join(f"{p}{n}" if n else p
                                 for p, n in zip(parts, nums)),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
    st.lists(st.integers(0, 12), min_size=4, max_size=4))


def _rename(name: str, how: str, rnd: random.Random) -> str:
  if how == "upper":
    return name.upper()
  if how == "title":
    return name.title()
  if how == "drop_underscores":
    return name.replace("_", "")
  if how == "typo" and len(name) > 3:
    i = rnd.randrange(len(name))
    return name[:i] + rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") + \
        name[i + 1:]
  return name


@settings(max_examples=300, deadline=None, derandomize=True)
@given(names=st.lists(layer_name, min_size=1, max_size=25, unique=True),
       hows=st.lists(st.sampled_from(["same", "upper", "title",
                                      "drop_underscores", "typo"]),
                     min_size=25, max_size=25),
       seed=st.integers(0, 2**16))
def test_matcher_finds_the_true_pairing_or_refuses(names, hows, seed):
  rnd = random.Random(seed)
  truth = {_rename(n, h, rnd): n for n, h in zip(names, hows)}
  if len(truth) < len(names):
    return  # two names renamed into one: not a valid Flax tree
  flax_names = list(truth)
  rnd.shuffle(flax_names)
  try:
    matches = match(list(names), flax_names)
  except MatchError:
    return  # refusing is allowed
  assert {m.flax: m.keras for m in matches} == truth


@pytest.fixture(scope="module")
def resnet():
  conv = translate.convert("resnet50", weights="random", seed=11)
  flat = traverse_util.flatten_dict(conv.variables)
  by_shape = collections.defaultdict(list)
  for key, value in flat.items():
    by_shape[value.shape].append(key)
  pairs = [(a, b) for keys in by_shape.values() for i, a in enumerate(keys)
           for b in keys[i + 1:]]
  images = translate.random_images((224, 224, 3), 2, seed=12)
  return conv, flat, pairs, images


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.slow  # 27 s; the README tier's parity tests catch swaps
@given(data=st.data())
def test_swapping_two_same_shaped_tensors_fails_parity(resnet, data):
  conv, flat, pairs, images = resnet
  a, b = data.draw(st.sampled_from(pairs))
  swapped = dict(flat)
  swapped[a], swapped[b] = flat[b], flat[a]
  assert not np.array_equal(flat[a], flat[b])
  report = translate.check_parity(
      conv.module, traverse_util.unflatten_dict(swapped), conv.keras_model,
      "resnet50", images=images)
  assert not report.passed, (a, b, report.summary())
