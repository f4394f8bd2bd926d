"""Datagen: strict teacher parsing, spec-augmented inputs, torn-line repair on resume."""

import json

import pytest

from safe_completion import datagen
from safe_completion import specs as specs_lib
from safe_completion.data import records

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
  assert datagen.compute_stats(resumed)["cells"]["biorisk/benign"] == {"kept": 4, "dropped": 1, "attempt_failed:unsafe": 1}
