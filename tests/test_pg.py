"""Policy-gradient loss: numpy reference for value and gradient, identities at initialization, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safe_completion.models import transformer
from safe_completion.rl import pg

RNG = np.random.default_rng(0)
B, T, L = 3, 5, 4
LOGP = np.log(RNG.uniform(0.05, 0.9, (B, T))).astype(np.float32)
OLD = (LOGP + RNG.normal(0, 0.3, (B, T))).astype(np.float32)
REF = (LOGP + RNG.normal(0, 0.2, (B, T))).astype(np.float32)
ADV = np.array([1.0, -0.5, 0.7], np.float32)
MASK = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
TINY_MODEL = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                     head_dim=8, mlp_dim=64)


def _token_batch(key: jax.Array) -> dict:
  """Four random 9-token rows of TINY_MODEL's vocabulary, unpadded."""
  tokens = jax.random.randint(key, (4, 9), 1, TINY_MODEL.vocab_size)
  return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(9), (4, 9)),
          "segment_ids": jnp.ones((4, 9), jnp.int32)}


def numpy_loss_and_grad(config: pg.PgConfig):
  """Reference in plain numpy: value and d(loss)/d(logprobs)."""
  ratio = np.exp(LOGP - OLD)
  adv = ADV[:, None]
  clipped_ratio = np.clip(ratio, 1 - config.clip_low, 1 + config.clip_high)
  pg_term = -np.minimum(ratio * adv, clipped_ratio * adv)
  clip_active = np.where(adv >= 0, ratio > 1 + config.clip_high, ratio < 1 - config.clip_low)
  d_pg = np.where(clip_active, 0.0, -adv * ratio)
  log_ratio = REF - LOGP
  k3 = np.exp(log_ratio) - 1 - log_ratio
  if config.kl_mode == "k3_loss":
    kl_value, d_kl = k3, 1 - np.exp(log_ratio)
  else:  # k3 value, k2 gradient.
    kl_value, d_kl = k3, LOGP - REF
  per_token = pg_term + config.kl_coef * kl_value
  d_token = d_pg + config.kl_coef * d_kl
  seqs_with_tokens = (MASK.sum(1) > 0).sum()
  if config.aggregation == "token_mean":
    scale = MASK / MASK.sum()
  elif config.aggregation == "seq_mean_token_mean":
    scale = MASK / np.maximum(MASK.sum(1, keepdims=True), 1) / seqs_with_tokens
  else:
    scale = MASK / config.max_completion_len / seqs_with_tokens
  return (per_token * scale).sum(), d_token * scale


@pytest.mark.parametrize("kl_mode", ["k3_value_k2_grad", "k3_loss"])
@pytest.mark.parametrize("aggregation", pg.AGGREGATIONS)
def test_loss_and_gradient_equal_numpy_reference(kl_mode, aggregation):
  config = pg.PgConfig(kl_mode=kl_mode, aggregation=aggregation, kl_coef=0.1, max_completion_len=L)
  loss_fn = lambda logp: pg.policy_loss(logp, OLD, REF, ADV, MASK, config)[0]
  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(LOGP))
  expected_loss, expected_grad = numpy_loss_and_grad(config)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)


def test_masked_tokens_get_no_gradient():
  config = pg.PgConfig()
  grad = jax.grad(lambda logp: pg.policy_loss(logp, OLD, REF, ADV, MASK, config)[0])(jnp.asarray(LOGP))
  assert np.all(np.asarray(grad)[MASK == 0] == 0)


def test_completion_mask_covers_each_rows_sampled_length_and_drops_truncated_rows():
  lengths = jnp.array([2, 4, 2])  # The sampler's lengths (EOS included): prompt 3 + completion 4 = 7 tokens.
  mask = pg.completion_mask_from_lengths(prompt_len=3, total_len=7, lengths=lengths)
  np.testing.assert_array_equal(np.asarray(mask), [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
  finished = jnp.array([True, False, True])
  truncated_out = pg.completion_mask_from_lengths(3, 7, lengths, finished)
  assert float(truncated_out[1].sum()) == 0 and float(truncated_out[0].sum()) == 2


def test_at_initialization_kl_is_zero_ratio_one_and_nothing_clips():
  config = TINY_MODEL
  params = transformer.init_params(config, jax.random.key(0))
  batch = _token_batch(jax.random.key(1))
  logp = pg.rollout_logprobs(params, batch, model_config=config, temperature=1.0)
  mask = pg.completion_mask_from_lengths(4, 9, jnp.array([5, 3, 5, 1]))
  _, metrics = pg.policy_loss(logp, logp, logp, jnp.array([1.0, -1.0, 0.5, 0.0]), mask, pg.PgConfig())
  assert float(metrics["kl"]) == 0.0
  assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
  assert float(metrics["clip_fraction"]) == 0.0


def test_update_without_reward_signal_is_skipped_and_one_with_signal_is_not():
  config = TINY_MODEL
  params = transformer.init_params(config, jax.random.key(0))
  optimizer = optax.adam(1e-2)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
  batch = {**_token_batch(jax.random.key(2)),
           "completion_mask": pg.completion_mask_from_lengths(4, 9, jnp.array([5, 3, 5, 2])).astype(jnp.float32)}
  logp = pg.rollout_logprobs(params, batch, model_config=config, temperature=1.0)
  # Policy = reference up to rounding, as at the first RL step: the KL gradient is noise.
  ref = logp + 1e-6 * jax.random.normal(jax.random.key(3), logp.shape)
  batch.update(old_logprobs=logp, ref_logprobs=ref)
  update = jax.jit(functools.partial(pg.update_step, model_config=config, optimizer=optimizer, config=pg.PgConfig()))

  kept, metrics = update(state, {**batch, "advantages": jnp.zeros(4)})
  assert float(metrics["update_skipped"]) == 1.0
  assert 0 < float(metrics["grad_norm"]) < 1e-4  # A noise gradient Adam would have scaled to a 1e-2 step.
  for name in ("params", "opt_state", "step"):
    jax.tree.map(np.testing.assert_array_equal, kept[name], state[name])

  moved, metrics = update(state, {**batch, "advantages": jnp.array([0.0, 0.0, 0.5, 0.0])})
  assert float(metrics["update_skipped"]) == 0.0 and int(moved["step"]) == 1
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), moved["params"], params))) > 1e-3


def test_k1_reward_penalty_subtracts_summed_log_ratio():
  rewards = pg.kl_penalized_rewards(jnp.ones(B), jnp.asarray(OLD), jnp.asarray(REF), jnp.asarray(MASK), 0.5)
  np.testing.assert_allclose(np.asarray(rewards), 1 - 0.5 * ((OLD - REF) * MASK).sum(1), rtol=1e-6)


def test_unknown_modes_are_rejected():
  with pytest.raises(ValueError, match="kl_mode"):
    pg.PgConfig(kl_mode="k4")
  with pytest.raises(ValueError, match="aggregation"):
    pg.PgConfig(aggregation="sum")
