"""Stage configs: every preset validates; bad values are refused at start-up, naming the field."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import datagen
from configs import eval as eval_config
from configs import experiment
from configs import reward_model
from configs import rl
from configs import sft
from safe_completion import config_checks
from safe_completion import metrics
from safe_completion import parallel
from safe_completion import sft as sft_trainer
from safe_completion.rl import loop as rl_trainer

PRESETS = [(sft, "tiny"), (sft, "llama3_8b"), (sft, "qwen2_7b"), (sft, "gemma_2b"), (rl, "tiny"), (rl, "llama3_8b"),
           (rl, "gemma_2b"), (reward_model, "tiny"), (reward_model, "finetune"), (datagen, "tiny"),
           (datagen, "endpoint"), (eval_config, "tiny"), (eval_config, "endpoint"), (experiment, "tiny")]
PRESETS += [(module, f"{preset},runlocal") for module, preset in PRESETS if module is not experiment]


@pytest.mark.parametrize("module, preset", PRESETS)
def test_every_preset_validates(module, preset):
  config_checks.validate(module.get_config(preset))


BAD = [
    (sft, "num_steps", 0), (sft, "batch_size", 0), (sft, "data.seq_len", -1), (sft, "data.eval_fraction", 1.0),
    (sft, "data.eval_fraction", -0.1), (sft, "checkpoint.every_steps", 0), (sft, "optimizer.learning_rate", -1e-3),
    (sft, "optimizer.learning_rate", float("nan")), (sft, "optimizer.learning_rate", float("inf")),
    (sft, "optimizer.grad_accum_steps", 0), (sft, "data.arm", "safe-completion"), (sft, "checkpoint.keep", 1),
    (sft, "export_dtype", "bf16"),
    (rl, "num_steps", -3), (rl, "optimizer.learning_rate", float("nan")), (rl, "checkpoint.every_steps", 0),
    (reward_model, "batch_size", -1), (reward_model, "learning_rate", float("inf")),
]


@pytest.mark.parametrize("module, field, value", BAD)
def test_a_bad_value_names_its_field(module, field, value):
  config = module.get_config("tiny")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=f"^config.{field}="):
    config_checks.validate(config)


def test_experiment_sections_are_checked_with_their_path():
  config = experiment.get_config("tiny")
  config.rl.optimizer.grad_accum_steps = 0
  with pytest.raises(ValueError, match=r"^config.rl.optimizer.grad_accum_steps=0 must be > 0"):
    config_checks.validate(config)


def test_main_refuses_a_bad_config_before_training(tmp_path):
  result = subprocess.run([sys.executable, "-m", "safe_completion.main", "--config=configs/sft.py:tiny",
                           f"--workdir={tmp_path}", "--config.batch_size=0"], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0
  assert "config.batch_size=0 must be > 0" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("stage, overrides, message", [
    (sft_trainer, {"batch_size": 4},
     r"^config.batch_size=4 is not divisible by the mesh's batch axes \(data x fsdp = 8\)"),
    (rl_trainer, {"rl.prompts_per_step": 1, "rl.samples_per_prompt": 2},
     r"^config.rl.prompts_per_step x rl.samples_per_prompt \(rollouts per step\)=2 is not divisible"),
    (rl_trainer, {"rl.minibatches": 3}, r"^config.rl.minibatches=3 does not divide the 32 rollouts"),
    (rl_trainer, {"rl.minibatches": 8},
     r"^rollouts per step / config.rl.minibatches \(update rows\)=4 is not divisible"),
])
def test_a_batch_the_mesh_cannot_split_is_refused_at_start_up(stage, overrides, message, tmp_path):
  config = (sft if stage is sft_trainer else rl).get_config("tiny")  # mesh (-1, 1, 1): data = the 8 devices.
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message):  # Before any model is built or loaded.
    stage.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("preset", ["tiny,runlocal", "llama3_8b,runlocal", "gemma_2b,lora,runlocal"])
def test_rl_runlocal_splits_over_the_eight_test_devices(preset):
  config = rl.get_config(preset)
  parallel.check_batch_split(parallel.mesh_from_config(config),
                             config.rl.prompts_per_step * config.rl.samples_per_prompt // config.rl.minibatches, preset)


def test_runlocal_shrinks_a_real_preset_but_keeps_its_model_family():
  real, local = sft.get_config("gemma_2b"), sft.get_config("gemma_2b,runlocal")
  assert local.model.hidden_size < real.model.hidden_size and local.model.num_layers == 2
  for switch in ("activation", "norm_offset", "scale_embeddings", "tie_embeddings"):
    assert local.model[switch] == real.model[switch]
  assert (local.model.dtype, local.mesh.shape, local.optimizer.grad_accum_steps) == ("float32", (-1, 1, 1), 1)
  assert local.num_steps < real.num_steps and local.data.seq_len < real.data.seq_len
  assert local.optimizer.learning_rate == real.optimizer.learning_rate  # Only sizes shrink.


def test_unknown_preset_or_option_is_refused():
  with pytest.raises(ValueError, match="unknown sft preset 'llama'"):
    sft.get_config("llama")
  with pytest.raises(ValueError, match="unknown option"):
    rl.get_config("tiny,fast")


def test_runlocal_of_a_real_preset_trains_on_cpu_and_logs_its_sharding_rules(tmp_path):
  final = sft_trainer.train(sft.get_config("gemma_2b,runlocal"), str(tmp_path))
  assert np.isfinite(final["loss"])
  with open(os.path.join(tmp_path, "config.json")) as f:
    logged = json.load(f)
  assert [tuple(tuple(a) if isinstance(a, list) else a for a in rule) for rule in logged["mesh"]["rules"]] == [
      tuple(rule) for rule in parallel.DEFAULT_RULES]
  assert len(metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))) == 4


def test_editing_a_built_config_leaves_its_preset_alone():
  built = sft.get_config("tiny")
  built.model.hidden_size += 1
  built.model.update({"num_layers": built.model.num_layers + 1})
  fresh = sft.get_config("tiny")
  assert (fresh.model.hidden_size, fresh.model.num_layers) == (built.model.hidden_size - 1, built.model.num_layers - 1)
