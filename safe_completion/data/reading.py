"""Reading record files (JSONL natively, other formats via `datasets`) with validation.

One machinery for every record type: a `Schema` says how to turn a raw row
into a record, what makes a record unique and how to count it. Problems are
`DataError`s naming `file:line: field: problem`; with `skip_invalid=True`
they are counted per reason in a `LoadReport` instead (never silently dropped).
"""

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from safe_completion import taxonomy

PathLike = str | Path
Paths = PathLike | Sequence[PathLike]

# File suffix -> `datasets` builder for the formats read through `datasets`.
DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
# How many locations the report keeps per skip reason.
MAX_LOCATIONS = 5


class DataError(ValueError):
  """A record file is malformed; the message names file, line and field."""


class FieldError(ValueError):
  """One field of one row is invalid; `reason` is the short kind used for counting."""

  def __init__(self, field: str, problem: str, reason: str):
    super().__init__(f"{field}: {problem}")
    self.field = field
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Schema:
  """How one record type is read.

  Attributes:
    kind: plural name used in messages ("prompts").
    fields: every allowed top-level field.
    parse: raw row (dict) -> record; raises FieldError.
    key: record -> identity that must be unique across all files.
    key_field: the field named in a duplicate error.
    cell_fields: names of the parts of `cell(record)` (report table header).
    cell: record -> tuple counted in `LoadReport.cell_counts`.
    json_fields: fields that tabular files (CSV) hold as JSON text.
  """
  kind: str
  fields: tuple[str, ...]
  parse: Callable[[dict[str, Any]], Any]
  key: Callable[[Any], Hashable]
  key_field: str
  cell_fields: tuple[str, ...]
  cell: Callable[[Any], tuple[str, ...]]
  json_fields: tuple[str, ...] = ()


@dataclasses.dataclass
class LoadReport:
  """What a load read, kept, filtered out and skipped, and counts per cell."""
  kind: str
  files: list[str] = dataclasses.field(default_factory=list)
  rows: int = 0
  loaded: int = 0
  filtered: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_at: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  cell_fields: tuple[str, ...] = ()
  cell_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def skip(self, reason: str, location: str) -> None:
    self.skipped[reason] += 1
    locations = self.skipped_at.setdefault(reason, [])
    if len(locations) < MAX_LOCATIONS:
      locations.append(location)

  def format(self) -> str:
    """Summary line, skip reasons and the cell counts as a Markdown table."""
    lines = [f"{self.kind}: {self.loaded} loaded from {len(self.files)} files "
             f"({self.rows} rows, {self.filtered} filtered out, "
             f"{sum(self.skipped.values())} skipped as invalid)"]
    for reason, count in sorted(self.skipped.items()):
      lines.append(f"  skipped {count}: {reason} (at {', '.join(self.skipped_at[reason])})")
    if self.cell_counts:
      lines += ["", format_cell_table(self.cell_fields, self.cell_counts)]
    return "\n".join(lines)


def format_cell_table(cell_fields: Sequence[str], counts: collections.Counter,
                      orders: Sequence[Sequence[str]] = ()) -> str:
  """Markdown table: one row per first cell part, one column per the rest, with totals.

  Values sort in taxonomy order, then in the order of any of `orders`, then
  alphabetically.
  """
  vocabularies = (taxonomy.CATEGORIES, taxonomy.INTENTS, taxonomy.SPLITS, taxonomy.ARMS,
                  taxonomy.MODES, taxonomy.SEVERITIES, *orders)

  def order(value: str) -> tuple[int, str]:
    return next(((v.index(value), value) for v in vocabularies if value in v), (1000, value))

  rows = sorted({cell[0] for cell in counts}, key=order)
  cols = sorted({cell[1:] for cell in counts}, key=lambda c: tuple(map(order, c)))
  header = [cell_fields[0]] + [" ".join(c) for c in cols] + ["total"]
  table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    values = [counts.get((row, *col), 0) for col in cols]
    table.append("| " + " | ".join([row] + [str(v) for v in values] + [str(sum(values))]) + " |")
  totals = [sum(counts.get((row, *col), 0) for row in rows) for col in cols]
  table.append("| total | " + " | ".join(str(v) for v in totals + [sum(totals)]) + " |")
  return "\n".join(table)


