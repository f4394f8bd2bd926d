"""Eval of our checkpoint sharded over the 8 fake devices: params really split, generations as on one device."""

import jax
import ml_collections
import numpy as np
import pytest
import transformers

from configs import eval as eval_config
from safe_completion import parallel
from safe_completion.backends import base
from safe_completion.backends import local
from safe_completion.data import sft_data
from safe_completion.evaluation import evaluate
from tests.test_sft_hf import write_tiny_llama

CONVERSATIONS = [[{"role": "user", "content": "How do I bake sourdough bread at home?"}],
                 [{"role": "user", "content": "What household chemicals should never be mixed?"}],
                 [{"role": "user", "content": "Summarise the rules of chess."}]]
GREEDY = base.SamplingParams(max_tokens=12, temperature=0.0)
SAMPLED = base.SamplingParams(max_tokens=12, temperature=1.0, n=2)  # Random bits do not depend on the sharding.


def _model_section(kind: str, path: str, sharded: bool) -> ml_collections.ConfigDict:
  """The eval config's model section for `path`, with its default mesh (all devices on fsdp) or none."""
  model = eval_config.get_config("tiny").model
  model.kind, model.path, model.max_prompt_len, model.batch_size = kind, path, 48, 8
  if not sharded:
    model = ml_collections.ConfigDict({k: v for k, v in model.items() if k != "mesh"})
  return model


def _assert_sharded_equals_one_device(kind: str, path: str) -> None:
  one, sharded = (evaluate.make_backend(_model_section(kind, path, s)) for s in (False, True))
  assert sharded.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1} and one.mesh is None

  embedding = sharded.params["embedding"]  # [vocab, embed]
  assert not embedding.sharding.is_fully_replicated
  assert embedding.addressable_shards[0].data.shape[1] == embedding.shape[1] // 8  # The model dim over fsdp.
  assert {d for leaf in jax.tree.leaves(sharded.params) for d in leaf.devices()} == set(jax.devices())
  assert all(isinstance(leaf, np.ndarray) or len(leaf.devices()) == 1 for leaf in jax.tree.leaves(one.params))

  # The sampler's tokens and their log-probs, row by row, on 8 devices and on one: greedy, and sampled with one key.
  for params in (GREEDY, SAMPLED):
    prompts = [p for p in one.encode(CONVERSATIONS) for _ in range(params.n)]
    config = one.sampling_config(params)
    expected, actual = (b.sample(prompts, config, jax.random.key(0)) for b in (one, sharded))
    rows = len(prompts)
    assert actual.lengths[:rows].min() > 0
    np.testing.assert_array_equal(actual.tokens[:rows], expected.tokens[:rows])
    np.testing.assert_array_equal(actual.lengths[:rows], expected.lengths[:rows])
    np.testing.assert_allclose(actual.logprobs[:rows], expected.logprobs[:rows], atol=1e-5, rtol=1e-5)
  assert len({tuple(row) for row in actual.tokens[:rows]}) > 1  # Not one repeated row that any bug would match.
  # And the backend's completions, through the eval path.
  assert sharded.generate(CONVERSATIONS, GREEDY) == one.generate(CONVERSATIONS, GREEDY)


def test_eval_of_a_checkpoint_sharded_over_8_devices_equals_one_device(tiny_sft_workdir):
  _assert_sharded_equals_one_device("checkpoint", tiny_sft_workdir)


def test_eval_of_an_hf_directory_sharded_over_8_devices_equals_one_device(tmp_path):
  write_tiny_llama(tmp_path)
  _assert_sharded_equals_one_device("hf", str(tmp_path))


def test_a_batch_the_mesh_cannot_split_is_an_error():
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))
  with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by the mesh's 8 data-parallel shards"):
    local.LocalBackend({}, None, tokenizer, 16, batch_size=4, mesh=parallel.make_mesh((1, -1, 1)))
