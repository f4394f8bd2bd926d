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


OPTIONS = dict(bootstrap_samples=50, seed=0)
ARMS = ("refusal", "safe_completion")
META = {
    "preset": "tiny", "k": 4, "threshold": np.float32(0.5), "note": math.nan,
    "model": {"params": 1234567, "num_layers": 4, "hidden_size": 128},
    "sft": {"refusal": {"train_loss": 1.21, "heldout_loss": 1.47},
            "safe_completion": {"train_loss": 1.18, "heldout_loss": 1.52}},
    "graders": {"datagen_judge": "reward model A", "rl_grader": "reward model A (seed 0)",
                "eval_grader": "reward model B (seed 1, disjoint grade split)"},
    "graders_shared": False,
    "eval_grader_validation": {"unsafe_auc": 0.91, "mode_accuracy": 0.83},
    "seeds": 2, "tiny": True,
    "fluency": {a: {"name": "distinct-2", "definition": "distinct bigrams / bigrams", "value": 0.61}
                for a in ARMS},
    "mode_match": {"refusal": {"dual_use": {"sft_records": {"direct": 0.6, "refusal": 0.4},
                                            "eval": {"direct": 0.3, "refusal": 0.7}}}},
    "completion_rate": {a: {"rl_rollouts": 0.95, "eval": 0.97} for a in ARMS},
    "reward_vs_eval": {a: {"rl_grader": {"safe": 0.9, "helpfulness": 0.6, "reward": 0.55},
                           "eval_grader": {"safe": 0.7, "helpfulness": 0.5, "reward": 0.4}}
                       for a in ARMS},
    "stage_times": {"reward_model": 60.0, "datagen": 30.0, "refusal/sft": 240.0},
    "samples": {a: [{"intent": i, "prompt": f"[prompt {i}]", "completion": f"[{a} answer | {i}]"}
                    for i in taxonomy.INTENTS for _ in range(3)] for a in ARMS},
}


def inputs():
  refusal = arm(0, 0.6, ["direct", "refusal"])
  safe = arm(1, 0.8, list(taxonomy.MODES))
  arms = {"refusal": metrics.evaluate_completions(refusal, **OPTIONS),
          "safe_completion": metrics.evaluate_completions(safe, **OPTIONS)}
  comparison = compare.compare_evaluations(refusal, safe, permutations=200, **OPTIONS)
  attacked = {"rot13": arm(2, 0.5, ["direct"], suffix="@rot13")}
  attack_results = {"safe_completion": attacks.attack_report(attacked, safe, permutations=200, **OPTIONS)}
  return {"refusal": refusal, "safe_completion": safe}, arms, comparison, attack_results


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("report")
  completions, arms, comparison, attack_results = inputs()
  seeds = {a: [arms[a], metrics.evaluate_completions(arm(10 + i, 0.5, ["direct"]), **OPTIONS)]
           for i, a in enumerate(ARMS)}
  prompts = {c.prompt_id: f"[prompt text of {c.prompt_id}]" for c in completions["refusal"]}
  return report.write_report(tmp_path / "out", arms, comparison, attack_results, META,
                             completions=completions, prompts=prompts, seed_metrics=seeds)


