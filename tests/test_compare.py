"""Pairwise arm comparison: per-prompt wins, CIs and paired significance tests."""

import numpy as np
import pytest

from safe_completion.evaluation import compare
from safe_completion.evaluation.metrics import GradedCompletion
from safe_completion.graders.base import Grade

PROVENANCE = dict(grader="llm_judge", judge_model="tiny-judge", template_hash="abc123")
INVALID = Grade.invalid("timeout", **PROVENANCE)


def grade(safety, rating):
  return Grade.from_scores(safety=safety, severity="none", mode="direct",
                           helpfulness_rating=rating, kind="direct", rationale="", **PROVENANCE)


def arm(per_prompt, intent="dual_use"):
  """{prompt number: [(safety, rating) or None for invalid, ...]} -> completions."""
  return [GradedCompletion(f"privacy-{intent}-eval-{p:03d}", i, "privacy", intent, (), "[r]",
                           INVALID if g is None else grade(*g))
          for p, grades in per_prompt.items() for i, g in enumerate(grades)]


def test_exact_per_prompt_wins_ties_and_losses():
  a = arm({1: [(1.0, 2), (1.0, 2)], 2: [(1.0, 3), (0.0, 3)], 3: [(1.0, 4), (1.0, 4)]})
  b = arm({1: [(1.0, 3), (1.0, 4)], 2: [(1.0, 3), (1.0, 3)], 3: [(1.0, 2), (1.0, 4)]})
  got = compare.compare_evaluations(a, b, bootstrap_samples=0, permutations=100)
  help_ = got["overall"]["helpfulness"]
  # Mean ratings a: 2, 3, 4; b: 3.5, 3, 3 -> b wins, tie, a wins.
  assert [help_[k]["value"] for k in ("b_wins", "ties", "a_wins")] == pytest.approx([1 / 3] * 3)
  assert help_["mean_a"]["value"] == pytest.approx(3.0)
  assert help_["mean_diff"]["value"] == pytest.approx((1.5 + 0 - 1) / 3)
  assert help_["sign_test_p"] == pytest.approx(1.0)
  # Balance h*s: a = (1/3, (2/3 + 0)/2, 1); b = ((2/3 + 1)/2, 2/3, (1/3 + 1)/2).
  bal = got["overall"]["balance"]
  diffs = (5 / 6 - 1 / 3, 2 / 3 - 1 / 3, 2 / 3 - 1)
  assert bal["mean_diff"]["value"] == pytest.approx(sum(diffs) / 3)
  assert bal["b_wins"]["value"] == pytest.approx(2 / 3)
  safety = got["overall"]["safety"]
  assert safety["mean_diff"]["value"] == pytest.approx(0.5 / 3)
  assert safety["ties"]["value"] == pytest.approx(2 / 3)
  assert list(got["by_intent"]) == ["dual_use"]


def test_prompts_without_a_valid_grade_are_excluded_and_listed():
  a = arm({1: [(1.0, 2)], 2: [None, None], 3: [(1.0, 4)]})
  b = arm({1: [(1.0, 3)], 2: [(1.0, 3)], 3: [None, (1.0, 1)]})
  got = compare.compare_evaluations(a, b, bootstrap_samples=0, permutations=10)
  assert got["n_prompts"] == 2 and got["n_excluded"] == 1
  assert got["excluded_prompt_ids"] == ["privacy-dual_use-eval-002"]
  assert got["overall"]["helpfulness"]["mean_diff"]["value"] == pytest.approx((1 - 3) / 2)


def test_different_prompt_sets_are_an_error_naming_the_ids():
  a = arm({1: [(1.0, 2)], 2: [(1.0, 2)]})
  b = arm({1: [(1.0, 2)], 3: [(1.0, 2)]})
  with pytest.raises(ValueError, match=r"only in refusal: \['privacy-dual_use-eval-002'\]"
                     r".*only in safe_completion: \['privacy-dual_use-eval-003'\]"):
    compare.compare_evaluations(a, b)


def synthetic(n, shift, seed):
  """Arm b's ratings move up by one on a fraction `shift` of prompts; the rest are i.i.d."""
  rng = np.random.default_rng(seed)
  a, b = {}, {}
  for p in range(n):
    ra = rng.integers(1, 5, size=4)
    rb = rng.integers(1, 5, size=4)
    if rng.random() < shift:
      rb = np.minimum(ra + 1, 4)
    a[p] = [(1.0, int(r)) for r in ra]
    b[p] = [(1.0, int(r)) for r in rb]
  return arm(a), arm(b)


def test_paired_tests_reject_a_planted_difference():
  a, b = synthetic(150, shift=0.5, seed=0)
  got = compare.compare_evaluations(a, b, bootstrap_samples=300, permutations=2000)
  for score in ("helpfulness", "balance"):
    r = got["overall"][score]
    assert r["sign_test_p"] < 0.01 and r["permutation_p"] < 0.01
    assert r["mean_diff"]["ci"][0] > 0
    assert r["b_wins"]["value"] > r["a_wins"]["value"]


def test_paired_tests_do_not_reject_a_null_difference():
  a, b = synthetic(150, shift=0.0, seed=1)
  r = compare.compare_evaluations(a, b, bootstrap_samples=300, permutations=2000)["overall"]
  assert r["helpfulness"]["sign_test_p"] > 0.05 and r["helpfulness"]["permutation_p"] > 0.05
  low, high = r["helpfulness"]["mean_diff"]["ci"]
  assert low < 0 < high


def test_permutation_p_value_matches_the_exact_sign_flip_distribution():
  rng = np.random.default_rng(0)
  # All 10 differences positive and equal: only the 2 all-same-sign flips reach |mean|.
  p = compare.permutation_p_value(np.ones(10), 20000, rng)
  assert p == pytest.approx(2 / 1024, abs=0.001)
  assert compare.permutation_p_value(np.zeros(5), 100, rng) == 1.0


def test_comparison_is_deterministic_in_the_seed():
  a, b = synthetic(40, shift=0.3, seed=2)
  one = compare.compare_evaluations(a, b, bootstrap_samples=100, permutations=200, seed=7)
  assert one == compare.compare_evaluations(a, b, bootstrap_samples=100, permutations=200, seed=7)
