"""Samples/s and the sample / grade / update time split of RL iterations, tiny and d=512 configs.

  python benchmarks/rl_step.py [--steps=4] [--grader=keyword|reward_model --reward_model_dir=DIR]

Each config first gets a 1-step SFT workdir (random init), then runs `--steps` RL
iterations through the real loop (`safe_completion.rl.loop.train`); the first
iteration holds the compilation and is reported separately. Prints the median
per-iteration time split and rollout samples per second.
"""

import argparse
import json
import os
import statistics
import tempfile

import jax

from configs import common
from configs import rl as rl_config
from configs import sft as sft_config
from safe_completion import metrics
from safe_completion import sft
from safe_completion.rl import loop

SIZES = {
    "tiny": dict(model="tiny", prompts=8, samples=4, max_new_tokens=48),
    "d512": dict(model="small", prompts=4, samples=4, max_new_tokens=64),
}


def run(size: str, steps: int, grader: str, reward_model_dir: str, workdir: str) -> dict:
  spec = SIZES[size]
  sft_cfg = sft_config.get_config("tiny")
  sft_cfg.model = common.model(spec["model"])
  sft_cfg.num_steps, sft_cfg.batch_size, sft_cfg.data.max_examples = 1, 8, 16
  sft_cfg.checkpoint.async_save = False
  sft.train(sft_cfg, os.path.join(workdir, "sft"))

  config = rl_config.get_config("tiny")
  config.init.sft_workdir = os.path.join(workdir, "sft")
  config.num_steps = steps
  config.rl.prompts_per_step, config.rl.samples_per_prompt = spec["prompts"], spec["samples"]
  config.rl.max_new_tokens = spec["max_new_tokens"]
  config.grader.kind = grader
  config.grader.keyword, config.grader.reward_model_dir = "the", reward_model_dir
  config.checkpoint.every_steps = steps
  loop.train(config, os.path.join(workdir, "rl"))
  rows = metrics.read_metrics(os.path.join(workdir, "rl", "metrics.jsonl"))
  steady = rows[1:] or rows
  split = {part: statistics.median(r[f"time/{part}"] for r in steady) for part in ("sample", "grade", "update")}
  total = sum(split.values())
  samples = spec["prompts"] * spec["samples"]
  return {"size": size, "rollouts_per_step": samples, "first_step_s": sum(rows[0][f"time/{p}"] for p in split),
          **{f"{p}_s": round(v, 3) for p, v in split.items()},
          **{f"{p}_fraction": round(v / total, 3) for p, v in split.items()},
          "samples_per_s": round(samples / total, 2), "tokens_per_s": round(samples * steady[-1]["response_length"] / total, 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--grader", default="keyword", choices=("keyword", "reward_model"))
  parser.add_argument("--reward_model_dir", default="")
  parser.add_argument("--sizes", default="tiny,d512")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  for size in args.sizes.split(","):
    with tempfile.TemporaryDirectory() as workdir:
      result = run(size, args.steps, args.grader, args.reward_model_dir, workdir)
    print(json.dumps(result))
    print(f"rl_step[{size}]: {result['samples_per_s']} samples/s; split sample {result['sample_fraction']:.0%} / "
          f"grade {result['grade_fraction']:.0%} / update {result['update_fraction']:.0%} "
          f"(first step with compilation {result['first_step_s']:.1f}s)")


if __name__ == "__main__":
  main()
