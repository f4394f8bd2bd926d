"""Model FLOPs and device peaks, for MFU (model FLOPs utilisation) in the training logs.

Model FLOPs follow the usual convention: 6 x params per trained token for the
matmuls (forward + backward), plus 12 x layers x seq_len x (heads x head_dim)
per token for attention scores and values. Accelerator peaks are dense bf16
figures from the vendors' sheets; on CPU the peak is measured once (a large f32
matmul), so CPU MFU is "of the matmul peak of this machine".
"""

import functools
import time

import jax
import jax.numpy as jnp

from safe_completion.models import transformer

# Dense bf16 peak FLOP/s per device, by `device.device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(config: transformer.ModelConfig) -> int:
  """Params that take part in a matmul per token: every layer's projections and the output head."""
  attn = config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = 3 * config.hidden_size * config.mlp_dim
  return config.num_layers * (attn + mlp) + config.hidden_size * config.vocab_size


def train_flops_per_token(config: transformer.ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per trained token."""
  attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
  return 6 * matmul_params(config) + attention


@functools.cache
def measured_cpu_peak(size: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of an f32 matmul on this host's CPU (best of a few runs)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - started)
  return 2 * size ** 3 / best


def device_peak_flops(device: jax.Device) -> float:
  """The peak of one device: the vendor figure for accelerators, measured for CPUs."""
  if device.platform == "cpu":
    return measured_cpu_peak()
  for prefix, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return peak
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to flops.PEAK_FLOPS")


def peak_flops(devices: list[jax.Device]) -> float:
  """The summed peak FLOP/s of the devices used.

  On CPU the fake devices of one host share its cores, so the host's measured
  peak counts once. Trainers take it before their loop: measured beside an
  async checkpoint write, the CPU peak comes out low and the MFU above 1.
  """
  if devices[0].platform == "cpu":
    return measured_cpu_peak()
  return device_peak_flops(devices[0]) * len(devices)
