"""Prompt, demonstration and grade records: schemas, loaders and cross-checks.

Schemas (one JSON object per line; data/README.md has the full description):
  prompt: id, messages, category, intent, split, source, tags
  demonstration: prompt_id, arm, mode, cot, answer
  grade: id, prompt_id, category, intent, split, response, safety, severity,
    mode, helpfulness, kind, label, source

Usage:
  prompts, report = load_prompts(DEFAULT_DATA_DIR / "prompts", split="train")
  print(report.format())
"""

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from safe_completion import taxonomy
from safe_completion.data import reading
from safe_completion.data.reading import DataError, FieldError, LoadReport, Paths

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"

ROLES = ("system", "user", "assistant")
# Kinds of labeled response in the grader-training data (rules in data/README.md).
GRADE_LABELS = (
    "good_direct",
    "good_safe_completion",
    "good_refusal",
    "conservative_refusal",
    "over_refusal",
    "vague",
    "unsafe_compliance",
    "manipulation",
)
HELPFULNESS_RANGE = (1, 4)
# <category>-<intent>-<split>-<NNN>; categories and intents use '_', never '-'.
PROMPT_ID_PATTERN = re.compile(
    r"(?P<category>[a-z_]+)-(?P<intent>[a-z_]+)-(?P<split>[a-z]+)-\d{3,}")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """A conversation that ends in a user turn, labeled with category, intent and split."""
  id: str
  messages: tuple[dict[str, str], ...]
  category: str
  intent: str
  split: str
  source: str
  tags: tuple[str, ...]

  @property
  def last_user_message(self) -> str:
    return self.messages[-1]["content"]


@dataclasses.dataclass(frozen=True)
class Demonstration:
  """A teacher (CoT, answer) for one train prompt and one training arm."""
  prompt_id: str
  arm: str
  mode: str
  cot: str
  answer: str

  @property
  def category(self) -> str:
    return PROMPT_ID_PATTERN.fullmatch(self.prompt_id)["category"]


@dataclasses.dataclass(frozen=True)
class GradeRecord:
  """A labeled (prompt, response) pair for training and checking graders."""
  id: str
  prompt_id: str
  category: str
  intent: str
  split: str
  response: str
  safety: float
  severity: str
  mode: str
  helpfulness: int
  kind: str
  label: str
  source: str


def _parse_prompt_id(row: dict[str, Any], field: str) -> re.Match:
  value = reading.str_field(row, field)
  match = PROMPT_ID_PATTERN.fullmatch(value)
  if not match:
    raise FieldError(field, f"{value!r} does not look like <category>-<intent>-<split>-<NNN>",
                     "malformed id")
  return match


def _parse_messages(row: dict[str, Any]) -> tuple[dict[str, str], ...]:
  messages = reading.get_field(row, "messages")
  reading.check_type(messages, list, "messages")
  if not messages:
    raise FieldError("messages", "empty list", "empty")
  parsed = []
  for i, message in enumerate(messages):
    field = f"messages[{i}]"
    reading.check_type(message, dict, field)
    # Tabular formats fill keys that other rows have with null; those are absent.
    message = {k: v for k, v in message.items() if v is not None}
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
      raise FieldError(f"{field}.{unknown[0]}", "unknown key (allowed: role, content)",
                       "unknown field")
    parsed.append({"role": reading.choice_field(message, "role", ROLES, prefix=f"{field}."),
                   "content": reading.str_field(message, "content", prefix=f"{field}.")})
  if parsed[-1]["role"] != "user":
    raise FieldError("messages", f"last turn must be 'user', got {parsed[-1]['role']!r}",
                     "last turn not user")
  return tuple(parsed)


def _check_id_matches(match: re.Match, field: str, values: dict[str, str]) -> None:
  """The labels spelled inside an id must equal the record's own labels."""
  for name, value in values.items():
    if match[name] != value:
      raise FieldError(field, f"id says {name} {match[name]!r} but the record says {value!r}",
                       "id disagrees with fields")


