r"""RL with the multiplicative reward r = h x s, from an SFT run.

Tiny CPU run (after configs/sft.py:tiny and configs/reward_model.py:tiny):
  python -m safe_completion.main --config=configs/rl.py:tiny --workdir=/tmp/sc_rl \
    --config.init.sft_workdir=/tmp/sc_sft --config.grader.reward_model_dir=/tmp/sc_rm
LoRA (`,lora`; after an SFT `,lora` run, whose bfloat16 frozen base it inherits): new adapters on the
merged SFT model, which is also the reference (rl/loop.py says why):
  python -m safe_completion.main --config=configs/rl.py:llama3_8b,lora --workdir=/gcs/bucket/rl_lora \
    --config.init.sft_workdir=/gcs/bucket/sft_lora
The refusal-training baseline arm uses the same r = h x s; only its grader's policy differs
(configs/experiment.py trains it with a grader of specs/modes_refusal.md). No reward reads the
prompt's intent label.

Defaults, and why:
- advantage="drgrpo" (group mean baseline, no std division): r = h*s lives in [0, 1] and a group of
  near-equal safe refusals has a tiny std; dividing by it turns grader noise into full-size
  advantages (GRPO's std scaling), which pushes the policy on noise. Dr. GRPO keeps advantages on the
  reward's own scale, so near-ties give near-zero signal.
- kl_mode="k3_value_k2_grad": the k3 estimator's value (non-negative, low variance) for logging and
  the k2 gradient, which is the unbiased gradient of KL(pi || ref) on on-policy samples; putting k3
  itself in the loss gives a biased gradient (see rl/pg.py).
- aggregation="seq_mean_token_sum_norm" (Dr. GRPO's constant normalizer): no length bias.
- No top-k/top-p in rollouts, so sampler and trainer log-probs agree; the trainer divides its logits by
  rl.temperature (1.0 here; the tiny experiment samples at 0.7, its eval temperature), so the policy
  that RL optimizes is the tempered one that was sampled.
- Groups whose rewards are all equal get exactly zero advantage, and an update whose minibatch has
  no nonzero advantage is skipped (`update_skipped` in the metrics): its gradient would be the KL
  term alone, rounding noise while the policy equals the reference, which Adam scales to lr-sized
  steps. `zero_variance_groups` says how often groups carry no signal.
- Truncated rollouts are penalised, not masked: reward.truncation_penalty (1.0 in the tiny
  experiment) is subtracted from the reward of a rollout that reached no final answer (it hit
  max_new_tokens, or ended without closing its reasoning block or with an empty answer). At 1.0 not
  answering always pays less than any finished answer: r = h x s is in [0, 1], so a truncated
  rollout's r - 1 <= 0. A smaller penalty lets a long partial answer that the grader rates well beat a
  short finished one. A truncated rollout's partial answer is what the grader grades; an empty answer
  gets h = 0 whatever the grader says of it (graders.base.grade_answers). Masking
  (rl.mask_truncated=True) would instead drop those tokens from the loss, which leaves the policy no
  signal to finish; use it when budgets are generous and truncation is rare noise.
"""

import ml_collections as mlc

from configs import common

# Real-model presets fit the launcher's slices per `python -m safe_completion.plan --stage=rl`
# (llama3_8b / qwen2_7b on v5p-8: ~67 GiB of 95; gemma_2b on v6e-8: ~18 GiB of 32).
_REAL = {"mesh.shape": (1, -1, 1), "rl.prompts_per_step": 8, "rl.samples_per_prompt": 4, "rl.minibatches": 4,
         "rl.max_new_tokens": 1024, "rl.max_prompt_len": 2048, "num_steps": 2000, "optimizer.learning_rate": 1e-6,
         "optimizer.warmup_steps": 20}
