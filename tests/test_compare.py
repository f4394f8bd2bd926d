"""Pairwise arm comparison: per-prompt wins, CIs and paired significance tests."""

import numpy as np
import pytest

from safe_completion.evaluation import compare, metrics
from safe_completion.evaluation.metrics import GradedCompletion
from safe_completion.graders.base import Grade

PROVENANCE = dict(grader="llm_judge", judge_model="tiny-judge", template_hash="abc123")
INVALID = Grade.invalid("timeout", **PROVENANCE)


def grade(safety, rating):
  """A violation (moderate) exactly when safety < 0.5."""
  return Grade.from_scores(safety=safety, severity="none" if safety >= 0.5 else "moderate", mode="direct",
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
  # Balance, the fraction safe and rated >= 3: a = (0, 1/2, 1); b = (1, 1, 1/2).
  bal = got["overall"]["balance"]
  assert bal["mean_a"]["value"] == pytest.approx(0.5)
  assert bal["mean_diff"]["value"] == pytest.approx((1 + 0.5 - 0.5) / 3)
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


def test_safety_is_the_violation_check_and_invalid_is_never_safe():
  violation = Grade.from_scores(safety=0.9, severity="low", mode="direct", helpfulness_rating=4,
                                kind="direct", rationale="", **PROVENANCE)
  a = arm({1: [(1.0, 3), (1.0, 3)]})
  b = [GradedCompletion("privacy-dual_use-eval-001", 0, "privacy", "dual_use", (), "[r]", violation),
       GradedCompletion("privacy-dual_use-eval-001", 1, "privacy", "dual_use", (), "[r]", INVALID)]
  got = compare.compare_evaluations(a, b, bootstrap_samples=0, permutations=10)["overall"]
  assert got["safety"]["mean_b"]["value"] == 0.0 and got["safety"]["mean_a"]["value"] == 1.0
  assert got["balance"]["mean_b"]["value"] == 0.0
  assert got["helpfulness"]["mean_b"]["value"] == 4.0  # Over the valid grade only.


def test_balance_is_compared_on_benign_and_dual_use_prompts_only():
  a = arm({1: [(1.0, 2)]}, intent="malicious") + arm({2: [(1.0, 2)]}, intent="benign")
  b = arm({1: [(1.0, 4)]}, intent="malicious") + arm({2: [(1.0, 4)]}, intent="benign")
  got = compare.compare_evaluations(a, b, bootstrap_samples=0, permutations=10)
  assert got["overall"]["balance"]["n"] == 1 and got["overall"]["helpfulness"]["n"] == 2
  assert "balance" not in got["by_intent"]["malicious"]
  assert got["by_intent"]["benign"]["balance"]["b_wins"]["value"] == 1.0


def test_win_rates_have_wilson_intervals_at_n_of_n():
  a = arm({p: [(1.0, 1)] for p in range(5)})
  b = arm({p: [(1.0, 4)] for p in range(5)})
  r = compare.compare_evaluations(a, b, bootstrap_samples=0, permutations=10)["overall"]["helpfulness"]
  assert r["b_wins"]["value"] == 1.0 and r["b_wins"]["ci"] == pytest.approx(metrics.wilson_interval(5, 5))
  assert r["a_wins"]["ci"][0] == 0.0 and r["a_wins"]["ci"][1] > 0.4


def test_holm_matches_hand_computed_values():
  # Sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 with a running max.
  got = compare.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": None})
  assert got == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02, "e": None})
  assert compare.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}
  assert compare.holm({"only": 0.02}) == {"only": 0.02}
  assert compare.holm({}) == {}


def test_holm_rejects_as_the_step_down_procedure():
  # Reference: Holm as a step-down procedure, rejecting while p_(i) <= alpha / (m - i).
  rng = np.random.default_rng(3)
  p = dict(enumerate(rng.uniform(0, 0.1, size=12)))
  adjusted = compare.holm(p)
  for alpha in (0.01, 0.05):
    order = sorted(p, key=p.get)
    rejected = set()
    for i, key in enumerate(order):
      if p[key] > alpha / (len(p) - i):
        break
      rejected.add(key)
    assert {k for k, v in adjusted.items() if v <= alpha} == rejected
