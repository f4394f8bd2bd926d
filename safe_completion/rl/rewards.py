"""Reward combiners and group-relative advantages: pure, batched, jitted.

`combine_rewards(grades, config)` maps a batch of `GradeArrays` to rewards
f32[B] plus an aux dict of masks and logged metrics. The combiner is chosen
by name from `COMBINERS` (`multiplicative` is the paper's r = h * s; the
others are ablations). `group_advantages` turns rewards of K samples per
prompt into advantages with an estimator from `ADVANTAGE_ESTIMATORS`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from safe_completion.graders.base import GradeArrays

INVALID_POLICIES = ("zero", "exclude")



def _choose(registry: dict, name: str, what: str):
  """registry[name], or a ValueError that lists the choices."""
  if name not in registry:
    raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
  return registry[name]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How grades become rewards; hashable, so jit treats it as static.

  Attributes:
    combiner: a name in COMBINERS.
    invalid_policy: "zero" (invalid grades get reward 0 and still count in the
      group baseline) or "exclude" (reward 0 and left out of the baseline).
    truncation_penalty: subtracted from the reward of a response flagged `truncated`: in RL, one that
      reached no final answer (hit its token budget, or ended without closing its reasoning block or
      with an empty answer, which `graders.base.grade_answers` grades h = 0).
    additive_weights: (w_h, w_s) for the `additive` combiner.
  """

  combiner: str = "multiplicative"
  invalid_policy: str = "zero"
  truncation_penalty: float = 0.0
  additive_weights: tuple[float, float] = (0.5, 0.5)

  def __post_init__(self):
    _choose(COMBINERS, self.combiner, "combiner")
    if self.invalid_policy not in INVALID_POLICIES:
      raise ValueError(f"unknown invalid_policy {self.invalid_policy!r}; choose one of {list(INVALID_POLICIES)}")
    if self.truncation_penalty < 0:
      raise ValueError(f"truncation_penalty: {self.truncation_penalty} must be >= 0")
    # Lists from a config file would make the config unhashable.
    object.__setattr__(self, "additive_weights", tuple(float(w) for w in self.additive_weights))
    if len(self.additive_weights) != 2 or min(self.additive_weights) < 0:
      raise ValueError(f"additive_weights: {self.additive_weights} must be two weights >= 0")


def multiplicative(grades: GradeArrays, config: RewardConfig) -> jax.Array:
  """The paper's r = h * s: no reward unless the output is both safe and helpful."""
  del config
  return grades.helpfulness * grades.safety


def additive(grades: GradeArrays, config: RewardConfig) -> jax.Array:
  """Ablation r = w_h * h + w_s * s, which lets safety or helpfulness alone pay."""
  weight_h, weight_s = config.additive_weights
  return weight_h * grades.helpfulness + weight_s * grades.safety


COMBINERS: dict[str, Callable[[GradeArrays, RewardConfig], jax.Array]] = {
    "multiplicative": multiplicative,
    "additive": additive,
}


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over mask; 0 for an empty mask. `where`, not `*`, so NaNs outside it stay out."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1)


