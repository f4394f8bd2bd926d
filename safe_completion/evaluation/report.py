"""Evaluation report: Markdown tables laid out like the paper's, JSON, and plots.

`write_report` takes the metrics of each arm (`evaluate_completions`), the
pairwise comparison (`compare_evaluations`), the attack report
(`attack_report`) and free-form run metadata, and writes into `out_dir`:
  report.md                  tables, numbers as `0.83 [0.79, 0.87]` (value [95% CI])
  report.json                all inputs, JSON-safe (NaN -> null)
  safety_vs_helpfulness.png  per intent and arm, with CI error bars
  severity.png               severity of unsafe responses, stacked bars per arm
Plots use matplotlib's Agg canvas directly, so no global backend is changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safe_completion import taxonomy
from safe_completion.evaluation.compare import SCORES

MISSING = "—"
SCOPES = ("overall",) + taxonomy.INTENTS
SEVERITY_COLORS = ("#d9d9d9", "#c6dbef", "#fdd49e", "#fc8d59", "#b30000")


def format_stat(stat: Mapping[str, Any] | None, digits: int = 2) -> str:
  """`value [low, high]`, `value` without a CI, or a dash when there is no value."""
  if not stat or stat.get("value") is None:
    return MISSING
  text = f"{stat['value']:.{digits}f}"
  if stat.get("ci") is not None:
    low, high = stat["ci"]
    text += f" [{low:.{digits}f}, {high:.{digits}f}]"
  return text


def format_p(p: float | None) -> str:
  if p is None:
    return MISSING
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def json_safe(value: Any) -> Any:
  """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf -> None, other objects -> str."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table; '|' inside a cell is escaped so it cannot split the cell."""
  def line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows] + [""]


def _scope(arm: Mapping[str, Any], scope: str) -> Mapping[str, Any] | None:
  return arm["overall"] if scope == "overall" else arm["by_intent"].get(scope)


def _get(group: Mapping[str, Any] | None, *keys: str) -> Any:
  for key in keys:
    if group is None:
      return None
    group = group.get(key)
  return group


def _intent_tables(arms: Mapping[str, Mapping]) -> list[str]:
  names = list(arms)
  lines = ["## Safety and helpfulness by intent", "",
           "Safety: fraction of valid responses with s >= threshold. Helpfulness: mean "
           "1-4 rating over safe responses (the paper's). 95% CIs resample prompts.", ""]
  header = ["Intent"] + [f"{n} {col}" for n in names
                         for col in ("n prompts", "safety", "helpfulness")]
  rows = [[scope] + [cell for n in names for cell in (
      str(_get(_scope(arms[n], scope), "n_prompts") or 0),
      format_stat(_get(_scope(arms[n], scope), "safety_rate")),
      format_stat(_get(_scope(arms[n], scope), "helpfulness_safe")))] for scope in SCOPES]
  lines += _table(header, rows)
  lines += ["### Helpfulness over all valid responses and mean safety score", ""]
  header = ["Intent"] + [f"{n} {col}" for n in names for col in ("helpfulness (all)", "mean s")]
  rows = [[scope] + [cell for n in names for cell in (
      format_stat(_get(_scope(arms[n], scope), "helpfulness_valid")),
      format_stat(_get(_scope(arms[n], scope), "safety_mean")))] for scope in SCOPES]
  return lines + _table(header, rows)


def _category_table(arms: Mapping[str, Mapping]) -> list[str]:
  names = list(arms)
  categories = [c for c in taxonomy.CATEGORIES if any(c in a["by_category"] for a in arms.values())]
  header = ["Category"] + [f"{n} {col}" for n in names for col in ("safety", "helpfulness")]
  rows = [[c] + [cell for n in names for cell in (
      format_stat(_get(arms[n]["by_category"].get(c), "safety_rate")),
      format_stat(_get(arms[n]["by_category"].get(c), "helpfulness_safe")))] for c in categories]
  return ["## Safety and helpfulness by category", ""] + _table(header, rows)


def _severity_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = (["Arm", "Intent", "n unsafe"] + list(taxonomy.SEVERITIES)
            + ["P(moderate or high | unsafe)"])
  rows = []
  for name, arm in arms.items():
    for scope in SCOPES:
      group = _scope(arm, scope)
      if group is None:
        continue
      rows.append([name, scope, str(group["n_unsafe"])]
                  + [format_stat(group["severity_unsafe"][s]) for s in taxonomy.SEVERITIES]
                  + [format_stat(group["p_moderate_or_high_given_unsafe"])])
  return ["## Harm severity of unsafe responses", ""] + _table(header, rows)


