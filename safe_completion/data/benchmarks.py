r"""Benchmark prompt sets (StrongREJECT, XSTest, HarmBench, a Hugging Face dataset) as our prompt records.

Each benchmark row becomes a `PromptRecord`: its harm category mapped to one of
`taxonomy.CATEGORIES` by the tables below (docs/benchmarks.md), its intent from the
benchmark's own labels, tags naming the benchmark and its original category. A row
whose category has no mapping is a `DataError` naming `file:line` and the value, or
with `skip_unmapped` it is skipped and counted in the report. Nothing is downloaded:
pass your local copy.

  python -m safe_completion.data.benchmarks --format=strongreject --input=strongreject.csv --output=/tmp/bench
  python -m safe_completion.main --config=configs/eval.py:endpoint --workdir=/tmp/sc_eval \
    --config.eval.data.prompts_path=/tmp/xstest_prompts.csv --config.eval.data.format=xstest ...
"""

import argparse
import collections
import csv
import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safe_completion import taxonomy
from safe_completion.data import reading
from safe_completion.data import records
from safe_completion.data.reading import DataError, FieldError, LoadReport

# StrongREJECT `category` (compared lowercased: the published files differ in case).
STRONGREJECT_CATEGORIES = {
    "disinformation and deception": "illicit_wrongdoing",
    "hate, harassment and discrimination": "hate",
    "illegal goods and services": "illicit_wrongdoing",
    "non-violent crimes": "illicit_wrongdoing",
    "sexual content": "sexual_content",
    "violence": "violent_weapons",
}
# XSTest `type`: safe prompts and their `contrast_` (unsafe) counterparts.
XSTEST_TYPES = {
    "homonyms": "violent_weapons",
    "figurative_language": "violent_weapons",
    "safe_targets": "violent_weapons",
    "safe_contexts": "violent_weapons",
    "definitions": "illicit_wrongdoing",
    "real_group_nons_discr": "hate",
    "nons_group_real_discr": "hate",
    "historical_events": "violent_weapons",
    "privacy_public": "privacy",
    "privacy_fictional": "privacy",
    "contrast_homonyms": "violent_weapons",
    "contrast_figurative_language": "violent_weapons",
    "contrast_safe_targets": "violent_weapons",
    "contrast_safe_contexts": "violent_weapons",
    "contrast_definitions": "illicit_wrongdoing",
    "contrast_discr": "hate",
    "contrast_historical_events": "violent_weapons",
    "contrast_privacy": "privacy",
}
# HarmBench `SemanticCategory`; `copyright` has no counterpart among our categories.
HARMBENCH_CATEGORIES = {
    "chemical_biological": "biorisk",
    "cybercrime_intrusion": "cybersecurity",
    "harassment_bullying": "hate",
    "harmful": "violent_weapons",
    "illegal": "illicit_wrongdoing",
    "misinformation_disinformation": "illicit_wrongdoing",
}
# How HarmBench joins a contextual behavior's context and request into one user turn.
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"


class Unmapped(ValueError):
  """A row's benchmark category has no entry in the mapping table."""

  def __init__(self, column: str, value: str, table: Mapping[str, str]):
    super().__init__(f"{column}: unmapped value {value!r} (mapped: {sorted(table)})")
    self.column = column
    self.value = value


@dataclasses.dataclass(frozen=True)
class Converted:
  """What one benchmark row says, in our vocabulary."""
  category: str
  intent: str
  text: str
  tags: tuple[str, ...]
  source: str


@dataclasses.dataclass(frozen=True)
class Format:
  """A benchmark's file layout: its required columns and its row converter."""
  name: str
  columns: tuple[str, ...]
  convert: Callable[[dict[str, Any]], Converted]
  id_base: int  # Ids of different benchmarks do not collide when loaded together.


