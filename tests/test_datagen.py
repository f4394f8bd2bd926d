"""Datagen: strict teacher parsing, spec-augmented inputs, torn-line repair, and the stage end to end
(demonstrations teacher, HTTP teacher against a real local server, kill and resume)."""

import json
import os
import subprocess
import sys

import pytest

from configs import datagen as datagen_config
from safe_completion import datagen
from safe_completion import datagen_stage
from safe_completion import jsonl
from safe_completion import specs as specs_lib
from safe_completion import taxonomy
from safe_completion.backends import base as backends_base
from safe_completion.backends import http
from safe_completion.data import records
from safe_completion.graders import reward_model
from tests import processes
from tests import scripted_server

GOOD = "<reasoning>\nThe spec allows a high-level answer.\n</reasoning>\n<mode>safe_completion</mode>\n<answer>\nHere is an overview.\n</answer>"


def test_parse_teacher_output_reads_the_three_blocks():
  sample = datagen.parse_teacher_output(GOOD, "safe_completion")
  assert sample == datagen.TeacherSample("The spec allows a high-level answer.", "safe_completion", "Here is an overview.")
  assert datagen.parse_teacher_output(datagen.format_teacher_output(sample), "safe_completion") == sample


@pytest.mark.parametrize("text, arm, reason", [
    ("just an answer", "safe_completion", "missing <reasoning>"),
    (GOOD.replace("<answer>\nHere is an overview.\n</answer>", "<answer> </answer>"), "safe_completion", "empty <answer>"),
    (GOOD + "<mode>direct</mode>", "safe_completion", "2 <mode> blocks"),
    (GOOD.replace("safe_completion</mode>", "helpful</mode>"), "safe_completion", "mode 'helpful' not allowed"),
    (GOOD, "refusal", "mode 'safe_completion' not allowed for arm refusal"),
    (GOOD.replace("overview", "overview \ud800"), "safe_completion", "not UTF-8 text: lone surrogate at position"),
    (None, "safe_completion", "expected text, got NoneType"),
])
def test_parse_teacher_output_rejects_malformed_output(text, arm, reason):
  with pytest.raises(datagen.TeacherParseError, match=reason):
    datagen.parse_teacher_output(text, arm)


def test_teacher_messages_carry_the_spec_but_records_keep_the_original_prompt():
  specs = specs_lib.load_specs()
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts", split="train")
  prompt = prompts[0]
  messages = datagen.teacher_messages(prompt, specs_lib.category_spec(specs, prompt.category),
                                      specs_lib.modes_guide(specs, "refusal"), "refusal")
  assert messages[0]["role"] == "system"
  assert "Severity of violations" in messages[0]["content"] and "direct, refusal" in messages[0]["content"]
  assert tuple(messages[1:]) == prompt.messages


def test_record_writer_cuts_a_torn_line_and_resumes(tmp_path):
  writer = datagen.RecordWriter(str(tmp_path), shard_size=2)
  for i in range(3):
    writer.write_record({"id": f"p{i}", "category": "biorisk", "intent": "benign", "failed_attempts": []})
  writer.write_dropped({"id": "p9", "category": "biorisk", "intent": "benign", "reasons": ["unsafe"]})
  with open(tmp_path / "records-00001.jsonl", "a") as f:
    f.write('{"id": "p3", "categ')  # A kill in the middle of a write.
  resumed = datagen.RecordWriter(str(tmp_path), shard_size=2)
  assert resumed.done_ids == {"p0", "p1", "p2", "p9"}
  resumed.write_record({"id": "p3", "category": "biorisk", "intent": "benign", "failed_attempts": []})
  rows = [json.loads(line) for path in resumed.shards() for line in open(path)]
  assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]
  assert datagen.compute_stats(resumed)["cells"]["biorisk/benign"] == {
      "kept": 4, "dropped": 1, "dropped:permanent": 1, "attempt_failed:unsafe": 1}


NUM_PROMPTS = 24


