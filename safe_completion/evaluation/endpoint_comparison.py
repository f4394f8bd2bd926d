"""The compare stage: two OpenAI-compatible endpoints, the same eval grader, one report with pairwise tests.

The paper's production comparison (a base instruct model against a trained arm, or two vendors): each
model's K completions per eval prompt (and its attacks) are generated and graded by `evaluate.evaluate_model`
into `workdir/a` and `workdir/b`, then compared prompt by prompt (`compare.compare_evaluations`, b vs a)
and written by `report.write_report` into `workdir/report` (report.md, report.html with the sample
browser, report.json). Resumable: the per-prompt caches of the eval stage make a rerun generate and grade
only what is missing; `identity.json` beside them refuses a rerun with another endpoint, grader or sampling.
"""

import hashlib
import json
import os
import time

import ml_collections

from safe_completion import config_checks
from safe_completion.evaluation import compare
from safe_completion.evaluation import evaluate
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.evaluation import report as report_lib
from safe_completion.graders import factory

SLOTS = ("a", "b")
IDENTITY_FILE = "identity.json"


def model_names(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The two models' report names: `models.<slot>.name`, else the endpoint's model id."""
  return tuple(config.models[s].name or config.models[s].endpoint.model for s in SLOTS)


def _check_grader(grader: ml_collections.ConfigDict, field: str) -> None:
  if grader.kind not in factory.GRADER_KINDS:
    raise ValueError(f"config.{field}.kind={grader.kind!r} is not one of {list(factory.GRADER_KINDS)}")
  if grader.kind == "reward_model":
    if not grader.reward_model_dir:
      raise ValueError(f"config.{field}.reward_model_dir is empty: grader kind 'reward_model' needs the "
                       "directory of a trained reward model (configs/reward_model.py)")
    if not os.path.isdir(grader.reward_model_dir):
      raise ValueError(f"config.{field}.reward_model_dir={grader.reward_model_dir!r} is not a directory")
  if grader.kind in factory.ENDPOINT_KINDS:
    config_checks.check_endpoint(grader.endpoint, f"{field}.endpoint", f"grader kind {grader.kind!r}")
  if grader.kind in factory.SAFETY_KINDS:
    if not grader.helpfulness.kind or grader.helpfulness.kind in factory.SAFETY_KINDS:
      raise ValueError(f"config.{field}.helpfulness.kind={grader.helpfulness.kind!r}: grader kind {grader.kind!r} "
                       "judges safety only; name a grader for mode and helpfulness (e.g. reward_model or llm_judge)")
    _check_grader(grader.helpfulness, f"{field}.helpfulness")


def validate(config: ml_collections.ConfigDict) -> None:
  """Start-up checks, before any request: each error names the config field."""
  for slot in SLOTS:
    config_checks.check_endpoint(config.models[slot].endpoint, f"models.{slot}.endpoint", f"model {slot}")
  a, b = (config.models[s].endpoint for s in SLOTS)
  if (a.base_url.rstrip("/"), a.model) == (b.base_url.rstrip("/"), b.model):
    raise ValueError(f"config.models.b.endpoint is config.models.a.endpoint ({a.model!r} at {a.base_url}): "
                     "a comparison needs two different models")
  names = model_names(config)
  if names[0] == names[1]:
    raise ValueError(f"config.models.b.name: both models are named {names[0]!r} in the report; set "
                     "--config.models.a.name and --config.models.b.name to tell them apart")
  _check_grader(config.eval.grader, "eval.grader")


def _identity(config: ml_collections.ConfigDict, slot: str) -> dict:
  """What a slot's cached completions and grades depend on (data selection only filters them)."""
  endpoint = config.models[slot].endpoint
  grader = json.dumps(config.eval.grader.to_dict(), sort_keys=True, default=str)
  return {"base_url": endpoint.base_url.rstrip("/"), "model": endpoint.model,
          "grader": hashlib.sha256(grader.encode()).hexdigest()[:12],
          "sampling": config.eval.sampling.to_dict(), "samples_per_prompt": config.eval.samples_per_prompt,
          "attack_samples_per_prompt": config.eval.attacks.samples_per_prompt, "seed": config.eval.seed}


def _claim(out_dir: str, identity: dict, slot: str) -> None:
  """Records what `out_dir` caches; a rerun with something else is an error, never a silent mix."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, IDENTITY_FILE)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    changed = sorted(k for k in identity if cached.get(k) != identity[k])
    if changed:
      raise ValueError(f"{path}: this workdir holds model {slot}'s completions made with other {changed} "
                       f"({ {k: cached.get(k) for k in changed} }, now { {k: identity[k] for k in changed} }); "
                       "use a new --workdir")
    return
  with open(path, "w") as f:
    json.dump(identity, f, indent=1)


def _describe_grader(grader: ml_collections.ConfigDict) -> str:
  parts = [f"kind {grader.kind}", f"policy {grader.get('arm', 'safe_completion')}"]
  if grader.kind == "reward_model":
    parts.append(f"directory {grader.reward_model_dir}")
  if grader.kind in factory.ENDPOINT_KINDS:
    parts.append(f"model {grader.endpoint.model} at {grader.endpoint.base_url}")
  if grader.kind in factory.SAFETY_KINDS:
    parts.append(f"helpfulness from ({_describe_grader(grader.helpfulness)})")
  return ", ".join(parts)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates both endpoints (or resumes), compares them and writes `workdir/report`; returns the results."""
  validate(config)
  names = model_names(config)
  grader = factory.make_grader(config.eval.grader)
  prompts = evaluate.eval_prompts(config.eval)
  wanted = {p.id for p in prompts}
  results, completions, times = {}, {}, {}
  for slot, name in zip(SLOTS, names):
    out_dir = os.path.join(workdir, slot)
    _claim(out_dir, _identity(config, slot), slot)
    started = time.perf_counter()
    backend = evaluate.make_backend(ml_collections.ConfigDict(dict(kind="endpoint",
                                                                   endpoint=config.models[slot].endpoint)))
    results[name] = evaluate.evaluate_model(config.eval, out_dir, backend, grader)
    times[f"{slot}: {name}"] = round(time.perf_counter() - started, 1)
    completions[name] = [c for c in metrics_lib.read_completions(os.path.join(out_dir, "completions.jsonl"))
                         if c.prompt_id in wanted]
    print(f"compare: {name} evaluated ({times[f'{slot}: {name}']:.0f}s)")

  comparison = compare.compare_evaluations(completions[names[0]], completions[names[1]], names=names,
                                           bootstrap_samples=config.eval.bootstrap_samples, seed=config.eval.seed)
  attacks = {name: results[name]["attacks"] for name in names if results[name]["attacks"]}
  meta = {"comparison": f"{names[1]} (b) vs {names[0]} (a): two OpenAI-compatible endpoints, one eval grader",
          "models": {name: {"base_url": config.models[slot].endpoint.base_url,
                            "model": config.models[slot].endpoint.model} for slot, name in zip(SLOTS, names)},
          "samples_per_prompt": config.eval.samples_per_prompt,
          "eval_temperature": config.eval.sampling.temperature,
          "graders": {"eval_grader": _describe_grader(config.eval.grader)},
          **({} if config.eval.grader.kind == "reward_model" else {"eval_grader_validation": None}),
          "stage_times": times}
  paths = report_lib.write_report(os.path.join(workdir, "report"), {n: results[n]["metrics"] for n in names},
                                  comparison, attacks or None, meta, completions=completions,
                                  prompts={p.id: p.last_user_message for p in prompts})
  print(f"compare: report at {paths['markdown']}")
  return {"models": {n: results[n]["metrics"] for n in names}, "comparison": comparison, "paths": paths,
          "meta": meta}
