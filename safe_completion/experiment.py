"""The paper's experimental design: a refusal-trained arm against a safe-completion arm, trained the same way.

One workdir, one command. Stages, each skipped when done and resumed when killed:
  reward_models/<name>-<policy>/  learned graders the roles ask for (`configs/experiment.py`)
  datagen/<arm>/                  spec-guided SFT records, filtered by the datagen judge under the arm's policy
  <arm>/seed_<i>/sft, .../rl      the same recipe and budget for both arms and every seed; r = h x s from
                                  the RL grader under the arm's policy
  <arm>/seed_<i>/sft_eval         the SFT checkpoint on the eval prompts (did the policy learn its data?)
  <arm>/seed_<i>/eval             K completions per eval prompt graded by the eval grader, with attacks;
                                  reward_grader.jsonl: the same completions graded by the RL grader
  report/                         report.md, report.html (sample browser), report.json, plots
  <arm>/seed_<i>/export           with `export_hf`: the RL model as an HF directory (transformers, vLLM)

The arms differ only in their policy text (`specs/modes.md` vs `specs/modes_refusal.md`), read by the
teacher, the datagen judge and the RL grader. No gold intent label reaches a grader or a reward: intent
is an evaluation label only.
"""

import collections
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from safe_completion import checkpoint
from safe_completion import datagen_stage
from safe_completion import jsonl
from safe_completion import metrics as metric_writer
from safe_completion import parallel
from safe_completion import reward_training
from safe_completion import sft
from safe_completion import taxonomy
from safe_completion import training
from safe_completion.data import records
from safe_completion.evaluation import compare
from safe_completion.evaluation import evaluate
from safe_completion.evaluation import fluency
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.evaluation import report as report_lib
from safe_completion.graders import base as graders_base
from safe_completion.graders import factory
from safe_completion.graders import reward_model
from safe_completion.models import transformer
from safe_completion.rl import loop

ARMS = ("refusal", "safe_completion")
ROLES = ("datagen_judge", "rl_grader", "eval_grader")


class _Timer:
  """Runs stages unless done; records each stage's wall time."""

  def __init__(self):
    self.times: dict[str, float] = {}

  def stage(self, name: str, done: bool, fn: Callable, *args) -> Any:
    if done:
      print(f"experiment: {name} done, skipping")
      return None
    started = time.perf_counter()
    result = fn(*args)
    self.times[name] = round(time.perf_counter() - started, 1)
    print(f"experiment: {name} took {self.times[name]:.0f}s")
    return result


def _finished_training(workdir: str, num_steps: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(num_steps)))


def role_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  return {"datagen_judge": config.datagen.judge, "rl_grader": config.rl.grader, "eval_grader": config.eval.grader}


def role_policy(role: str, arm: str, config: ml_collections.ConfigDict) -> str:
  """The policy a role judges against: the arm's own for datagen and RL, the eval policy for eval."""
  return config.eval.grader_policy if role == "eval_grader" else arm


def _learned(grader_config: ml_collections.ConfigDict) -> bool:
  return grader_config.kind == "reward_model" and not grader_config.reward_model_dir


def reward_model_dir(workdir: str, name: str, policy: str) -> str:
  return os.path.join(workdir, "reward_models", f"{name}-{policy}")


def resolve_grader(grader_config: ml_collections.ConfigDict, policy: str, workdir: str) -> ml_collections.ConfigDict:
  """One role's grader config for one policy: a learned grader gets its trained directory; a judge that
  reads a modes guide reads the policy's."""
  resolved = grader_config.copy_and_resolve_references()
  with resolved.unlocked():
    if _learned(resolved):
      resolved.reward_model_dir = reward_model_dir(workdir, resolved.reward_model, policy)
    if "arm" in resolved:
      resolved.arm = policy
  return resolved


def describe_grader(grader_config: ml_collections.ConfigDict, policy: str,
                    config: ml_collections.ConfigDict) -> str:
  """What graded, in words, for the report."""
  if _learned(grader_config):
    name = grader_config.get("reward_model", "")
    model = config.reward_models[name] if name in config.reward_models else None
    detail = (f" (learned, frozen MiniLM + heads; data half {model.data.half}, seed {model.seed})"
              if model is not None else "")
    return f"reward_model '{name}'{detail} under the {policy} policy"
  if grader_config.kind == "reward_model":
    return f"reward_model at {grader_config.reward_model_dir} under the {policy} policy"
  if grader_config.kind == "llm_judge":
    return f"llm_judge {grader_config.endpoint.model}@{grader_config.endpoint.base_url} under the {policy} policy"
  return f"{grader_config.kind} grader under the {policy} policy"


