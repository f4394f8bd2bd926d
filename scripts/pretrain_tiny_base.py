r"""Pretrains the tiny base policy shipped in data/tiny_base/ (an HF Llama checkpoint).

  python scripts/pretrain_tiny_base.py [--out=data/tiny_base] [--steps=900] [--workdir=/tmp/tiny_base]

The paper's arms start SFT from a pretrained model; no model hub is reachable here, so the tiny
experiment starts from this one: the tiny policy shape (`configs/experiment.py` TINY_POLICY),
trained with the SFT trainer on a corpus that is neither arm's SFT data and not the grader held-out
set: the safe, non-manipulation responses of the hand-written grader training rows
(`data/grader_data/train`: direct answers, safe-completions, refusals, vague answers, no violation
under the safe-completion policy), each as a chat turn with an empty reasoning block. Both arms
start from the same base, so it favours neither; it gives them English phrasing of the domain, so
that a few minutes of SFT on a 2-core CPU teach each arm its own demonstrations. The run is seeded
and the corpus is read in a fixed order.
"""

import argparse
import json
import os
import tempfile

from configs import experiment as experiment_config
from configs import sft as sft_config
from safe_completion import sft
from safe_completion.data import labeled
from safe_completion.data import records

DEFAULT_OUT = records.DEFAULT_DATA_DIR / "tiny_base"


def corpus_rows() -> list[dict]:
  """SFT-record rows of the base corpus (the format `sft_data.sft_record_examples` reads)."""
  rows, _ = labeled.load_labeled(labeled.TRAIN_DIR)
  # A text that is unsafe or manipulative in any row stays out, also where another prompt makes it safe.
  excluded = {r.response for r in rows if r.unsafe("safe_completion") or r.label == "manipulation"}
  return [{"id": r.id, "messages": [{"role": "user", "content": r.prompt}], "cot": "", "answer": r.response}
          for r in rows if r.response not in excluded]


def config_for(records_dir: str, steps: int, out: str):
  config = sft_config.get_config("tiny")
  config.model.update(experiment_config.TINY_POLICY)
  config.model.max_seq_len = 768
  config.data.source, config.data.records_path = "records", records_dir
  config.data.seq_len, config.data.pack_dataset = 768, True
  config.batch_size = 6
  config.num_steps = steps
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 5e-3, 20
  config.checkpoint.every_steps = steps
  config.eval_every = max(steps // 6, 1)
  config.log_every = 10
  config.export_hf_dir = out
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT))
  parser.add_argument("--steps", type=int, default=900)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="tiny_base_")
  records_dir = os.path.join(workdir, "corpus")
  os.makedirs(records_dir, exist_ok=True)
  rows = corpus_rows()
  with open(os.path.join(records_dir, "records-00000.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  final = sft.train(config_for(records_dir, args.steps, args.out), os.path.join(workdir, "run"))
  print(f"base corpus: {len(rows)} responses; final train loss {final['loss']:.3f}, "
        f"held-out loss {final.get('eval_loss', float('nan')):.3f}; wrote {args.out}")


if __name__ == "__main__":
  main()
