"""Pieces shared by the stage configs: model presets, meshes, optimizer, checkpoints, logging."""

import copy

import ml_collections as mlc

from safe_completion import parallel

# Architectures. Real presets normally come from the checkpoint's config.json
# (config.init.hf_dir); these let `plan`-style tools and random-init runs work too.
MODELS = {
    "tiny": dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=192, max_seq_len=512, tie_embeddings=True, rope_theta=10000.0),
    # benchmarks/ and issue targets: d=512, 8 layers.
    "small": dict(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                  mlp_dim=1536, max_seq_len=1024, tie_embeddings=True),
    # Llama-3.2-1B: the 1B-class config of benchmarks/mfu.py.
    "llama3_1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                      head_dim=64, mlp_dim=8192, norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
                      rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_position=8192, max_seq_len=8192, tie_embeddings=True),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
                      rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_position=8192, max_seq_len=8192),
    "qwen2_7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                     head_dim=128, mlp_dim=18944, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                     max_seq_len=32768),
    "gemma_2b": dict(vocab_size=256000, hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1,
                     head_dim=256, mlp_dim=16384, activation="gelu_tanh", norm_offset=True,
                     scale_embeddings=True, tie_embeddings=True, max_seq_len=8192),
    # Gemma-2-9B: soft-capped attention and final logits, post-norms, every other layer on a 4096 window.
    "gemma2_9b": dict(vocab_size=256000, hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                      head_dim=256, mlp_dim=14336, activation="gelu_tanh", norm_offset=True,
                      scale_embeddings=True, tie_embeddings=True, query_pre_attn_scalar=256.0,
                      attn_logit_softcap=50.0, final_logit_softcap=30.0, post_norms=True, sliding_window=4096,
                      sliding_window_pattern=2, max_seq_len=8192),
}

# TPU presets train in bfloat16 with float32 master weights and remat.
TPU_NUMERICS = dict(dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
# transposed_weight_grads: XLA:CPU runs the projections' weight gradients in YNNPACK (models/transformer.py).
CPU_NUMERICS = dict(dtype="float32", param_dtype="float32", remat_policy="none", transposed_weight_grads=True)


# What `runlocal` keeps of a real model: its family's switches (activation, norms, RoPE, tying), on tiny sizes
# and the shipped tiny tokenizer's vocabulary, so a CPU smoke run goes through the same code paths.
_RUNLOCAL_SIZES = dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=192,
                       max_seq_len=512)


def model(name: str, **overrides) -> mlc.ConfigDict:
  numerics = CPU_NUMERICS if name in ("tiny", "small") else TPU_NUMERICS
  return mlc.ConfigDict({**MODELS[name], **numerics, **overrides})


def runlocal_model(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """`config` (a model section) shrunk to tiny sizes with CPU numerics."""
  return mlc.ConfigDict({**config.to_dict(), **_RUNLOCAL_SIZES, **CPU_NUMERICS,
                         "num_kv_heads": min(config.num_kv_heads, 2)})


def mesh(shape=(-1, 1, 1), rules=parallel.DEFAULT_RULES) -> mlc.ConfigDict:
  """Mesh axes (data, fsdp, tensor) with sizes (-1 = the rest) and the (logical axis, mesh axes) rules.

  The rules are in the config, so every run's logged config records its sharding.
  """
  return mlc.ConfigDict({"axes": ("data", "fsdp", "tensor"), "shape": tuple(shape), "rules": tuple(rules)})


def parse_variants(arg: str, presets: dict, stage: str, variants: dict[str, dict]) -> tuple[str, bool, dict]:
  """`name[,flag...]` -> (preset name, runlocal, the overrides of the variant flags given, in arg order).

  A variant is a named dict of overrides applied on top of the preset, before `runlocal` shrinks it
  (e.g. `llama3_8b,lora,runlocal`: the LoRA variant's code path on tiny sizes).
  """
  name, *flags = arg.split(",")
  if name not in presets:
    raise ValueError(f"unknown {stage} preset {name!r}; choose one of {sorted(presets)}")
  options = ["runlocal", *variants]
  unknown = sorted(set(flags) - set(options))
  if unknown:
    raise ValueError(f"{stage} config arg {arg!r}: unknown option(s) {unknown}; choose from {options}")
  overrides = {}
  for flag in flags:
    overrides.update(variants.get(flag, {}))
  return name, "runlocal" in flags, overrides


def parse_arg(arg: str, presets: dict, stage: str) -> tuple[str, bool]:
  """`name` or `name,runlocal` (big_vision's run-local variant) -> (preset name, runlocal)."""
  name, runlocal, _ = parse_variants(arg, presets, stage, {})
  return name, runlocal


def override(config: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
  """Sets the dotted fields of `overrides` ({"optimizer.learning_rate": 1e-5, ...}) in `config`."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"preset field {dotted!r} is not a field of the config")
    # A copy: a section shared by presets (a model dict) must not change when one built config is edited.
    node[leaf] = copy.deepcopy(value)
  return config


def optimizer(learning_rate: float, warmup_steps: int) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, decay="cosine",
                             final_lr_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0,
                             grad_accum_steps=1))


def lora(rank: int = 0, alpha: float = 16.0) -> mlc.ConfigDict:
  """LoRA adapters (safe_completion/lora.py, through qwix): rank 0 = off, full fine-tuning.

  With rank r > 0 only the adapters of `target_modules` (q, k, v, o, gate, up, down) train, scaled by alpha / r.
  """
  return mlc.ConfigDict(dict(rank=rank, alpha=alpha, target_modules=("q", "k", "v", "o", "gate", "up", "down")))


# The `lora` variant of the stage presets (`configs/sft.py:llama3_8b,lora`): rank 16, alpha 32 on every
# projection, the convention `plan` sizes LoRA with.
LORA = {"lora.rank": 16, "lora.alpha": 32.0, "lora.target_modules": ("q", "k", "v", "o", "gate", "up", "down")}


def checkpointing(every_steps: int, keep: int = 2) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(every_steps=every_steps, keep=keep, async_save=True))


def wandb() -> mlc.ConfigDict:
  """Off by default; `--config.wandb.enabled=True` logs offline (no key needed) unless mode=online."""
  return mlc.ConfigDict(dict(enabled=False, project="safe_completion", mode="offline", name=""))


def policy_training(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """Adds the sections the policy trainers (SFT, RL) share: LoRA off, the default mesh, wandb off, and
  checkpoints every step (the stage configs then space them to a quarter of num_steps)."""
  config.lora = lora()
  config.mesh = mesh()
  config.checkpoint = checkpointing(every_steps=1)
  config.wandb = wandb()
  return config


def endpoint() -> mlc.ConfigDict:
  """An OpenAI-compatible endpoint (vLLM, SGLang, a hosted API); the API key comes from the named env var."""
  return mlc.ConfigDict(dict(base_url="", model="", api_key_env="OPENAI_API_KEY", max_concurrency=8, cache_path=""))