def _stage_config(reward_model_dir, **overrides):
  config = datagen_config.get_config("tiny")
  config.judge.reward_model_dir = reward_model_dir
  config.data.max_prompts = NUM_PROMPTS
  config.update(overrides)
  return config


def _records(arm_dir):
  return [row for path in sorted(os.listdir(arm_dir)) if path.startswith("records-")
          for row in jsonl.read_rows(os.path.join(arm_dir, path))]


def test_demonstrations_teacher_with_reward_model_judge(tiny_reward_model_dir, tmp_path):
  stats = datagen_stage.run(_stage_config(tiny_reward_model_dir), str(tmp_path))
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts", split="train")
  by_id = {p.id: p for p in prompts}
  for arm in ("safe_completion", "refusal"):
    totals = stats[arm]["totals"]
    assert totals.get("kept", 0) + totals.get("dropped", 0) == NUM_PROMPTS
    rows = _records(tmp_path / arm)
    assert len(rows) == totals["kept"] > 0
    for row in rows:
      assert tuple(row["messages"]) == by_id[row["id"]].messages  # The original prompt, no spec.
      assert row["grade"]["grader"] == "reward_model" and row["grade"]["safety"] >= 0.75
      assert row["mode"] in taxonomy.ARM_MODES[arm]
  assert datagen_stage.run(_stage_config(tiny_reward_model_dir), str(tmp_path)) == stats  # Finished: no new work.


def test_http_teacher_against_the_local_server_counts_malformed_output(tiny_reward_model_dir, tmp_path):
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts", split="train")
  prompts = records.spread_subset(prompts, 12)
  malformed = sum(scripted_server.ScriptedTeacher.malformed_first(p.messages[-1]["content"]) for p in prompts)
  assert 0 < malformed < len(prompts)
  port = scripted_server.free_port()
  with scripted_server.running_server(["tests.scripted_server", "--kind=teacher", f"--port={port}"], port) as url:
    teacher = datagen.BackendTeacher(http.HttpBackend(url, "scripted-teacher"),
                                     backends_base.SamplingParams(max_tokens=256, temperature=0.7))
    stats = datagen.generate_arm(prompts, specs_lib.load_specs(), "refusal", teacher,
                                 reward_model.RewardModelGrader.load(tiny_reward_model_dir), str(tmp_path),
                                 max_attempts=2, batch_size=5, filter_config=datagen.FilterConfig(min_helpfulness=0.0))
  assert stats["totals"]["attempt_failed:unparsable"] == malformed
  assert stats["totals"].get("kept", 0) + stats["totals"].get("dropped", 0) == len(prompts)
  for row in _records(tmp_path):
    assert row["teacher"] == "scripted-teacher" and row["mode"] == "refusal"
    assert bool(row["failed_attempts"]) == scripted_server.ScriptedTeacher.malformed_first(row["messages"][-1]["content"])


def _datagen_command(workdir, reward_model_dir):
  return [sys.executable, "-m", "safe_completion.main", "--config=configs/datagen.py:tiny", f"--workdir={workdir}",
          f"--config.judge.reward_model_dir={reward_model_dir}", f"--config.data.max_prompts={NUM_PROMPTS}",
          "--config.batch_size=2", "--config.arms=('safe_completion',)"]


def test_kill_and_resume_gives_the_same_record_set(tiny_reward_model_dir, tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  subprocess.run(_datagen_command(reference, tiny_reward_model_dir), check=True, capture_output=True, timeout=600)
  processes.kill_when(_datagen_command(resumed, tiny_reward_model_dir),
                      resumed / "safe_completion" / "records-00000.jsonl", lines=6)
  subprocess.run(_datagen_command(resumed, tiny_reward_model_dir), check=True, capture_output=True, timeout=600)
  expected, actual = _records(reference / "safe_completion"), _records(resumed / "safe_completion")
  assert len({r["id"] for r in actual}) == len(actual)  # No duplicates.
  key = lambda r: (r["id"], r["cot"], r["answer"], r["mode"])
  assert sorted(map(key, actual)) == sorted(map(key, expected))
