r"""The paper's experimental design (the README's main job): refusal arm vs safe-completion arm, one command.

The tiny preset runs that design small, on a CPU: a run of the machinery, not evidence about the method at scale.

Offline tiny default on a 2-core CPU (shipped data, learned reward model as the grader):
  python -m safe_completion.main --config=configs/experiment.py:tiny --workdir=workdir/experiment
Every stage's config is a section here and can be overridden, e.g. --config.rl.num_steps=50,
--config.eval.samples_per_prompt=8. Real models: start SFT from an HF directory with
--config.sft.init.hf_dir=... (set --config.sft.export_architecture for export) and use an LLM judge.
"""

import ml_collections as mlc

from configs import datagen
from configs import eval as eval_config
from configs import reward_model
from configs import rl
from configs import sft


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg != "tiny":
    raise ValueError(f"unknown experiment preset {arg!r}; choose one of ['tiny']")
  config = mlc.ConfigDict()
  config.stage = "experiment"
  config.preset = arg
  config.seed = 0
  config.reward_model_dir = ""  # Empty: train one into <workdir>/reward_model.
  config.reward_model = reward_model.get_config("tiny")
  config.datagen = datagen.get_config("tiny")
  config.sft = sft.get_config("tiny")
  config.rl = rl.get_config("tiny")
  config.eval = eval_config.get_config("tiny")
  config.eval.attacks.names = ("past_tense", "prefill", "base64")
  return config