def resolve_paths(paths: Paths) -> list[Path]:
  """A file, a directory (its *.jsonl, sorted) or a list of either -> list of files."""
  if isinstance(paths, (str, Path)):
    paths = [paths]
  files = []
  for path in map(Path, paths):
    if path.is_dir():
      found = sorted(path.glob("*.jsonl"))
      if not found:
        raise DataError(f"{path}: directory holds no *.jsonl files")
      files += found
    elif path.is_file():
      if path.suffix != ".jsonl" and path.suffix not in DATASETS_BUILDERS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; "
                        f"use .jsonl or one of {sorted(DATASETS_BUILDERS)}")
      files.append(path)
    else:
      raise DataError(f"{path}: no such file or directory")
  if not files:
    raise DataError("no input files given")
  return files


class _DuplicateKey(ValueError):
  pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  row = {}
  for key, value in pairs:
    if key in row:
      raise _DuplicateKey(key)
    row[key] = value
  return row


def _no_constant(name: str) -> Any:
  raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, field: str = "json") -> Any:
  """Strict JSON: no duplicate keys, no NaN/Infinity; any failure (bad bytes, too deep, a 5000-digit int) is a
  FieldError on `field`."""
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as e:
      raise FieldError("encoding", f"not UTF-8: byte 0x{text[e.start]:02x} at column {e.start + 1}",
                       "not UTF-8") from None
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
  except _DuplicateKey as e:
    raise FieldError(str(e), "duplicate key in one JSON object", "duplicate key") from None
  except json.JSONDecodeError as e:
    raise FieldError(field, f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON") from None
  except RecursionError:
    raise FieldError(field, "invalid JSON: nested too deeply", "invalid JSON") from None
  except ValueError as e:  # NaN/Infinity, or an integer past Python's digit limit.
    raise FieldError(field, f"invalid JSON: {e}", "invalid JSON") from None


def iter_rows(path: Path, json_fields: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
  """Yields (line, row) for each record; row is a FieldError for a line that is not one.

  JSONL lines are numbered as in the file (blank lines skipped) and decoded one
  by one, so one line of bad bytes is one invalid row; rows read through
  `datasets` are numbered from 1 in file order.
  """
  if path.suffix == ".jsonl":
    with path.open("rb") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = parse_json(line)
        except FieldError as e:
          row = e
        yield line_number, row
    return
  import datasets  # Heavy; imported only for non-JSONL inputs.
  try:
    table = datasets.load_dataset(DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train")
  except Exception as e:  # pylint: disable=broad-except  # Any reader failure is a malformed file.
    raise DataError(f"{path}: cannot be read as {DATASETS_BUILDERS[path.suffix]}: {type(e).__name__}: {e}") from None
  for row_number, row in enumerate(table, start=1):
    yield row_number, _decode_json_cells(row, json_fields)


def _decode_json_cells(row: dict[str, Any], json_fields: Sequence[str]) -> Any:
  """Tabular formats hold nested fields as JSON text; decode those cells."""
  row = dict(row)
  for field in json_fields:
    if isinstance(row.get(field), str):
      try:
        row[field] = parse_json(row[field], field)
      except FieldError as e:
        return e
  return row


def load_records(schema: Schema, paths: Paths, *, skip_invalid: bool = False,
                 keep: Callable[[Any], bool] = lambda record: True) -> tuple[list[Any], LoadReport]:
  """Reads, validates and filters records of one schema from `paths`.

  Args:
    schema: the record type.
    paths: a file, a directory (all *.jsonl inside, sorted) or a list of either.
    skip_invalid: count invalid rows in the report instead of raising.
    keep: filter applied after validation (filtered records are counted).

  Returns:
    The kept records in file order, and the LoadReport.
  """
  report = LoadReport(kind=schema.kind, cell_fields=schema.cell_fields)
  records, first_seen = [], {}
  for path in resolve_paths(paths):
    report.files.append(str(path))
    for line, row in iter_rows(path, schema.json_fields):
      report.rows += 1
      location = f"{path}:{line}"
      try:
        record = _parse_row(schema, row)
        key = schema.key(record)
        if key in first_seen:
          raise FieldError(schema.key_field, f"duplicate {key!r} (first at {first_seen[key]})",
                           "duplicate")
      except FieldError as e:
        if not skip_invalid:
          raise DataError(f"{location}: {e}") from None
        report.skip(f"{e.field}: {e.reason}", location)
        continue
      first_seen[key] = location
      if not keep(record):
        report.filtered += 1
        continue
      records.append(record)
      report.cell_counts[schema.cell(record)] += 1
  report.loaded = len(records)
  return records, report


def _parse_row(schema: Schema, row: Any) -> Any:
  if isinstance(row, FieldError):
    raise row
  if not isinstance(row, dict):
    raise FieldError("record", f"expected a JSON object, got {type(row).__name__}", "not an object")
  unknown = sorted(set(row) - set(schema.fields))
  if unknown:
    raise FieldError(unknown[0], f"unknown field (allowed: {list(schema.fields)})", "unknown field")
  return schema.parse(row)


# Field readers used by the schemas' parse functions; each raises FieldError.


# `prefix` names the enclosing object in errors ("messages[2].").


def get_field(row: dict[str, Any], field: str, *, prefix: str = "") -> Any:
  if field not in row or row[field] is None:
    raise FieldError(prefix + field, "missing", "missing")
  return row[field]


def str_field(row: dict[str, Any], field: str, *, allow_empty: bool = False,
              prefix: str = "") -> str:
  value = get_field(row, field, prefix=prefix)
  check_type(value, str, prefix + field)
  if not allow_empty and not value.strip():
    raise FieldError(prefix + field, "empty string", "empty")
  return value


def choice_field(row: dict[str, Any], field: str, vocabulary: Iterable[str], *,
                 prefix: str = "") -> str:
  value = str_field(row, field, prefix=prefix)
  try:
    taxonomy.index(tuple(vocabulary), value, field)
  except ValueError as e:
    raise FieldError(prefix + field, str(e).removeprefix(f"{field}: "), "unknown value") from None
  return value


def str_list_field(row: dict[str, Any], field: str) -> tuple[str, ...]:
  value = get_field(row, field)
  check_type(value, list, field)
  for i, item in enumerate(value):
    check_type(item, str, f"{field}[{i}]")
  return tuple(value)


def number_field(row: dict[str, Any], field: str, low: float, high: float) -> float:
  value = get_field(row, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise FieldError(field, f"expected a number, got {type(value).__name__}", "wrong type")
  if not low <= value <= high:
    raise FieldError(field, f"{value!r} is outside [{low}, {high}]", "out of range")
  return float(value)


def int_field(row: dict[str, Any], field: str, low: int, high: int) -> int:
  value = get_field(row, field)
  if isinstance(value, float) and value.is_integer():
    value = int(value)  # JSON and CSV readers may give 3.0 for 3.
  if isinstance(value, bool) or not isinstance(value, int):
    raise FieldError(field, f"expected an integer, got {type(value).__name__}", "wrong type")
  if not low <= value <= high:
    raise FieldError(field, f"{value!r} is outside [{low}, {high}]", "out of range")
  return value


def check_type(value: Any, expected: type, field: str) -> None:
  if not isinstance(value, expected):
    names = {str: "a string", list: "a list", dict: "an object"}
    raise FieldError(field, f"expected {names.get(expected, expected.__name__)}, "
                     f"got {type(value).__name__}", "wrong type")