def parse_prompt(row: dict[str, Any]) -> PromptRecord:
  """Validates one raw prompt row; raises FieldError."""
  match = _parse_prompt_id(row, "id")
  labels = dict(category=reading.choice_field(row, "category", taxonomy.CATEGORIES),
                intent=reading.choice_field(row, "intent", taxonomy.INTENTS),
                split=reading.choice_field(row, "split", taxonomy.SPLITS))
  _check_id_matches(match, "id", labels)
  return PromptRecord(id=match[0], messages=_parse_messages(row),
                      source=reading.str_field(row, "source"),
                      tags=reading.str_list_field(row, "tags"), **labels)


def parse_demonstration(row: dict[str, Any]) -> Demonstration:
  """Validates one raw demonstration row; raises FieldError."""
  prompt_id = _parse_prompt_id(row, "prompt_id")[0]
  arm = reading.choice_field(row, "arm", taxonomy.ARMS)
  mode = reading.choice_field(row, "mode", taxonomy.MODES)
  if mode not in taxonomy.ARM_MODES[arm]:
    raise FieldError("mode", f"{mode!r} is not allowed for arm {arm!r} "
                     f"(allowed: {list(taxonomy.ARM_MODES[arm])})", "mode not allowed for arm")
  return Demonstration(prompt_id=prompt_id, arm=arm, mode=mode,
                       cot=reading.str_field(row, "cot", allow_empty=True),
                       answer=reading.str_field(row, "answer"))


def parse_grade(row: dict[str, Any]) -> GradeRecord:
  """Validates one raw grade row; raises FieldError."""
  labels = dict(category=reading.choice_field(row, "category", taxonomy.CATEGORIES),
                intent=reading.choice_field(row, "intent", taxonomy.INTENTS))
  match = _parse_prompt_id(row, "prompt_id")
  _check_id_matches(match, "prompt_id", labels)
  grade = GradeRecord(
      id=reading.str_field(row, "id"),
      prompt_id=match[0],
      split=reading.choice_field(row, "split", taxonomy.SPLITS),
      response=reading.str_field(row, "response"),
      safety=reading.number_field(row, "safety", 0.0, 1.0),
      severity=reading.choice_field(row, "severity", taxonomy.SEVERITIES),
      mode=reading.choice_field(row, "mode", taxonomy.MODES),
      helpfulness=reading.int_field(row, "helpfulness", *HELPFULNESS_RANGE),
      kind=reading.choice_field(row, "kind", taxonomy.HELPFULNESS_KINDS),
      label=reading.choice_field(row, "label", GRADE_LABELS),
      source=reading.str_field(row, "source"),
      **labels)
  # Fields that contradict each other: a fully safe response has no harm, a harmful one has some.
  if grade.safety == 1.0 and grade.severity in ("moderate", "high"):
    raise FieldError("severity", f"{grade.severity!r} contradicts safety 1.0", "contradiction")
  if grade.safety < 1.0 and grade.severity == "none":
    raise FieldError("severity", f"'none' contradicts safety {grade.safety} (< 1)", "contradiction")
  if grade.safety == 0.0 and grade.label.startswith("good_"):
    raise FieldError("label", f"{grade.label!r} contradicts safety 0", "contradiction")
  return grade


def _fields(cls: type) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


PROMPT_SCHEMA = reading.Schema(
    kind="prompts", fields=_fields(PromptRecord), parse=parse_prompt,
    key=lambda r: r.id, key_field="id", cell_fields=("category", "intent", "split"),
    cell=lambda r: (r.category, r.intent, r.split), json_fields=("messages", "tags"))
DEMONSTRATION_SCHEMA = reading.Schema(
    kind="demonstrations", fields=_fields(Demonstration), parse=parse_demonstration,
    key=lambda r: (r.prompt_id, r.arm), key_field="prompt_id",
    cell_fields=("category", "arm", "mode"), cell=lambda r: (r.category, r.arm, r.mode))
GRADE_SCHEMA = reading.Schema(
    kind="grades", fields=_fields(GradeRecord), parse=parse_grade,
    key=lambda r: r.id, key_field="id", cell_fields=("category", "intent", "split"),
    cell=lambda r: (r.category, r.intent, r.split))


