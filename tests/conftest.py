"""Test session setup: 8 fake CPU devices, before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402  (after the environment is set up)


@pytest.fixture(scope="session")
def tiny_sft_workdir(tmp_path_factory):
  """A finished micro SFT run on the shipped demonstrations, shared by the later-stage tests."""
  from safe_completion import sft
  from tests.test_sft import micro_config
  workdir = tmp_path_factory.mktemp("tiny_sft")
  sft.train(micro_config(num_steps=12), str(workdir))
  return str(workdir)


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
  """A learned reward model trained on a subset of the shipped grades (frozen encoder), shared by the tests."""
  from configs import reward_model as reward_model_config
  from safe_completion import reward_training
  config = reward_model_config.get_config("tiny")
  config.max_len = 128  # Responses are shorter than ~200 tokens; 128 keeps the tests fast.
  config.num_steps = 200
  config.data.max_train_rows = 400
  config.data.independent_heldout_dir = "none"  # The tests validate it on the held-out set themselves.
  workdir = str(tmp_path_factory.mktemp("reward_model"))
  reward_training.train(config, workdir)
  return workdir
