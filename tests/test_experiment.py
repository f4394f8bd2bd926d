"""The experiment end to end on a micro config: graders in separate roles, two seeds, every artefact; a rerun skips."""

import dataclasses
import json
import os

import pytest

from configs import experiment as experiment_config
from safe_completion import datagen
from safe_completion import experiment
from safe_completion import metrics as metric_writer
from safe_completion import specs as specs_lib
from safe_completion.data import records
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.graders import rule_based
from safe_completion.rl import loop
from tests.test_rl import micro_rl_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARMS = ("refusal", "safe_completion")


def micro_experiment_config(reward_model_dir):
  config = experiment_config.get_config("tiny")
  config.seeds = 2
  for role in (config.datagen.judge, config.rl.grader):  # A trained reward model for both arms' roles.
    role.reward_model_dir = reward_model_dir
  # A different grader kind for eval: the role is honoured as written, apart from the RL grader.
  config.eval.grader.kind, config.eval.grader.keyword = "keyword", "help"
  config.datagen.data.max_prompts = 24
  config.sft.init.hf_dir = ""  # A random micro policy (the shipped base is tested in test_tiny_base.py).
  config.sft.model.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  config.sft.num_steps, config.sft.batch_size, config.sft.eval_every = 4, 8, 4
  config.sft.checkpoint.every_steps, config.sft.checkpoint.async_save = 4, False
  config.rl.num_steps, config.rl.rl.prompts_per_step, config.rl.rl.samples_per_prompt = 2, 4, 2
  config.rl.rl.max_new_tokens = 12
  config.rl.data.max_prompts = 24
  config.rl.checkpoint.every_steps, config.rl.checkpoint.async_save = 1, False
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
  assert set(stats) == set(ARMS)
  for arm in ARMS:
    rows = [json.loads(line) for line in (workdir / "datagen" / arm / "records-00000.jsonl").open()]
    assert rows and all(r["arm"] == arm for r in rows)
    for seed in (0, 1):
      run_dir = workdir / arm / f"seed_{seed}"
      assert os.path.isdir(run_dir / "sft" / "checkpoints" / "4") and os.path.isdir(run_dir / "rl" / "checkpoints" / "2")
      completions = metrics_lib.read_completions(str(run_dir / "eval" / "completions.jsonl"))
      assert len(completions) == 12 * 2 and {c.finish_reason for c in completions} <= {"stop", "length"}
      assert len(metrics_lib.read_completions(str(run_dir / "sft_eval" / "completions.jsonl"))) == 12
    assert result["arms"][arm]["overall"]["n_completions"] == 24
  report = json.loads((workdir / "report" / "report.json").read_text())
  assert set(report["arms"]) == set(ARMS) and report["comparison"] is not None
  assert len(report["seed_metrics"]["refusal"]) == 2
  markdown = (workdir / "report" / "report.md").read_text()
  assert "## Attacks: refusal" in markdown and "small-scale" in markdown
  assert (workdir / "report" / "report.html").read_text().count("<") > 100
  for png in ("safety_vs_helpfulness.png", "severity.png"):
    assert (workdir / "report" / png).read_bytes()[:8] == PNG_MAGIC
  meta = result["meta"]
  assert set(meta["stage_times"]) >= {"datagen/refusal", "refusal/seed_1/rl", "safe_completion/seed_0/eval"}
  for arm in ARMS:
    assert set(meta["mode_match"][arm]) <= {"benign", "dual_use", "malicious"} and meta["mode_match"][arm]
    assert 0.0 <= meta["completion_rate"][arm]["eval"] <= 1.0
    assert len(meta["samples"][arm]) == 9


def test_each_grader_role_is_honoured_and_reported(finished_experiment):
  workdir, result = finished_experiment
  meta = result["meta"]
  assert meta["graders"]["eval_grader"].startswith("keyword")
  assert meta["graders"]["rl_grader"].startswith("reward_model") and not meta["graders_shared"]
  for arm in ARMS:
    eval_grades = metrics_lib.read_completions(str(workdir / arm / "seed_0" / "eval" / "completions.jsonl"))
    assert {c.grade.grader for c in eval_grades} == {"keyword"}
    [regraded_path] = (workdir / arm / "seed_0" / "eval").glob("reward_grader-*.jsonl")
    regraded = [json.loads(line) for line in regraded_path.open()]
    assert len(regraded) == len(eval_grades) and {g["grader"] for g in regraded} == {"reward_model"}
    assert set(meta["reward_vs_eval"][arm]) == {"rl_grader", "eval_grader"}
    rows = [json.loads(line) for line in (workdir / "datagen" / arm / "records-00000.jsonl").open()]
    assert {r["grade"]["grader"] for r in rows} == {"reward_model"}
    rl_config = json.loads((workdir / arm / "seed_0" / "rl" / "config.json").read_text())
    assert rl_config["grader"]["kind"] == "reward_model"


