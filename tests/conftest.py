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
