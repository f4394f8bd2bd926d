"""The experiment end to end on a micro config: graders in separate roles, two seeds, every artefact; a rerun skips."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from configs import experiment as experiment_config
from safe_completion import checkpoint
from safe_completion import config_checks
from safe_completion import datagen
from safe_completion import experiment
from safe_completion import metrics as metric_writer
from safe_completion import slices
from safe_completion import specs as specs_lib
from safe_completion.data import records
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.graders import rule_based
from safe_completion.models import transformer
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


REAL_PRESETS = ("llama3_8b", "qwen2_7b", "gemma2_9b")
ENDPOINT_FIELDS = ["teacher.endpoint", "datagen.judge.endpoint", "rl.grader.endpoint", "eval.grader.endpoint"]


def real_experiment_config(preset):
  """A real preset with every outside input set (the shipped tiny base as the HF directory)."""
  config = experiment_config.get_config(preset)
  config.sft.init.hf_dir = experiment_config.TINY_BASE_DIR
  for i, field in enumerate(ENDPOINT_FIELDS):
    config.update_from_flattened_dict({f"{field}.base_url": f"http://127.0.0.1:{8000 + i}/v1",
                                       f"{field}.model": "eval-judge" if field.startswith("eval") else "model"})
  return config


@pytest.mark.parametrize("preset", [*REAL_PRESETS, *(f"{p},runlocal" for p in REAL_PRESETS)])
def test_a_real_preset_names_each_missing_input(preset):
  config_checks.validate(real_experiment_config(preset))
  for field, value, message in [("sft.init.hf_dir", "", "config.sft.init.hf_dir is empty"),
                                ("sft.init.hf_dir", "/nonexistent", "has no config.json"),
                                *((f"{f}.{k}", "", f"config.{f}.{k} is empty") for f in ENDPOINT_FIELDS
                                  for k in ("base_url", "model"))]:
    config = real_experiment_config(preset)
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=f"^{message}" if message.startswith("config") else message):
      config_checks.validate(config)


def test_the_eval_grader_must_be_another_model_than_the_reward_grader():
  config = real_experiment_config("llama3_8b")
  config.eval.grader.endpoint.model = config.rl.grader.endpoint.model
  with pytest.raises(ValueError, match="^config.eval.grader.endpoint.model='model' is the RL reward grader's model"):
    config_checks.validate(config)
  config.eval.grader.kind = "reward_model"  # A learned eval grader is no endpoint: the report flags sharing.
  config_checks.validate(config)


def test_a_safety_classifier_eval_grader_needs_its_helpfulness_endpoint():
  config = real_experiment_config("gemma2_9b")
  config.eval.grader.kind, config.eval.grader.helpfulness.kind = "gpt_oss_safeguard", "llm_judge"
  with pytest.raises(ValueError, match="^config.eval.grader.helpfulness.endpoint.base_url is empty"):
    config_checks.validate(config)


def test_main_names_the_missing_hf_dir_before_any_compute(tmp_path):
  result = subprocess.run([sys.executable, "-m", "safe_completion.main", "--config=configs/experiment.py:qwen2_7b",
                           f"--workdir={tmp_path / 'exp'}"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0 and "config.sft.init.hf_dir is empty" in result.stderr
  assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_runlocal_shrinks_a_real_preset_but_keeps_the_pod_path(preset):
  real, local = experiment_config.get_config(preset), experiment_config.get_config(f"{preset},runlocal")
  assert local.sft.num_steps < real.sft.num_steps and local.rl.num_steps < real.rl.num_steps
  assert 0 < local.datagen.data.max_prompts and 0 < local.eval.data.max_prompts
  assert local.sft.model.hidden_size < real.sft.model.hidden_size
  for section in ("sft.model.dtype", "sft.model.param_dtype", "sft.model.remat_policy", "rl.model.remat_policy",
                  "sft.mesh.shape", "rl.mesh.shape", "teacher.kind", "datagen.judge.kind", "rl.grader.kind",
                  "eval.grader.kind", "export_hf", "sft.export_architecture", "sft.export_dtype", "sft.init.hf_dir"):
    assert local[section] == real[section], section
  assert real.sft.export_dtype == "bfloat16"  # float32 master weights, exported at the dtype vLLM serves.
  assert (local.sft.model.dtype, local.sft.model.param_dtype, local.sft.mesh.shape) == ("bfloat16", "float32",
                                                                                        (1, -1, 1))
  assert local.sft.optimizer.grad_accum_steps > 1 and local.export_hf and local.teacher.kind == "http"


def test_export_writes_an_hf_directory_and_replaces_a_partial_one(tiny_sft_workdir, tmp_path):
  rl_config = experiment_config.get_config("llama3_8b,runlocal").rl  # The FSDP mesh over the 8 fake devices.
  out_dir = str(tmp_path / "export")
  os.makedirs(out_dir + ".partial")
  with open(os.path.join(out_dir + ".partial", "config.json"), "w") as f:
    f.write("{torn")  # What a preempted export left.
  experiment.export_model(rl_config, tiny_sft_workdir, out_dir, "LlamaForCausalLM")
  assert not os.path.exists(out_dir + ".partial")
  params, model_config, tokenizer = checkpoint.load_model(tiny_sft_workdir)
  exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
  tokens = np.asarray([tokenizer("a short question")["input_ids"]], np.int32)
  ours = transformer.forward(params, model_config, tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_the_lora_variant_trains_adapters_in_both_stages_on_a_smaller_slice(preset):
  full, adapted = experiment_config.get_config(preset), experiment_config.get_config(f"{preset},lora")
  local = experiment_config.get_config(f"{preset},lora,runlocal")
  for config in (adapted, local):
    assert config.sft.lora.rank > 0 and config.rl.lora.rank > 0 and config.sft.model.param_dtype == "bfloat16"
  assert full.sft.lora.rank == full.rl.lora.rank == 0
  assert slices.get_slice(adapted.slice).hbm_gib * slices.get_slice(adapted.slice).devices < (
      slices.get_slice(full.slice).hbm_gib * slices.get_slice(full.slice).devices)
  assert local.sft.optimizer.grad_accum_steps > 1 and local.export_hf and local.sft.mesh.shape == (1, -1, 1)
  config_checks.validate(real_experiment_config(f"{preset},lora,runlocal"))
  with pytest.raises(ValueError, match="unknown option"):
    experiment_config.get_config(f"{preset},qlora")