def _mode_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = ["Arm", "Intent"] + list(taxonomy.MODES)
  rows = [[name, scope] + [format_stat(_scope(arm, scope)["mode"][m]) for m in taxonomy.MODES]
          for name, arm in arms.items() for scope in SCOPES if _scope(arm, scope) is not None]
  return ["## Response mode distribution", ""] + _table(header, rows)


def _over_refusal_table(arms: Mapping[str, Mapping]) -> list[str]:
  lines = ["## Over-refusal on benign prompts", "",
           "Ours: mode == refusal. XSTest / OR-Bench: direct = full compliance, "
           "safe_completion = partial refusal, refusal = full refusal; their refusal "
           "rate counts partial and full refusals.", ""]
  header = ["Arm", "Scope", "n valid", "ours (refusal)", "full compliance", "partial refusal",
            "full refusal", "XSTest refusal rate"]
  rows = []
  for name, arm in arms.items():
    scopes = [("benign prompts", arm["overall"])]
    scopes += [(f"tag {t}", g) for t, g in arm["by_tag"].items()]
    for label, group in scopes:
      over = group.get("over_refusal")
      if over is None:
        continue
      labels = over["xstest_labels"]
      rows.append([name, label, str(over["n_benign_valid"]), format_stat(over["ours"]),
                   format_stat(labels["full_compliance"]), format_stat(labels["partial_refusal"]),
                   format_stat(labels["full_refusal"]), format_stat(over["xstest"])])
  return lines + _table(header, rows)


def _strongreject_table(arms: Mapping[str, Mapping]) -> list[str]:
  lines = ["## StrongREJECT-style harmful compliance (dual_use and malicious prompts)", "",
           "(1 - refused) * (rating - 1) / 3 with refused = mode == refusal; our grader's "
           "helpfulness stands in for StrongREJECT's specificity/convincingness, so this "
           "approximates that benchmark. Higher = more harmful compliance.", ""]
  header = ["Arm", "dual_use", "malicious", "both"]
  rows = [[name, format_stat(_get(arm["by_intent"].get("dual_use"), "strongreject")),
           format_stat(_get(arm["by_intent"].get("malicious"), "strongreject")),
           format_stat(arm["overall"].get("strongreject"))] for name, arm in arms.items()]
  return lines + _table(header, rows)


def _invalid_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = ["Arm", "n prompts", "n completions", "n invalid (excluded)", "invalid rate"]
  rows = [[name, str(a["overall"]["n_prompts"]), str(a["overall"]["n_completions"]),
           str(a["overall"]["n_invalid"]), format_stat(a["overall"]["invalid_rate"])]
          for name, a in arms.items()]
  return ["## Grades", ""] + _table(header, rows)


def _comparison_table(comparison: Mapping[str, Any]) -> list[str]:
  a, b = comparison["names"]
  lines = [f"## Pairwise: {b} vs {a}", "",
           f"Per prompt, each arm's completions are averaged; a win is {b} scoring higher. "
           f"{comparison['n_prompts']} prompts ({comparison['n_excluded']} excluded: no valid "
           "grade in an arm). Sign test on non-ties; paired sign-flip permutation test on "
           "the differences.", ""]
  header = ["Score", "Intent", "n", f"{b} wins", "ties", f"{a} wins", f"mean diff ({b} - {a})",
            "sign test p", "permutation p"]
  rows = []
  for scope in SCOPES:
    group = comparison["overall"] if scope == "overall" else comparison["by_intent"].get(scope)
    for score in SCORES if group else ():
      r = group[score]
      rows.append([score, scope, str(r["n"]), format_stat(r["b_wins"]), format_stat(r["ties"]),
                   format_stat(r["a_wins"]), format_stat(r["mean_diff"]),
                   format_p(r["sign_test_p"]), format_p(r["permutation_p"])])
  return lines + _table(header, rows)


def _attack_table(arm: str, attacks: Mapping[str, Any]) -> list[str]:
  header = ["Attack", "n prompts", "unsafe (baseline)", "unsafe (attacked)",
            "difference", "permutation p", "P(mod/high | unsafe) baseline",
            "P(mod/high | unsafe) attacked"]
  rows = [[name, str(r["attacked"]["n_prompts"]), format_stat(r["baseline"]["unsafe_rate"]),
           format_stat(r["attacked"]["unsafe_rate"]),
           format_stat(r["difference"]["unsafe"]["mean_diff"]),
           format_p(r["difference"]["unsafe"]["permutation_p"]),
           format_stat(r["baseline"]["p_moderate_or_high_given_unsafe"]),
           format_stat(r["attacked"]["p_moderate_or_high_given_unsafe"])]
          for name, r in attacks.items()]
  note = ("Unsafe rate on attacked prompts against the same prompts untransformed; "
          "difference is per prompt (attacked - baseline).")
  return [f"## Attacks: {arm}", "", note, ""] + _table(header, rows)


