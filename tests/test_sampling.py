"""The KV-cache sampler agrees with full uncached forward passes, stops per row, filters and shards."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_completion import parallel
from safe_completion.models import sampling, transformer

CONFIG = transformer.ModelConfig(vocab_size=96, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=12, mlp_dim=96)
PROMPT_LENGTHS = (7, 3, 5, 1, 6, 2, 4, 7)
PROMPT_LEN = 7
NUM_NEW = 8
PAD = 95


@pytest.fixture(scope="module")
def params():
  # Scaled-up init: logits with a spread of a few nats, so argmaxes are well separated
  # and sampling is neither uniform nor deterministic.
  return jax.tree.map(lambda x: 4 * x, transformer.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def prompts():
  mask = (np.arange(PROMPT_LEN)[None, :] >= PROMPT_LEN - np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size - 1, size=mask.shape).astype(np.int32)
  return jnp.asarray(tokens * mask), jnp.asarray(mask)


def run(params, prompts, rng=0, **fields):
  config = sampling.SamplingConfig(**{"max_new_tokens": NUM_NEW, "pad_id": PAD, **fields})
  return sampling.sample(params, CONFIG, *prompts, jax.random.key(rng), config)


@pytest.fixture(scope="module")
def greedy(params, prompts):
  return run(params, prompts, temperature=0.0)


def full_log_probs(params, prompts, completion):
  """Log-softmax over the vocab of one uncached forward on prompt + completion, at the completion slots."""
  tokens, mask = prompts
  full_tokens = jnp.concatenate([tokens, completion], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(completion)], axis=1)
  logits = transformer.forward(params, CONFIG, full_tokens, transformer.positions_from_mask(full_mask), full_mask)
  return jax.nn.log_softmax(logits[:, PROMPT_LEN - 1:-1], axis=-1)


def test_greedy_with_cache_equals_step_by_step_full_recompute(params, prompts, greedy):
  tokens, mask = prompts
  forward = jax.jit(transformer.forward, static_argnums=1)
  # A fixed-size buffer whose not-yet-generated slots are padding (segment 0), recomputed in full each step.
  buffer = np.concatenate([np.asarray(tokens), np.zeros((len(tokens), NUM_NEW), np.int32)], axis=1)
  buffer_mask = np.concatenate([np.asarray(mask), np.zeros((len(tokens), NUM_NEW), np.int32)], axis=1)
  for step in range(NUM_NEW):
    logits = forward(params, CONFIG, buffer, transformer.positions_from_mask(buffer_mask), buffer_mask)
    buffer[:, PROMPT_LEN + step] = np.argmax(np.asarray(logits[:, PROMPT_LEN - 1 + step]), axis=-1)
    buffer_mask[:, PROMPT_LEN + step] = 1
  np.testing.assert_array_equal(np.asarray(greedy.tokens), buffer[:, PROMPT_LEN:])
  assert len({tuple(row) for row in buffer[:, PROMPT_LEN:]}) > 1
  np.testing.assert_array_equal(greedy.lengths, NUM_NEW)
  assert not np.any(greedy.finished)


def test_greedy_logprobs_are_log_softmax_of_raw_logits(params, prompts, greedy):
  expected = jnp.take_along_axis(full_log_probs(params, prompts, greedy.tokens), greedy.tokens[..., None], -1)
  np.testing.assert_allclose(greedy.logprobs, expected[..., 0], atol=1e-4)


def test_sampled_logprobs_equal_full_forward_log_softmax(params, prompts, greedy):
  out = run(params, prompts, rng=1, temperature=1.0)
  assert np.any(np.asarray(out.tokens) != np.asarray(greedy.tokens))
  expected = jnp.take_along_axis(full_log_probs(params, prompts, out.tokens), out.tokens[..., None], -1)
  np.testing.assert_allclose(out.logprobs, expected[..., 0], atol=1e-4)


def test_filtered_logprobs_are_under_the_filtered_distribution(params, prompts):
  out = run(params, prompts, rng=2, temperature=0.7, top_k=5, top_p=0.8)
  tokens, mask = prompts
  full_tokens = jnp.concatenate([tokens, out.tokens], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(out.tokens)], axis=1)
  logits = transformer.forward(params, CONFIG, full_tokens, transformer.positions_from_mask(full_mask), full_mask)
  filtered = sampling.filter_logits(logits[:, PROMPT_LEN - 1:-1], 0.7, 5, 0.8)
  expected = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), out.tokens[..., None], -1)[..., 0]
  assert np.all(np.isfinite(expected))  # Every sampled token survived the filters.
  np.testing.assert_allclose(out.logprobs, expected, atol=1e-4)


def test_same_rng_same_samples_other_rng_other_samples(params, prompts):
  first, again, other = (run(params, prompts, rng=rng, temperature=1.0) for rng in (3, 3, 4))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert np.any(np.asarray(first.tokens) != np.asarray(other.tokens))


def first_stop(row, eos_ids):
  hits = [i for i, token in enumerate(row) if token in eos_ids]
  return hits[0] + 1 if hits else len(row)


def test_eos_stops_each_row_independently_with_several_eos_ids(params, prompts, greedy):
  free = np.asarray(greedy.tokens)
  # Two EOS ids: the tokens rows 0 and 1 first produce at steps 2 and 4 (greedy prefixes do not depend on EOS).
  eos_ids = (int(free[0, 2]), int(free[1, 4]))
  expected_lengths = np.array([first_stop(row, eos_ids) for row in free])
  assert expected_lengths[0] <= 3 and expected_lengths[1] <= 5
  assert np.any(expected_lengths < NUM_NEW) and np.any(expected_lengths == NUM_NEW)
  assert expected_lengths[0] != expected_lengths[1]

  out = run(params, prompts, temperature=0.0, eos_ids=eos_ids)
  np.testing.assert_array_equal(out.lengths, expected_lengths)
  finished = np.array([any(token in eos_ids for token in row) for row in free])
  np.testing.assert_array_equal(out.finished, finished)
  for row, length in enumerate(expected_lengths):
    np.testing.assert_array_equal(out.tokens[row, :length], free[row, :length])
    np.testing.assert_allclose(out.logprobs[row, :length], greedy.logprobs[row, :length], atol=1e-5)
    np.testing.assert_array_equal(out.tokens[row, length:], PAD)
    np.testing.assert_array_equal(out.logprobs[row, length:], 0.0)


def test_all_rows_on_eos_at_first_step(params, prompts, greedy):
  eos_ids = tuple(sorted({int(t) for t in np.asarray(greedy.tokens)[:, 0]}))
  out = run(params, prompts, temperature=0.0, eos_ids=eos_ids)
  np.testing.assert_array_equal(out.lengths, 1)
  assert np.all(out.finished)
  np.testing.assert_array_equal(out.tokens[:, 1:], PAD)


def test_max_new_tokens_truncation_is_not_finished(params, prompts, greedy):
  never = next(t for t in range(CONFIG.vocab_size) if t not in np.asarray(greedy.tokens)[:, :3])
  out = run(params, prompts, temperature=0.0, max_new_tokens=3, eos_ids=(never,))
  np.testing.assert_array_equal(out.tokens, np.asarray(greedy.tokens)[:, :3])
  np.testing.assert_array_equal(out.lengths, 3)
  assert not np.any(out.finished)


@pytest.mark.parametrize("fields", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.05, top_k=1, top_p=0.5)])
def test_degenerate_filters_equal_greedy(params, prompts, greedy, fields):
  out = run(params, prompts, rng=5, **{"temperature": 1.0, **fields})
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)  # One token left: probability 1.


def test_new_prompts_and_rng_do_not_recompile(params, prompts, greedy):
  tokens, mask = prompts
  run(params, prompts, rng=6, temperature=0.0)
  before = sampling.sample._cache_size()
  run(params, ((tokens + 1) % CONFIG.vocab_size, mask), rng=7, temperature=0.0)
  assert sampling.sample._cache_size() == before


@pytest.mark.parametrize("mesh_shape, param_rules", [((8, 1, 1), "replicated"), ((2, 2, 2), "rules")])
def test_sharded_greedy_equals_unsharded(params, prompts, greedy, mesh_shape, param_rules):
  mesh = parallel.make_mesh(mesh_shape)
  if param_rules == "rules":
    shardings = parallel.logical_to_shardings(transformer.logical_param_specs(CONFIG), mesh)
  else:
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), params)
  sharded_params = jax.device_put(params, shardings)
  tokens, mask = parallel.shard_batch(prompts, mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  assert tokens.addressable_shards[0].data.shape[0] == len(PROMPT_LENGTHS) // batch_shards
  config = sampling.SamplingConfig(max_new_tokens=NUM_NEW, temperature=0.0, pad_id=PAD)
  with parallel.activation_sharding(mesh):
    out = sampling.sample(sharded_params, CONFIG, tokens, mask, jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)
  np.testing.assert_array_equal(out.lengths, greedy.lengths)
  assert out.tokens.addressable_shards[0].data.shape[0] == len(PROMPT_LENGTHS) // batch_shards


def test_filter_logits_on_hand_made_logits():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.0, 1.0]])
  inf = -np.inf
  np.testing.assert_allclose(sampling.filter_logits(logits), logits)
  np.testing.assert_allclose(sampling.filter_logits(logits, temperature=2.0), logits / 2)
  # Top-k keeps the k largest; ties with the k-th are kept.
  np.testing.assert_array_equal(sampling.filter_logits(logits, top_k=2), [[2, 1, inf, inf], [inf, 3, 3, inf]])
  np.testing.assert_array_equal(sampling.filter_logits(logits, top_k=1), [[2, inf, inf, inf], [inf, 3, 3, inf]])
  np.testing.assert_allclose(sampling.filter_logits(logits, top_k=4), logits)
  # Row 0 probabilities are [0.644, 0.237, 0.087, 0.032]: top-p 0.7 needs two tokens, 0.6 one, 0.99 four.
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], top_p=0.7), [[2, 1, inf, inf]])
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], top_p=0.6), [[2, inf, inf, inf]])
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], top_p=0.99), [[2, 1, 0, -1]])
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], top_p=0.9), [[2, 1, 0, inf]])
  # Temperature first: at T=0.25 the top token alone holds > 0.98 of the mass.
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], temperature=0.25, top_p=0.9), [[8, inf, inf, inf]])
  # Top-k before top-p: renormalised over {2, 1}, token 0 has 0.731 < 0.9, so both stay.
  np.testing.assert_array_equal(sampling.filter_logits(logits[:1], top_k=2, top_p=0.9), [[2, 1, inf, inf]])
  with pytest.raises(ValueError, match="temperature > 0"):
    sampling.filter_logits(logits, temperature=0.0)


def test_sampling_config_is_hashable_and_validated():
  config = sampling.SamplingConfig(max_new_tokens=4, eos_ids=[1, 2])
  assert config.eos_ids == (1, 2)
  assert hash(config) == hash(sampling.SamplingConfig(max_new_tokens=4, eos_ids=(1, 2)))
  assert sampling.SamplingConfig(max_new_tokens=1, temperature=0).greedy
  for bad, message in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
    with pytest.raises(ValueError, match=message):
      sampling.SamplingConfig(**{"max_new_tokens": 4, **bad})


def test_cached_decoder_equals_the_uncached_forward(params, prompts):
  tokens, mask = prompts
  positions = transformer.positions_from_mask(mask)
  full = transformer.forward(params, CONFIG, tokens, positions, mask)
  with pytest.raises(ValueError, match="unstacked=True"):  # The scanned layers take no cache.
    transformer.Decoder(CONFIG).apply({"params": params}, tokens, positions, mask,
                                      transformer.init_cache(CONFIG, len(tokens), PROMPT_LEN))
  decoder, split = transformer.Decoder(CONFIG, unstacked=True), transformer.unstack_params(params, CONFIG)
  cache = transformer.init_cache(CONFIG, len(tokens), PROMPT_LEN + 1)
  # Prefill all but the last prompt token, then feed it as a one-token decode step.
  head, cache = decoder.apply({"params": split}, tokens[:, :-1], positions[:, :-1], mask[:, :-1], cache)
  last, cache = decoder.apply({"params": split}, tokens[:, -1:], positions[:, -1:], mask[:, -1:], cache)
  real = mask[..., None].astype(bool)  # Padding queries attend to nothing; their logits are arbitrary.
  np.testing.assert_allclose(jnp.where(real, jnp.concatenate([head, last], axis=1), 0), jnp.where(real, full, 0),
                             atol=1e-4)
  assert int(cache["index"]) == PROMPT_LEN
  for decoder, variables in ((decoder, split), (transformer.Decoder(CONFIG), params)):
    only, _ = decoder.apply({"params": variables}, tokens, positions, mask, last_only=True)
    np.testing.assert_allclose(only, full[:, -1:], atol=1e-5)
