r"""Regenerates the counts section of data/README.md from the shipped files.

  python scripts/update_data_readme.py [--check]

With --check it changes nothing and exits 1 when the README is out of date.
"""

import argparse
import collections
import sys
from pathlib import Path

from safe_completion.data import reading, records

BEGIN, END = "<!-- counts:begin -->", "<!-- counts:end -->"


def counts_markdown(data_dir: Path) -> str:
  """Tables of prompts per cell, demonstrations per arm/mode and grades per label."""
  prompts, prompt_report = records.load_prompts(data_dir / "prompts")
  _, demo_report = records.load_demonstrations(data_dir / "demonstrations")
  grades, grade_report = records.load_grades(data_dir / "grades")
  over_refusal = collections.Counter(
      (p.category, "over_refusal") for p in prompts
      if p.intent == "benign" and "over_refusal" in p.tags)
  by_split = collections.Counter((g.label, g.split) for g in grades)
  by_severity = collections.Counter((g.label, g.severity) for g in grades)
  by_helpfulness = collections.Counter((g.label, f"h={g.helpfulness}") for g in grades)
  labels = [records.GRADE_LABELS]
  sections = [
      (f"Prompts ({prompt_report.loaded}) per category, intent and split:",
       reading.format_cell_table(prompt_report.cell_fields, prompt_report.cell_counts)),
      ("Benign prompts tagged `over_refusal` (all splits):",
       reading.format_cell_table(("category", "tag"), over_refusal)),
      (f"Demonstrations ({demo_report.loaded}) per category, arm and mode:",
       reading.format_cell_table(demo_report.cell_fields, demo_report.cell_counts)),
      (f"Grades ({grade_report.loaded}) per label and grader split:",
       reading.format_cell_table(("label", "split"), by_split, labels)),
      ("Grades per label and severity:",
       reading.format_cell_table(("label", "severity"), by_severity, labels)),
      ("Grades per label and helpfulness rating:",
       reading.format_cell_table(("label", "helpfulness"), by_helpfulness, labels)),
      ("Grades per category, intent and grader split:",
       reading.format_cell_table(grade_report.cell_fields, grade_report.cell_counts)),
  ]
  return "\n\n".join(f"{title}\n\n{table}" for title, table in sections)


def updated_readme(readme: str, counts: str) -> str:
  """`readme` with the text between the count markers replaced by `counts`."""
  if BEGIN not in readme or END not in readme:
    raise ValueError(f"README lacks the markers {BEGIN} and {END}")
  head, rest = readme.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{counts}\n{END}{tail}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", type=Path, default=records.DEFAULT_DATA_DIR)
  parser.add_argument("--check", action="store_true")
  args = parser.parse_args()
  path = args.data_dir / "README.md"
  readme = path.read_text(encoding="utf-8")
  new = updated_readme(readme, counts_markdown(args.data_dir))
  if args.check:
    if new != readme:
      sys.exit(f"{path} counts are out of date; run scripts/update_data_readme.py")
    return
  path.write_text(new, encoding="utf-8")
  print(f"updated {path}")


if __name__ == "__main__":
  main()
