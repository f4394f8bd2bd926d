"""Jitted autoregressive sampling with a KV cache: one prefill call, then a `lax.while_loop` decode.

Prompts come left-padded (`prompt_mask` 0 on padding), so every row's last
prompt token sits in the last slot and the whole batch prefills in one call.
Each decode step then feeds one token per row at position `previous + 1`
with segment id 1. Rows stop independently: a row that emits one of the EOS
ids is done, and from then on emits `pad_id` with log-prob 0 and leaves its
length alone. The loop ends when every row is done or `max_new_tokens` tokens
were produced, so `finished` tells an EOS ending from truncation.

The sampling settings live in a frozen, hashable `SamplingConfig` that is a
static jit argument (as is the `ModelConfig`): changing them recompiles,
changing prompts, params or the rng does not.
"""

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from safe_completion.models import transformer

Array = jax.Array



@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each token. Hashable, so it is a static jit argument.

  temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 turn those filters
  off. `eos_ids` may hold several ids (chat models often end on either of two).
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    if self.max_new_tokens < 1:
      raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be at least 1")
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 is off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1] (1 is off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


class SampleOutput(NamedTuple):
  """What `sample` returns; all arrays have the batch first.

  tokens: [B, N] int32 completion tokens, `pad_id` after a row's end.
  logprobs: [B, N] f32 log-prob of each sampled token under the distribution it
    was drawn from (temperature-scaled, top-k/top-p filtered logits); for greedy,
    the log-softmax of the raw logits. 0 after a row's end.
  lengths: [B] int32 tokens generated, counting the EOS token when there is one.
  finished: [B] bool, True when the row ended on an EOS id (False: truncated).
  """

  tokens: Array
  logprobs: Array
  lengths: Array
  finished: Array


@flax.struct.dataclass
class _State:
  """The `lax.while_loop` carry. `step` is the next column of `tokens` to write."""

  step: Array
  tokens: Array
  logprobs: Array
  lengths: Array
  done: Array
  last_token: Array
  last_position: Array
  cache: transformer.Cache
  rng: Array


def filter_logits(logits: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Logits [..., V] scaled by 1 / temperature, with tokens outside top-k / top-p set to -inf.

  The order is temperature, then top-k, then top-p (as in `transformers`).
  Top-p keeps the smallest set of most likely tokens whose probability reaches
  `top_p`, so the most likely token always survives. Tokens tied with the last
  kept one are kept too. The settings are Python numbers (static under jit);
  `temperature` must be > 0 (greedy does not filter).
  """
  if temperature <= 0:
    raise ValueError(f"filter_logits needs temperature > 0, got {temperature}")
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _argmax(logits: Array) -> Array:
  """First index of the max over the last axis: `jnp.argmax`, as two plain reductions.

  XLA:CPU runs argmax's (value, index) reduction several times slower than a
  max followed by a min over the matching indices.
  """
  is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max, jnp.arange(logits.shape[-1]), logits.shape[-1]), axis=-1)


def _choose(logits: Array, rng: Array, config: SamplingConfig) -> tuple[Array, Array]:
  """(token [B], its log-prob [B]) from last-position logits [B, V]."""
  if config.greedy:
    token = _argmax(logits)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  else:
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    token = jax.random.categorical(rng, filtered, axis=-1)
    log_probs = jax.nn.log_softmax(filtered, axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def _emit(state: _State, logits: Array, config: SamplingConfig) -> _State:
  """Picks the next token of every row that is not done and writes it at column `step`."""
  rng, step_rng = jax.random.split(state.rng)
  token, logprob = _choose(logits, step_rng, config)
  token = jnp.where(state.done, config.pad_id, token)
  logprob = jnp.where(state.done, 0.0, logprob)
  is_eos = jnp.isin(token, jnp.asarray(config.eos_ids, jnp.int32)) if config.eos_ids else jnp.zeros_like(state.done)
  return state.replace(
      step=state.step + 1,
      tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
      logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step)),
      lengths=state.lengths + (~state.done).astype(jnp.int32),
      done=state.done | is_eos,
      last_token=token,
      rng=rng)


def cache_layout() -> dict[str, tuple]:
  """Logical axes of the sampler's KV cache: per layer, k and v [B, Hkv, S, D]; key segment ids [B, S].

  The cache is split over the batch like the activations; `plan` sizes it from this.
  """
  per_layer = ("activation_batch", None, None, None)
  return {"k": per_layer, "v": per_layer, "segment_ids": ("activation_batch", None)}


def _constrain_cache(cache: transformer.Cache) -> transformer.Cache:
  """Keeps the cache laid out as `cache_layout` says (a no-op outside `activation_sharding`)."""
  layout = cache_layout()
  layer_axes = {"k": layout["k"], "v": layout["v"]}
  return {"index": cache["index"],
          "segment_ids": nn.with_logical_constraint(cache["segment_ids"], layout["segment_ids"]),
          "layers": tuple(nn.with_logical_constraint(layer, layer_axes) for layer in cache["layers"])}


@functools.partial(jax.jit, static_argnames=("model_config", "sampling_config"))
def sample(params: dict, model_config: transformer.ModelConfig, prompt_tokens: Array, prompt_mask: Array,
           rng: Array, sampling_config: SamplingConfig) -> SampleOutput:
  """Completes a batch of left-padded prompts.

  Args:
    params: decoder params (any sharding; replicated or by the logical rules).
    model_config: the decoder's config (static).
    prompt_tokens: [B, P] int32, left-padded; every row needs at least one real token.
    prompt_mask: [B, P], 1 on real tokens, 0 on the left padding.
    rng: a PRNG key; unused when greedy.
    sampling_config: how to pick tokens (static).

  Returns:
    SampleOutput with N = `sampling_config.max_new_tokens` columns.

  Call it inside `parallel.activation_sharding(mesh)` with inputs split over
  the batch to run data-parallel; the cache follows the batch sharding.
  """
  config = sampling_config
  # Per-layer weights and caches, split once here: the decode loop then slices nothing out of a stack.
  decoder = transformer.Decoder(model_config, unstacked=True)
  params = transformer.unstack_params(params, model_config)
  batch, prompt_len = prompt_tokens.shape
  num_new = config.max_new_tokens
  prompt_mask = prompt_mask.astype(jnp.int32)
  positions = transformer.positions_from_mask(prompt_mask)
  # The last sampled token is never fed back, so P + N - 1 slots suffice.
  cache = _constrain_cache(transformer.init_cache(model_config, batch, prompt_len + num_new - 1))
  logits, cache = decoder.apply({"params": params}, prompt_tokens.astype(jnp.int32), positions, prompt_mask, cache,
                                last_only=True)

  state = _State(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((batch, num_new), config.pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, num_new), jnp.float32),
      lengths=jnp.zeros((batch,), jnp.int32),
      done=jnp.zeros((batch,), bool),
      last_token=jnp.zeros((batch,), jnp.int32),
      last_position=positions[:, -1],
      cache=_constrain_cache(cache),
      rng=rng)
  state = _emit(state, logits[:, -1], config)

  def keep_going(state: _State) -> Array:
    return (state.step < num_new) & ~jnp.all(state.done)

  def decode_step(state: _State) -> _State:
    position = state.last_position + 1
    logits, cache = decoder.apply({"params": params}, state.last_token[:, None], position[:, None],
                                  jnp.ones((batch, 1), jnp.int32), state.cache)
    state = state.replace(last_position=position, cache=_constrain_cache(cache))
    return _emit(state, logits[:, 0], config)

  state = jax.lax.while_loop(keep_going, decode_step, state)
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths, finished=state.done)
