"""The eval stage: K completions per eval prompt from a model, graded, turned into metrics and a report.

The model is one of our training workdirs, an HF directory, or any
OpenAI-compatible endpoint (vLLM, SGLang, a hosted API). Graded completions are
cached per prompt (`completions.jsonl`, `attacks.jsonl`), so a killed or
repeated evaluation only generates what is missing.
"""

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
import tqdm

from safe_completion import jsonl
from safe_completion.backends import base as backends_base
from safe_completion.data import benchmarks
from safe_completion.data import records
from safe_completion.evaluation import attacks as attacks_lib
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.evaluation import report as report_lib
from safe_completion.graders import base as graders_base
from safe_completion.graders import factory

REWRITE_INSTRUCTION_MAX_TOKENS = 512


def make_backend(model_config: ml_collections.ConfigDict) -> backends_base.Backend:
  """`checkpoint` (a training workdir), `hf` (an HF directory) or `endpoint` (OpenAI-compatible)."""
  if model_config.kind == "endpoint":
    from safe_completion.backends import http
    endpoint = model_config.endpoint
    return http.HttpBackend(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
                            max_concurrency=endpoint.max_concurrency, cache_path=endpoint.cache_path or None)
  if model_config.kind in ("checkpoint", "hf"):
    from safe_completion import parallel
    from safe_completion.backends import serve
    # With a `mesh` section the params are sharded over it (a model too big for one device); without, one device.
    sharded = "mesh" in model_config
    return serve.load_local_backend(
        model_dir=model_config.path if model_config.kind == "hf" else None,
        checkpoint_dir=model_config.path if model_config.kind == "checkpoint" else None,
        max_prompt_len=model_config.max_prompt_len, batch_size=model_config.batch_size,
        mesh=parallel.mesh_from_config(model_config) if sharded else None,
        rules=parallel.rules_from_config(model_config) if sharded else None)
  raise ValueError(f"model.kind={model_config.kind!r} is not one of ['checkpoint', 'hf', 'endpoint']")


def generate_and_grade(backend: backends_base.Backend, grader: graders_base.Grader,
                       prompts: Sequence[records.PromptRecord], sampling: backends_base.SamplingParams,
                       cache_path: str, batch_size: int, desc: str = "eval",
                       grade_against: Mapping[str, tuple] | None = None) -> list[metrics_lib.GradedCompletion]:
  """`sampling.n` graded completions per prompt; prompts already in the cache are not redone.

  `grade_against` maps a prompt id to the messages its responses are graded against when these
  are not the prompt's own (an attacked prompt is graded against its original request).
  """
  grade_against = grade_against or {}
  cached = collections.defaultdict(list)
  for row in jsonl.read_rows(cache_path):
    completion = metrics_lib.GradedCompletion.from_json(json.dumps(row))
    cached[completion.prompt_id].append(completion)
  done = {pid for pid, rows in cached.items() if len(rows) == sampling.n}
  pending = [p for p in prompts if p.id not in done]
  for start in tqdm.trange(0, len(pending), batch_size, desc=desc, disable=not pending):
    batch = pending[start:start + batch_size]
    outputs = backend.generate([list(p.messages) for p in batch], sampling)
    requests = [graders_base.GradeRequest(prompt=grade_against.get(p.id, p.messages), response=c.text,
                                          category=p.category, prompt_id=p.id)
                for p, choices in zip(batch, outputs) for c in choices]
    grades = iter(graders_base.grade_answers(grader, requests))
    rows = []
    for prompt, choices in zip(batch, outputs):
      graded = [metrics_lib.GradedCompletion(prompt.id, index, prompt.category, prompt.intent, prompt.tags,
                                             choice.text, next(grades), reasoning=choice.reasoning,
                                             finish_reason=choice.finish_reason)
                for index, choice in enumerate(choices)]
      cached[prompt.id] = graded
      rows.extend(json.loads(g.to_json()) for g in graded)
    jsonl.append_rows(cache_path, rows)
  wanted = {p.id for p in prompts}
  return [c for pid in sorted(wanted) for c in cached[pid]]


