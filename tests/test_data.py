"""Record loaders on good and bad inputs, and the shipped prompts, demonstrations and grades."""

import collections
import csv
import dataclasses
import importlib.util
import json

import pytest

from safe_completion import taxonomy
from safe_completion.data import records
from safe_completion.data.reading import DataError

DATA = records.DEFAULT_DATA_DIR


def _prompt(category="hate", intent="benign", split="train", n=1, **overrides):
  row = {"id": f"{category}-{intent}-{split}-{n:03d}",
         "messages": [{"role": "user", "content": "What is a hate crime statute?"}],
         "category": category, "intent": intent, "split": split,
         "source": "test", "tags": []}
  row.update(overrides)
  return row


def _demo(prompt_id="hate-benign-train-001", arm="safe_completion", mode="direct", **overrides):
  row = {"prompt_id": prompt_id, "arm": arm, "mode": mode, "cot": "Benign; answer.",
         "answer": "A statute that adds penalties when a crime is motivated by bias."}
  row.update(overrides)
  return row


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


# Loaders on good input.


def test_load_prompts_reads_directory_sorted_and_counts_cells(tmp_path):
  _write_jsonl(tmp_path / "b.jsonl", [_prompt(n=2), _prompt(split="eval")])
  _write_jsonl(tmp_path / "a.jsonl", [_prompt(n=1), "", _prompt(intent="malicious")])
  prompts, report = records.load_prompts(tmp_path)
  assert [p.id for p in prompts] == ["hate-benign-train-001", "hate-malicious-train-001",
                                     "hate-benign-train-002", "hate-benign-eval-001"]
  assert report.cell_counts == {("hate", "benign", "train"): 2, ("hate", "malicious", "train"): 1,
                                ("hate", "benign", "eval"): 1}
  assert isinstance(prompts[0].messages, tuple) and prompts[0].tags == ()
  assert "| hate | 2 | 1 |" in report.format().replace("| 0 ", "")


def test_load_prompts_filters_by_split_and_category_and_counts_filtered(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl",
                      [_prompt(), _prompt(split="eval"), _prompt(category="privacy")])
  prompts, report = records.load_prompts(path, split="train", categories=["hate"])
  assert [p.id for p in prompts] == ["hate-benign-train-001"]
  assert report.filtered == 2 and report.loaded == 1 and report.rows == 3


def test_filter_values_are_checked_against_the_vocabulary(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [_prompt()])
  with pytest.raises(ValueError, match="split: 'trian' is not one of"):
    records.load_prompts(path, split="trian")


def test_csv_is_read_through_datasets_with_json_cells_and_row_numbers(tmp_path):
  path = tmp_path / "p.csv"
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(_prompt()))
    writer.writeheader()
    writer.writerow({**_prompt(n=1), "messages": json.dumps(_prompt()["messages"]), "tags": "[]"})
    writer.writerow({**_prompt(n=2, intent="bad"), "messages": "[]", "tags": "[]"})
  with pytest.raises(DataError, match=r"p\.csv:2: intent: 'bad' is not one of"):
    records.load_prompts(path)
  prompts, report = records.load_prompts(path, skip_invalid=True)
  assert [p.id for p in prompts] == ["hate-benign-train-001"]
  assert report.skipped == {"intent: unknown value": 1}


def test_json_file_is_read_through_datasets(tmp_path):
  path = tmp_path / "d.json"
  path.write_text(json.dumps([_demo(), _demo(arm="refusal", mode="refusal")]))
  demos, report = records.load_demonstrations(path)
  assert [(d.arm, d.mode) for d in demos] == [("safe_completion", "direct"), ("refusal", "refusal")]
  assert report.cell_counts[("hate", "refusal", "refusal")] == 1


# Loaders on bad input: each error names file:line and the field.


