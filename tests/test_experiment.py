"""The controlled experiment end to end on a micro config: every artefact exists and parses; a rerun skips."""

import json
import os

import pytest

from configs import experiment as experiment_config
from safe_completion import experiment
from safe_completion.evaluation import metrics as metrics_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def micro_experiment_config(reward_model_dir):
  config = experiment_config.get_config("tiny")
  config.reward_model_dir = reward_model_dir
  config.datagen.data.max_prompts = 24
  config.sft.num_steps, config.sft.batch_size, config.sft.eval_every = 4, 8, 4
  config.sft.checkpoint.async_save = False
  config.rl.num_steps, config.rl.rl.prompts_per_step, config.rl.rl.samples_per_prompt = 2, 4, 2
  config.rl.rl.max_new_tokens = 12
  config.rl.data.max_prompts = 24
  config.rl.checkpoint.async_save = False
  config.eval.data.max_prompts = 12
  config.eval.samples_per_prompt = 2
  config.eval.sampling.max_tokens = 12
  config.eval.bootstrap_samples = 50
  config.eval.attacks.names = ("base64",)
  return config


@pytest.fixture(scope="module")
def finished_experiment(tiny_reward_model_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("experiment")
  result = experiment.run(micro_experiment_config(tiny_reward_model_dir), str(workdir))
  return workdir, result


def test_every_artefact_exists_and_parses(finished_experiment):
  workdir, result = finished_experiment
  stats = json.loads((workdir / "datagen" / "stats.json").read_text())
  assert set(stats) == {"refusal", "safe_completion"}
  for arm in ("refusal", "safe_completion"):
    records = [json.loads(line) for line in (workdir / "datagen" / arm / "records-00000.jsonl").open()]
    assert records and all(r["arm"] == arm and "[REDACTED" not in r["answer"] for r in records)
    assert os.path.isdir(workdir / arm / "sft" / "checkpoints" / "4")
    assert os.path.isdir(workdir / arm / "rl" / "checkpoints" / "2")
    completions = metrics_lib.read_completions(str(workdir / arm / "eval" / "completions.jsonl"))
    assert len(completions) == 12 * 2
    assert result["arms"][arm]["overall"]["n_completions"] == 24
  report = json.loads((workdir / "report" / "report.json").read_text())
  assert set(report["arms"]) == {"refusal", "safe_completion"} and report["comparison"] is not None
  assert "base64" in report["attacks"]["safe_completion"]
  markdown = (workdir / "report" / "report.md").read_text()
  assert "refusal" in markdown and "safe_completion" in markdown and "## Attacks: refusal" in markdown
  for png in ("safety_vs_helpfulness.png", "severity.png"):
    assert (workdir / "report" / png).read_bytes()[:8] == PNG_MAGIC


def test_rerun_skips_finished_stages_and_reuses_cached_completions(finished_experiment, tiny_reward_model_dir,
                                                                   capsys):
  workdir, result = finished_experiment
  before = (workdir / "refusal" / "eval" / "completions.jsonl").read_text()
  rerun = experiment.run(micro_experiment_config(tiny_reward_model_dir), str(workdir))
  out = capsys.readouterr().out
  for stage in ("reward_model", "datagen", "refusal/sft", "refusal/rl", "safe_completion/sft", "safe_completion/rl"):
    assert f"experiment: {stage} done, skipping" in out
  assert (workdir / "refusal" / "eval" / "completions.jsonl").read_text() == before
  assert rerun["arms"]["refusal"]["overall"] == result["arms"]["refusal"]["overall"]
