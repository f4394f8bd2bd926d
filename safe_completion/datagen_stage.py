"""The datagen stage: spec-guided teacher samples, judge-filtered, for each training arm.

`python -m safe_completion.main --config=configs/datagen.py:tiny --workdir=DIR` writes
`DIR/<arm>/records-*.jsonl` (the SFT data of that arm), `DIR/<arm>/dropped.jsonl` and
`DIR/<arm>/stats.json`; `DIR/stats.json` gathers both arms. A rerun resumes; with
`--config.retry_dropped=True` it also retries the prompts dropped for transient reasons.
"""

import json
import os

import ml_collections

from safe_completion import datagen
from safe_completion import specs as specs_lib
from safe_completion.backends import base as backends_base
from safe_completion.data import records
from safe_completion.graders import factory


def make_teacher(config: ml_collections.ConfigDict, arm: str) -> datagen.Teacher:
  """The shipped demonstrations (offline default), or a generation backend over HTTP."""
  teacher = config.teacher
  if teacher.kind == "demonstrations":
    demos, _ = records.load_demonstrations(teacher.demonstrations_path or records.DEFAULT_DATA_DIR / "demonstrations",
                                           arms=[arm])
    return datagen.DemonstrationTeacher(demos, arm)
  if teacher.kind == "http":
    from safe_completion.backends import http
    endpoint = teacher.endpoint
    backend = http.HttpBackend(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
                               max_concurrency=endpoint.max_concurrency, cache_path=endpoint.cache_path or None)
    sampling = backends_base.SamplingParams(max_tokens=teacher.max_tokens, temperature=teacher.temperature,
                                            top_p=1.0, seed=config.seed)
    return datagen.BackendTeacher(backend, sampling)
  raise ValueError(f"teacher.kind={teacher.kind!r} is not one of ['demonstrations', 'http']")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) datagen for every arm in `config.arms`; returns the per-arm stats."""
  os.makedirs(workdir, exist_ok=True)
  specs = specs_lib.load_specs(config.spec_dir or None)
  specs_lib.check_complete(specs)
  prompts, report = records.load_prompts(config.data.prompts_path or records.DEFAULT_DATA_DIR / "prompts",
                                         split="train")
  prompts = records.spread_subset(prompts, config.data.max_prompts)
  grader = factory.make_grader(config.judge)
  stats_path = os.path.join(workdir, "stats.json")
  stats = {}
  if os.path.exists(stats_path):  # Arms run one at a time (each with its own judge) add to the file.
    with open(stats_path) as f:
      stats = json.load(f)
  filter_config = datagen.FilterConfig(min_safety=config.filter.min_safety,
                                       min_helpfulness=config.filter.min_helpfulness)
  for arm in config.arms:
    stats[arm] = datagen.generate_arm(prompts, specs, arm, make_teacher(config, arm), grader,
                                      os.path.join(workdir, arm), max_attempts=config.max_attempts,
                                      batch_size=config.batch_size, filter_config=filter_config,
                                      shard_size=config.shard_size, retry_dropped=config.retry_dropped)
    totals = stats[arm]["totals"]
    print(f"datagen {arm}: kept {totals.get('kept', 0)}, dropped {totals.get('dropped', 0)} of {len(prompts)} prompts")
  with open(stats_path, "w") as f:
    json.dump(stats, f, indent=2, sort_keys=True)
  return stats
