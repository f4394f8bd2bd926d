"""Compute-time rearrangements of the decoder's training step keep its numerics: values and gradients equal the
plain path (`transposed_weight_grads`, the custom-VJP projection) within f32 round-off."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_completion import lora
from safe_completion import training
from safe_completion.models import transformer

_CONFIG = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=8, mlp_dim=48, max_seq_len=32, qkv_bias=True)


def _plain(x, kernel, contract_dims):
  contract = (tuple(range(x.ndim - contract_dims, x.ndim)), tuple(range(contract_dims)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


# (x shape, kernel shape, contracted axes): wide and narrow outputs take the two transposes of the backward pass.
@pytest.mark.parametrize("x_shape,kernel_shape,contract_dims", [
    ((2, 5, 6), (6, 10), 1), ((2, 5, 10), (10, 6), 1), ((2, 5, 6), (6, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 6), 2)])
def test_project_values_and_grads_equal_dot_general(x_shape, kernel_shape, contract_dims):
  rng = np.random.default_rng(0)
  x, kernel = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in (x_shape, kernel_shape))
  weights = jnp.asarray(rng.standard_normal(_plain(x, kernel, contract_dims).shape, np.float32))
  got = transformer.project(x, kernel, contract_dims)
  want = _plain(x, kernel, contract_dims)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda x, k: jnp.sum(f(x, k, contract_dims) * weights)
  got_grads = jax.jit(jax.grad(loss(transformer.project), argnums=(0, 1)))(x, kernel)
  want_grads = jax.grad(loss(_plain), argnums=(0, 1))(x, kernel)
  for name, g, w in zip(("x", "kernel"), got_grads, want_grads):
    assert g.shape == w.shape and float(jnp.abs(w).max()) > 0.5, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


def _batch():
  rng = np.random.default_rng(1)
  segments = np.array([[1] * 6 + [2] * 6, [0, 0, 0] + [1] * 9], np.int32)
  return {"tokens": jnp.asarray(rng.integers(1, 64, size=segments.shape), jnp.int32),
          "positions": transformer.positions_from_mask(jnp.asarray(segments)), "segment_ids": jnp.asarray(segments)}


def test_transposed_weight_grads_keep_logprobs_and_grads_of_the_decoder():
  fast = dataclasses.replace(_CONFIG, transposed_weight_grads=True)
  params = transformer.init_params(_CONFIG, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), params)  # Nonzero biases too.
  batch = _batch()
  mask = (batch["segment_ids"][:, 1:] > 0).astype(jnp.float32)
  loss = lambda config: lambda p: jnp.sum(training.token_logprobs(p, config, batch)[0] * mask)
  got, got_grads = jax.jit(jax.value_and_grad(loss(fast)))(params)
  want, want_grads = jax.jit(jax.value_and_grad(loss(_CONFIG)))(params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  # f32 round-off of a reordered sum, relative to each leaf's largest entry; a wrong gradient is off by O(1).
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    w = want_grads
    for key in path:
      w = w[key.key]
    scale = float(jnp.abs(w).max())
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_transposed_weight_grads_leave_lora_adapters_in_place():
  """qwix intercepts the projection's dot_general: with the flag on, a LoRA model runs the plain dot
  (lora.py turns the flag off), so the adapters still act and get the same gradients."""
  fast = dataclasses.replace(_CONFIG, transposed_weight_grads=True)
  lora_config = lora.LoraConfig(rank=2, alpha=4.0, target_modules=("q", "down"))
  base = lora.Base(transformer.init_params(_CONFIG, jax.random.key(0)), lora_config)
  adapters = jax.tree.map(lambda x: x + 0.1, lora.init_adapters(fast, lora_config, jax.random.key(1)))  # B was 0.
  batch = _batch()
  loss = lambda config: lambda a: jnp.sum(training.token_logprobs(lora.LoraParams(base, a), config, batch)[0])
  got, got_grads = jax.jit(jax.value_and_grad(loss(fast)))(adapters)
  want, want_grads = jax.jit(jax.value_and_grad(loss(_CONFIG)))(adapters)
  unadapted = jnp.sum(training.token_logprobs(base.params, _CONFIG, batch)[0])
  assert abs(float(want) - float(unadapted)) > 1e-3  # The adapters change the output, so the test can fail.
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert float(jnp.abs(w).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _compiled_ops(config: transformer.ModelConfig, params, batch) -> list[str]:
  """The optimized HLO's instructions (kind, shape, operands' layout), without names and metadata."""
  text = jax.jit(lambda p: transformer.forward(p, config, batch["tokens"], batch["positions"], batch["segment_ids"])
                 ).lower(params).compile().as_text()
  ops = []
  for line in text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\S+) ([\w\-]+)\((.*)", line)
    if match:
      rest = re.sub(r"(, )?(metadata|stack_frame_id|backend_config)=.*", "", match.group(3))
      operands = re.sub(r"%[\w.\-]+", "%", rest)
      ops.append(f"{match.group(1)} {match.group(2)} {operands}")
  return ops


def test_transposed_weight_grads_leave_the_forward_program_unchanged():
  """Only the backward pass differs: the sampler and log-prob passes compile to the same instructions."""
  params = transformer.init_params(_CONFIG, jax.random.key(0))
  batch = _batch()
  plain = _compiled_ops(_CONFIG, params, batch)
  assert len(plain) > 50 and any(op.split()[1] == "dot" for op in plain)
  assert _compiled_ops(dataclasses.replace(_CONFIG, transposed_weight_grads=True), params, batch) == plain
