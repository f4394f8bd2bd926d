"""The controlled experiment: a refusal-trained arm against a safe-completion arm, trained the same way.

One workdir, one command. Stages, each skipped when done and resumed when killed:
  reward_model/            the learned grader (judge of datagen, reward of RL, grader of eval)
  datagen/<arm>/           spec-guided SFT records of both arms
  <arm>/sft, <arm>/rl      the same recipe and budget for both arms; the arms differ only in their
                           modes guide (three modes vs comply-or-refuse) and RL reward
                           (r = h x s vs the refusal-baseline objective)
  <arm>/eval               K completions per eval prompt, graded, with attacks
  report/                  per-intent tables, pairwise comparison, attacks, plots
"""

import json
import os
import time

import ml_collections

from safe_completion import datagen_stage
from safe_completion import sft
from safe_completion.evaluation import compare
from safe_completion.evaluation import evaluate
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.evaluation import report as report_lib
from safe_completion.graders import factory
from safe_completion.graders import reward_model
from safe_completion.rl import loop

ARMS = ("refusal", "safe_completion")
# The RL objective of each arm: the paper's r = h x s, and the refusal-training baseline.
ARM_COMBINER = {"safe_completion": "multiplicative", "refusal": "refusal_baseline"}


def _stage(name: str, done: bool, fn, *args):
  """Runs a stage unless its output is complete; prints its wall time."""
  if done:
    print(f"experiment: {name} done, skipping")
    return None
  started = time.perf_counter()
  result = fn(*args)
  print(f"experiment: {name} took {time.perf_counter() - started:.0f}s")
  return result


def _finished_training(workdir: str, num_steps: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(num_steps)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole experiment into `workdir`; returns the report's data."""
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  rm_dir = config.reward_model_dir or os.path.join(workdir, "reward_model")
  _stage("reward_model", os.path.exists(os.path.join(rm_dir, reward_model.REPORT_FILE)),
         reward_model.train, config.reward_model, rm_dir)
  grader_config = ml_collections.ConfigDict(dict(kind="reward_model", reward_model_dir=rm_dir))

  datagen_config = config.datagen
  with datagen_config.unlocked():
    datagen_config.judge.kind, datagen_config.judge.reward_model_dir = "reward_model", rm_dir
  datagen_dir = os.path.join(workdir, "datagen")
  _stage("datagen", os.path.exists(os.path.join(datagen_dir, "stats.json")), datagen_stage.run, datagen_config,
         datagen_dir)

  grader = factory.make_grader(grader_config)
  results = {}
  for arm in ARMS:
    arm_dir = os.path.join(workdir, arm)
    sft_config = config.sft.copy_and_resolve_references()
    with sft_config.unlocked():
      sft_config.data.source, sft_config.data.records_path = "records", os.path.join(datagen_dir, arm)
    _stage(f"{arm}/sft", _finished_training(os.path.join(arm_dir, "sft"), sft_config.num_steps), sft.train,
           sft_config, os.path.join(arm_dir, "sft"))

    rl_config = config.rl.copy_and_resolve_references()
    with rl_config.unlocked():
      rl_config.arm = arm
      rl_config.init.sft_workdir = os.path.join(arm_dir, "sft")
      rl_config.grader = grader_config
      rl_config.reward.combiner = ARM_COMBINER[arm]
    _stage(f"{arm}/rl", _finished_training(os.path.join(arm_dir, "rl"), rl_config.num_steps), loop.train,
           rl_config, os.path.join(arm_dir, "rl"))

    eval_config = config.eval.copy_and_resolve_references()
    with eval_config.unlocked():
      eval_config.name = arm
      eval_config.model.kind, eval_config.model.path = "checkpoint", os.path.join(arm_dir, "rl")
    backend = evaluate.make_backend(eval_config.model)
    eval_started = time.perf_counter()
    results[arm] = evaluate.evaluate_model(eval_config, os.path.join(arm_dir, "eval"), backend, grader)
    print(f"experiment: {arm}/eval took {time.perf_counter() - eval_started:.0f}s")

  completions = {arm: metrics_lib.read_completions(os.path.join(workdir, arm, "eval", "completions.jsonl"))
                 for arm in ARMS}
  comparison = compare.compare_evaluations(completions["refusal"], completions["safe_completion"], names=ARMS,
                                           safety_threshold=config.eval.safety_threshold,
                                           bootstrap_samples=config.eval.bootstrap_samples, seed=config.seed)
  attacks = {arm: results[arm]["attacks"] for arm in ARMS if results[arm]["attacks"]}
  meta = {"preset": config.preset, "samples_per_prompt": config.eval.samples_per_prompt, "grader": "reward_model",
          "sft_steps": config.sft.num_steps, "rl_steps": config.rl.num_steps,
          "wall_time_s": round(time.perf_counter() - started)}
  paths = report_lib.write_report(os.path.join(workdir, "report"), {arm: results[arm]["metrics"] for arm in ARMS},
                                  comparison, attacks or None, meta)
  with open(os.path.join(workdir, "experiment.json"), "w") as f:
    json.dump({"report": {k: str(v) for k, v in paths.items()}, **meta}, f, indent=1)
  print(f"experiment: report at {paths['markdown']}")
  return {"arms": {arm: results[arm]["metrics"] for arm in ARMS}, "comparison": comparison, "paths": paths}
