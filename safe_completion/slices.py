"""The machines: TPU slices and GPU hosts (devices, HBM per device, default mesh).

Data about hardware, not about a run: `launch/tpu.py` creates the slices (through
`configs/launch.py`, which pairs models with them) and `safe_completion.plan` sizes
a stage config against them.

A slice's `devices` are the JAX devices it exposes (one per chip: v4 and v5p
chips are megacore), `hosts` the TPU VM workers every command runs on.
"""

import dataclasses

# HBM per JAX device, GiB.
DEVICE_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0, "h100": 80.0}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: what `gcloud` creates and what the mesh sees (a GPU host: only the latter)."""

  accelerator_type: str
  runtime_version: str
  zone: str
  device_kind: str
  devices: int
  hosts: int
  mesh: tuple[int, int, int]  # (data, fsdp, tensor) for a model that needs FSDP; -1 = the rest.

  @property
  def hbm_gib(self) -> float:
    return DEVICE_HBM_GIB[self.device_kind]


SLICES = {
    "v4-8": Slice("v4-8", "tpu-ubuntu2204-base", "us-central2-b", "v4", devices=4, hosts=1, mesh=(1, -1, 1)),
    "v4-32": Slice("v4-32", "tpu-ubuntu2204-base", "us-central2-b", "v4", devices=16, hosts=4, mesh=(1, -1, 4)),
    # The 8B-class `,lora` presets' slice (configs/sft.py, configs/rl.py).
    "v5e-8": Slice("v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a", "v5e", devices=8, hosts=1, mesh=(1, -1, 1)),
    "v5e-16": Slice("v5litepod-16", "v2-alpha-tpuv5-lite", "us-west4-a", "v5e", devices=16, hosts=4,
                    mesh=(1, -1, 4)),
    "v5p-8": Slice("v5p-8", "v2-alpha-tpuv5", "us-east5-a", "v5p", devices=4, hosts=1, mesh=(1, -1, 1)),
    "v6e-8": Slice("v6e-8", "v2-alpha-tpuv6e", "us-east5-b", "v6e", devices=8, hosts=1, mesh=(1, -1, 1)),
}

# Single GPU hosts, for `safe_completion.plan` only: launch/tpu.py creates TPU slices, not these.
GPU_HOSTS = {
    "h100x8": Slice("", "", "", "h100", devices=8, hosts=1, mesh=(1, -1, 1)),
}


def get_slice(name: str) -> Slice:
  """A TPU slice or a GPU host by name."""
  slices = {**SLICES, **GPU_HOSTS}
  if name not in slices:
    raise ValueError(f"unknown slice {name!r}; choose one of {sorted(slices)}")
  return slices[name]
