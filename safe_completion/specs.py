"""Policy specs: loading, validation and rendering of `specs/*.md`.

A spec is a Markdown file with a `---` fenced YAML front matter. Category specs
(`kind: category`) state the output-centric policy of one safety category and
carry a severity rubric; modes guides (`kind: modes`) say which response modes
a training arm may use and how. The rendered text is what datagen inserts into
spec-augmented teacher prompts and what LLM graders read, so loading is strict:
every malformed spec is a `SpecError` naming the file (and line) and the field,
never a silently partial policy.
"""

import dataclasses
import pathlib
import re
from collections.abc import Hashable, Mapping
from typing import Any

import yaml

from safe_completion import taxonomy

DEFAULT_SPEC_DIR = pathlib.Path(__file__).resolve().parents[1] / "specs"

KINDS = ("category", "modes")
# A violation always has some severity; "none" is the grade of a safe output.
SEVERITY_LEVELS = tuple(s for s in taxonomy.SEVERITIES if s != "none")
CATEGORY_SECTIONS = (
    "Allowed (direct answer)",
    "Disallowed: meaningful facilitation",
    "Safe-completion",
    "Refusal with redirection",
    "Clear intent for harm",
    "Examples",
)
# Datagen and graders parse the output format a modes guide prescribes.
MODES_SECTIONS = ("How to choose", "What each mode must contain", "Output format")
REQUIRED_FIELDS = ("id", "title", "version", "kind", "applies_to")
OPTIONAL_FIELDS = ("severity",)

_FENCE = "---"
_HEADING = re.compile(r"^## +(.+?)\s*$")


class SpecError(ValueError):
  """A spec file or spec set is malformed; the message names file and field."""


