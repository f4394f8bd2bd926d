"""Policy-gradient loss and the sharded update step (PPO-style clipped ratio + KL to a reference).

Everything here works on per-token arrays aligned with next-token targets:
for a sequence of T tokens (prompt + completion), index t is the log-prob of
token t+1, so arrays are [B, T-1]. `completion_mask` is 1 on completion tokens
through the first EOS (inclusive) and 0 on prompt, padding, and, when asked,
truncated rows.

KL estimators (Schulman's k1/k2/k3, with log r = ref - logp):
  k1 = -log r (unbiased value, high variance; used in the reward),
  k3 = r - 1 - log r (unbiased, non-negative value; its gradient in the loss is biased),
  k2 = (log r)^2 / 2 (its gradient is the unbiased KL gradient under on-policy samples).
`kl_mode="k3_value_k2_grad"` (the default) reports k3 and back-propagates k2's
gradient, as verl's `k3+`: the value stays non-negative and low-variance while
the gradient is unbiased.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from safe_completion import training
from safe_completion.models import transformer

KL_MODES = ("k3_value_k2_grad", "k3_loss", "k1_reward", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class PgConfig:
  clip_low: float = 0.2
  clip_high: float = 0.2
  kl_mode: str = "k3_value_k2_grad"
  kl_coef: float = 0.02
  aggregation: str = "seq_mean_token_sum_norm"
  max_completion_len: int = 128  # Dr. GRPO's constant normalizer.
  temperature: float = 1.0  # The temperature the rollouts were sampled at.

  def __post_init__(self):
    if self.kl_mode not in KL_MODES:
      raise ValueError(f"rl.kl_mode={self.kl_mode!r} is not one of {list(KL_MODES)}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"rl.aggregation={self.aggregation!r} is not one of {list(AGGREGATIONS)}")


def completion_mask_from_lengths(prompt_len: int, total_len: int, lengths: jax.Array,
                                 finished: jax.Array | None = None) -> jax.Array:
  """[B, total_len-1] target mask: the first `lengths[b]` completion tokens (EOS included).

  Lengths come from the sampler, so EOS ids that equal the pad id, or several
  EOS ids, need no token matching. With `finished`, truncated rows are masked out.
  """
  target_index = jnp.arange(total_len - 1)[None, :] + 1  # Position of the predicted token.
  completion_index = target_index - prompt_len
  mask = (completion_index >= 0) & (completion_index < lengths[:, None])
  if finished is not None:
    mask &= finished[:, None]
  return mask.astype(jnp.float32)


def aggregate(values: jax.Array, mask: jax.Array, aggregation: str, max_completion_len: int) -> jax.Array:
  """Reduces per-token values [B, T] under a mask to a scalar, by the named rule."""
  if aggregation == "token_mean":
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  per_seq_tokens = jnp.sum(mask, axis=1)
  has_tokens = (per_seq_tokens > 0).astype(jnp.float32)
  num_seqs = jnp.maximum(jnp.sum(has_tokens), 1.0)
  if aggregation == "seq_mean_token_mean":
    per_seq = jnp.sum(values * mask, axis=1) / jnp.maximum(per_seq_tokens, 1.0)
  else:
    per_seq = jnp.sum(values * mask, axis=1) / max_completion_len
  return jnp.sum(per_seq * has_tokens) / num_seqs


def kl_terms(logprobs: jax.Array, ref_logprobs: jax.Array, kl_mode: str) -> tuple[jax.Array, jax.Array]:
  """(per-token KL term for the loss, per-token k3 value for logging)."""
  log_ratio = ref_logprobs - logprobs
  k3 = jnp.exp(log_ratio) - 1.0 - log_ratio
  if kl_mode == "k3_loss":
    return k3, k3
  if kl_mode == "k3_value_k2_grad":
    k2 = 0.5 * jnp.square(log_ratio)
    return k2 + jax.lax.stop_gradient(k3 - k2), k3
  return jnp.zeros_like(logprobs), k3


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, config: PgConfig) -> tuple[jax.Array, dict]:
  """Clipped-ratio policy-gradient loss plus the KL penalty, aggregated by `config.aggregation`."""
  ratio = jnp.exp(logprobs - old_logprobs)
  adv = advantages[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high) * adv
  pg = -jnp.minimum(unclipped, clipped)
  kl_loss, k3 = kl_terms(logprobs, ref_logprobs, config.kl_mode)
  per_token = pg + config.kl_coef * kl_loss if config.kl_mode in ("k3_loss", "k3_value_k2_grad") else pg
  loss = aggregate(per_token, mask, config.aggregation, config.max_completion_len)
  token_mean = functools.partial(aggregate, mask=mask, aggregation="token_mean", max_completion_len=1)
  metrics = {
      "pg_loss": aggregate(pg, mask, config.aggregation, config.max_completion_len),
      "kl": token_mean(k3),
      "ratio_mean": token_mean(ratio),
      "clip_fraction": token_mean(jnp.where(adv >= 0, ratio > 1.0 + config.clip_high,
                                            ratio < 1.0 - config.clip_low).astype(jnp.float32)),
  }
  return loss, metrics


def update_step(state: dict, batch: dict, *, model_config: transformer.ModelConfig,
                optimizer: optax.GradientTransformation, config: PgConfig) -> tuple[dict, dict]:
  """One optimizer step on one minibatch of rollouts.

  `batch` carries tokens, positions, segment_ids, completion_mask, advantages,
  and the old-policy and reference log-probs, both computed once per rollout
  by `rollout_logprobs` (so sampler and trainer numerics never mix).

  A minibatch whose advantages are all zero carries no reward signal: its
  gradient is the KL term alone, which while the policy still equals the
  reference is rounding noise (~1e-9) that Adam would scale into a full
  learning-rate step. Such a step is skipped by `training.apply_gradients`
  (state unchanged, `update_skipped` = 1), as is a non-finite one.
  """

  def loss_fn(params):
    logprobs, entropy = training.token_logprobs(params, model_config, batch, config.temperature)
    loss, metrics = policy_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                batch["completion_mask"], config)
    metrics["entropy"] = aggregate(entropy, batch["completion_mask"], "token_mean", 1)
    return loss, metrics

  (loss, metrics), grads = training.value_and_grad(loss_fn, state)
  has_signal = jnp.any((batch["advantages"] != 0) & jnp.any(batch["completion_mask"] > 0, axis=1))
  new_state, update_metrics = training.apply_gradients(state, grads, loss, optimizer, has_signal)
  return new_state, {**metrics, **update_metrics}


def kl_penalized_rewards(rewards: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array,
                         kl_coef: float) -> jax.Array:
  """`kl_mode="k1_reward"`: r - beta * sum_t k1 over each completion, before advantages."""
  return rewards - kl_coef * jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1)


def rollout_logprobs(params: Any, batch: dict, *, model_config: transformer.ModelConfig,
                     temperature: float) -> jax.Array:
  """Trainer-side log-probs of a rollout batch (for old policy and reference alike)."""
  return training.token_logprobs(params, model_config, batch, temperature)[0]
