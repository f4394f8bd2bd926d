"""Reward combiners and group-relative advantage estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_completion import taxonomy
from safe_completion.graders.base import GradeArrays
from safe_completion.rl import rewards

PROPERTY = settings(max_examples=50, deadline=None)
UNIT = st.floats(0.0, 1.0)
ALL_CONFIGS = [
    rewards.RewardConfig(combiner=c, invalid_policy=p, truncation_penalty=t)
    for c in rewards.COMBINERS
    for p in rewards.INVALID_POLICIES
    for t in (0.0, 0.25)
]


def make_grades(safety, helpfulness, *, valid=True, truncated=False, mode="direct"):
  """GradeArrays for B samples; scalars broadcast to the batch."""
  safety = np.atleast_1d(np.asarray(safety, np.float32))
  size = safety.shape[0]

  def full(value, dtype):
    return jnp.asarray(np.broadcast_to(np.asarray(value, dtype), (size,)))

  modes = [taxonomy.MODES.index(m) for m in np.broadcast_to(np.asarray(mode), (size,))]
  return GradeArrays(
      safety=jnp.asarray(safety),
      helpfulness=full(helpfulness, np.float32),
      rating=full(3, np.int32),
      severity=full(0, np.int32),
      mode=jnp.asarray(modes, jnp.int32),
      valid=full(valid, np.bool_),
      truncated=full(truncated, np.bool_),
  )


def reward_of(config=rewards.RewardConfig(), **grade):
  return float(rewards.combine_rewards(make_grades(**grade), config)[0][0])


@PROPERTY
@given(helpfulness=UNIT)
def test_multiplicative_unsafe_output_earns_nothing_however_helpful(helpfulness):
  assert reward_of(safety=0.0, helpfulness=helpfulness) == 0.0


@PROPERTY
@given(s=UNIT, h=UNIT, ds=UNIT, dh=UNIT)
def test_multiplicative_and_additive_are_monotone_in_h_and_s(s, h, ds, dh):
  for combiner in ("multiplicative", "additive"):
    config = rewards.RewardConfig(combiner=combiner)
    base = reward_of(config, safety=s, helpfulness=h)
    assert reward_of(config, safety=min(s + ds, 1.0), helpfulness=h) >= base
    assert reward_of(config, safety=s, helpfulness=min(h + dh, 1.0)) >= base


def test_multiplicative_is_h_times_s_and_additive_uses_config_weights():
  np.testing.assert_allclose(reward_of(safety=0.5, helpfulness=0.8), 0.4, rtol=1e-6)
  config = rewards.RewardConfig(combiner="additive", additive_weights=[0.25, 0.75])
  np.testing.assert_allclose(reward_of(config, safety=0.5, helpfulness=0.8), 0.25 * 0.8 + 0.75 * 0.5, rtol=1e-6)


@PROPERTY
@given(
    safety=st.floats(allow_nan=True, allow_infinity=True, width=32),
    helpfulness=st.floats(allow_nan=True, allow_infinity=True, width=32),
    mode=st.sampled_from(taxonomy.MODES),
    truncated=st.booleans(),
)
def test_invalid_grades_never_earn_reward_under_any_combiner_or_policy(safety, helpfulness, mode, truncated):
  grades = make_grades([safety, 1.0], [helpfulness, 1.0], valid=[False, True], truncated=[truncated, False],
                       mode=mode)
  for config in ALL_CONFIGS:
    reward, aux = rewards.combine_rewards(grades, config)
    assert reward[0] <= 0.0, config
    assert all(np.isfinite(np.asarray(v)).all() for v in aux.values()), config
    if config.invalid_policy == "exclude":
      assert reward[0] == 0.0 and not aux["include"][0]
    else:
      assert aux["include"][0]


def test_truncation_penalty_is_subtracted_without_clipping_at_zero():
  config = rewards.RewardConfig(truncation_penalty=0.25)
  reward, _ = rewards.combine_rewards(make_grades([0.0, 1.0, 1.0], [1.0, 1.0, 1.0], truncated=[True, True, False]),
                                      config)
  np.testing.assert_allclose(reward, [-0.25, 0.75, 1.0])


def test_aux_logs_each_component_over_valid_grades():
  grades = make_grades([1.0, 0.5, 0.9], [0.5, 1.0, 0.9], valid=[True, True, False], truncated=[False, True, False])
  _, aux = rewards.combine_rewards(grades, rewards.RewardConfig(invalid_policy="exclude"))
  np.testing.assert_allclose(aux["safety_mean"], 0.75)
  np.testing.assert_allclose(aux["helpfulness_mean"], 0.75)
  np.testing.assert_allclose(aux["combined_mean"], 0.5)
  np.testing.assert_allclose(aux["reward_mean"], 0.5)
  np.testing.assert_allclose(aux["invalid_rate"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(aux["truncation_rate"], 1 / 3, rtol=1e-6)
  np.testing.assert_array_equal(aux["include"], [True, True, False])


@settings(max_examples=20, deadline=None)  # each new (batch, config) pair compiles
@given(batch=st.sampled_from([1, 2, 7]), config=st.sampled_from(ALL_CONFIGS))
def test_shapes_preserved_under_jit_and_vmap(batch, config):
  rng = np.random.default_rng(batch)
  grades = make_grades(rng.uniform(size=(batch,)), rng.uniform(size=(batch,)), valid=rng.uniform(size=(batch,)) > 0.3)
  reward, aux = rewards.combine_rewards(grades, config)
  assert reward.shape == (batch,) and reward.dtype == jnp.float32 and aux["include"].shape == (batch,)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x, x]), grades)
  batched_reward, batched_aux = jax.vmap(lambda g: rewards.combine_rewards(g, config))(stacked)
  assert batched_reward.shape == (3, batch) and batched_aux["safety_mean"].shape == (3,)
  np.testing.assert_allclose(batched_reward[1], reward)


def test_unknown_names_list_the_choices():
  with pytest.raises(ValueError, match="multiplicative"):
    rewards.RewardConfig(combiner="max")
  with pytest.raises(ValueError, match="exclude"):
    rewards.RewardConfig(invalid_policy="drop")
  with pytest.raises(ValueError, match="rloo"):
    rewards.group_advantages(jnp.zeros((1, 2)), jnp.ones((1, 2), bool), "ppo")


def test_config_is_hashable_so_jit_can_treat_it_as_static():
  assert hash(rewards.RewardConfig(additive_weights=[0.3, 0.7])) == hash(rewards.RewardConfig(additive_weights=(0.3, 0.7)))


def numpy_advantages(reward_rows, include_rows, estimator, eps=1e-6):
  """Hand computation, one group at a time, over included members only."""
  out = np.zeros_like(reward_rows, dtype=np.float64)
  for g, (row, keep) in enumerate(zip(reward_rows, include_rows)):
    members = row[keep].astype(np.float64)
    if estimator == "grpo" and members.size:
      out[g, keep] = (members - members.mean()) / (members.std() + eps)
    elif estimator == "drgrpo" and members.size:
      out[g, keep] = members - members.mean()
    elif estimator == "rloo" and members.size > 1:
      out[g, keep] = [r - (members.sum() - r) / (members.size - 1) for r in members]
  return out


GROUPS = st.integers(1, 4).flatmap(
    lambda g: st.integers(1, 6).flatmap(
        lambda k: st.tuples(
            st.lists(st.floats(-2.0, 2.0, width=32), min_size=g * k, max_size=g * k),
            st.lists(st.booleans(), min_size=g * k, max_size=g * k),
        ).map(lambda t: (np.asarray(t[0], np.float32).reshape(g, k), np.asarray(t[1]).reshape(g, k)))
    )
)


@PROPERTY
@given(groups=GROUPS, estimator=st.sampled_from(sorted(rewards.ADVANTAGE_ESTIMATORS)))
def test_advantages_match_numpy_and_sum_to_zero_over_included(groups, estimator):
  reward_rows, include_rows = groups
  # Excluded slots hold NaN: they must not leak into any statistic.
  poisoned = np.where(include_rows, reward_rows, np.nan).astype(np.float32)
  advantages = np.asarray(rewards.group_advantages(poisoned, include_rows, estimator))
  expected = numpy_advantages(reward_rows, include_rows, estimator)
  np.testing.assert_allclose(advantages, expected, rtol=1e-4, atol=1e-4)
  assert np.all(advantages[~include_rows] == 0.0)
  np.testing.assert_allclose(advantages.sum(axis=1), 0.0, atol=1e-3)


def test_hand_computed_group():
  group = jnp.array([[1.0, 0.0, 0.5, 9.0]])
  include = jnp.array([[True, True, True, False]])
  np.testing.assert_allclose(rewards.group_advantages(group, include, "drgrpo"), [[0.5, -0.5, 0.0, 0.0]])
  np.testing.assert_allclose(rewards.group_advantages(group, include, "rloo"), [[0.75, -0.75, 0.0, 0.0]])
  std = np.sqrt((0.25 + 0.25) / 3)
  np.testing.assert_allclose(rewards.group_advantages(group, include, "grpo", eps=0.0),
                             [[0.5 / std, -0.5 / std, 0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("estimator", sorted(rewards.ADVANTAGE_ESTIMATORS))
def test_excluded_constant_or_single_member_groups_give_zeros_not_nan(estimator):
  group = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [4.0, 7.0, 1.0]])
  include = jnp.array([[False, False, False], [True, True, True], [False, True, False]])
  advantages = np.asarray(rewards.group_advantages(group, include, estimator))
  # All excluded, constant, and a lone member (r - mean = 0; rloo has no baseline).
  np.testing.assert_array_equal(advantages, 0.0)


@pytest.mark.parametrize("estimator", sorted(rewards.ADVANTAGE_ESTIMATORS))
def test_constant_groups_give_exact_zeros_despite_rounding(estimator):
  # The f32 mean of three 0.9s misses 0.9 by an ulp; GRPO's std division once turned that into 0.056.
  values = np.float32([0.9, 0.1, 0.7, 0.3, 1 / 3, 0.55])
  group = jnp.asarray(np.repeat(values[:, None], 3, axis=1))
  advantages = rewards.group_advantages(group, jnp.ones(group.shape, bool), estimator)
  np.testing.assert_array_equal(np.asarray(advantages), 0.0)


def test_zero_variance_fraction_counts_groups_without_signal():
  group = jnp.array([[1.0, 1.0, 5.0], [0.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 4.0, 5.0]])
  include = jnp.array([[True, True, False], [True, True, True], [True, True, True], [True, False, False]])
  # Rows 0 (equal included), 2 (constant) and 3 (one member) have no signal.
  assert float(rewards.zero_variance_fraction(group, include)) == 0.75
