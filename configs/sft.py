r"""Supervised fine-tuning on spec-guided (CoT, answer) data.

Tiny CPU run from the shipped demonstrations (the offline default):
  python -m safe_completion.main --config=configs/sft.py:tiny --workdir=/tmp/sc_sft

Llama-3-8B on a TPU pod from an HF checkpoint, writing to a gcsfuse-mounted bucket (main refuses gs:// paths):
  python -m safe_completion.main --config=configs/sft.py:llama3_8b \
    --config.init.hf_dir=/mnt/models/Meta-Llama-3-8B-Instruct --workdir=/gcs/bucket/sft
CPU smoke run of a real preset (its model family on tiny sizes, a few short steps, random init):
  python -m safe_completion.main --config=configs/sft.py:llama3_8b,runlocal --workdir=/tmp/sc_sft_local
LoRA on a smaller slice (`,lora`: adapters only on a bfloat16 frozen base; `,lora,runlocal` on CPU):
  python -m safe_completion.main --config=configs/sft.py:llama3_8b,lora \
    --config.init.hf_dir=/mnt/models/Meta-Llama-3-8B-Instruct --workdir=/gcs/bucket/sft_lora
Any field can be overridden: --config.optimizer.learning_rate=1e-5 --config.num_steps=500.
"""

import ml_collections as mlc

from configs import common

# Real-model presets are sized with `python -m safe_completion.plan` for the launcher's slices
# (llama3_8b / qwen2_7b on v5p-8: ~80 GiB of 95; gemma_2b on v6e-8: ~21 GiB of 32): a global
# batch of 256 sequences as 8 per step x 32 accumulation steps.
_REAL = {"mesh.shape": (1, -1, 1), "batch_size": 8, "optimizer.grad_accum_steps": 32, "data.seq_len": 4096,
         "num_steps": 64000, "optimizer.learning_rate": 1e-5, "optimizer.warmup_steps": 100}
PRESETS = {
    "tiny": {"model": common.model("tiny"), "mesh.shape": (-1, 1, 1), "batch_size": 8,
             "optimizer.grad_accum_steps": 1, "data.seq_len": 512, "num_steps": 40, "optimizer.learning_rate": 3e-3,
             "optimizer.warmup_steps": 4},
    "llama3_8b": {**_REAL, "model": common.model("llama3_8b")},
    "qwen2_7b": {**_REAL, "model": common.model("qwen2_7b")},
    "gemma_2b": {**_REAL, "model": common.model("gemma_2b"), "optimizer.learning_rate": 2e-5},
    # gemma2_9b on v5p-8: 69.4 GiB of 95 with 4 per step x 64 accumulation steps (8 per step: 87 + accumulator).
    "gemma2_9b": {**_REAL, "model": common.model("gemma2_9b"), "batch_size": 4, "optimizer.grad_accum_steps": 64,
                  "export_architecture": "Gemma2ForCausalLM"},
}
# `<preset>,lora`: only rank-16 adapters train (float32), so the frozen base needs no float32 master copy and
# full remat keeps one layer's activations; LoRA takes ~10x full fine-tuning's learning rate. Sized with
# `python -m safe_completion.plan --config=configs/sft.py:<preset>,lora --slice=v5e-8` (8 x 16 GiB), the
# preset's 8 x 4096 tokens per step x 32 accumulation steps: llama3_8b 13.07 GiB/device (82%), qwen2_7b
# 12.96 (81%), gemma_2b 10.87 (68%); on v4-8 (4 x 32 GiB) llama3_8b 25.63 (80%). Full fine-tuning of
# llama3_8b needs v5p-8: 79.7 of 95.
LORA = {**common.LORA, "model.param_dtype": "bfloat16", "model.remat_policy": "full",
        "optimizer.learning_rate": 1e-4}
RUNLOCAL = {"mesh.shape": (-1, 1, 1), "batch_size": 8, "optimizer.grad_accum_steps": 1, "data.seq_len": 512,
            "data.max_examples": 32, "num_steps": 4, "optimizer.warmup_steps": 1, "init.hf_dir": "",
            "checkpoint.async_save": False}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  name, runlocal, variant = common.parse_variants(arg, PRESETS, "sft", {"lora": LORA})
  config = mlc.ConfigDict()
  config.stage = "sft"
  config.seed = 0
  config.model = common.model("tiny")
  config.init = mlc.ConfigDict(dict(hf_dir=""))  # Empty: random init from config.model.
  config.tokenizer_dir = ""  # Empty: the HF checkpoint's, else the shipped tiny tokenizer.
  config.data = mlc.ConfigDict(dict(
      source="demonstrations",  # or "records" (datagen output at records_path)
      arm="safe_completion",  # which arm's demonstrations: safe_completion | refusal
      data_dir="", records_path="", seq_len=512, eval_fraction=0.1, max_examples=0,
      # Packing: pack_dataset packs the train examples once into rows (a batch is batch_size rows);
      # packed_rows > 0 packs each batch's batch_size examples into that many rows instead.
      pack_dataset=False, packed_rows=0,
      # Records (data.source="records") whose prompt is in the eval split of data_dir's prompts, duplicate
      # records and malformed lines are errors naming file:line; True skips them and prints the counts.
      skip_invalid_records=False))
  config.batch_size = 8
  config.num_steps = 40
  config.optimizer = common.optimizer(3e-3, 4)
  common.policy_training(config)
  config.log_every = 1
  config.eval_every = 1
  config.export_hf_dir = ""  # Set to write the final model as an HF directory (for vLLM).
  config.export_architecture = "LlamaForCausalLM"
  config.export_dtype = ""  # Empty: the params' dtype; "bfloat16" halves a float32 run's export (vLLM's dtype).
  common.override(config, {**PRESETS[name], **variant})
  if runlocal:  # Tiny sizes, but a variant's numerics stay: `,lora,runlocal` runs its bfloat16 frozen base.
    common.override(config, {**RUNLOCAL, "model": common.runlocal_model(config.model),
                             **{k: v for k, v in variant.items() if k.startswith("model.")}})
  config.checkpoint.every_steps = max(config.num_steps // 4, 1)
  config.eval_every = max(config.num_steps // 4, 1)
  return config