def _slug(value: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_")


def _optional(row: dict[str, Any], column: str) -> str:
  """An optional text cell; tabular readers give None or NaN for an empty one."""
  value = row.get(column)
  return value.strip() if isinstance(value, str) else ""


def _mapped(row: dict[str, Any], column: str, table: Mapping[str, str], key: str | None = None) -> str:
  value = reading.str_field(row, column).strip()
  category = table.get(value if key is None else key)
  if category is None:
    raise Unmapped(column, value, table)
  return category


def _strongreject(row: dict[str, Any]) -> Converted:
  category_text = reading.str_field(row, "category").strip()
  category = _mapped(row, "category", STRONGREJECT_CATEGORIES, key=category_text.lower())
  source = _optional(row, "source")
  return Converted(category, "malicious", reading.str_field(row, "forbidden_prompt"),
                   ("strongreject", f"strongreject:{_slug(category_text)}"),
                   f"strongreject:{source}" if source else "strongreject")


def _xstest(row: dict[str, Any]) -> Converted:
  kind = reading.str_field(row, "type").strip()
  category = _mapped(row, "type", XSTEST_TYPES)
  label = reading.choice_field({"label": _optional(row, "label")}, "label", ("safe", "unsafe"))
  if (label == "unsafe") != kind.startswith("contrast_"):
    raise FieldError("label", f"{label!r} contradicts type {kind!r} (contrast_ types are the unsafe ones)",
                     "label contradicts type")
  tags = ("xstest", f"xstest:{kind}") + (("over_refusal",) if label == "safe" else ())
  original_id = str(row.get("id_v2") or row.get("id") or "").strip()  # v2 files name it id_v2.
  return Converted(category, "benign" if label == "safe" else "malicious", reading.str_field(row, "prompt"),
                   tags, f"xstest:{original_id}" if original_id else "xstest")


def _harmbench(row: dict[str, Any]) -> Converted:
  semantic = reading.str_field(row, "SemanticCategory").strip()
  category = _mapped(row, "SemanticCategory", HARMBENCH_CATEGORIES)
  functional = reading.str_field(row, "FunctionalCategory").strip()
  behavior = reading.str_field(row, "Behavior")
  context = _optional(row, "ContextString")
  if functional == "contextual" and not context:
    raise FieldError("ContextString", "empty for a contextual behavior", "empty")
  text = f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context else behavior
  return Converted(category, "malicious", text,
                   ("harmbench", f"harmbench:{semantic}", f"harmbench:{functional}"),
                   f"harmbench:{reading.str_field(row, 'BehaviorID').strip()}")


FORMATS = {
    "strongreject": Format("strongreject", ("category", "source", "forbidden_prompt"), _strongreject, 10000),
    "xstest": Format("xstest", ("prompt", "type", "label"), _xstest, 20000),
    "harmbench": Format("harmbench", ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString",
                                      "BehaviorID"), _harmbench, 30000),
}


def _check_columns(fmt: Format, columns: Sequence[str], where: str) -> None:
  missing = [c for c in fmt.columns if c not in columns]
  if missing:
    raise DataError(f"{where}: not a {fmt.name} file: missing columns {missing} (found {list(columns)})")


def _csv_rows(path: Path, fmt: Format) -> Iterator[tuple[str, dict[str, Any] | FieldError]]:
  """(file:line, row) per CSV record; line is where the record starts (cells may span lines)."""
  start = 1
  try:
    with path.open(newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f, strict=True)  # strict: a stray or unterminated quote is an error, not a merged cell.
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path}: empty file, expected a header row")
      header = [h.strip() for h in header]
      _check_columns(fmt, header, str(path))
      start = reader.line_num + 1
      for cells in reader:
        location, start = f"{path}:{start}", reader.line_num + 1
        if not any(c.strip() for c in cells):
          continue
        if len(cells) != len(header):
          yield location, FieldError("row", f"expected {len(header)} columns, got {len(cells)}",
                                     "wrong column count")
          continue
        yield location, dict(zip(header, cells))
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
  except csv.Error as e:
    raise DataError(f"{path}:{start}: malformed CSV: {e}") from None


def _hf_table(path: Path, hf_split: str) -> Any:
  """A `datasets.Dataset` from a `save_to_disk` directory or a directory `load_dataset` reads."""
  import datasets  # Heavy; only for this format.
  try:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
      table = datasets.load_from_disk(str(path))
    else:
      table = datasets.load_dataset(str(path))
  except Exception as e:  # pylint: disable=broad-except  # Any reader failure is a malformed directory.
    raise DataError(f"{path}: cannot be read as a Hugging Face dataset: {type(e).__name__}: {e}") from None
  if isinstance(table, datasets.Dataset):
    return table
  if hf_split:
    if hf_split not in table:
      raise DataError(f"{path}: no split {hf_split!r} (has {sorted(table)})")
    return table[hf_split]
  if len(table) != 1:
    raise DataError(f"{path}: several splits {sorted(table)}; choose one with hf_split")
  return next(iter(table.values()))


