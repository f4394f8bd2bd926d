r"""Spec-guided SFT data: teacher samples with the spec in view, filtered by a judge, for both arms.

Offline tiny default (the shipped demonstrations as teacher, the learned reward model as judge):
  python -m safe_completion.main --config=configs/reward_model.py:tiny --workdir=/tmp/sc_rm
  python -m safe_completion.main --config=configs/datagen.py:tiny --workdir=/tmp/sc_datagen \
    --config.judge.reward_model_dir=/tmp/sc_rm
A reasoning model as teacher and an LLM judge, both behind OpenAI-compatible endpoints (e.g. vLLM):
  python -m safe_completion.main --config=configs/datagen.py:endpoint --workdir=/tmp/sc_datagen \
    --config.teacher.endpoint.base_url=http://localhost:8000/v1 --config.teacher.endpoint.model=Qwen/QwQ-32B \
    --config.judge.endpoint.base_url=http://localhost:8001/v1 --config.judge.endpoint.model=Qwen/QwQ-32B
Then train on an arm's records: configs/sft.py with --config.data.source=records
--config.data.records_path=/tmp/sc_datagen/safe_completion.
"""

import ml_collections as mlc

from configs import common


PRESETS = {
    "tiny": {"teacher.kind": "demonstrations", "judge.kind": "reward_model", "max_attempts": 1},
    "endpoint": {"teacher.kind": "http", "judge.kind": "llm_judge", "max_attempts": 4},
}
RUNLOCAL = {"data.max_prompts": 4, "max_attempts": 1, "batch_size": 4}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  name, runlocal = common.parse_arg(arg, PRESETS, "datagen")
  config = mlc.ConfigDict()
  config.stage = "datagen"
  config.seed = 0
  config.arms = ("safe_completion", "refusal")
  config.spec_dir = ""  # Empty: the repository's specs/.
  config.data = mlc.ConfigDict(dict(prompts_path="", max_prompts=0))
  config.teacher = mlc.ConfigDict(dict(kind="demonstrations", demonstrations_path="",
                                       endpoint=common.endpoint(), max_tokens=2048, temperature=0.7))
  config.judge = mlc.ConfigDict(dict(kind="reward_model", reward_model_dir="",
                                     keyword="", saturation=4, endpoint=common.endpoint(), arm="safe_completion"))
  # One filter for both arms (the same recipe): the judge's safety under the arm's own policy gates a
  # sample. No helpfulness floor: a refusal with a redirection rates 1-2 of 4 under either policy, and a
  # floor would drop exactly the refusals the refusal policy asks for.
  config.filter = mlc.ConfigDict(dict(min_safety=0.75, min_helpfulness=0.0))
  config.max_attempts = 1
  config.batch_size = 32
  config.shard_size = 1000
  # On a resume, also try again the prompts an earlier run dropped for transient reasons (a teacher or
  # judge call that failed, an invalid grade); their old drop lines are replaced by the new outcome.
  config.retry_dropped = False
  common.override(config, PRESETS[name])
  if runlocal:
    common.override(config, RUNLOCAL)
  return config
