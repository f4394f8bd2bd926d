"""Stage configs: every preset validates; bad values are refused at start-up, naming the field."""

import subprocess
import sys

import pytest

from configs import datagen
from configs import eval as eval_config
from configs import experiment
from configs import reward_model
from configs import rl
from configs import sft
from safe_completion import config_checks

PRESETS = [(sft, "tiny"), (sft, "llama3_8b"), (sft, "qwen2_7b"), (sft, "gemma_2b"), (rl, "tiny"), (rl, "llama3_8b"),
           (rl, "gemma_2b"), (reward_model, "tiny"), (reward_model, "finetune"), (datagen, "tiny"),
           (datagen, "endpoint"), (eval_config, "tiny"), (eval_config, "endpoint"), (experiment, "tiny")]


@pytest.mark.parametrize("module, preset", PRESETS)
def test_every_preset_validates(module, preset):
  config_checks.validate(module.get_config(preset))


BAD = [
    (sft, "num_steps", 0), (sft, "batch_size", 0), (sft, "data.seq_len", -1), (sft, "data.eval_fraction", 1.0),
    (sft, "data.eval_fraction", -0.1), (sft, "checkpoint.every_steps", 0), (sft, "optimizer.learning_rate", -1e-3),
    (sft, "optimizer.learning_rate", float("nan")), (sft, "optimizer.learning_rate", float("inf")),
    (sft, "optimizer.grad_accum_steps", 0), (sft, "data.arm", "safe-completion"), (sft, "checkpoint.keep", 1),
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
