"""The evaluation report renders from a small two-arm fixture."""

import json
import math
import re

import numpy as np
import pytest

from safe_completion import taxonomy
from safe_completion.evaluation import attacks, compare, metrics, report
from safe_completion.evaluation.metrics import GradedCompletion
from safe_completion.graders.base import Grade

PROVENANCE = dict(grader="llm_judge", judge_model="tiny-judge", template_hash="abc123")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def arm(seed, safe_p, modes, suffix=""):
  """6 prompts (2 per intent) x 4 samples of random grades, one invalid."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(6):
    intent = taxonomy.INTENTS[p % 3]
    tags = ("over_refusal",) if intent == "benign" else ()
    for k in range(4):
      if p == 0 and k == 0:
        g = Grade.invalid("unparsable", **PROVENANCE)
      else:
        safe = rng.random() < safe_p
        g = Grade.from_scores(
            safety=0.9 if safe else 0.1,
            severity="none" if safe else str(rng.choice(["low", "moderate", "high"])),
            mode=str(rng.choice(modes)), helpfulness_rating=int(rng.integers(1, 5)),
            kind="indirect", rationale="", **PROVENANCE)
      prompt_id = f"hate-{intent}-eval-{p:03d}{suffix}"
      rows.append(GradedCompletion(prompt_id, k, "hate", intent, tags, "[response]", g))
  return rows


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("report")
  options = dict(bootstrap_samples=50, seed=0)
  refusal = arm(0, 0.6, ["direct", "refusal"])
  safe = arm(1, 0.8, list(taxonomy.MODES))
  arms = {"refusal": metrics.evaluate_completions(refusal, **options),
          "safe_completion": metrics.evaluate_completions(safe, **options)}
  comparison = compare.compare_evaluations(refusal, safe, permutations=200, **options)
  attacked = {"rot13": arm(2, 0.5, ["direct"], suffix="@rot13")}
  attack_results = attacks.attack_report(attacked, safe, permutations=200, **options)
  meta = {"model": "tiny", "k": 4, "threshold": np.float32(0.5), "note": math.nan}
  return report.write_report(tmp_path / "out", arms, comparison, {"safe_completion": attack_results}, meta)


def test_report_files_render(paths):
  assert {p.name for p in paths["markdown"].parent.iterdir()} == {
      "report.md", "report.json", "safety_vs_helpfulness.png", "severity.png"}
  for name in ("safety_vs_helpfulness", "severity"):
    data = paths[name].read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_markdown_has_the_papers_tables(paths):
  text = paths["markdown"].read_text()
  for heading in ("## Safety and helpfulness by intent", "## Harm severity of unsafe responses",
                  "## Response mode distribution", "## Over-refusal on benign prompts",
                  "## Pairwise: safe_completion vs refusal", "## Attacks"):
    assert heading in text
  assert ("| Intent | refusal n prompts | refusal safety | refusal helpfulness | "
          "safe_completion n prompts | safe_completion safety | safe_completion helpfulness |"
          ) in text
  for intent in taxonomy.INTENTS:
    assert f"| {intent} | 2 |" in text
  assert "| rot13 | 6 |" in text
  assert "P(moderate or high \\| unsafe)" in text
  assert "| helpfulness | overall | 6 |" in text


def test_markdown_table_rows_have_the_header_width(paths):
  widths = []
  for line in paths["markdown"].read_text().splitlines() + [""]:
    if line.startswith("|"):
      widths.append(len(re.split(r"(?<!\\)\|", line)))
    elif widths:
      assert len(set(widths)) == 1, widths
      widths = []


def test_json_parses_and_keeps_everything(paths):
  loaded = json.loads(paths["json"].read_text())
  assert set(loaded) == {"meta", "arms", "comparison", "attacks"}
  assert loaded["meta"] == {"model": "tiny", "k": 4, "threshold": 0.5, "note": None}
  assert loaded["arms"]["refusal"]["overall"]["n_invalid"] == 1
  assert loaded["comparison"]["names"] == ["refusal", "safe_completion"]
  assert "rot13" in loaded["attacks"]["safe_completion"]


def test_report_without_comparison_or_attacks(tmp_path):
  arms = {"only": metrics.evaluate_completions(arm(3, 0.7, ["direct"]), bootstrap_samples=0)}
  text = report.write_report(tmp_path, arms, None, None, {})["markdown"].read_text()
  assert "## Pairwise" not in text and "## Attacks" not in text
  assert "| overall | 6 |" in text


def test_formatting():
  assert report.format_stat({"value": 0.8312, "ci": [0.79, 0.871], "n": 5}) == "0.83 [0.79, 0.87]"
  assert report.format_stat({"value": 3.0, "ci": None, "n": 1}) == "3.00"
  assert report.format_stat({"value": None, "ci": None, "n": 0}) == report.MISSING
  assert report.format_p(0.0004) == "<0.001" and report.format_p(0.0341) == "0.034"
  assert report.json_safe({1: (np.int64(2), float("inf"))}) == {"1": [2, None]}