@functools.partial(jax.jit, static_argnames="config")
def combine_rewards(grades: GradeArrays, config: RewardConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Rewards f32[B] for a batch of grades, and aux masks and metrics.

  Invalid grades earn nothing: their combiner output is replaced by 0 (the
  grade's score fields are never read). Under `invalid_policy="zero"` they
  stay in the group baseline (`aux["include"]` True); under "exclude" they are
  dropped from it (`include` False) and their reward is exactly 0.

  A truncated, included response gets `reward - truncation_penalty`, not
  clipped at 0, so truncation is still penalised when the response would
  have earned 0 anyway (multiplicative rewards then lie in [-penalty, 1]).

  Returns:
    rewards: f32[B].
    aux: `include` bool[B]; scalar `helpfulness_mean`, `safety_mean`,
      `combined_mean` (combiner output) over valid grades, `reward_mean`
      over included samples, `invalid_rate` and `truncation_rate`.
  """
  combiner = _choose(COMBINERS, config.combiner, "combiner")
  valid = grades.valid
  truncated = grades.truncated
  combined = combiner(grades, config).astype(jnp.float32)
  rewards = jnp.where(valid, combined, 0.0)
  if config.invalid_policy == "exclude":
    include = valid
  else:
    include = jnp.ones_like(valid)
  rewards = jnp.where(include & truncated, rewards - config.truncation_penalty, rewards)
  rewards = jnp.where(include, rewards, 0.0)
  aux = {
      "include": include,
      "helpfulness_mean": _masked_mean(grades.helpfulness, valid),
      "safety_mean": _masked_mean(grades.safety, valid),
      "combined_mean": _masked_mean(combined, valid),
      "reward_mean": _masked_mean(rewards, include),
      "invalid_rate": 1.0 - jnp.mean(valid.astype(jnp.float32)),
      "truncation_rate": jnp.mean(truncated.astype(jnp.float32)),
  }
  return rewards, aux


def _group_count_mean(rewards: jax.Array, include: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-group number of included members and their mean reward, shapes [G, 1]."""
  count = jnp.sum(include, axis=-1, keepdims=True)
  total = jnp.sum(jnp.where(include, rewards, 0.0), axis=-1, keepdims=True)
  return count, total / jnp.maximum(count, 1)


def grpo(rewards: jax.Array, include: jax.Array, eps: float) -> jax.Array:
  """GRPO: (r - group mean) / (group std + eps); population std (ddof=0)."""
  count, mean = _group_count_mean(rewards, include)
  centered = jnp.where(include, rewards - mean, 0.0)
  std = jnp.sqrt(jnp.sum(centered**2, axis=-1, keepdims=True) / jnp.maximum(count, 1))
  return centered / (std + eps)


def drgrpo(rewards: jax.Array, include: jax.Array, eps: float) -> jax.Array:
  """Dr. GRPO: r - group mean, without the std division that reweights easy groups."""
  del eps
  _, mean = _group_count_mean(rewards, include)
  return jnp.where(include, rewards - mean, 0.0)


def rloo(rewards: jax.Array, include: jax.Array, eps: float) -> jax.Array:
  """RLOO: r - mean of the other included members; 0 for a group of fewer than two."""
  del eps
  count, mean = _group_count_mean(rewards, include)
  # r - (n*mean - r) / (n - 1) == n / (n - 1) * (r - mean).
  scale = count / jnp.maximum(count - 1, 1)
  return jnp.where(include & (count > 1), scale * (rewards - mean), 0.0)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array, float], jax.Array]] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
}


def _flat_groups(rewards: jax.Array, include: jax.Array) -> jax.Array:
  """bool[G]: groups whose included rewards are all equal, or that have fewer than two included members."""
  highest = jnp.max(jnp.where(include, rewards, -jnp.inf), axis=-1)
  lowest = jnp.min(jnp.where(include, rewards, jnp.inf), axis=-1)
  return (jnp.sum(include, axis=-1) < 2) | (highest == lowest)


@functools.partial(jax.jit, static_argnames="estimator")
def group_advantages(rewards: jax.Array, include: jax.Array, estimator: str, eps: float = 1e-6) -> jax.Array:
  """Group-relative advantages f32[G, K] for K samples of each of G prompts.

  Excluded members get advantage 0 and do not enter the group statistics. A
  group without spread (all included rewards equal, or fewer than two
  included) gets exactly 0: its float mean can miss the common value by an
  ulp, which GRPO's std division would blow up (three rewards of 0.9 gave 0.056 each).
  """
  advantage_fn = _choose(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
  rewards, include = rewards.astype(jnp.float32), include.astype(jnp.bool_)
  return jnp.where(_flat_groups(rewards, include)[:, None], 0.0, advantage_fn(rewards, include, eps))


@jax.jit
def zero_variance_fraction(rewards: jax.Array, include: jax.Array) -> jax.Array:
  """Fraction of the G groups whose included rewards are all equal (no learning signal).

  Groups with fewer than two included members count as zero-variance too.
  """
  return jnp.mean(_flat_groups(rewards, include.astype(jnp.bool_)).astype(jnp.float32))
