r"""Real-model launch presets: each model on the slice it was planned for, read by `launch/tpu.py`.

The slices themselves are `safe_completion/slices.py` (data about machines, which `plan` reads too).
Check that a preset fits before renting the slice, then launch it:
  python -m safe_completion.plan --config=configs/sft.py:llama3_8b --slice=v5p-8
  python launch/tpu.py run --preset=llama3_8b --stage=sft --name=sc-llama --bucket=my-bucket --dry_run
"""

import dataclasses

from safe_completion import slices

SLICES = slices.SLICES  # What launch/tpu.py creates (the GPU hosts are for `plan` only).
get_slice = slices.get_slice


@dataclasses.dataclass(frozen=True)
class ModelPreset:
  """A real model on the slice it was planned for (`safe_completion.plan` shows the numbers)."""

  slice: str
  mesh: tuple[int, int, int]
  config_preset: str  # The preset of configs/<stage>.py.


MODEL_PRESETS = {
    "llama3_8b": ModelPreset("v5p-8", (1, -1, 1), "llama3_8b"),
    "qwen2_7b": ModelPreset("v5p-8", (1, -1, 1), "qwen2_7b"),
    "gemma_2b": ModelPreset("v6e-8", (1, -1, 1), "gemma_2b"),
    "gemma2_9b": ModelPreset("v5p-8", (1, -1, 1), "gemma2_9b"),
}


def get_model_preset(name: str) -> ModelPreset:
  if name not in MODEL_PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
  return MODEL_PRESETS[name]
