"""`training.token_logprobs` (logit - logsumexp over all positions) against log_softmax of the sliced logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_completion import training
from safe_completion.models import transformer

_CONFIG = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, mlp_dim=48, max_seq_len=32, tie_embeddings=True)


def _batch():
  rng = np.random.default_rng(0)
  segments = np.array([[1] * 10, [0, 0, 0] + [1] * 7], np.int32)
  return {"tokens": jnp.asarray(rng.integers(1, 64, size=segments.shape), jnp.int32),
          "positions": transformer.positions_from_mask(jnp.asarray(segments)), "segment_ids": jnp.asarray(segments),
          "loss_mask": jnp.asarray(segments)}


def _reference(params, batch, temperature):
  """The formula before: log_softmax of logits[:, :-1], the next token's entry, and -sum p log p."""
  logits = transformer.forward(params, _CONFIG, batch["tokens"], batch["positions"], batch["segment_ids"])
  log_softmax = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
  logprobs = jnp.take_along_axis(log_softmax, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  return logprobs, -jnp.sum(jnp.exp(log_softmax) * log_softmax, axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_their_grads_equal_the_log_softmax_formula(temperature):
  params = transformer.init_params(_CONFIG, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 20.0, params)  # Peaked logits, so the log-probs spread out and can differ.
  batch = _batch()
  mask = batch["loss_mask"][:, 1:]
  got = training.token_logprobs(params, _CONFIG, batch, temperature)
  want = _reference(params, batch, temperature)
  assert got[0].shape == want[0].shape == mask.shape and float(jnp.std(want[0])) > 0.5
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda p: jnp.sum((fn(p)[0] + 0.1 * fn(p)[1]) * mask)

  grads = jax.grad(loss(lambda p: training.token_logprobs(p, _CONFIG, batch, temperature)))(params)
  expected = jax.grad(loss(lambda p: _reference(p, batch, temperature)))(params)
  # f32 round-off scales with each leaf's largest entry (up to ~1e2 with these peaked logits).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max())),
               grads, expected)