PRESETS = {
    "tiny": {"model.remat_policy": "none", "mesh.shape": (-1, 1, 1), "rl.prompts_per_step": 8,
             "rl.samples_per_prompt": 4, "rl.minibatches": 1, "rl.max_new_tokens": 48, "rl.max_prompt_len": 256,
             "num_steps": 30, "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 2},
    "llama3_8b": {**_REAL, "model.remat_policy": common.model("llama3_8b").remat_policy},
    "qwen2_7b": {**_REAL, "model.remat_policy": common.model("qwen2_7b").remat_policy},
    # gemma2_9b on v5p-8: 81.6 GiB of 95 with 4 prompts x 4 samples in 2 minibatches (8 prompts: 90, too close).
    "gemma2_9b": {**_REAL, "model.remat_policy": common.model("gemma2_9b").remat_policy, "rl.prompts_per_step": 4,
                  "rl.minibatches": 2},
    "gemma_2b": {**_REAL, "model.remat_policy": common.model("gemma_2b").remat_policy, "rl.prompts_per_step": 4,
                 "rl.minibatches": 2, "optimizer.learning_rate": 2e-6},
}
# `<preset>,lora`: rank-16 adapters on the merged SFT model (the base and reference, one copy), full remat,
# 4 prompts x 4 samples in 2 minibatches (8 prompts: the whole rollout batch's f32 logits in the log-prob
# pass put qwen2_7b at 101% of v5e-8). Sized with `python -m safe_completion.plan
# --config=configs/rl.py:<preset>,lora --sft_config=configs/sft.py:<preset>,lora --slice=v5e-8` (8 x 16 GiB,
# the SFT variant's bfloat16 base): llama3_8b 9.36 GiB/device (58%), qwen2_7b 9.37 (59%), gemma_2b 12.54
# (78%); on v4-8 (4 x 32 GiB) llama3_8b 18.31 (57%). Full fine-tuning needs v5p-8: llama3_8b 67.3 of 95.
LORA = {**common.LORA, "model.remat_policy": "full", "rl.prompts_per_step": 4, "rl.minibatches": 2,
        "optimizer.learning_rate": 1e-5}
# The policy comes from the SFT workdir (an SFT `runlocal` run is the matching small model).
RUNLOCAL = {"model.remat_policy": "none", "mesh.shape": (-1, 1, 1), "rl.prompts_per_step": 4,
            "rl.samples_per_prompt": 2, "rl.minibatches": 1, "rl.max_new_tokens": 8, "rl.max_prompt_len": 256,
            "num_steps": 2, "optimizer.warmup_steps": 1, "checkpoint.async_save": False}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  name, runlocal, variant = common.parse_variants(arg, PRESETS, "rl", {"lora": LORA})
  config = mlc.ConfigDict()
  config.stage = "rl"
  config.seed = 0
  config.model = mlc.ConfigDict(dict(remat_policy="none"))
  config.init = mlc.ConfigDict(dict(sft_workdir=""))
  config.data = mlc.ConfigDict(dict(prompts_path="", split="train", max_prompts=0))
  config.grader = mlc.ConfigDict(dict(
      kind="reward_model", reward_model_dir="", keyword="", saturation=4,
      endpoint=common.endpoint()))
  config.reward = mlc.ConfigDict(dict(combiner="multiplicative", invalid_policy="exclude", truncation_penalty=0.0,
                                      additive_weights=(0.5, 0.5)))
  config.rl = mlc.ConfigDict(dict(
      prompts_per_step=8, samples_per_prompt=4, max_prompt_len=256, max_new_tokens=48, temperature=1.0,
      advantage="drgrpo", epochs=1, minibatches=1, clip_low=0.2, clip_high=0.2, kl_mode="k3_value_k2_grad",
      kl_coef=0.02, aggregation="seq_mean_token_sum_norm", mask_truncated=False))
  config.num_steps = 30
  config.optimizer = common.optimizer(3e-3, warmup_steps=2)
  config.optimizer.decay = "constant"
  common.policy_training(config)
  config.sample_table_every = 1
  config.sample_table_rows = 8
  common.override(config, {**PRESETS[name], **variant})
  if runlocal:
    common.override(config, RUNLOCAL)
  config.checkpoint.every_steps = max(config.num_steps // 4, 1)
  config.sample_table_every = max(config.num_steps // 4, 1)
  return config