def llm_rewriter(backend: backends_base.Backend):
  """A `rewrite(text, instruction) -> str` over a backend, for the attacks that need one."""
  def rewrite(text: str, instruction: str) -> str:
    sampling = backends_base.SamplingParams(max_tokens=REWRITE_INSTRUCTION_MAX_TOKENS, temperature=0.0)
    return backend.generate([[{"role": "user", "content": f"{instruction}\n\n{text}"}]], sampling)[0][0].text
  return rewrite


def eval_prompts(config: ml_collections.ConfigDict) -> list[records.PromptRecord]:
  """The eval prompts: ours of `data.split`, or a benchmark file imported as that split."""
  data = config.data
  if data.format == "prompts":
    prompts, _ = records.load_prompts(data.prompts_path or records.DEFAULT_DATA_DIR / "prompts",
                                      split=data.split, categories=data.categories or None)
  else:
    if not data.prompts_path:
      raise ValueError(f"data.format={data.format!r} needs data.prompts_path: your local copy of the benchmark")
    prompts, _ = benchmarks.load_benchmark(data.prompts_path, data.format, split=data.split,
                                           skip_unmapped=data.skip_unmapped, hf_split=data.hf_split)
    prompts = [p for p in prompts if not data.categories or p.category in data.categories]
  return records.spread_subset(prompts, data.max_prompts)


def evaluate_model(config: ml_collections.ConfigDict, workdir: str, backend: backends_base.Backend,
                   grader: graders_base.Grader) -> dict:
  """Completions, metrics and (optionally) attacks of one model into `workdir`; returns the results."""
  os.makedirs(workdir, exist_ok=True)
  prompts = eval_prompts(config)
  sampling = backends_base.SamplingParams(max_tokens=config.sampling.max_tokens,
                                          temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                                          n=config.samples_per_prompt, seed=config.seed)
  completions = generate_and_grade(backend, grader, prompts, sampling, os.path.join(workdir, "completions.jsonl"),
                                   config.batch_size)
  options = dict(safety_threshold=config.safety_threshold, bootstrap_samples=config.bootstrap_samples,
                 seed=config.seed)
  results = {"metrics": metrics_lib.evaluate_completions(completions, **options), "attacks": None,
             "model": backend.model_id}
  if config.attacks.names:
    targets = [p for p in prompts if p.intent in config.attacks.intents]
    rewriter = llm_rewriter(make_backend(config.attacks.rewriter)) if config.attacks.rewriter.kind else None
    attacked = attacks_lib.apply_attacks(targets, list(config.attacks.names), rewriter=rewriter)
    attack_sampling = dataclasses.replace(sampling, n=config.attacks.samples_per_prompt)
    attacked_completions = generate_and_grade(backend, grader, attacked, attack_sampling,
                                              os.path.join(workdir, "attacks.jsonl"), config.batch_size, "attacks",
                                              grade_against=attacks_lib.grading_prompts(attacked, targets))
    by_attack = collections.defaultdict(list)
    for completion in attacked_completions:
      by_attack[completion.prompt_id.split("@", 1)[1]].append(completion)
    results["attacks"] = attacks_lib.attack_report(by_attack, completions, **options)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(report_lib.json_safe(results), f, indent=1)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The eval stage on its own: one model, its report in `workdir/report`."""
  results = evaluate_model(config, workdir, make_backend(config.model), factory.make_grader(config.grader))
  name = config.name or results["model"]
  report_lib.write_report(os.path.join(workdir, "report"), {name: results["metrics"]}, None,
                          {name: results["attacks"]} if results["attacks"] else None,
                          {"model": results["model"], "samples_per_prompt": config.samples_per_prompt,
                           "grader": config.grader.kind})
  print(f"eval report: {os.path.join(workdir, 'report', 'report.md')}")
  return results