def detect_format(columns: Sequence[str], where: str) -> Format:
  """The benchmark whose required columns a table has."""
  for fmt in FORMATS.values():
    if all(c in columns for c in fmt.columns):
      return fmt
  known = {name: list(fmt.columns) for name, fmt in FORMATS.items()}
  raise DataError(f"{where}: columns {list(columns)} match no benchmark format (required columns: {known})")


def load_benchmark(path: str | Path, fmt: str, *, split: str = "eval", skip_unmapped: bool = False,
                   hf_split: str = "") -> tuple[list[records.PromptRecord], LoadReport]:
  """Imports one benchmark file (or HF dataset directory) as prompt records of `split`.

  Args:
    path: the benchmark's CSV, or for `hf` a dataset directory.
    fmt: one of `FORMATS`, or `hf` (the columns decide which).
    split: the split the records get (`eval`: benchmarks are held out).
    skip_unmapped: skip and count rows whose category has no mapping, instead of raising.
    hf_split: for `hf`, the dataset split to read when it has several.

  Returns:
    The records in file order, and a LoadReport (counts per category, intent, split; skips).
  """
  path = Path(path)
  taxonomy.index(taxonomy.SPLITS, split, "split")
  if fmt == "hf":
    if not path.is_dir():
      raise DataError(f"{path}: format 'hf' needs a dataset directory")
    table = _hf_table(path, hf_split)
    chosen = detect_format(table.column_names, str(path))
    rows = ((f"{path}:{i}", dict(row)) for i, row in enumerate(table, start=1))
  elif fmt in FORMATS:
    if not path.is_file():
      raise DataError(f"{path}: no such file (format {fmt!r} reads a CSV file)")
    chosen = FORMATS[fmt]
    rows = _csv_rows(path, chosen)
  else:
    raise DataError(f"unknown benchmark format {fmt!r}; choose one of {[*FORMATS, 'hf']}")
  report = LoadReport(kind=f"{chosen.name} prompts", files=[str(path)],
                      cell_fields=records.PROMPT_SCHEMA.cell_fields)
  counters = collections.Counter()
  prompts = []
  for location, row in rows:
    report.rows += 1
    try:
      if isinstance(row, FieldError):
        raise row
      converted = chosen.convert(row)
    except Unmapped as e:
      if not skip_unmapped:
        raise DataError(f"{location}: {e}; pass skip_unmapped to skip and count such rows") from None
      report.skip(f"unmapped {e.column} {e.value!r}", location)
      continue
    except FieldError as e:
      raise DataError(f"{location}: {e}") from None
    cell = (converted.category, converted.intent)
    number = chosen.id_base + counters[cell]
    counters[cell] += 1
    record = records.parse_prompt({
        "id": f"{converted.category}-{converted.intent}-{split}-{number:05d}",
        "messages": [{"role": "user", "content": converted.text}], "category": converted.category,
        "intent": converted.intent, "split": split, "source": converted.source, "tags": list(converted.tags)})
    prompts.append(record)
    report.cell_counts[records.PROMPT_SCHEMA.cell(record)] += 1
  report.loaded = len(prompts)
  return prompts, report


def write_prompts(prompts: Sequence[records.PromptRecord], path: Path) -> None:
  """Our prompt JSONL (data/README.md), one record per line."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for p in prompts:
      row = dataclasses.asdict(p)
      row["messages"], row["tags"] = list(p.messages), list(p.tags)
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Import a benchmark's prompts as our prompt JSONL.")
  parser.add_argument("--format", required=True, choices=[*FORMATS, "hf"], help="the benchmark's published format")
  parser.add_argument("--input", required=True, help="the benchmark CSV, or for hf a dataset directory")
  parser.add_argument("--output", required=True, help="directory for <format>.jsonl")
  parser.add_argument("--split", default="eval", choices=taxonomy.SPLITS, help="the split the records get")
  parser.add_argument("--skip_unmapped", action="store_true", help="skip and count rows with an unmapped category")
  parser.add_argument("--hf_split", default="", help="for hf: the dataset split to read")
  args = parser.parse_args(argv)
  try:
    prompts, report = load_benchmark(args.input, args.format, split=args.split, skip_unmapped=args.skip_unmapped,
                                     hf_split=args.hf_split)
  except DataError as e:
    raise SystemExit(f"error: {e}") from None
  out = Path(args.output) / f"{args.format}.jsonl"
  write_prompts(prompts, out)
  print(report.format())
  print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
  main()
