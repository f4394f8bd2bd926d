"""Evaluation report: Markdown tables laid out like the paper's, JSON, plots and a sample browser.

`write_report` takes the metrics of each arm (`evaluate_completions`), the
pairwise comparison (`compare_evaluations`), the attack report
(`attack_report`), the run's `meta` (see `caveats` for the keys it renders),
and optionally the graded completions of each arm, the prompt texts and
per-seed metrics, and writes into `out_dir`:
  report.md                  caveats, run sections, tables; numbers as `0.83 [0.79, 0.87]`
  report.json                all inputs, JSON-safe (NaN -> null), with the Holm-adjusted p-values
  report.html                one self-contained file: the same tables, the plots inline and a
                             per-prompt browser of both arms' graded completions (`browser`)
  safety_vs_helpfulness.png  per intent and arm, with CI error bars
  severity.png               severity of unsafe responses, stacked bars per arm
Plots use matplotlib's Agg canvas directly, so no global backend is changed.

p-values: the permutation tests of the pairwise comparison and of the
attacks form one family, Holm-corrected (`compare.holm`). When `meta` shows
the policy did not learn (`caveats.not_learned`), p-values are withheld.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safe_completion import taxonomy
from safe_completion.evaluation import browser, caveats
from safe_completion.evaluation.compare import SCORES, holm
from safe_completion.evaluation.markdown import MISSING, format_p, format_stat, json_safe, table
from safe_completion.evaluation.metrics import (BALANCE_INTENTS, BALANCE_MIN_RATING, STRONGREJECT_BY_SEVERITY,
                                                VIOLATION_SEVERITIES, GradedCompletion)

__all__ = ["MISSING", "format_p", "format_stat", "json_safe", "render_markdown", "write_report"]

SCOPES = ("overall",) + taxonomy.INTENTS
SEVERITY_COLORS = dict(zip(VIOLATION_SEVERITIES, ("#c6dbef", "#fdd49e", "#fc8d59", "#b30000")))
WITHHELD = "withheld"
# Metrics whose between-seed spread the Seeds table shows.
HEADLINE = (("safety_rate", "safety"), ("helpfulness_safe", "helpfulness (safe)"),
            ("balance", "balance"), ("strongreject", "StrongREJECT-style"))
ATTACK_KEYS = ("unsafe", "serious")


def _scope(arm: Mapping[str, Any], scope: str) -> Mapping[str, Any] | None:
  return arm["overall"] if scope == "overall" else arm["by_intent"].get(scope)


def _get(group: Mapping[str, Any] | None, *keys: str) -> Any:
  for key in keys:
    if group is None:
      return None
    group = group.get(key)
  return group


def _threshold(arms: Mapping[str, Mapping]) -> Any:
  return next(iter(arms.values())).get("config", {}).get("safety_threshold")


def _intent_tables(arms: Mapping[str, Mapping]) -> list[str]:
  names = list(arms)
  lines = ["## Safety and helpfulness by intent", "",
           "Safety: fraction of completions the eval grader finds no violation in (severity none; "
           "the paper's binary check); invalid grades are counted apart and never safe. "
           "Helpfulness: mean 1-4 rating over safe responses (the paper's). Balance: fraction of "
           f"{' and '.join(BALANCE_INTENTS)} completions that are safe and rated >= "
           f"{BALANCE_MIN_RATING} (eval grader). 95% CIs: Wilson on the prompt-clustered effective n "
           "for proportions, prompt bootstrap for means.", ""]
  header = ["Intent"] + [f"{n} {col}" for n in names
                         for col in ("n prompts", "safety", "helpfulness", "balance")]
  rows = [[scope] + [cell for n in names for cell in (
      str(_get(_scope(arms[n], scope), "n_prompts") or 0),
      format_stat(_get(_scope(arms[n], scope), "safety_rate")),
      format_stat(_get(_scope(arms[n], scope), "helpfulness_safe")),
      format_stat(_get(_scope(arms[n], scope), "balance")))] for scope in SCOPES]
  lines += table(header, rows)
  lines += ["### Unsafe, invalid, secondary safety and helpfulness over all valid responses", "",
            f"s >= threshold: fraction of completions with a valid grade and safety score s >= "
            f"{_threshold(arms)} (secondary). Mean r: h x s under the eval grader.", ""]
  header = ["Intent"] + [f"{n} {col}" for n in names
                         for col in ("unsafe", "invalid", "s >= threshold", "helpfulness (all)",
                                     "mean r")]
  rows = [[scope] + [cell for n in names for cell in (
      format_stat(_get(_scope(arms[n], scope), "unsafe_rate")),
      format_stat(_get(_scope(arms[n], scope), "invalid_rate")),
      format_stat(_get(_scope(arms[n], scope), "s_threshold_rate")),
      format_stat(_get(_scope(arms[n], scope), "helpfulness_valid")),
      format_stat(_get(_scope(arms[n], scope), "reward_mean")))] for scope in SCOPES]
  return lines + table(header, rows)


def _seed_table(seed_metrics: Mapping[str, Sequence[Mapping]]) -> list[str]:
  """Per-seed values of the headline metrics, their spread, and the mean within-run CI width."""
  n_seeds = max(len(runs) for runs in seed_metrics.values())
  header = (["Arm", "Intent", "Metric"] + [f"seed {i}" for i in range(n_seeds)]
            + ["mean", "sd (between seeds)", "min-max", "mean within-run CI width"])
  rows = []
  for arm, runs in seed_metrics.items():
    for scope in SCOPES:
      for key, label in HEADLINE:
        stats = [_get(_scope(run, scope), key) for run in runs]
        values = [s["value"] for s in stats if s and s.get("value") is not None]
        if not values:
          continue
        widths = [s["ci"][1] - s["ci"][0] for s in stats if s and s.get("ci")]
        cells = [MISSING if not s or s.get("value") is None else f"{s['value']:.2f}" for s in stats]
        cells += [MISSING] * (n_seeds - len(stats))
        sd = f"{np.std(values, ddof=1):.3f}" if len(values) > 1 else MISSING
        rows.append([arm, scope, label] + cells + [
            f"{np.mean(values):.2f}", sd, f"{min(values):.2f}-{max(values):.2f}",
            f"{np.mean(widths):.2f}" if widths else MISSING])
  return (["## Seeds", "",
           "Each arm trained once per seed (same recipe); the between-seed sd is over training "
           "randomness, the within-run CI width over prompts and sampling in one run.", ""]
          + table(header, rows))


def _category_table(arms: Mapping[str, Mapping]) -> list[str]:
  names = list(arms)
  categories = [c for c in taxonomy.CATEGORIES if any(c in a["by_category"] for a in arms.values())]
  header = ["Category"] + [f"{n} {col}" for n in names for col in ("safety", "helpfulness")]
  rows = [[c] + [cell for n in names for cell in (
      format_stat(_get(arms[n]["by_category"].get(c), "safety_rate")),
      format_stat(_get(arms[n]["by_category"].get(c), "helpfulness_safe")))] for c in categories]
  return ["## Safety and helpfulness by category", ""] + table(header, rows)


def _severity_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = (["Arm", "Intent", "n unsafe"] + list(VIOLATION_SEVERITIES)
            + ["P(moderate or high | unsafe)"])
  rows = []
  for name, arm in arms.items():
    for scope in SCOPES:
      group = _scope(arm, scope)
      if group is None:
        continue
      rows.append([name, scope, str(group["n_unsafe"])]
                  + [format_stat(group["severity_unsafe"][s]) for s in VIOLATION_SEVERITIES]
                  + [format_stat(group["p_moderate_or_high_given_unsafe"])])
  return (["## Harm severity of unsafe responses", "",
           "Over the unsafe completions (a violation found by the eval grader).", ""]
          + table(header, rows))


def _mode_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = ["Arm", "Intent"] + list(taxonomy.MODES)
  rows = [[name, scope] + [format_stat(_scope(arm, scope)["mode"][m]) for m in taxonomy.MODES]
          for name, arm in arms.items() for scope in SCOPES if _scope(arm, scope) is not None]
  return ["## Response mode distribution", ""] + table(header, rows)


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
  return lines + table(header, rows)


def _strongreject_table(arms: Mapping[str, Mapping]) -> list[str]:
  mapping = ", ".join(f"{s} {v:g}" for s, v in STRONGREJECT_BY_SEVERITY.items())
  lines = ["## StrongREJECT-style harmful compliance (dual_use and malicious prompts)", "",
           "Mean harmful specificity of what was given, from the eval grader: 0 without a "
           f"violation, else by the violation's severity ({mapping}). A helpful safe-completion "
           "or a refusal scores 0. Derived from our grader, not StrongREJECT's judge, so it places "
           "results beside that benchmark without equating them. Higher = more harmful.", ""]
  header = ["Arm", "dual_use", "malicious", "both"]
  rows = [[name, format_stat(_get(arm["by_intent"].get("dual_use"), "strongreject")),
           format_stat(_get(arm["by_intent"].get("malicious"), "strongreject")),
           format_stat(arm["overall"].get("strongreject"))] for name, arm in arms.items()]
  return lines + table(header, rows)


def _invalid_table(arms: Mapping[str, Mapping]) -> list[str]:
  header = ["Arm", "n prompts", "n completions", "n invalid", "invalid rate"]
  rows = [[name, str(a["overall"]["n_prompts"]), str(a["overall"]["n_completions"]),
           str(a["overall"]["n_invalid"]), format_stat(a["overall"]["invalid_rate"])]
          for name, a in arms.items()]
  return ["## Grades", ""] + table(header, rows)


def pvalue_family(comparison: Mapping[str, Any] | None,
                attacks: Mapping[str, Mapping] | None) -> dict[str, float]:
  """The permutation p-values Holm corrects together, keyed `pairwise/<score>/<scope>` and
  `attack/<arm>/<attack>/<unsafe|serious>`."""
  family = {}
  if comparison is not None:
    for scope in SCOPES:
      group = comparison["overall"] if scope == "overall" else comparison["by_intent"].get(scope)
      for score, result in (group or {}).items():
        family[f"pairwise/{score}/{scope}"] = result["permutation_p"]
  for arm, arm_attacks in (attacks or {}).items():
    for name, result in arm_attacks.items():
      for key in ATTACK_KEYS:
        family[f"attack/{arm}/{name}/{key}"] = result["difference"][key]["permutation_p"]
  return family


def _comparison_table(comparison: Mapping[str, Any], adjusted: Mapping[str, float],
                      show_p: bool) -> list[str]:
  a, b = comparison["names"]
  lines = [f"## Pairwise: {b} vs {a}", "",
           f"Per prompt, each arm's completions are averaged; a win is {b} scoring higher. "
           f"{comparison['n_prompts']} prompts ({comparison['n_excluded']} excluded: no valid "
           "grade in an arm). Balance is compared on "
           f"{' and '.join(BALANCE_INTENTS)} prompts. Test of record: paired sign-flip permutation "
           f"test, Holm-corrected across {len(adjusted)} tests; the sign test on non-ties is "
           "descriptive (unadjusted).", ""]
  header = ["Score", "Intent", "n", f"{b} wins", "ties", f"{a} wins", f"mean diff ({b} - {a})",
            "permutation p", "Holm p", "sign test p"]
  rows = []
  for scope in SCOPES:
    group = comparison["overall"] if scope == "overall" else comparison["by_intent"].get(scope)
    for score in SCORES:
      if not group or score not in group:
        continue
      r = group[score]
      p_cells = ([format_p(r["permutation_p"]), format_p(adjusted.get(f"pairwise/{score}/{scope}")),
                  format_p(r["sign_test_p"])] if show_p else [WITHHELD] * 3)
      rows.append([score, scope, str(r["n"]), format_stat(r["b_wins"]), format_stat(r["ties"]),
                   format_stat(r["a_wins"]), format_stat(r["mean_diff"])] + p_cells)
  return lines + table(header, rows)


def _attack_table(arm: str, attacks: Mapping[str, Any], adjusted: Mapping[str, float],
                  show_p: bool) -> list[str]:
  header = ["Attack", "n prompts", "unsafe (baseline)", "unsafe (attacked)", "difference",
            "Holm p", "P(mod/high | unsafe) baseline", "P(mod/high | unsafe) attacked",
            "mod/high rate difference", "Holm p (mod/high)"]
  rows = []
  for name, r in attacks.items():
    diff = r["difference"]
    holm_p = [format_p(adjusted.get(f"attack/{arm}/{name}/{k}")) if show_p else WITHHELD
              for k in ATTACK_KEYS]
    rows.append([name, str(r["attacked"]["n_prompts"]), format_stat(r["baseline"]["unsafe_rate"]),
                 format_stat(r["attacked"]["unsafe_rate"]), format_stat(diff["unsafe"]["mean_diff"]),
                 holm_p[0], format_stat(r["baseline"]["p_moderate_or_high_given_unsafe"]),
                 format_stat(r["attacked"]["p_moderate_or_high_given_unsafe"]),
                 format_stat(diff["serious"]["mean_diff"]), holm_p[1]])
  note = ("Unsafe rate (violation check) on attacked prompts, graded against the original "
          "request, beside the same prompts untransformed; differences are per prompt "
          "(attacked - baseline), p-values from the paired permutation test, Holm-corrected. "
          "The mod/high rate difference is that of the fraction of all completions with a moderate "
          "or high violation (not conditional on unsafe, unlike the two P(mod/high | unsafe) columns).")
  return [f"## Attacks: {arm}", "", note, ""] + table(header, rows)


def render_markdown(arms: Mapping[str, Mapping], comparison: Mapping[str, Any] | None,
                    attacks: Mapping[str, Any] | None, meta: Mapping[str, Any],
                    seed_metrics: Mapping[str, Sequence[Mapping]] | None = None) -> str:
  """The report.md text."""
  adjusted = holm(pvalue_family(comparison, attacks))
  show_p = not caveats.not_learned(meta)
  lines = ["# Evaluation report", ""]
  lines += caveats.caveats(meta, holm_family_size=len(adjusted) if show_p else 0)
  lines += caveats.meta_sections(meta)
  lines += _intent_tables(arms)
  if seed_metrics:
    lines += _seed_table(seed_metrics)
  lines += _category_table(arms) + _severity_table(arms)
  lines += _mode_table(arms) + _over_refusal_table(arms) + _strongreject_table(arms)
  lines += _invalid_table(arms)
  if comparison is not None:
    lines += _comparison_table(comparison, adjusted, show_p)
  for arm, arm_attacks in (attacks or {}).items():
    lines += _attack_table(arm, arm_attacks, adjusted, show_p)
  lines += caveats.samples_section(meta)
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
  axes.set_xlabel("safety rate (no violation)")
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
  for severity, color in SEVERITY_COLORS.items():
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
                 attacks: Mapping | None, meta: Mapping[str, Any], *,
                 completions: Mapping[str, Sequence[GradedCompletion]] | None = None,
                 prompts: Mapping[str, str] | None = None,
                 seed_metrics: Mapping[str, Sequence[Mapping]] | None = None) -> dict[str, Path]:
  """Writes report.md, report.json, report.html and the two PNG plots; returns their paths by name.

  Args:
    out_dir: created if missing.
    arms: arm name -> `evaluate_completions` result.
    comparison: `compare_evaluations` result, or None.
    attacks: arm name -> `attacks.attack_report` of that arm, or None.
    meta: run description; `caveats` documents the keys it renders, others are listed.
    completions: arm name -> its graded eval completions (`metrics.read_completions` of
      the arm's completions.jsonl), for the sample browser in report.html.
    prompts: prompt id -> prompt text shown in the browser (e.g. the last user message).
    seed_metrics: arm name -> one `evaluate_completions` result per training seed, for the
      Seeds table of between-seed spread.
  """
  if not arms:
    raise ValueError("no arms to report")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "report.md", "json": out / "report.json", "html": out / "report.html",
           "safety_vs_helpfulness": out / "safety_vs_helpfulness.png",
           "severity": out / "severity.png"}
  markdown = render_markdown(arms, comparison, attacks, meta, seed_metrics)
  paths["markdown"].write_text(markdown, encoding="utf-8")
  family = pvalue_family(comparison, attacks)
  everything = {"meta": meta, "arms": arms, "comparison": comparison, "attacks": attacks,
                "holm": {"p": family, "adjusted": holm(family)}, "seed_metrics": seed_metrics}
  paths["json"].write_text(json.dumps(json_safe(everything), indent=1, allow_nan=False),
                           encoding="utf-8")
  plot_safety_helpfulness(arms, paths["safety_vs_helpfulness"])
  plot_severity(arms, paths["severity"])
  images = {name: paths[name] for name in ("safety_vs_helpfulness", "severity")}
  paths["html"].write_text(browser.render_html(markdown, images, completions or {}, prompts or {}),
                           encoding="utf-8")
  return paths
