r"""Supervised fine-tuning on spec-guided (CoT, answer) data.

Tiny CPU run from the shipped demonstrations (the offline default):
  python -m safe_completion.main --config=configs/sft.py:tiny --workdir=/tmp/sc_sft

Llama-3-8B on a TPU pod from a local/GCS-fused HF checkpoint:
  python -m safe_completion.main --config=configs/sft.py:llama3_8b \
    --config.init.hf_dir=/mnt/models/Meta-Llama-3-8B-Instruct --workdir=gs://bucket/sft
Any field can be overridden: --config.optimizer.learning_rate=1e-5 --config.num_steps=500.
"""

import ml_collections as mlc

from configs import common

# Real-model presets are sized with `python -m safe_completion.plan` for the launcher's slices
# (llama3_8b / qwen2_7b on v5p-8: ~80 GiB of 95; gemma_2b on v6e-8: ~21 GiB of 32): a global
# batch of 256 sequences as 8 per step x 32 accumulation steps.
_PRESETS = {
    # name: (model preset, mesh shape, batch size, grad accumulation, seq len, steps, lr, warmup)
    "tiny": ("tiny", (-1, 1, 1), 8, 1, 512, 40, 3e-3, 4),
    "llama3_8b": ("llama3_8b", (1, -1, 1), 8, 32, 4096, 64000, 1e-5, 100),
    "qwen2_7b": ("qwen2_7b", (1, -1, 1), 8, 32, 4096, 64000, 1e-5, 100),
    "gemma_2b": ("gemma_2b", (1, -1, 1), 8, 32, 4096, 64000, 2e-5, 100),
}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"unknown sft preset {arg!r}; choose one of {sorted(_PRESETS)}")
  model_name, mesh_shape, batch_size, grad_accum, seq_len, num_steps, learning_rate, warmup = _PRESETS[arg]
  config = mlc.ConfigDict()
  config.stage = "sft"
  config.seed = 0
  config.model = common.model(model_name)
  config.init = mlc.ConfigDict(dict(hf_dir=""))  # Empty: random init from config.model.
  config.tokenizer_dir = ""  # Empty: the HF checkpoint's, else the shipped tiny tokenizer.
  config.data = mlc.ConfigDict(dict(
      source="demonstrations",  # or "records" (datagen output at records_path)
      arm="safe_completion",  # which arm's demonstrations: safe_completion | refusal
      data_dir="", records_path="", seq_len=seq_len, packed_rows=0, eval_fraction=0.1, max_examples=0))
  config.batch_size = batch_size
  config.num_steps = num_steps
  config.optimizer = common.optimizer(learning_rate, warmup)
  config.optimizer.grad_accum_steps = grad_accum
  config.mesh = common.mesh(mesh_shape)
  config.checkpoint = common.checkpointing(every_steps=max(num_steps // 4, 1))
  config.log_every = 1
  config.eval_every = max(num_steps // 4, 1)
  config.wandb = common.wandb()
  config.export_hf_dir = ""  # Set to write the final model as an HF directory (for vLLM).
  config.export_architecture = "LlamaForCausalLM"
  return config