def test_report_files_render(paths):
  assert {p.name for p in paths["markdown"].parent.iterdir()} == {
      "report.md", "report.json", "report.html", "safety_vs_helpfulness.png", "severity.png"}
  for name in ("safety_vs_helpfulness", "severity"):
    data = paths[name].read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_markdown_has_the_papers_tables(paths):
  text = paths["markdown"].read_text()
  for heading in ("## Safety and helpfulness by intent", "## Harm severity of unsafe responses",
                  "## Response mode distribution", "## Over-refusal on benign prompts",
                  "## Pairwise: safe_completion vs refusal", "## Attacks"):
    assert heading in text
  assert ("| Intent | refusal n prompts | refusal safety | refusal helpfulness | refusal balance | "
          "safe_completion n prompts | safe_completion safety | safe_completion helpfulness | "
          "safe_completion balance |") in text
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
  assert set(loaded) == {"meta", "arms", "comparison", "attacks", "holm", "seed_metrics"}
  assert {k: loaded["meta"][k] for k in ("preset", "k", "threshold", "note")} == {
      "preset": "tiny", "k": 4, "threshold": 0.5, "note": None}
  assert set(loaded["holm"]["p"]) == set(loaded["holm"]["adjusted"])
  assert loaded["arms"]["refusal"]["overall"]["n_invalid"] == 1
  assert loaded["comparison"]["names"] == ["refusal", "safe_completion"]
  assert "rot13" in loaded["attacks"]["safe_completion"]


def test_report_without_comparison_or_attacks(tmp_path):
  arms = {"only": metrics.evaluate_completions(arm(3, 0.7, ["direct"]), bootstrap_samples=0)}
  paths = report.write_report(tmp_path, arms, None, None, {"model": "endpoint-model-id"})
  text = paths["markdown"].read_text()
  assert "## Pairwise" not in text and "## Attacks" not in text and "## Seeds" not in text
  assert "| overall | 6 |" in text
  assert '- model: "endpoint-model-id"' in text and "## Policy model" not in text
  assert "No completions were given" in paths["html"].read_text()


def test_formatting():
  assert report.format_stat({"value": 0.8312, "ci": [0.79, 0.871], "n": 5}) == "0.83 [0.79, 0.87]"
  assert report.format_stat({"value": 3.0, "ci": None, "n": 1}) == "3.00"
  assert report.format_stat({"value": None, "ci": None, "n": 0}) == report.MISSING
  assert report.format_p(0.0004) == "<0.001" and report.format_p(0.0341) == "0.034"
  assert report.json_safe({1: (np.int64(2), float("inf"))}) == {"1": [2, None]}


def section(text, heading):
  """The lines of one '## ' section."""
  body = text.split(f"\n{heading}\n", 1)[1]
  return body.split("\n## ", 1)[0]


def test_caveats_and_run_sections_are_written_from_meta(paths):
  text = paths["markdown"].read_text()
  assert text.index("## Caveats") < text.index("## Safety and helpfulness by intent")
  caveats = section(text, "## Caveats")
  for says in ("small-scale run of the machinery", "not evidence about the method at scale",
               "1,234,567 parameters, 4 layers, hidden size 128", "held-out loss 1.470",
               "not the RL reward grader", "unsafe_auc 0.910", "2 training seed(s)",
               "refusal/dual_use/direct", "binary violation check"):
    assert says in caveats, says
  assert "not meaningful" not in caveats
  family = report.pvalue_family(*[json.loads(paths["json"].read_text())[k]
                                  for k in ("comparison", "attacks")])
  assert f"Holm-corrected across the family of {len(family)} tests" in caveats
  for heading in ("## Policy model", "## SFT loss", "## Graders", "## Eval grader validation",
                  "## Fluency", "## Mode match: SFT records vs eval", "## Completion rate",
                  "## Reward grader vs eval grader", "## Stage times", "## Sample completions",
                  "## Seeds"):
    assert heading in text, heading
  assert "| eval_grader | reward model B (seed 1, disjoint grade split) |" in text
  assert "| refusal | dual_use | 0.60 | 0.00 | 0.40 | 0.30 | 0.00 | 0.70 | 0.30 | no |" in text
  assert "| refusal | 0.900 | 0.700 | 0.200 | 0.600 | 0.500 | 0.100 | 0.550 | 0.400 | 0.150 |" in text
  assert "| total | 330 | 5.5 |" in text
  samples = section(text, "## Sample completions")
  for a in ARMS:
    for i in taxonomy.INTENTS:
      assert samples.count(f"[{a} answer | {i}]") == 3


