"""SFT trainer: learns on the shipped data, sharded step equals single-device, a blow-up stops and resumes."""

import os

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from safe_completion import checkpoint
from safe_completion import flops
from safe_completion import metrics
from safe_completion import parallel
from safe_completion import sft
from safe_completion import training
from safe_completion.data import sft_data


def micro_config(num_steps=8, **overrides):
  config = sft_config.get_config("tiny")
  config.num_steps = num_steps
  config.batch_size = 8
  config.data.max_examples = 48
  config.optimizer.warmup_steps = 1
  config.checkpoint.every_steps = 4
  config.checkpoint.async_save = False
  config.eval_every = 4
  config.update_from_flattened_dict(overrides)
  return config


def test_tiny_sft_lowers_loss_and_writes_checkpoints(tmp_path):
  final = sft.train(micro_config(), str(tmp_path))
  rows = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
  assert np.isfinite(final["eval_loss"]) and final["tokens_per_second"] > 0
  assert 0 < final["mfu"] < 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def _two_steps(mesh, config):
  model_config = sft.model_config_from(config)
  tokenizer = sft_data.load_tokenizer(config)
  dataset = sft_data.build_dataset(config, tokenizer)
  optimizer, schedule = training.make_optimizer(config, config.num_steps)
  state, shardings, _ = training.create_state(model_config, optimizer, mesh)
  step = training.jit_step(sft.train_step, shardings, mesh, model_config=model_config, optimizer=optimizer,
                           schedule=schedule)
  with parallel.activation_sharding(mesh):
    for i in range(2):
      state, _ = step(state, parallel.shard_batch(dataset.train_batch(i), mesh))
  return state


def test_sharded_train_step_equals_single_device():
  config = micro_config()
  single = _two_steps(parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), config)
  sharded = _two_steps(parallel.make_mesh((2, 2, 2)), config)
  assert sharded["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[1] == "fsdp"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5),
               single["params"], sharded["params"])


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_non_finite_stops_with_a_finite_state_on_disk_and_a_lower_lr_resumes_from_it(tmp_path):
  # The repro of issue 14: a huge learning rate, no warmup, no clipping, a checkpoint every step.
  blowup = {"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 1e30,
            "checkpoint.every_steps": 1, "checkpoint.async_save": True}
  with pytest.raises(FloatingPointError, match="last finite state is checkpoint"):
    sft.train(micro_config(num_steps=6, **blowup), str(tmp_path))
  directory = str(tmp_path / "checkpoints")
  with checkpoint.manager(directory, async_save=False) as mngr:
    kept = mngr.latest_step()
    model_config = sft.model_config_from(micro_config())
    abstract, _ = training.state_shardings(model_config, training.make_optimizer(micro_config(), 6)[0],
                                           parallel.make_mesh(), parallel.DEFAULT_RULES)
    for step in mngr.all_steps():
      assert _all_finite(checkpoint.restore(mngr, abstract, step)[0]), f"checkpoint {step} is not finite"
  logged = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  # The state the failing step started from is dropped too: it is what produced the non-finite numbers.
  assert kept is not None and kept == len(logged) - 1

  final = sft.train(micro_config(num_steps=6, **{**blowup, "optimizer.learning_rate": 3e-3}), str(tmp_path))
  rows = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  # Resumed from the kept state: the rows up to it are kept, the failed step's row is replaced, once each.
  assert [r["step"] for r in rows] == list(range(1, 7)) and rows[:kept] == logged[:kept]
  assert np.isfinite(final["loss"]) and final["non_finite"] == 0.0
  with checkpoint.manager(directory, async_save=False) as mngr:
    assert mngr.latest_step() == 6 and _all_finite(checkpoint.restore(mngr, abstract)[0])


def test_gradient_accumulation_sizes_the_schedule_in_optimizer_steps():
  config = micro_config(**{"optimizer.grad_accum_steps": 4, "optimizer.warmup_steps": 2,
                           "optimizer.decay": "linear", "optimizer.final_lr_fraction": 0.0})
  _, schedule = training.make_optimizer(config, num_steps=40)  # 10 optimizer steps: 2 warmup, 8 decay.
  learning_rate = config.optimizer.learning_rate
  assert float(schedule(7)) == pytest.approx(learning_rate / 2 * 1)  # Micro-step 7 is optimizer step 1.
  assert float(schedule(8)) == pytest.approx(learning_rate)  # Warmup done at optimizer step 2.
  assert float(schedule(39)) == pytest.approx(learning_rate * 1 / 8)  # Optimizer step 9 of a 2..10 decay.


def test_matmul_params_count_every_projection_and_the_head():
  model_config = sft.model_config_from(micro_config())  # Tied embeddings: the table is the head.
  params = sft.transformer.init_params(model_config, jax.random.key(0))
  norm_params = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                    if "norm" in jax.tree_util.keystr(path))
  assert flops.matmul_params(model_config) == sft.transformer.num_params(params) - norm_params