def graders_shared(config: ml_collections.ConfigDict) -> bool:
  """Whether the eval grader is the RL reward grader (of the arm whose policy it grades): then reward
  hacking of that grader is invisible in the eval numbers."""
  rl_grader, eval_grader = config.rl.grader.to_dict(), config.eval.grader.to_dict()
  for grader in (rl_grader, eval_grader):
    grader.pop("arm", None)
  return rl_grader == eval_grader


def _config_hash(grader_config: ml_collections.ConfigDict) -> str:
  """Names caches of one grader's verdicts, so a changed grader never reuses another's."""
  return hashlib.sha256(json.dumps(grader_config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train_reward_models(config: ml_collections.ConfigDict, workdir: str, timer: _Timer) -> None:
  needed = sorted({(role.reward_model, role_policy(name, arm, config))
                   for name, role in role_configs(config).items() if _learned(role) for arm in ARMS})
  for name, policy in needed:
    if name not in config.reward_models:
      raise ValueError(f"a grader role names reward_model {name!r}, which is not one of "
                       f"{sorted(config.reward_models)} (config.reward_models)")
    model_config = config.reward_models[name].copy_and_resolve_references()
    with model_config.unlocked():
      model_config.policy = policy
    model_dir = reward_model_dir(workdir, name, policy)
    timer.stage(f"reward_model/{name}-{policy}", os.path.exists(os.path.join(model_dir, reward_model.REPORT_FILE)),
                reward_training.train, model_config, model_dir)


def _grader_validation(grader_config: ml_collections.ConfigDict) -> dict | None:
  """The independent held-out figures of a learned grader, from its training report."""
  if grader_config.kind != "reward_model":
    return None
  path = os.path.join(grader_config.reward_model_dir, reward_model.REPORT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  figures = report.get("independent")
  if not figures:
    return None
  keep = ("rows", "unsafe_auc", "unsafe_kappa", "mean_s_moderate_high", "mode_accuracy", "helpfulness_spearman")
  out = {k: figures[k] for k in keep if k in figures}
  out["reward_ordering"] = figures.get("reward_ordering", {}).get("fraction")
  out["injection_max_increase"] = figures.get("injection", {}).get("max_increase")
  return out


def _record_modes(path: str, prompts: dict[str, records.PromptRecord], grader: graders_base.Grader,
                  cache_path: str) -> dict[str, dict[str, float]]:
  """Per intent, the mode distribution of an arm's SFT records' answers as the eval grader sees them."""
  rows = [row for name in sorted(os.listdir(path)) if name.startswith("records-")
          for row in jsonl.read_rows(os.path.join(path, name))]
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      modes = json.load(f)
  else:
    requests = [graders_base.GradeRequest(prompt=prompts[r["id"]].messages, response=r["answer"],
                                          category=r["category"], prompt_id=r["id"]) for r in rows]
    modes = [g.mode if g.valid else None for g in grader.grade(requests)]
    with open(cache_path, "w") as f:
      json.dump(modes, f)
  by_intent = collections.defaultdict(list)
  for row, mode in zip(rows, modes):
    if mode is not None:
      by_intent[row["intent"]].append(mode)
  return {intent: _distribution(values) for intent, values in sorted(by_intent.items())}


def _distribution(modes: Sequence[str]) -> dict[str, float]:
  counts = collections.Counter(modes)
  return {mode: counts[mode] / max(len(modes), 1) for mode in taxonomy.MODES}


def _completion_modes(completions: Sequence[metrics_lib.GradedCompletion]) -> dict[str, dict[str, float]]:
  by_intent = collections.defaultdict(list)
  for c in completions:
    if c.grade.valid:
      by_intent[c.intent].append(c.grade.mode)
  return {intent: _distribution(values) for intent, values in sorted(by_intent.items())}


def _grade_summary(grades: Sequence[graders_base.Grade]) -> dict[str, float]:
  """Violation-free fraction, mean h and mean r = h x s of valid grades; the invalid fraction."""
  valid = [g for g in grades if g.valid]
  if not valid:
    return {"safe": float("nan"), "helpfulness": float("nan"), "reward": float("nan"), "invalid": 1.0}
  return {"safe": float(np.mean([g.severity == "none" for g in valid])),
          "helpfulness": float(np.mean([g.helpfulness for g in valid])),
          "reward": float(np.mean([g.helpfulness * g.safety for g in valid])),
          "invalid": 1 - len(valid) / len(grades)}


def _regrade(completions: Sequence[metrics_lib.GradedCompletion], prompts: dict[str, records.PromptRecord],
             grader: graders_base.Grader, cache_path: str) -> list[graders_base.Grade]:
  """The completions graded again by another grader (cached as one JSON grade per line)."""
  if os.path.exists(cache_path):
    return [graders_base.Grade(**row) for row in jsonl.read_rows(cache_path)]
  requests = [graders_base.GradeRequest(prompt=prompts[c.prompt_id].messages, response=c.response,
                                        category=c.category, prompt_id=c.prompt_id) for c in completions]
  grades = graders_base.grade_answers(grader, requests)
  jsonl.append_rows(cache_path, [dict(g.__dict__) for g in grades])
  return grades


def _sft_losses(sft_dir: str) -> dict[str, float]:
  rows = metric_writer.read_metrics(os.path.join(sft_dir, "metrics.jsonl"))
  train = [r["loss"] for r in rows if "loss" in r]
  heldout = [r["eval_loss"] for r in rows if "eval_loss" in r]
  return {"train_loss": float(np.mean(train[-5:])) if train else float("nan"),
          "heldout_loss": heldout[-1] if heldout else float("nan")}


def _rl_answer_rate(rl_dir: str) -> float:
  rows = metric_writer.read_metrics(os.path.join(rl_dir, "metrics.jsonl"))
  rates = [r["answer_rate"] for r in rows if "answer_rate" in r]
  return float(np.mean(rates)) if rates else float("nan")


def _samples(completions: Sequence[metrics_lib.GradedCompletion], prompts: dict[str, records.PromptRecord],
             per_intent: int = 3) -> list[dict]:
  """The first completion of the first `per_intent` prompts of each intent (in prompt-id order)."""
  out = []
  for intent in taxonomy.INTENTS:
    picked = [c for c in completions if c.intent == intent and c.sample_index == 0][:per_intent]
    out += [{"intent": intent, "prompt": prompts[c.prompt_id].last_user_message, "completion": c.response,
             "reasoning": c.reasoning} for c in picked]
  return out


def _evaluate(eval_config: ml_collections.ConfigDict, checkpoint_dir: str, out_dir: str,
              grader: graders_base.Grader) -> dict:
  eval_config = eval_config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.model.kind, eval_config.model.path = "checkpoint", checkpoint_dir
  return evaluate.evaluate_model(eval_config, out_dir, evaluate.make_backend(eval_config.model), grader)


def export_model(rl_config: ml_collections.ConfigDict, rl_dir: str, out_dir: str, architecture: str,
                 dtype: str = "") -> None:
  """The latest checkpoint of `rl_dir` as an HF directory of `architecture`, in the params' dtype or `dtype`.

  Restored onto the RL stage's mesh; written beside `out_dir` and renamed when complete, so an export
  killed halfway is redone, never mistaken for a finished one.
  """
  from safe_completion.models import convert
  mesh = parallel.mesh_from_config(rl_config)
  model_config = checkpoint.read_model_config(rl_dir)
  shardings = training.param_shardings(model_config, mesh, parallel.rules_from_config(rl_config))
  params, model_config, tokenizer = checkpoint.load_model(rl_dir, shardings)
  host_params = parallel.to_host(params)  # A collective: every process takes part.
  if jax.process_index() == 0:
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    convert.export_hf(host_params, model_config, partial, architecture=architecture, tokenizer=tokenizer,
                      dtype=dtype)
    os.replace(partial, out_dir)


def _train_arm_seed(config: ml_collections.ConfigDict, workdir: str, arm: str, seed_index: int,
                    graders: dict, timer: _Timer) -> str:
  """SFT, SFT-checkpoint eval, RL and eval of one arm and seed; returns its directory."""
  run_dir = os.path.join(workdir, arm, f"seed_{seed_index}")
  seed = config.seed + seed_index
  sft_config = config.sft.copy_and_resolve_references()
  with sft_config.unlocked():
    sft_config.seed = seed
    sft_config.data.source, sft_config.data.records_path = "records", os.path.join(workdir, "datagen", arm)
  sft_dir = os.path.join(run_dir, "sft")
  timer.stage(f"{arm}/seed_{seed_index}/sft", _finished_training(sft_dir, sft_config.num_steps), sft.train,
              sft_config, sft_dir)

  sft_eval = config.eval.copy_and_resolve_references()
  with sft_eval.unlocked():
    sft_eval.seed, sft_eval.samples_per_prompt, sft_eval.attacks.names = seed, config.sft_eval_samples_per_prompt, ()
  # Eval stages always run: their per-prompt caches make a rerun generate and grade nothing new.
  timer.stage(f"{arm}/seed_{seed_index}/sft_eval", False, _evaluate, sft_eval, sft_dir,
              os.path.join(run_dir, "sft_eval"), graders["eval"])

  rl_config = config.rl.copy_and_resolve_references()
  with rl_config.unlocked():
    rl_config.seed = seed
    rl_config.init.sft_workdir = sft_dir
    rl_config.grader = resolve_grader(config.rl.grader, arm, workdir)
  rl_dir = os.path.join(run_dir, "rl")
  timer.stage(f"{arm}/seed_{seed_index}/rl", _finished_training(rl_dir, rl_config.num_steps), loop.train,
              rl_config, rl_dir)

  eval_config = config.eval.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.seed, eval_config.name = seed, arm
  results = timer.stage(f"{arm}/seed_{seed_index}/eval", False, _evaluate, eval_config, rl_dir,
                        os.path.join(run_dir, "eval"), graders["eval"])
  if config.get("export_hf"):
    export_dir = os.path.join(run_dir, "export")
    timer.stage(f"{arm}/seed_{seed_index}/export", os.path.isdir(export_dir), export_model, rl_config, rl_dir,
                export_dir, config.sft.export_architecture, config.sft.export_dtype)
  return run_dir, results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole experiment into `workdir`; returns the report's data."""
  if config.seeds < 1:
    raise ValueError(f"seeds: {config.seeds} must be >= 1")
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  timer = _Timer()
  _train_reward_models(config, workdir, timer)

  for arm in ARMS:
    datagen_config = config.datagen.copy_and_resolve_references()
    with datagen_config.unlocked():
      datagen_config.arms = (arm,)
      if "teacher" in config:  # Real presets: the experiment's one teacher section.
        datagen_config.teacher = config.teacher
      datagen_config.judge = resolve_grader(config.datagen.judge, arm, workdir)
    timer.stage(f"datagen/{arm}", os.path.exists(os.path.join(workdir, "datagen", arm, "stats.json")),
                datagen_stage.run, datagen_config, os.path.join(workdir, "datagen"))

  eval_grader_config = resolve_grader(config.eval.grader, config.eval.grader_policy, workdir)
  graders = {"eval": factory.make_grader(eval_grader_config)}
  own_prompts = config.eval.data.format == "prompts" and config.eval.data.prompts_path
  all_prompts, _ = records.load_prompts(own_prompts or records.DEFAULT_DATA_DIR / "prompts")
  prompts = {p.id: p for p in [*all_prompts, *evaluate.eval_prompts(config.eval)]}  # Benchmark ids differ from ours.
  runs = {arm: [_train_arm_seed(config, workdir, arm, i, graders, timer) for i in range(config.seeds)]
          for arm in ARMS}
  run_dirs = {arm: [run_dir for run_dir, _ in runs[arm]] for arm in ARMS}
  results = {arm: [result for _, result in runs[arm]] for arm in ARMS}

  # What the report needs beyond the eval metrics: learning checks, grader gap, samples.
  read = lambda *parts: metrics_lib.read_completions(os.path.join(*parts, "completions.jsonl"))
  completions = {arm: read(run_dirs[arm][0], "eval") for arm in ARMS}
  reference = [d.answer + " " + d.cot for d in records.load_demonstrations(records.DEFAULT_DATA_DIR / "demonstrations")[0]]
  reference += [p.last_user_message for p in all_prompts if p.split == "train"]
  known_words, known_pairs = fluency.reference_sets(reference)
  meta_by_arm = collections.defaultdict(dict)
  for arm in ARMS:
    run_dir = run_dirs[arm][0]
    sft_completions = read(run_dir, "sft_eval")
    meta_by_arm["sft"][arm] = _sft_losses(os.path.join(run_dir, "sft"))
    meta_by_arm["fluency"][arm] = {
        "name": "seen word-pair rate",
        "definition": ("fraction of adjacent word pairs in the eval answers that also occur in the SFT "
                       "demonstrations or train prompts (token soup scores near 0; readable text high)"),
        "value": fluency.seen_bigram_rate([c.response for c in completions[arm]], known_pairs),
        "sft_checkpoint": fluency.seen_bigram_rate([c.response for c in sft_completions], known_pairs),
        "known_word_rate": fluency.known_word_rate([c.response for c in completions[arm]], known_words)}
    meta_by_arm["mode_match"][arm] = {
        intent: {"sft_records": records_modes, "eval": _completion_modes(sft_completions).get(intent, {})}
        for intent, records_modes in _record_modes(
            os.path.join(workdir, "datagen", arm), prompts, graders["eval"],
            os.path.join(workdir, "datagen", arm, f"modes-{_config_hash(eval_grader_config)}.json")).items()}
    meta_by_arm["completion_rate"][arm] = {
        "rl_rollouts": _rl_answer_rate(os.path.join(run_dir, "rl")),
        "eval": float(np.mean([c.reached_answer for c in completions[arm]])),
        "sft_checkpoint": float(np.mean([c.reached_answer for c in sft_completions]))}
    rl_grader_config = resolve_grader(config.rl.grader, arm, workdir)
    regraded = _regrade(completions[arm], prompts, factory.make_grader(rl_grader_config),
                        os.path.join(run_dir, "eval", f"reward_grader-{_config_hash(rl_grader_config)}.jsonl"))
    meta_by_arm["reward_vs_eval"][arm] = {"rl_grader": _grade_summary(regraded),
                                          "eval_grader": _grade_summary([c.grade for c in completions[arm]])}
    meta_by_arm["samples"][arm] = _samples(completions[arm], prompts)

  comparison = compare.compare_evaluations(completions["refusal"], completions["safe_completion"], names=ARMS,
                                           safety_threshold=config.eval.safety_threshold,
                                           bootstrap_samples=config.eval.bootstrap_samples, seed=config.seed)
  attacks = {arm: results[arm][0]["attacks"] for arm in ARMS if results[arm][0]["attacks"]}
  sft_model = config.sft.model
  shapes = jax.eval_shape(lambda rng: transformer.init_params(sft.model_config_from(config.sft), rng),
                          jax.random.key(0))
  meta = {"preset": config.preset, "tiny": config.preset == "tiny", "seeds": config.seeds,
          "samples_per_prompt": config.eval.samples_per_prompt, "eval_temperature": config.eval.sampling.temperature,
          "sft_steps": config.sft.num_steps, "rl_steps": config.rl.num_steps,
          "model": {"params": transformer.num_params(shapes), "num_layers": sft_model.num_layers, "hidden_size": sft_model.hidden_size},
          "graders": {"datagen_judge": "; ".join(describe_grader(config.datagen.judge, arm, config) for arm in ARMS),
                      "rl_grader": "; ".join(describe_grader(config.rl.grader, arm, config) for arm in ARMS),
                      "eval_grader": describe_grader(config.eval.grader, config.eval.grader_policy, config)},
          "graders_shared": graders_shared(config),
          "eval_grader_validation": _grader_validation(eval_grader_config),
          "rl_grader_validation": {arm: _grader_validation(resolve_grader(config.rl.grader, arm, workdir))
                                   for arm in ARMS},
          **meta_by_arm, "stage_times": timer.times, "wall_time_s": round(time.perf_counter() - started)}
  seed_metrics = {arm: [r["metrics"] for r in results[arm]] for arm in ARMS} if config.seeds > 1 else None
  paths = report_lib.write_report(os.path.join(workdir, "report"), {arm: results[arm][0]["metrics"] for arm in ARMS},
                                  comparison, attacks or None, meta, completions=completions,
                                  prompts={pid: p.last_user_message for pid, p in prompts.items()},
                                  seed_metrics=seed_metrics)
  with open(os.path.join(workdir, "experiment.json"), "w") as f:
    json.dump(report_lib.json_safe({"report": {k: str(v) for k, v in paths.items()}, **meta}), f, indent=1)
  print(f"experiment: report at {paths['markdown']}")
  return {"arms": {arm: results[arm][0]["metrics"] for arm in ARMS}, "comparison": comparison, "paths": paths,
          "meta": meta}