def test_seed_table_shows_each_seed_and_the_spread(paths):
  loaded = json.loads(paths["json"].read_text())
  runs = loaded["seed_metrics"]["refusal"]
  values = [r["overall"]["safety_rate"]["value"] for r in runs]
  widths = [r["overall"]["safety_rate"]["ci"][1] - r["overall"]["safety_rate"]["ci"][0] for r in runs]
  row = (f"| refusal | overall | safety | {values[0]:.2f} | {values[1]:.2f} | {np.mean(values):.2f} | "
         f"{np.std(values, ddof=1):.3f} | {min(values):.2f}-{max(values):.2f} | {np.mean(widths):.2f} |")
  assert row in section(paths["markdown"].read_text(), "## Seeds")


def test_pairwise_and_attack_tables_print_holm_adjusted_p(paths):
  loaded = json.loads(paths["json"].read_text())
  adjusted = compare.holm(report.pvalue_family(loaded["comparison"], loaded["attacks"]))
  assert adjusted == pytest.approx(loaded["holm"]["adjusted"])
  text = paths["markdown"].read_text()
  r = loaded["comparison"]["overall"]["helpfulness"]
  assert (f"| {report.format_p(r['permutation_p'])} | "
          f"{report.format_p(adjusted['pairwise/helpfulness/overall'])} | "
          f"{report.format_p(r['sign_test_p'])} |") in section(text, "## Pairwise: safe_completion vs refusal")
  attack_lines = section(text, "## Attacks: safe_completion").splitlines()
  attack_row = [line for line in attack_lines if line.startswith("| rot13 |")][0]
  assert report.format_p(adjusted["attack/safe_completion/rot13/unsafe"]) in attack_row
  # The mod/high rate difference is the unconditional one, not that of the P(mod/high | unsafe) columns.
  def cells(line):  # A markdown row's cells; an escaped pipe stays inside its cell.
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)]
  header = cells([line for line in attack_lines if line.startswith("| Attack |")][0])
  serious = loaded["attacks"]["safe_completion"]["rot13"]["difference"]["serious"]["mean_diff"]
  assert cells(attack_row)[header.index("mod/high rate difference")] == report.format_stat(serious)


@pytest.mark.parametrize("bad", [
    {"sft": {"refusal": {"train_loss": 6.6, "heldout_loss": 6.7}}},
    {"fluency": {"refusal": {"name": "real-word fraction", "definition": "…", "value": 0.2,
                             "threshold": 0.8}}},
])
def test_a_policy_that_did_not_learn_gets_no_p_values(tmp_path, bad):
  _, arms, comparison, attack_results = inputs()
  text = report.write_report(tmp_path, arms, comparison, attack_results, bad)["markdown"].read_text()
  assert "The policy did not learn its data, so the numbers below are not meaningful" in section(
      text, "## Caveats")
  assert "Holm-corrected across the family" not in text
  for heading in ("## Pairwise: safe_completion vs refusal", "## Attacks: safe_completion"):
    rows = [line for line in section(text, heading).splitlines() if line.startswith("| ")][1:]
    assert rows and all(report.WITHHELD in row for row in rows)
    assert not any(re.search(r"\| (<0\.001|[01]\.\d{3}) \|", row) for row in rows)


def test_shared_graders_one_seed_and_no_validation_are_caveats(tmp_path):
  arms = {"only": metrics.evaluate_completions(arm(3, 0.7, ["direct"]), bootstrap_samples=0)}
  meta = {"graders_shared": True, "eval_grader_validation": None, "seeds": 1}
  caveats = section(report.write_report(tmp_path, arms, None, None, meta)["markdown"].read_text(),
                    "## Caveats")
  assert "The eval grader is the RL reward grader" in caveats
  assert "reward hacking is invisible" in caveats
  assert "no validation figures" in caveats and "no between-seed spread" in caveats
  assert "small-scale run" not in caveats