class _UniqueKeyLoader(yaml.SafeLoader):
  """safe_load, except that a repeated mapping key is an error, not a silent overwrite."""

  def construct_mapping(self, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
      key = self.construct_object(key_node, deep=deep)
      if not isinstance(key, Hashable):
        continue  # SafeLoader rejects it below, with a mark.
      if key in seen:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate key {key!r}", key_node.start_mark)
      seen.add(key)
    return super().construct_mapping(node, deep=deep)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One validated spec file.

  Attributes:
    id: unique spec id; for a category spec, the category id and file stem.
    title: human-readable title.
    version: version string, e.g. "1.0".
    kind: "category" or "modes".
    applies_to: category ids (category spec) or arm names (modes guide).
    severity: level -> one-sentence description, keys SEVERITY_LEVELS in
      order; empty for modes guides.
    body: Markdown body after the front matter, stripped.
    path: the file it was loaded from.
  """
  id: str
  title: str
  version: str
  kind: str
  applies_to: tuple[str, ...]
  severity: Mapping[str, str] = dataclasses.field(hash=False)
  body: str
  path: str


def _split_front_matter(path: str, text: str) -> tuple[str, str, int]:
  """Returns (yaml text, body text, 1-based line number where body starts)."""
  lines = text.splitlines()
  if not lines or lines[0].strip() != _FENCE:
    raise SpecError(f"{path}:1: front matter: missing; the file must start with a '---' line")
  for i, line in enumerate(lines[1:], start=1):
    if line.strip() == _FENCE:
      return "\n".join(lines[1:i]), "\n".join(lines[i + 1:]), i + 2
  raise SpecError(f"{path}: front matter: unterminated; no closing '---' line after line 1")


def _parse_yaml(path: str, yaml_text: str) -> dict[str, Any]:
  try:
    data = yaml.load(yaml_text, Loader=_UniqueKeyLoader)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    # +2: the YAML starts on file line 2 and marks are 0-based.
    where = f"{path}:{mark.line + 2}" if mark else path
    raise SpecError(f"{where}: front matter: YAML syntax error: {e.problem or e}") from None
  except yaml.YAMLError as e:
    raise SpecError(f"{path}: front matter: YAML error: {e}") from None
  if not isinstance(data, dict):
    raise SpecError(
        f"{path}: front matter: must be a YAML mapping of fields, got {type(data).__name__}")
  return data


def _require_str(path: str, data: dict[str, Any], field: str) -> str:
  value = data[field]
  if not isinstance(value, str) or not value.strip():
    hint = " (quote it, e.g. \"1.0\")" if field == "version" else ""
    raise SpecError(
        f"{path}: field '{field}': must be a non-empty string{hint}, got {value!r}")
  return value.strip()


def _check_applies_to(path: str, kind: str, value: Any) -> tuple[str, ...]:
  if (not isinstance(value, list) or not value
      or not all(isinstance(v, str) for v in value)):
    raise SpecError(
        f"{path}: field 'applies_to': must be a non-empty list of strings, got {value!r}")
  vocabulary, what = (
      (taxonomy.CATEGORIES, "category") if kind == "category" else (taxonomy.ARMS, "arm"))
  unknown = [v for v in value if v not in vocabulary]
  if unknown:
    raise SpecError(
        f"{path}: field 'applies_to': unknown {what} {unknown}; "
        f"expected some of {list(vocabulary)}")
  if len(set(value)) != len(value):
    raise SpecError(f"{path}: field 'applies_to': duplicate entries in {value!r}")
  return tuple(value)


def _check_severity(path: str, kind: str, data: dict[str, Any]) -> dict[str, str]:
  if kind != "category":
    if "severity" in data:
      raise SpecError(f"{path}: field 'severity': only category specs have a severity rubric")
    return {}
  if "severity" not in data:
    raise SpecError(
        f"{path}: field 'severity': missing; category specs need levels {list(SEVERITY_LEVELS)}")
  value = data["severity"]
  if not isinstance(value, dict):
    raise SpecError(f"{path}: field 'severity': must be a mapping level -> text, got {value!r}")
  unknown = sorted(str(k) for k in value if k not in SEVERITY_LEVELS)
  if unknown:
    raise SpecError(
        f"{path}: field 'severity': unknown level(s) {unknown}; levels are {list(SEVERITY_LEVELS)}")
  missing = [level for level in SEVERITY_LEVELS if level not in value]
  if missing:
    raise SpecError(f"{path}: field 'severity': missing level(s) {missing}")
  for level in SEVERITY_LEVELS:
    if not isinstance(value[level], str) or not value[level].strip():
      raise SpecError(
          f"{path}: field 'severity.{level}': must be a non-empty string, got {value[level]!r}")
  return {level: value[level].strip() for level in SEVERITY_LEVELS}


def _headings(body: str) -> list[tuple[str, int]]:
  """(heading text, 0-based line index in body) of each `## ` heading outside code fences."""
  found = []
  in_code = False
  for i, line in enumerate(body.splitlines()):
    if line.lstrip().startswith("```"):
      in_code = not in_code
      continue
    match = None if in_code else _HEADING.match(line)
    if match:
      found.append((match.group(1), i))
  return found


def _check_sections(
    path: str, body: str, body_line: int, required_sections: tuple[str, ...]) -> None:
  """Every required heading present exactly once and followed by some text."""
  headings = _headings(body)
  names = [name for name, _ in headings]
  lines = body.splitlines()
  for required in required_sections:
    count = names.count(required)
    if count == 0:
      raise SpecError(f"{path}: body: missing required section '## {required}'")
    if count > 1:
      raise SpecError(f"{path}: body: section '## {required}' appears {count} times")
    k = names.index(required)
    start = headings[k][1] + 1
    end = headings[k + 1][1] if k + 1 < len(headings) else len(lines)
    if not "\n".join(lines[start:end]).strip():
      raise SpecError(
          f"{path}:{body_line + headings[k][1]}: body: section '## {required}' is empty")


def load_spec(path: str | pathlib.Path) -> Spec:
  """Parses and validates one spec file.

  Args:
    path: a Markdown file with `---` fenced YAML front matter.

  Returns:
    The validated Spec.

  Raises:
    SpecError: naming the file (and line where known) and the offending field.
  """
  path = str(path)
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: cannot read spec: {e}") from None
  yaml_text, raw_body, body_line = _split_front_matter(path, text)
  data = _parse_yaml(path, yaml_text)

  unknown = sorted(str(k) for k in data if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS)
  if unknown:
    raise SpecError(
        f"{path}: field(s) {unknown}: unknown; allowed fields are "
        f"{list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
  for field in REQUIRED_FIELDS:
    if field not in data:
      raise SpecError(f"{path}: field '{field}': missing (required: {list(REQUIRED_FIELDS)})")
  spec_id = _require_str(path, data, "id")
  title = _require_str(path, data, "title")
  version = _require_str(path, data, "version")
  kind = _require_str(path, data, "kind")
  if kind not in KINDS:
    raise SpecError(f"{path}: field 'kind': unknown kind {kind!r}; expected one of {list(KINDS)}")
  applies_to = _check_applies_to(path, kind, data["applies_to"])
  severity = _check_severity(path, kind, data)
  if kind == "category":
    stem = pathlib.Path(path).stem
    if spec_id != stem:
      raise SpecError(f"{path}: field 'id': {spec_id!r} must equal the file name stem {stem!r}")
    if spec_id not in applies_to:
      raise SpecError(
          f"{path}: field 'applies_to': a category spec must apply to its own id {spec_id!r}")

  body = raw_body.strip()
  if not body:
    raise SpecError(f"{path}: body: empty; the policy text after the front matter is required")
  # The unstripped body keeps file line numbers in error messages true.
  _check_sections(path, raw_body, body_line,
                  CATEGORY_SECTIONS if kind == "category" else MODES_SECTIONS)
  return Spec(id=spec_id, title=title, version=version, kind=kind, applies_to=applies_to,
              severity=severity, body=body, path=path)


def load_specs(spec_dir: str | pathlib.Path | None = None) -> dict[str, Spec]:
  """Loads every `*.md` in `spec_dir` (default: the repo's `specs/`), keyed by id."""
  spec_dir = pathlib.Path(spec_dir) if spec_dir is not None else DEFAULT_SPEC_DIR
  if not spec_dir.is_dir():
    raise SpecError(f"{spec_dir}: spec directory does not exist")
  paths = sorted(spec_dir.glob("*.md"))
  if not paths:
    raise SpecError(f"{spec_dir}: no *.md spec files found")
  specs: dict[str, Spec] = {}
  for path in paths:
    spec = load_spec(path)
    if spec.id in specs:
      raise SpecError(
          f"{spec.path}: field 'id': duplicate id {spec.id!r}, "
          f"already used by {specs[spec.id].path}")
    specs[spec.id] = spec
  return specs


def category_spec(specs: Mapping[str, Spec], category: str) -> Spec:
  """The category spec whose applies_to covers `category`; exactly one must."""
  taxonomy.index(taxonomy.CATEGORIES, category, "category")
  matches = [s for s in specs.values() if s.kind == "category" and category in s.applies_to]
  if not matches:
    raise SpecError(
        f"no category spec covers category {category!r}; loaded specs: {sorted(specs)}")
  if len(matches) > 1:
    raise SpecError(
        f"category {category!r} is covered by several specs: {[s.path for s in matches]}")
  return matches[0]


def modes_guide(specs: Mapping[str, Spec], arm: str) -> Spec:
  """The modes guide for training arm `arm` (one of taxonomy.ARMS); exactly one must exist."""
  taxonomy.index(taxonomy.ARMS, arm, "arm")
  matches = [s for s in specs.values() if s.kind == "modes" and arm in s.applies_to]
  if not matches:
    raise SpecError(f"no modes guide covers arm {arm!r}; loaded specs: {sorted(specs)}")
  if len(matches) > 1:
    raise SpecError(f"arm {arm!r} is covered by several modes guides: {[s.path for s in matches]}")
  return matches[0]


def check_complete(specs: Mapping[str, Spec]) -> None:
  """Raises SpecError unless every category and every arm has exactly one spec."""
  for category in taxonomy.CATEGORIES:
    category_spec(specs, category)
  for arm in taxonomy.ARMS:
    modes_guide(specs, arm)


def section(spec: Spec, heading: str) -> str:
  """Text under `## {heading}` up to the next `## ` heading, stripped."""
  lines = spec.body.splitlines()
  headings = _headings(spec.body)
  for k, (name, i) in enumerate(headings):
    if name == heading:
      end = headings[k + 1][1] if k + 1 < len(headings) else len(lines)
      return "\n".join(lines[i + 1:end]).strip()
  raise SpecError(f"{spec.path}: body: no section '## {heading}'")


def render_spec(spec: Spec) -> str:
  """The spec text for spec-augmented teacher and grader prompts.

  Title and version, then (category specs) the severity rubric as a list in
  increasing order, then the body. Deterministic: same spec, same text.
  """
  parts = [f"# {spec.title} (spec {spec.id}, version {spec.version})"]
  if spec.severity:
    rubric = "\n".join(f"- {level}: {spec.severity[level]}" for level in SEVERITY_LEVELS)
    parts.append(f"## Severity of violations\n{rubric}")
  parts.append(spec.body)
  return "\n\n".join(parts) + "\n"
