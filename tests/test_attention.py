"""The blocked attention (custom VJP) against the plain softmax formula it replaces, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_completion.models import transformer

# Two packed rows and a left-padded one, 11 slots: blocks of 4 and 5 leave a ragged last block.
_SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
                      [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
_B, _T = _SEGMENTS.shape
_KV_HEADS, _GROUPS, _DIM = 2, 3, 8


def _reference(q, k, v, mask, softcap):
  """softmax over masked (soft-capped) scores, stored whole: the formula before the blocked kernel."""
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k)
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None], scores, transformer._MASK_VALUE)
  return jnp.einsum("bkgts,bksd->btkgd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(window=None):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((_B, _T, _KV_HEADS, _GROUPS, _DIM), np.float32)
  k, v = (rng.standard_normal((_B, _KV_HEADS, _T, _DIM), np.float32) for _ in range(2))
  weights = rng.standard_normal(q.shape, np.float32) * (_SEGMENTS > 0)[:, :, None, None, None]
  slots = jnp.arange(_T)
  mask = transformer.attention_mask(slots, slots, jnp.asarray(_SEGMENTS), jnp.asarray(_SEGMENTS), window)
  return (jnp.asarray(x) for x in (q, k, v, weights)), mask


@pytest.mark.parametrize("block", [0, 4, 5, 64])
@pytest.mark.parametrize("softcap,window", [(None, None), (2.0, None), (None, 3)])
def test_blocked_attention_values_and_grads_equal_the_softmax_formula(block, softcap, window):
  (q, k, v, weights), mask = _inputs(window)

  def loss(attend):
    # Padding rows (segment 0) attend to nothing; their output is unspecified, so they carry no weight.
    return lambda q, k, v: jnp.sum(attend(q, k, v) * weights)

  ours = lambda q, k, v: transformer.dot_product_attention(q, k, v, mask, softcap, block)
  theirs = lambda q, k, v: _reference(q, k, v, mask, softcap)
  real = _SEGMENTS > 0
  np.testing.assert_allclose(np.asarray(ours(q, k, v))[real], np.asarray(theirs(q, k, v))[real],
                             rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(ours(q, k, v))).all()
  grads = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss(theirs), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    assert float(jnp.abs(want).max()) > 0.1, name  # Gradients that are not near zero, so the test can fail.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)


def test_decoder_logits_and_loss_grads_do_not_depend_on_the_attention_block():
  config = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   head_dim=8, mlp_dim=48, max_seq_len=32, attention_block=0)
  params = transformer.init_params(config, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, size=_SEGMENTS.shape), jnp.int32)
  segments = jnp.asarray(_SEGMENTS)
  positions = transformer.positions_from_mask(segments > 0)

  def loss(p, cfg):
    logits = transformer.forward(p, cfg, tokens, positions, segments)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * (segments > 0)), logits

  (want_loss, want_logits), want_grads = jax.value_and_grad(loss, has_aux=True)(params, config)
  for block in (3, 4):
    (got_loss, got_logits), got_grads = jax.value_and_grad(loss, has_aux=True)(
        params, dataclasses.replace(config, attention_block=block))
    real = _SEGMENTS > 0
    np.testing.assert_allclose(np.asarray(got_logits)[real], np.asarray(want_logits)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grads, want_grads)


def test_negative_attention_block_is_an_error_naming_the_field():
  with pytest.raises(ValueError, match="model.attention_block"):
    transformer.ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                            mlp_dim=8, attention_block=-1)
