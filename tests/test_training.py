"""The training core: guarded update, abstract-first restore, the non-finite stop and its resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safe_completion import checkpoint
from safe_completion import parallel
from safe_completion import training
from safe_completion.models import transformer

TINY = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               mlp_dim=64)


def _state(optimizer):
  params = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


@pytest.mark.parametrize("loss, grad, has_signal, applied, non_finite", [
    (1.0, 1.0, True, True, False),
    (float("nan"), 1.0, True, False, True),
    (1.0, float("inf"), True, False, True),
    (1.0, 1.0, False, False, False),
])
def test_apply_gradients_skips_non_finite_and_signal_free_updates(loss, grad, has_signal, applied, non_finite):
  optimizer = optax.sgd(0.1)
  state = _state(optimizer)
  grads = jax.tree.map(lambda x: jnp.full_like(x, grad), state["params"])
  new, metrics = jax.jit(training.apply_gradients, static_argnums=3)(state, grads, jnp.float32(loss), optimizer,
                                                                     has_signal)
  assert float(metrics["non_finite"]) == float(non_finite)
  assert float(metrics["update_skipped"]) == float(not applied)
  assert int(new["step"]) == int(applied)
  expected = 1.0 - 0.1 * grad if applied else 1.0
  np.testing.assert_allclose(np.asarray(new["params"]["w"]), expected)


def test_an_update_that_overflows_the_params_is_not_applied():
  optimizer = optax.sgd(1e38)  # Finite loss and gradient, but 1 - 1e38 * 10 overflows float32.
  state = _state(optimizer)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 10.0), state["params"])
  new, metrics = training.apply_gradients(state, grads, jnp.float32(1.0), optimizer)
  assert float(metrics["non_finite"]) == 1.0
  np.testing.assert_array_equal(np.asarray(new["params"]["w"]), 1.0)


def test_create_state_restores_the_latest_checkpoint_without_initialising(tmp_path):
  mesh = parallel.make_mesh((1, 2, 1), devices=jax.devices()[:2])
  optimizer = optax.adamw(1e-3)
  with checkpoint.manager(str(tmp_path), async_save=False) as ckpt:
    state, shardings, start = training.create_state(TINY, optimizer, mesh, ckpt=ckpt)
    assert start == 0 and ckpt.all_steps() == [0]  # A new state is checkpoint 0.
    moved = jax.tree.map(lambda x: x + 1, state["params"])
    checkpoint.save(ckpt, 3, {**state, "params": moved, "step": state["step"] + 3}, force=True)

  def must_not_run(_):
    raise AssertionError("a restart initialised params it then threw away")

  with checkpoint.manager(str(tmp_path), async_save=False) as ckpt:
    restored, _, start = training.create_state(TINY, optimizer, mesh, ckpt=ckpt, init_params=must_not_run)
  assert start == 3 and int(restored["step"]) == 3
  embedding = restored["params"]["embedding"]
  assert embedding.sharding == shardings["params"]["embedding"]
  np.testing.assert_array_equal(np.asarray(embedding), np.asarray(moved["embedding"]))


def test_stop_if_non_finite_keeps_only_earlier_checkpoints(tmp_path):
  state = {"params": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
  with checkpoint.manager(str(tmp_path), max_to_keep=5, async_save=False) as ckpt:
    for step in (0, 1, 2):
      checkpoint.save(ckpt, step, state, force=True)
    training.stop_if_non_finite(ckpt, 2, False, "loss")  # A finite step changes nothing.
    assert ckpt.all_steps() == [0, 1, 2]
    with pytest.raises(FloatingPointError, match="last finite state is checkpoint 1"):
      training.stop_if_non_finite(ckpt, 2, True, "loss nan")
    assert ckpt.all_steps() == [0, 1]