def test_overriding_one_role_changes_only_that_role(tmp_path):
  config = experiment_config.get_config("tiny")
  config.eval.grader.kind = "llm_judge"
  assert config.rl.grader.kind == config.datagen.judge.kind == "reward_model"
  workdir = str(tmp_path)
  for arm in ARMS:
    rl = experiment.resolve_grader(config.rl.grader, arm, workdir)
    assert rl.reward_model_dir == experiment.reward_model_dir(workdir, "reward", arm)
  evaluation = experiment.resolve_grader(config.eval.grader, "safe_completion", workdir)
  assert evaluation.kind == "llm_judge" and evaluation.reward_model_dir == ""
  assert experiment.role_policy("eval_grader", "refusal", config) == "safe_completion"
  assert experiment.role_policy("rl_grader", "refusal", config) == "refusal"
  shared = experiment_config.get_config("tiny")
  shared.eval.grader = shared.rl.grader.copy_and_resolve_references()
  assert experiment.graders_shared(shared) and not experiment.graders_shared(experiment_config.get_config("tiny"))


def _relabeled(prompts):
  """The same prompts with every intent label (and the id that spells it) changed."""
  other = {"benign": "malicious", "dual_use": "benign", "malicious": "dual_use"}
  return [dataclasses.replace(p, intent=other[p.intent], id=p.id.replace(p.intent, other[p.intent], 1))
          for p in prompts]


def test_no_gold_intent_reaches_datagen_filtering(tmp_path):
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts", split="train")
  prompts = records.spread_subset(prompts, 24)
  demos, _ = records.load_demonstrations(records.DEFAULT_DATA_DIR / "demonstrations", arms=["refusal"])
  specs = specs_lib.load_specs()
  grader = rule_based.KeywordGrader("[REDACTED", 1)
  kept = []
  for name, batch in (("gold", prompts), ("relabeled", _relabeled(prompts))):
    by_id = {p.id: p for p in batch}
    teacher_demos = [dataclasses.replace(d, prompt_id=next(q.id for q, p in zip(batch, prompts) if p.id == d.prompt_id))
                     for d in demos if d.prompt_id in {p.id for p in prompts}]
    datagen.generate_arm(batch, specs, "refusal", datagen.DemonstrationTeacher(teacher_demos, "refusal"), grader,
                         str(tmp_path / name), max_attempts=1, batch_size=8,
                         filter_config=datagen.FilterConfig(min_safety=0.75, min_helpfulness=0.0), shard_size=100)
    rows = [json.loads(line) for line in (tmp_path / name / "records-00000.jsonl").open()]
    kept.append([(by_id[r["id"]].messages, r["answer"], r["grade"]["safety"]) for r in rows])
  assert kept[0] == kept[1] and len(kept[0]) > 0


def test_no_gold_intent_reaches_the_rl_reward(tiny_sft_workdir, tmp_path, monkeypatch):
  rewards = []
  for name, relabel in (("gold", False), ("relabeled", True)):
    load = records.load_prompts
    if relabel:
      monkeypatch.setattr(loop.records, "load_prompts", lambda *a, **k: (_relabeled(load(*a, **k)[0]), None))
    loop.train(micro_rl_config(tiny_sft_workdir, num_steps=2), str(tmp_path / name))
    rewards.append([row["reward"] for row in metric_writer.read_metrics(str(tmp_path / name / "metrics.jsonl"))])
  assert rewards[0] == rewards[1]


def test_rerun_skips_finished_stages_and_reuses_cached_completions(finished_experiment, tiny_reward_model_dir,
                                                                   capsys):
  workdir, result = finished_experiment
  before = (workdir / "refusal" / "seed_0" / "eval" / "completions.jsonl").read_text()
  rerun = experiment.run(micro_experiment_config(tiny_reward_model_dir), str(workdir))
  out = capsys.readouterr().out
  for stage in ("datagen/refusal", "refusal/seed_0/sft", "refusal/seed_1/rl", "safe_completion/seed_0/sft",
                "safe_completion/seed_1/rl"):
    assert f"experiment: {stage} done, skipping" in out
  assert (workdir / "refusal" / "seed_0" / "eval" / "completions.jsonl").read_text() == before
  assert rerun["arms"]["refusal"]["overall"] == result["arms"]["refusal"]["overall"]
