r"""The paper's experimental design (the README's main job): refusal arm vs safe-completion arm, one command.

The tiny preset runs that design small, on a CPU: a run of the machinery, not evidence about the method at scale.

Offline tiny default on a 2-core CPU (shipped data, learned reward models as graders):
  python -m safe_completion.main --config=configs/experiment.py:tiny --workdir=workdir/experiment
Both arms run the same recipe (prompts, steps, hyperparameters, seeds, reward r = h x s); they differ only in
the policy text their teacher, datagen judge and RL grader read (`specs/modes.md` vs `specs/modes_refusal.md`).

Grader roles are separate sections, each honoured as written (any `grader.kind` the factory knows):
  datagen.judge   filters the teacher's samples, under the arm's policy
  rl.grader       the RL reward grader, under the arm's policy
  eval.grader     grades both arms' eval completions, under the safe-completion policy
A role of kind `reward_model` with an empty `reward_model_dir` names one of `reward_models`, which the
experiment trains per policy it is needed for. By default the eval grader is not the reward grader: it is
trained on the other half of the grader data's prompts, with another seed, so reward hacking of the RL grader
shows up as a gap between the two (the report's reward-vs-eval table). For example, an LLM judge as the eval
grader: --config.eval.grader.kind=llm_judge --config.eval.grader.endpoint.base_url=http://host:8001/v1
--config.eval.grader.endpoint.model=NAME. `--config.seeds=N` trains each arm N times.
"""

import os

import ml_collections as mlc

from configs import datagen
from configs import eval as eval_config
from configs import reward_model
from configs import rl
from configs import sft

# The tiny policy's shape. Both arms start SFT from the shipped base with this shape (data/tiny_base,
# pretrained by scripts/pretrain_tiny_base.py on text that is neither arm's SFT data), as the paper's
# arms start from a pretrained model.
TINY_POLICY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)
TINY_BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny_base")


def learned_grader(name: str) -> mlc.ConfigDict:
  """A grader role that uses the experiment's learned reward model `name` (trained per policy)."""
  config = rl.get_config("tiny").grader.copy_and_resolve_references()
  config.kind = "reward_model"
  config.reward_model = name
  config.arm = "safe_completion"  # The policy an LLM judge reads; the experiment sets it per arm.
  return config


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg != "tiny":
    raise ValueError(f"unknown experiment preset {arg!r}; choose one of ['tiny']")
  config = mlc.ConfigDict()
  config.stage = "experiment"
  config.preset = arg
  config.seed = 0
  config.seeds = 1  # Each arm is trained this many times (seeds seed, seed + 1, ...).
  # Learned graders, trained on disjoint halves of the grader data's prompts with different seeds.
  reward, judge = reward_model.get_config("tiny"), reward_model.get_config("tiny")
  reward.data.half, judge.data.half, judge.seed = 0, 1, 1
  config.reward_models = mlc.ConfigDict({"reward": reward, "eval": judge})

  config.datagen = datagen.get_config("tiny")
  config.datagen.judge = learned_grader("reward")

  config.sft = sft.get_config("tiny")
  config.sft.model.update(TINY_POLICY)  # The shape of a random init; the base's config.json wins.
  config.sft.init.hf_dir = TINY_BASE_DIR
  config.sft.data.seq_len, config.sft.data.pack_dataset, config.sft.batch_size = 768, True, 6
  config.sft.num_steps = 160
  config.sft.optimizer.learning_rate = 3e-3
  config.sft.optimizer.warmup_steps = 20
  config.sft.checkpoint.every_steps = 40
  config.sft.eval_every = 40
  config.sft.log_every = 10

  config.rl = rl.get_config("tiny")
  config.rl.grader = learned_grader("reward")
  config.rl.num_steps = 6
  # A gentler step than the RL stage's tiny default: at 3e-3 the tiny policy's answer rate fell from
  # 0.9 to 0.34 within five steps (it stopped closing its reasoning block) before recovering.
  config.rl.optimizer.learning_rate = 1e-3
  config.rl.checkpoint.every_steps = 3
  config.rl.sample_table_every = 3
  # Room for the demonstrations' reasoning + answer (up to ~370 tokens of the tiny tokenizer).
  config.rl.rl.max_new_tokens = 384
  config.rl.reward.truncation_penalty = 0.25

  config.eval = eval_config.get_config("tiny")
  config.eval.grader = learned_grader("eval")
  config.eval.grader_policy = "safe_completion"  # Both arms are judged by the output-centric policy.
  config.eval.sampling.max_tokens = 384
  config.eval.model.max_prompt_len = 320  # Attacked prompts reach ~300 tokens; 320 + 384 fits the base's 768.
  # Below 1.0 for the eval samples of a tiny model, whose tail at temperature 1 is noise; RL rollouts
  # stay at 1.0 so that sampler and trainer log-probs agree.
  config.eval.sampling.temperature = 0.7
  config.eval.attacks.names = ("past_tense", "prefill", "base64")
  # The SFT checkpoint is evaluated too (one sample per eval prompt, no attacks): does the policy
  # answer in the modes of its SFT data?
  config.sft_eval_samples_per_prompt = 1
  return config