def _checked(vocabulary: Sequence[str], values: Iterable[str] | str | None,
             field: str) -> frozenset[str] | None:
  """A filter argument as a set, each value checked against its vocabulary."""
  if values is None:
    return None
  values = [values] if isinstance(values, str) else list(values)
  for value in values:
    taxonomy.index(tuple(vocabulary), value, field)
  return frozenset(values)


def _keep(**filters: tuple[Sequence[str], Iterable[str] | str | None, str]) -> Callable[[Any], bool]:
  """A record filter from {attribute: (vocabulary, allowed values or None for all, argument name)}.

  The values are checked against their vocabularies first, in argument order.
  """
  allowed = {name: _checked(*spec) for name, spec in filters.items()}
  return lambda r: all(values is None or getattr(r, name) in values for name, values in allowed.items())


def load_prompts(paths: Paths, *, split: str | None = None,
                 categories: Iterable[str] | None = None,
                 skip_invalid: bool = False) -> tuple[list[PromptRecord], LoadReport]:
  """Loads and validates prompts; optionally keeps one split and some categories."""
  keep = _keep(split=(taxonomy.SPLITS, split, "split"),
               category=(taxonomy.CATEGORIES, categories, "categories"))
  return reading.load_records(PROMPT_SCHEMA, paths, skip_invalid=skip_invalid, keep=keep)


def load_demonstrations(paths: Paths, *, arms: Iterable[str] | None = None,
                        categories: Iterable[str] | None = None,
                        skip_invalid: bool = False) -> tuple[list[Demonstration], LoadReport]:
  """Loads and validates demonstrations; optionally keeps some arms and categories."""
  keep = _keep(arm=(taxonomy.ARMS, arms, "arms"), category=(taxonomy.CATEGORIES, categories, "categories"))
  return reading.load_records(DEMONSTRATION_SCHEMA, paths, skip_invalid=skip_invalid, keep=keep)


def load_grades(paths: Paths, *, split: str | None = None,
                categories: Iterable[str] | None = None, labels: Iterable[str] | None = None,
                skip_invalid: bool = False) -> tuple[list[GradeRecord], LoadReport]:
  """Loads and validates grader-training rows; optionally filtered."""
  keep = _keep(split=(taxonomy.SPLITS, split, "split"),
               category=(taxonomy.CATEGORIES, categories, "categories"), label=(GRADE_LABELS, labels, "labels"))
  return reading.load_records(GRADE_SCHEMA, paths, skip_invalid=skip_invalid, keep=keep)


def check_demonstrations(prompts: Sequence[PromptRecord],
                         demonstrations: Sequence[Demonstration]) -> None:
  """Every train prompt has exactly one demonstration per arm, in a mode that arm allows.

  Demonstrations of unknown or eval prompts are problems too (eval prompts
  must stay unseen in training). Pass prompts and demonstrations loaded with
  the same filters. Raises DataError listing every problem.
  """
  by_id = {p.id: p for p in prompts}
  arms_of = {p.id: [] for p in prompts if p.split == "train"}
  problems = []
  for demo in demonstrations:
    where = f"{demo.prompt_id} arm {demo.arm}"
    if demo.prompt_id not in by_id:
      problems.append(f"{where}: no such prompt")
    elif demo.prompt_id not in arms_of:
      problems.append(f"{where}: prompt is in split {by_id[demo.prompt_id].split!r}, not train")
    else:
      arms_of[demo.prompt_id].append(demo.arm)
    if demo.mode not in taxonomy.ARM_MODES.get(demo.arm, ()):
      problems.append(f"{where}: mode {demo.mode!r} is not allowed for this arm")
  for prompt_id, arms in arms_of.items():
    for arm in taxonomy.ARMS:
      if arms.count(arm) != 1:
        problems.append(f"{prompt_id} arm {arm}: {arms.count(arm)} demonstrations, expected 1")
  if problems:
    shown = "\n  ".join(problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise DataError(f"{len(problems)} demonstration problems:\n  {shown}{more}")


def spread_subset(items: Sequence[Any], count: int) -> list[Any]:
  """`count` items spread evenly over `items` (all of them when count is 0 or too large).

  Prompt files are ordered by category and intent, so a spread subset keeps every
  cell represented where a prefix would not.
  """
  if not count or count >= len(items):
    return list(items)
  return [items[i * len(items) // count] for i in range(count)]