@pytest.mark.parametrize("line, pattern", [
    ('{"id": ', r":2: json: invalid JSON"),
    ("[1, 2]", r":2: record: expected a JSON object, got list"),
    (_prompt(intent="curious"), r":2: intent: 'curious' is not one of"),
    (_prompt(messages=[]), r":2: messages: empty list"),
    (_prompt(messages=[{"role": "robot", "content": "x"}]), r":2: messages\[0\]\.role: 'robot'"),
    (_prompt(messages=[{"role": "user"}]), r":2: messages\[0\]\.content: missing"),
    (_prompt(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
     r":2: messages: last turn must be 'user'"),
    (_prompt(tags="over_refusal"), r":2: tags: expected a list, got str"),
    (_prompt(source=None), r":2: source: missing"),
    (_prompt(extra=1), r":2: extra: unknown field"),
    (_prompt(id="hate-benign-train-1x"), r":2: id: 'hate-benign-train-1x' does not look like"),
    (_prompt(id="hate-malicious-train-002"), r":2: id: id says intent 'malicious'"),
    (_prompt(), r":2: id: duplicate 'hate-benign-train-001' \(first at .*p\.jsonl:1\)"),
])
def test_bad_prompt_line_is_an_error_naming_file_line_and_field(tmp_path, line, pattern):
  path = _write_jsonl(tmp_path / "p.jsonl", [_prompt(), line])
  with pytest.raises(DataError, match=r"p\.jsonl" + pattern):
    records.load_prompts(path)


def test_skip_invalid_counts_each_reason_with_locations(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [
      _prompt(), "{oops", _prompt(n=2, intent="x"), _prompt(n=3, intent="y"), _prompt()])
  prompts, report = records.load_prompts(path, skip_invalid=True)
  assert [p.id for p in prompts] == ["hate-benign-train-001"]
  assert report.skipped == {"json: invalid JSON": 1, "intent: unknown value": 2, "id: duplicate": 1}
  assert report.skipped_at["intent: unknown value"] == [f"{path}:3", f"{path}:4"]
  assert report.rows == 5 and "skipped 2: intent: unknown value" in report.format()


def test_duplicate_ids_across_files_are_an_error(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", [_prompt()])
  _write_jsonl(tmp_path / "b.jsonl", [_prompt()])
  with pytest.raises(DataError, match=r"b\.jsonl:1: id: duplicate .*a\.jsonl:1"):
    records.load_prompts(tmp_path)


@pytest.mark.parametrize("make_path, pattern", [
    (lambda tmp: tmp / "missing.jsonl", "no such file"),
    (lambda tmp: tmp, "directory holds no"),
    (lambda tmp: (tmp / "p.txt").write_text("x") and tmp / "p.txt", "unsupported file type"),
])
def test_bad_paths_are_clear_errors(tmp_path, make_path, pattern):
  with pytest.raises(DataError, match=pattern):
    records.load_prompts(make_path(tmp_path))


def test_demonstration_mode_must_be_allowed_for_its_arm(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [_demo(arm="refusal", mode="safe_completion")])
  with pytest.raises(DataError, match=r"d\.jsonl:1: mode: 'safe_completion' is not allowed for "
                     r"arm 'refusal'"):
    records.load_demonstrations(path)


def test_grade_fields_are_range_checked(tmp_path):
  good = {"id": "g1", "prompt_id": "hate-benign-train-001", "category": "hate",
          "intent": "benign", "split": "train", "response": "ok", "safety": 1,
          "severity": "none", "mode": "direct", "helpfulness": 4, "kind": "direct",
          "label": "good_direct", "source": "test"}
  path = _write_jsonl(tmp_path / "g.jsonl", [good, {**good, "id": "g2", "safety": 1.5},
                                             {**good, "id": "g3", "helpfulness": True}])
  with pytest.raises(DataError, match=r"g\.jsonl:2: safety: 1\.5 is outside"):
    records.load_grades(path)
  grades, report = records.load_grades(path, skip_invalid=True)
  assert grades[0].safety == 1.0 and isinstance(grades[0].safety, float)
  assert report.skipped == {"safety: out of range": 1, "helpfulness: wrong type": 1}


def test_check_demonstrations_lists_every_problem():
  prompts = [records.parse_prompt(_prompt(n=1)), records.parse_prompt(_prompt(n=2)),
             records.parse_prompt(_prompt(split="eval"))]
  demos = [records.parse_demonstration(_demo(arm=arm, mode="direct")) for arm in taxonomy.ARMS]
  demos += [records.parse_demonstration(_demo("hate-benign-train-002")),
            records.parse_demonstration(_demo("hate-benign-eval-001")),
            records.parse_demonstration(_demo("hate-benign-train-009"))]
  records.check_demonstrations(prompts[:1], demos[:2])
  with pytest.raises(DataError) as e:
    records.check_demonstrations(prompts, demos)
  message = str(e.value)
  assert "3 demonstration problems" in message
  assert "hate-benign-train-002 arm refusal: 0 demonstrations, expected 1" in message
  assert "hate-benign-eval-001 arm safe_completion: prompt is in split 'eval'" in message
  assert "hate-benign-train-009 arm safe_completion: no such prompt" in message


# The shipped data.


@pytest.fixture(scope="module")
def shipped_prompts():
  return records.load_prompts(DATA / "prompts")


def test_shipped_prompts_fill_every_cell(shipped_prompts):
  _, report = shipped_prompts
  for category in taxonomy.CATEGORIES:
    for intent in taxonomy.INTENTS:
      assert report.cell_counts[(category, intent, "train")] >= 20, (category, intent)
      assert report.cell_counts[(category, intent, "eval")] >= 8, (category, intent)


def test_shipped_benign_prompts_have_an_over_refusal_subset(shipped_prompts):
  prompts, _ = shipped_prompts
  tagged = collections.Counter(p.category for p in prompts
                               if p.intent == "benign" and "over_refusal" in p.tags)
  assert all(tagged[c] > 0 for c in taxonomy.CATEGORIES), tagged


def test_every_shipped_train_prompt_has_both_demonstrations(shipped_prompts):
  demos, _ = records.load_demonstrations(DATA / "demonstrations")
  records.check_demonstrations(shipped_prompts[0], demos)


@pytest.fixture(scope="module")
def shipped_grades():
  return records.load_grades(DATA / "grades")


def test_shipped_grades_cover_every_label_and_severity(shipped_grades):
  grades, _ = shipped_grades
  assert len(grades) >= 1500
  assert set(g.label for g in grades) == set(records.GRADE_LABELS)
  unsafe = [g for g in grades if g.label == "unsafe_compliance"]
  assert set(g.severity for g in unsafe) == set(taxonomy.SEVERITIES) - {"none"}
  assert all("[REDACTED" in g.response for g in unsafe)
  for split in taxonomy.SPLITS:
    assert set(g.label for g in grades if g.split == split) == set(records.GRADE_LABELS), split


def test_no_prompt_is_in_both_grade_splits(shipped_grades):
  grades, _ = shipped_grades
  splits_of = collections.defaultdict(set)
  for g in grades:
    splits_of[g.prompt_id].add(g.split)
  assert all(len(s) == 1 for s in splits_of.values())
  eval_share = sum(s == {"eval"} for s in splits_of.values()) / len(splits_of)
  assert 0.1 < eval_share < 0.3


def test_shipped_grades_come_from_shipped_train_prompts(shipped_prompts, shipped_grades):
  train_ids = {p.id for p in shipped_prompts[0] if p.split == "train"}
  assert {g.prompt_id for g in shipped_grades[0]} <= train_ids


# The grade builder on a small synthetic data directory.


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, DATA.parent / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  (root / "prompts").mkdir()
  (root / "demonstrations").mkdir()
  modes = {"benign": ("direct", "direct"), "dual_use": ("safe_completion", "refusal"),
           "malicious": ("safe_completion", "refusal")}
  prompts, demos = [], []
  for category in ("cybersecurity", "self_harm"):
    for intent in taxonomy.INTENTS:
      for n in range(1, 7):
        prompts.append(_prompt(category, intent, n=n, messages=[
            {"role": "user", "content": f"Question {n} about {category}? More words."}]))
        for arm, mode in zip(taxonomy.ARMS, modes[intent]):
          demos.append(_demo(prompts[-1]["id"], arm, mode,
                             answer=f"Answer from {arm}. Second sentence."))
      prompts.append(_prompt(category, intent, split="eval"))
  _write_jsonl(root / "prompts" / "p.jsonl", prompts)
  _write_jsonl(root / "demonstrations" / "d.jsonl", demos)
  return root


def test_build_grades_is_deterministic_and_rates_manipulation_by_content(tiny_data_dir):
  build_grades = _load_script("build_grades")
  rows = build_grades.build(tiny_data_dir)
  assert rows == build_grades.build(tiny_data_dir)
  assert len({r["prompt_id"] for r in rows}) == 36  # train prompts only
  for row in rows:
    if row["label"] == "manipulation":
      assert row["safety"] < 1.0 or row["helpfulness"] <= 2, row
    if row["label"] == "unsafe_compliance":
      assert row["safety"] == build_grades.SAFETY_BY_SEVERITY[row["severity"]] < 1.0
      assert "[REDACTED" in row["response"]
  build_grades.write(rows, tiny_data_dir / "grades")
  grades, report = records.load_grades(tiny_data_dir / "grades")
  assert len(grades) == len(rows) and report.skipped == {}


def test_build_grades_labels_demonstrations_by_mode_and_intent():
  build_grades = _load_script("build_grades")
  assert build_grades.demonstration_label("refusal", "benign") == "over_refusal"
  assert build_grades.demonstration_label("refusal", "dual_use") == "conservative_refusal"
  assert build_grades.demonstration_label("refusal", "malicious") == "good_refusal"
  assert build_grades.rate("over_refusal", "benign").helpfulness == 1
  assert build_grades.rate("unsafe_compliance", "malicious", "high") == (
      0.0, "high", "direct", 4, "direct")


def test_shipped_grades_are_reproducible_from_shipped_inputs(shipped_grades):
  built = sorted(_load_script("build_grades").build(DATA), key=lambda r: r["id"])
  shipped = sorted((dataclasses.asdict(g) for g in shipped_grades[0]), key=lambda r: r["id"])
  assert built == shipped, "data/grades is stale: run scripts/build_grades.py"


def test_readme_counts_match_shipped_files():
  update = _load_script("update_data_readme")
  readme = (DATA / "README.md").read_text()
  assert update.updated_readme(readme, update.counts_markdown(DATA)) == readme, (
      "data/README.md counts are stale: run scripts/update_data_readme.py")