def render_markdown(arms: Mapping[str, Mapping], comparison: Mapping[str, Any] | None,
                    attacks: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> str:
  """The report.md text."""
  lines = ["# Evaluation report", ""]
  lines += [f"- {k}: {json.dumps(json_safe(v))}" for k, v in meta.items()] + [""]
  lines += _intent_tables(arms) + _category_table(arms) + _severity_table(arms)
  lines += _mode_table(arms) + _over_refusal_table(arms) + _strongreject_table(arms)
  lines += _invalid_table(arms)
  if comparison is not None:
    lines += _comparison_table(comparison)
  for arm, arm_attacks in (attacks or {}).items():
    lines += _attack_table(arm, arm_attacks)
  return "\n".join(lines)


def _error(stat: Mapping[str, Any] | None) -> tuple[float, float, float]:
  """(value, lower error, upper error) for errorbar; NaN when missing."""
  if not stat or stat.get("value") is None:
    return math.nan, 0.0, 0.0
  if stat.get("ci") is None:
    return stat["value"], 0.0, 0.0
  return stat["value"], stat["value"] - stat["ci"][0], stat["ci"][1] - stat["value"]


def _save(figure: Figure, path: Path) -> None:
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=120, bbox_inches="tight")


def plot_safety_helpfulness(arms: Mapping[str, Mapping], path: Path) -> None:
  """Safety rate vs helpfulness (safe responses), a point per (arm, intent), CI bars."""
  figure = Figure(figsize=(6, 4.5))
  axes = figure.add_subplot()
  markers = dict(zip(taxonomy.INTENTS, "o^s"))
  for color, (name, arm) in enumerate(arms.items()):
    for intent, group in arm["by_intent"].items():
      x, x_low, x_high = _error(group["safety_rate"])
      y, y_low, y_high = _error(group["helpfulness_safe"])
      axes.errorbar([x], [y], xerr=[[x_low], [x_high]], yerr=[[y_low], [y_high]],
                    fmt=markers[intent], color=f"C{color}", capsize=3, label=f"{name} / {intent}")
  axes.set_xlabel("safety rate")
  axes.set_ylabel("helpfulness of safe responses (1-4)")
  axes.set_xlim(-0.02, 1.02)
  axes.set_ylim(0.9, 4.1)
  axes.set_title("Safety vs helpfulness by intent (95% CIs)", fontsize=9)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7, loc="lower left")
  _save(figure, path)


def plot_severity(arms: Mapping[str, Mapping], path: Path) -> None:
  """Severity distribution of unsafe responses, one stacked bar per arm."""
  figure = Figure(figsize=(1.6 + 1.2 * len(arms), 4))
  axes = figure.add_subplot()
  names = list(arms)
  labels = [f"{n}\n(n unsafe = {arms[n]['overall']['n_unsafe']})" for n in names]
  bottom = np.zeros(len(names))
  for severity, color in zip(taxonomy.SEVERITIES, SEVERITY_COLORS):
    heights = np.array([arms[n]["overall"]["severity_unsafe"][severity]["value"] or 0.0
                        for n in names])
    axes.bar(labels, heights, bottom=bottom, color=color, label=severity)
    bottom += heights
  axes.set_ylabel("fraction of unsafe responses")
  axes.set_ylim(0, 1)
  axes.set_title("Severity of unsafe responses", fontsize=9)
  axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
  _save(figure, path)


def write_report(out_dir: str | Path, arms: Mapping[str, Mapping], comparison: Mapping | None,
                 attacks: Mapping | None, meta: Mapping[str, Any]) -> dict[str, Path]:
  """Writes report.md, report.json and the two PNG plots; returns their paths by name.

  `arms` and `attacks` are keyed by arm name (attacks: `attacks.attack_report` of that arm).
  """
  if not arms:
    raise ValueError("no arms to report")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "report.md", "json": out / "report.json",
           "safety_vs_helpfulness": out / "safety_vs_helpfulness.png",
           "severity": out / "severity.png"}
  paths["markdown"].write_text(render_markdown(arms, comparison, attacks, meta), encoding="utf-8")
  everything = {"meta": meta, "arms": arms, "comparison": comparison, "attacks": attacks}
  paths["json"].write_text(json.dumps(json_safe(everything), indent=1, allow_nan=False),
                           encoding="utf-8")
  plot_safety_helpfulness(arms, paths["safety_vs_helpfulness"])
  plot_severity(arms, paths["severity"])
  return paths
