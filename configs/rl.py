r"""RL with the multiplicative reward r = h x s, from an SFT run.

Tiny CPU run (after configs/sft.py:tiny and configs/reward_model.py:tiny):
  python -m safe_completion.main --config=configs/rl.py:tiny --workdir=/tmp/sc_rl \
    --config.init.sft_workdir=/tmp/sc_sft --config.grader.reward_model_dir=/tmp/sc_rm
The refusal-training baseline arm: --config.reward.combiner=refusal_baseline.

Defaults, and why:
- advantage="drgrpo" (group mean baseline, no std division): r = h*s lives in [0, 1] and a group of
  near-equal safe refusals has a tiny std; dividing by it turns grader noise into full-size
  advantages (GRPO's std scaling), which pushes the policy on noise. Dr. GRPO keeps advantages on the
  reward's own scale, so near-ties give near-zero signal.
- kl_mode="k3_value_k2_grad": the k3 estimator's value (non-negative, low variance) for logging and
  the k2 gradient, which is the unbiased gradient of KL(pi || ref) on on-policy samples; putting k3
  itself in the loss gives a biased gradient (see rl/pg.py).
- aggregation="seq_mean_token_sum_norm" (Dr. GRPO's constant normalizer): no length bias.
- temperature=1.0 and no top-k/top-p in rollouts, so sampler and trainer log-probs agree.
- Groups whose rewards are all equal get exactly zero advantage, and an update whose minibatch has
  no nonzero advantage is skipped (`update_skipped` in the metrics): its gradient would be the KL
  term alone, rounding noise while the policy equals the reference, which Adam scales to lr-sized
  steps. `zero_variance_groups` says how often groups carry no signal.
"""

import ml_collections as mlc

from configs import common

# Real-model presets fit the launcher's slices per `python -m safe_completion.plan --stage=rl`
# (llama3_8b / qwen2_7b on v5p-8: ~67 GiB of 95; gemma_2b on v6e-8: ~18 GiB of 32).
_PRESETS = {
    # name: (model preset, mesh, prompts/step, samples/prompt, minibatches, max new tokens, steps, lr)
    "tiny": ("tiny", (-1, 1, 1), 8, 4, 1, 48, 30, 3e-3),
    "llama3_8b": ("llama3_8b", (1, -1, 1), 8, 4, 4, 1024, 2000, 1e-6),
    "qwen2_7b": ("qwen2_7b", (1, -1, 1), 8, 4, 4, 1024, 2000, 1e-6),
    "gemma_2b": ("gemma_2b", (1, -1, 1), 4, 4, 2, 1024, 2000, 2e-6),
}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"unknown rl preset {arg!r}; choose one of {sorted(_PRESETS)}")
  model_name, mesh_shape, prompts_per_step, samples, minibatches, max_new_tokens, num_steps, lr = _PRESETS[arg]
  config = mlc.ConfigDict()
  config.stage = "rl"
  config.seed = 0
  config.arm = "safe_completion"
  config.model = mlc.ConfigDict(dict(remat_policy=common.model(model_name).remat_policy))
  config.init = mlc.ConfigDict(dict(sft_workdir=""))
  config.data = mlc.ConfigDict(dict(prompts_path="", split="train", max_prompts=0))
  config.grader = mlc.ConfigDict(dict(
      kind="reward_model", reward_model_dir="", keyword="", saturation=4,
      endpoint=common.endpoint()))
  config.reward = mlc.ConfigDict(dict(combiner="multiplicative", invalid_policy="exclude", truncation_penalty=0.0,
                                      additive_weights=(0.5, 0.5), refusal_safety_threshold=0.5))
  config.rl = mlc.ConfigDict(dict(
      prompts_per_step=prompts_per_step, samples_per_prompt=samples, max_prompt_len=256 if arg == "tiny" else 2048,
      max_new_tokens=max_new_tokens, temperature=1.0, advantage="drgrpo", epochs=1, minibatches=minibatches,
      clip_low=0.2, clip_high=0.2, kl_mode="k3_value_k2_grad", kl_coef=0.02,
      aggregation="seq_mean_token_sum_norm", mask_truncated=False))
  config.num_steps = num_steps
  config.optimizer = common.optimizer(lr, warmup_steps=2 if arg == "tiny" else 20)
  config.optimizer.decay = "constant"
  config.mesh = common.mesh(mesh_shape)
  config.checkpoint = common.checkpointing(every_steps=max(num_steps // 4, 1))
  config.sample_table_every = max(num_steps // 4, 1)
  config.sample_table_rows = 8
  config.wandb = common.wandb()
  return config
