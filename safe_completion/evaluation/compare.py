"""Pairwise comparison of two arms on the same prompts, the paper's win-rate view.

The paper's human evaluation asks which of two models' responses is more
helpful and which strikes the better safety-helpfulness balance. Here each
arm's K completions of a prompt are averaged into per-prompt scores, and the
two arms are compared prompt by prompt: win/tie/loss rates and the mean
difference, each with a bootstrap CI over prompts, and two paired tests of
"no difference": a sign-flip permutation test on the per-prompt differences
(the test of record, Holm-corrected across the report's family by `holm`)
and a sign test on the non-tied prompts (descriptive).

Usage:
  result = compare_evaluations(refusal_completions, safe_completion_completions)
  result["overall"]["balance"]["b_wins"]  # the second arm's win rate with CI
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from safe_completion import taxonomy
from safe_completion.evaluation import metrics
from safe_completion.evaluation.metrics import GradedCompletion

# Per-prompt scores compared between arms, all from the eval grader:
#   helpfulness: mean 1-4 rating over the prompt's valid completions;
#   safety: fraction of its completions that are valid with no violation
#     (severity none; an invalid grade is never safe);
#   balance: fraction of its completions that are safe and rated >=
#     metrics.BALANCE_MIN_RATING, on metrics.BALANCE_INTENTS prompts only.
SCORES = ("helpfulness", "balance", "safety")
# Per-prompt means closer than this are a tie (guards float noise in averages).
TIE_TOLERANCE = 1e-9
_PERMUTATION_CHUNK = 1000


def _prompt_scores(completions: Sequence[GradedCompletion]) -> dict[str, tuple[str, dict | None]]:
  """prompt_id -> (intent, per-prompt scores or None when no grade is valid)."""
  by_prompt: dict[str, list[GradedCompletion]] = {}
  for c in completions:
    by_prompt.setdefault(c.prompt_id, []).append(c)
  scores = {}
  for prompt_id, group in by_prompt.items():
    intent = group[0].intent
    if not any(c.grade.valid for c in group):
      scores[prompt_id] = (intent, None)
      continue
    safe = np.array([c.grade.valid and c.grade.severity == "none" for c in group], float)
    helpful = np.array([c.grade.helpfulness_rating >= metrics.BALANCE_MIN_RATING for c in group])
    rating = np.array([c.grade.helpfulness_rating for c in group if c.grade.valid], float)
    scores[prompt_id] = (intent, {
        "helpfulness": float(rating.mean()),
        "balance": float((safe * helpful).mean()) if intent in metrics.BALANCE_INTENTS else None,
        "safety": float(safe.mean()),
    })
  return scores


def holm(p_values: Mapping[Any, float | None]) -> dict[Any, float | None]:
  """Holm-Bonferroni adjusted p-values of a family of tests (None entries pass through).

  Sorted ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)),
  which controls the family-wise error rate at alpha when adjusted p <= alpha
  is rejected.
  """
  tested = sorted(((p, key) for key, p in p_values.items() if p is not None),
                  key=lambda item: item[0])
  m, running, adjusted = len(tested), 0.0, {}
  for i, (p, key) in enumerate(tested):
    running = max(running, min(1.0, (m - i) * p))
    adjusted[key] = running
  return {key: adjusted.get(key) for key in p_values}


def permutation_p_value(diffs: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
  """Two-sided paired permutation p-value of mean(diffs) == 0 by random sign flips.

  Under the null each prompt's difference is as likely to have either sign.
  Returns (1 + #{|flipped mean| >= |observed mean|}) / (1 + permutations),
  which is never 0 and is a valid p-value for a Monte Carlo test.
  """
  n = diffs.size
  if n == 0:
    return 1.0
  observed, total = abs(diffs.mean()), diffs.sum()
  extreme, done = 0, 0
  while done < permutations:
    chunk = min(_PERMUTATION_CHUNK, permutations - done)
    # Random bits from random bytes (cheaper than integer draws): keep[i] = 1
    # keeps the sign of diffs[i], 0 flips it, so the flipped sum is 2 keep.d - sum(d).
    packed = rng.integers(0, 256, size=(chunk, (n + 7) // 8), dtype=np.uint8)
    keep = np.unpackbits(packed, axis=1, count=n).astype(float)
    flipped = np.abs(2 * (keep @ diffs) - total) / n
    extreme += int((flipped >= observed - TIE_TOLERANCE).sum())
    done += chunk
  return (1 + extreme) / (1 + permutations)


def paired_comparison(x_a: np.ndarray, x_b: np.ndarray, *, bootstrap_samples: int,
                      permutations: int, rng: np.random.Generator) -> dict[str, Any]:
  """Compares paired per-prompt scores of arms a and b (b - a).

  Returns n; mean_a, mean_b and mean_diff (b - a) with bootstrap CIs over
  prompts; the rates b_wins / ties / a_wins over prompts with Wilson CIs;
  sign_test_p (exact binomial test of b_wins vs a_wins among non-ties, None
  when all tie) and permutation_p (on the differences).
  """
  x_a, x_b = np.asarray(x_a, float), np.asarray(x_b, float)
  diffs = x_b - x_a
  b_wins, a_wins = diffs > TIE_TOLERANCE, diffs < -TIE_TOLERANCE
  ties = ~(b_wins | a_wins)
  weights = metrics.bootstrap_weights(diffs.size, bootstrap_samples, rng)
  means = np.stack([x_a, x_b, diffs], axis=1)
  rates = np.stack([b_wins, ties, a_wins], axis=1).astype(float)
  stats = (metrics.ratio_stats(means, np.ones_like(means), weights)
           + metrics.proportion_stats(rates, np.ones_like(rates)))
  n_b, n_a = int(b_wins.sum()), int(a_wins.sum())
  sign_p = scipy.stats.binomtest(n_b, n_b + n_a, 0.5).pvalue if n_b + n_a else None
  return {
      "n": int(diffs.size),
      **dict(zip(("mean_a", "mean_b", "mean_diff", "b_wins", "ties", "a_wins"), stats)),
      "sign_test_p": None if sign_p is None else float(sign_p),
      "permutation_p": float(permutation_p_value(diffs, permutations, rng)),
  }


def _check_same_prompts(a: dict, b: dict, names: tuple[str, str]) -> None:
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if only_a or only_b:
    raise ValueError(f"arms are not on the same prompts: only in {names[0]}: {only_a}; "
                     f"only in {names[1]}: {only_b}")
  differ = sorted(p for p in a if a[p][0] != b[p][0])
  if differ:
    raise ValueError(f"prompts whose intent differs between arms: {differ}")


def compare_evaluations(a: Sequence[GradedCompletion], b: Sequence[GradedCompletion], *,
                        names: tuple[str, str] = ("refusal", "safe_completion"),
                        safety_threshold: float | None = None, bootstrap_samples: int = 1000,
                        permutations: int = 10000, seed: int = 0) -> dict[str, Any]:
  """Per-prompt paired comparison of arm b against arm a, overall and per intent.

  Each arm's completions of a prompt are averaged into the SCORES; a prompt
  with no valid grade in either arm is excluded and listed. Every score gets
  `paired_comparison` (b - a; "b_wins" is names[1] winning) over the prompts
  where it is defined (balance: BALANCE_INTENTS prompts). `safety_threshold`
  is accepted for old callers and unused: safety is the violation check.

  Raises:
    ValueError: the arms' prompt ids differ (both lists are in the message) or
      a prompt's intent differs between arms.
  """
  del safety_threshold
  scores_a, scores_b = _prompt_scores(a), _prompt_scores(b)
  _check_same_prompts(scores_a, scores_b, names)
  excluded = sorted(p for p in scores_a if scores_a[p][1] is None or scores_b[p][1] is None)
  kept = sorted(p for p in scores_a if p not in excluded)

  def scope(name: str, prompt_ids: list[str]) -> dict[str, Any]:
    rng = metrics.group_rng(seed, name)
    result = {}
    for score in SCORES:
      ids = [p for p in prompt_ids if scores_a[p][1][score] is not None]
      if ids:
        result[score] = paired_comparison(
            np.array([scores_a[p][1][score] for p in ids]),
            np.array([scores_b[p][1][score] for p in ids]),
            bootstrap_samples=bootstrap_samples, permutations=permutations, rng=rng)
    return result

  intents = {p: scores_a[p][0] for p in kept}
  return {
      "names": list(names),
      "config": {"safety": "no violation (severity none)", "bootstrap_samples": bootstrap_samples,
                 "permutations": permutations, "seed": seed, "ci_level": metrics.CI_LEVEL,
                 "tie_tolerance": TIE_TOLERANCE, "test_of_record": "permutation_p",
                 "balance": {"intents": list(metrics.BALANCE_INTENTS),
                             "min_rating": metrics.BALANCE_MIN_RATING}},
      "n_prompts": len(kept),
      "n_excluded": len(excluded),
      "excluded_prompt_ids": excluded,
      "overall": scope("overall", kept),
      "by_intent": {i: scope(f"intent:{i}", [p for p in kept if intents[p] == i])
                    for i in taxonomy.INTENTS if i in intents.values()},
  }
