"""Hand-written labeled responses: the shipped sets load, contradictions and mismatches are errors."""

import json

import pytest

from safe_completion.data import labeled
from safe_completion.data import reading
from safe_completion.data import records

ROW = dict(id="t-hate-0001", prompt_id="t-hate-p001", category="hate", intent="dual_use", prompt="q?",
           response="A high-level answer.", mode="safe_completion", helpfulness=3, kind="direct",
           severity={"safe_completion": "none", "refusal": "low"}, refusal_policy_request="refuse",
           label="good_safe_completion", tags=["short"], source="handwritten:t")


def _write(tmp_path, *rows):
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_shipped_sets_load_with_both_policies_and_are_disjoint():
  train, train_report = labeled.load_labeled(labeled.TRAIN_DIR)
  heldout, _ = labeled.load_labeled(labeled.HELDOUT_DIR)
  assert len(train) >= 1000 and len(heldout) >= 300 and not train_report.skipped
  assert not {r.prompt for r in train} & {r.prompt for r in heldout}
  assert {r.source for r in train}.isdisjoint({r.source for r in heldout})  # Different authors.
  for row in train + heldout:
    assert set(row.severity) == set(labeled.POLICIES)
    assert row.safety("safe_completion") == labeled.SAFETY_OF_SEVERITY[row.severity["safe_completion"]]


def test_safety_is_derived_from_severity_and_reward_is_h_times_s(tmp_path):
  row = labeled.load_labeled(_write(tmp_path, ROW))[0][0]
  assert row.safety("safe_completion") == 1.0 and row.safety("refusal") == 0.4
  assert row.reward("safe_completion") == pytest.approx(2 / 3) and row.unsafe("refusal")
  assert row.request().prompt == ({"role": "user", "content": "q?"},)


@pytest.mark.parametrize("change, field", [
    (dict(severity={"safe_completion": "none", "refusal": "none"}), "severity.refusal"),
    (dict(label="good_direct", mode="direct", severity={"safe_completion": "high", "refusal": "high"}),
     "severity.safe_completion"),
    (dict(mode="refusal", helpfulness=4, label="good_refusal",
          severity={"safe_completion": "none", "refusal": "none"}), "helpfulness"),
    (dict(severity={"safe_completion": "none", "other": "none"}), "severity.other"),
    (dict(refusal_policy_request="maybe"), "refusal_policy_request"),
])
def test_contradictory_or_bad_rows_name_file_line_and_field(tmp_path, change, field):
  path = _write(tmp_path, ROW, {**ROW, "id": "t-hate-0002", **change})
  with pytest.raises(reading.DataError, match=rf"rows.jsonl:2: {field}"):
    labeled.load_labeled(path)


def test_one_prompt_text_per_prompt_id(tmp_path):
  with pytest.raises(reading.DataError, match="prompt_id 't-hate-p001'"):
    labeled.load_labeled(_write(tmp_path, ROW, {**ROW, "id": "t-hate-0002", "prompt": "another"}))


def test_templated_rows_get_refusal_policy_labels_from_the_refusal_arm_decision():
  data = records.DEFAULT_DATA_DIR
  grades, _ = records.load_grades(data / "grades")
  prompts, _ = records.load_prompts(data / "prompts", split="train")
  demos, _ = records.load_demonstrations(data / "demonstrations")
  rows = labeled.from_templated(grades, prompts, demos)
  refusal_answer = {d.prompt_id: d.answer for d in demos if d.arm == "refusal"}
  for row, grade in zip(rows, grades):
    assert row.severity["safe_completion"] == grade.severity
    if row.response == refusal_answer[row.prompt_id]:
      assert row.severity["refusal"] == "none"  # The refusal arm's own demonstration follows its policy.
    elif row.refusal_policy_request == "refuse" and row.mode != "refusal":
      assert row.unsafe("refusal")  # No partial answer, and no vague one, under the refusal policy.
  assert any(r.unsafe("safe_completion") and not r.unsafe("refusal") for r in rows)
  assert any(r.unsafe("refusal") and not r.unsafe("safe_completion") for r in rows)
  assert any(r.label == "vague" and r.unsafe("refusal") for r in rows)


def test_split_by_authors_partitions_by_source_and_names_the_field():
  rows = labeled.load_labeled(labeled.TRAIN_DIR)[0]
  always, folded = labeled.split_by_authors(rows, ["hw3"], "train_only_authors")
  assert always and {r.source for r in always} == {"handwritten:hw3"}
  assert "handwritten:hw3" not in {r.source for r in folded} and len(folded) + len(always) == len(rows)
  assert labeled.split_by_authors(rows, [], "train_only_authors") == ([], list(rows))
  with pytest.raises(ValueError, match="train_only_authors: no rows with source"):
    labeled.split_by_authors(rows, ["nobody"], "train_only_authors")
