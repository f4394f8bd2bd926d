"""Sharded forward passes equal the single-device one, and params land where the rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_completion import parallel
from safe_completion import training
from safe_completion.models import transformer

P = jax.sharding.PartitionSpec

CONFIG = transformer.ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                                 head_dim=16, mlp_dim=128, qkv_bias=True)


@pytest.fixture(scope="module")
def params_and_batch():
  params = transformer.init_params(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, CONFIG.vocab_size)
  mask = (jnp.arange(12)[None, :] >= jnp.arange(8)[:, None]).astype(jnp.int32)  # Left padding.
  return params, {"tokens": tokens, "positions": transformer.positions_from_mask(mask), "segment_ids": mask}


def sharded_forward(params, batch, mesh_shape):
  mesh = parallel.make_mesh(mesh_shape)
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(CONFIG), mesh)
  parallel.check_divisible(params, shardings)
  params = jax.device_put(params, shardings)
  batch = parallel.shard_batch(batch, mesh)

  @jax.jit
  def run(params, batch):
    return transformer.forward(params, CONFIG, batch["tokens"], batch["positions"], batch["segment_ids"])

  with parallel.activation_sharding(mesh):
    return params, run(params, batch)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4), (-1, 1, 2)])
def test_sharded_forward_equals_single_device(params_and_batch, mesh_shape):
  params, batch = params_and_batch
  expected = transformer.forward(params, CONFIG, batch["tokens"], batch["positions"], batch["segment_ids"])
  _, logits = sharded_forward(params, batch, mesh_shape)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def test_params_are_sharded_as_the_rules_say(params_and_batch):
  params, batch = params_and_batch
  sharded, _ = sharded_forward(params, batch, (1, 2, 4))
  q_kernel = sharded["layers"]["attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
  assert q_kernel.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q_kernel.addressable_shards[0].data.shape == (2, 32, 1, 16)
  assert sharded["embedding"].sharding.spec == P("tensor", "fsdp")
  down = sharded["layers"]["mlp"]["down_proj"]["kernel"]  # (layers, mlp, embed)
  assert down.addressable_shards[0].data.shape == (2, 32, 32)
  assert sharded["final_norm"]["scale"].sharding.is_fully_replicated


def test_batch_is_split_over_data_and_fsdp():
  mesh = parallel.make_mesh((2, 2, 2))
  batch = parallel.shard_batch({"tokens": np.zeros((8, 5), np.int32)}, mesh)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
  assert batch["tokens"].addressable_shards[0].data.shape == (2, 5)


def test_a_batch_the_batch_axes_cannot_split_names_its_field():
  mesh = parallel.make_mesh((2, 2, 2))  # data x fsdp = 4 ways; tensor does not split the batch.
  parallel.check_batch_split(mesh, 8, "config.batch_size")
  with pytest.raises(ValueError,
                     match=r"^config.batch_size=6 is not divisible by the mesh's batch axes \(data x fsdp = 4\)"):
    parallel.check_batch_split(mesh, 6, "config.batch_size")


def test_mesh_shape_errors_are_clear():
  assert parallel.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.resolve_mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.resolve_mesh_shape((3, 2, 1), 8)
  with pytest.raises(ValueError, match="at most one"):
    parallel.resolve_mesh_shape((-1, -1, 1), 8)


def test_param_shardings_refuse_a_mesh_that_cannot_split_a_param():
  # The one entry point of RL's reference load, the export and `serve` onto a mesh.
  config = transformer.ModelConfig(vocab_size=100, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                   head_dim=16, mlp_dim=128)
  shardings = training.param_shardings(config, parallel.make_mesh((1, 4, 2)), parallel.DEFAULT_RULES)
  assert dict(shardings["embedding"].mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match=r"\['embedding'\].*100"):
    training.param_shardings(config, parallel.make_mesh((1, 1, 8)), parallel.DEFAULT_RULES)


def test_indivisible_param_dimension_names_the_param():
  config = transformer.ModelConfig(vocab_size=100, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                   head_dim=16, mlp_dim=128)
  mesh = parallel.make_mesh((1, 1, 8))
  shapes = jax.eval_shape(lambda rng: transformer.init_params(config, rng), jax.random.key(0))
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(config), mesh)
  with pytest.raises(ValueError, match=r"\['embedding'\].*100"):
    parallel.check_divisible(shapes, shardings)
