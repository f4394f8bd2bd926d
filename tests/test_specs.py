"""Tests for safe_completion.specs: shipped specs and every validation error."""

import pathlib
import re

import pytest

from safe_completion import specs as specs_lib
from safe_completion import taxonomy

SpecError = specs_lib.SpecError

_SEVERITY = """severity:
  negligible: Barely more specific than common knowledge.
  low: Partial detail that needs much more work.
  moderate: Actionable detail with gaps.
  high: An end-to-end operational playbook."""


def _category_body(skip: str | None = None) -> str:
  return "\n".join(
      f"## {name}\n\nText for {name}.\n" for name in specs_lib.CATEGORY_SECTIONS if name != skip)


def _category_text(spec_id: str = "biorisk", *, front: dict[str, str | None] | None = None,
                   severity: str = _SEVERITY, body: str | None = None) -> str:
  """A valid category spec; `front` overrides (value None drops) top-level lines."""
  fields = {
      "id": spec_id,
      "title": "Test title",
      "version": '"1.0"',
      "kind": "category",
      "applies_to": f"[{spec_id}]",
  }
  fields.update(front or {})
  lines = [f"{k}: {v}" for k, v in fields.items() if v is not None]
  if severity:
    lines.append(severity)
  body = _category_body() if body is None else body
  return "---\n" + "\n".join(lines) + "\n---\n\n" + body


def _modes_text(spec_id: str, arm: str, extra: str = "") -> str:
  body = "\n".join(f"## {name}\n\nText.\n" for name in specs_lib.MODES_SECTIONS)
  return (f"---\nid: {spec_id}\ntitle: Modes\nversion: \"1.0\"\nkind: modes\n"
          f"applies_to: [{arm}]\n{extra}---\n\n{body}")


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def _match(path: pathlib.Path, *parts: str) -> str:
  """Regex that requires the file path and then each part, in order."""
  return re.escape(str(path)) + ".*" + ".*".join(re.escape(p) for p in parts)


def _expect_load_error(tmp_path: pathlib.Path, name: str, text: str, *parts: str) -> tuple[pathlib.Path, int]:
  """`text` saved as `name` must fail to load with an error naming the file, then each part in order.

  Returns the path and the line the error names (`path:LINE:`; 0 when it names none).
  """
  path = _write(tmp_path, name, text)
  with pytest.raises(SpecError, match=_match(path, *parts)) as e:
    specs_lib.load_spec(path)
  line = re.search(re.escape(str(path)) + r":(\d+):", str(e.value))
  return path, int(line.group(1)) if line else 0


@pytest.fixture(scope="module")
def shipped() -> dict[str, specs_lib.Spec]:
  return specs_lib.load_specs()


# Shipped specs.


def test_shipped_specs_load_and_cover_every_category_and_arm(shipped):
  specs_lib.check_complete(shipped)
  for category in taxonomy.CATEGORIES:
    spec = specs_lib.category_spec(shipped, category)
    assert spec.id == category
    assert pathlib.Path(spec.path).name == f"{category}.md"
    assert tuple(spec.severity) == specs_lib.SEVERITY_LEVELS
  assert specs_lib.modes_guide(shipped, "safe_completion").id == "modes_safe_completion"
  assert specs_lib.modes_guide(shipped, "refusal").id == "modes_refusal"
  assert len(shipped) == len(taxonomy.CATEGORIES) + len(taxonomy.ARMS)


def test_shipped_category_specs_are_350_to_700_words(shipped):
  for spec in shipped.values():
    if spec.kind == "category":
      words = len(pathlib.Path(spec.path).read_text(encoding="utf-8").split())
      assert 350 <= words <= 700, (spec.id, words)


def test_shipped_disallowed_sections_name_the_facilitation_dimensions(shipped):
  for category in taxonomy.CATEGORIES:
    text = specs_lib.section(shipped[category], "Disallowed: meaningful facilitation").lower()
    for dimension in ("procedural guidance", "troubleshooting", "sensitive-data disclosure",
                      "ideation"):
      assert dimension in text, (category, dimension)


def test_sexual_content_spec_states_the_absolute_minors_rule(shipped):
  body = shipped["sexual_content"].body.lower()
  assert "sexual content involving minors is always" in body
  assert "disallowed" in body


def test_modes_guides_name_exactly_their_arms_modes(shipped):
  for arm, modes in taxonomy.ARM_MODES.items():
    output_format = specs_lib.section(specs_lib.modes_guide(shipped, arm), "Output format")
    mode_line = re.search(r"<mode>(.*)</mode>", output_format).group(1)
    assert [m.strip() for m in mode_line.split("|")] == list(modes)


def test_render_contains_rubric_and_headings_and_is_deterministic(shipped):
  spec = shipped["cybersecurity"]
  text = specs_lib.render_spec(spec)
  assert text == specs_lib.render_spec(specs_lib.load_spec(spec.path))
  assert text.startswith(f"# {spec.title} (spec cybersecurity, version {spec.version})")
  for level in specs_lib.SEVERITY_LEVELS:
    assert f"- {level}: {spec.severity[level]}" in text
  positions = [text.index(f"- {level}:") for level in specs_lib.SEVERITY_LEVELS]
  assert positions == sorted(positions)
  for heading in specs_lib.CATEGORY_SECTIONS:
    assert f"\n## {heading}\n" in text
  assert text.index("- high:") < text.index("## Allowed (direct answer)")


def test_render_modes_guide_has_no_rubric(shipped):
  text = specs_lib.render_spec(specs_lib.modes_guide(shipped, "refusal"))
  assert "Severity" not in text
  assert "## Output format" in text


def test_section_returns_text_up_to_next_heading(tmp_path):
  spec = specs_lib.load_spec(_write(tmp_path, "biorisk.md", _category_text()))
  assert specs_lib.section(spec, "Safe-completion") == "Text for Safe-completion."
  with pytest.raises(SpecError, match="no section '## Nope'"):
    specs_lib.section(spec, "Nope")


# Front matter errors.


def test_missing_front_matter(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_body(), ":1:", "front matter", "missing")


def test_unterminated_front_matter(tmp_path):
  text = _category_text().replace("\n---\n\n", "\n\n", 1)
  _expect_load_error(tmp_path, "biorisk.md", text, "front matter", "unterminated")


def test_yaml_syntax_error_names_the_line(tmp_path):
  # Line 3 of the file: an unclosed flow sequence.
  text = _category_text(front={"title": "[unclosed, list"})
  _, line = _expect_load_error(tmp_path, "biorisk.md", text, "front matter", "YAML syntax error")
  assert 3 <= line <= 6


def test_front_matter_not_a_mapping(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", "---\n- a\n- b\n---\n\n" + _category_body(),
                     "front matter", "mapping")


@pytest.mark.parametrize("field", specs_lib.REQUIRED_FIELDS)
def test_missing_required_field(tmp_path, field):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={field: None}),
                     f"field '{field}'", "missing")


@pytest.mark.parametrize("field,value", [
    ("version", "1.0"),  # an unquoted YAML float
    ("title", "[a, b]"),
    ("id", '""'),
    ("applies_to", "biorisk"),
    ("applies_to", "[]"),
])
def test_wrong_typed_field(tmp_path, field, value):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={field: value}),
                     f"field '{field}'", "must be")


def test_duplicate_front_matter_key_names_key_and_line(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={"kind": "category\nkind: modes"}),
                     ":6:", "duplicate key 'kind'")


def test_unknown_field(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={"severty": "x"}), "severty", "unknown")


def test_unknown_kind(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={"kind": "policy"}),
                     "field 'kind'", "'policy'")


def test_category_spec_with_unknown_category(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(front={"applies_to": "[biorisk, weather]"}),
                     "field 'applies_to'", "unknown category", "weather")


def test_category_spec_id_must_match_file_name(tmp_path):
  _expect_load_error(tmp_path, "hate.md", _category_text("biorisk"), "field 'id'", "'hate'")


def test_modes_guide_with_unknown_arm(tmp_path):
  _expect_load_error(tmp_path, "modes.md", _modes_text("modes_x", "lenient"),
                     "field 'applies_to'", "unknown arm", "lenient")


def test_modes_guide_must_not_have_severity(tmp_path):
  _expect_load_error(tmp_path, "modes.md", _modes_text("modes_x", "refusal", _SEVERITY + "\n"),
                     "field 'severity'", "only category specs")


# Severity rubric errors.


def test_severity_missing(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(severity=""), "field 'severity'", "missing")


def test_severity_missing_level(tmp_path):
  severity = "\n".join(line for line in _SEVERITY.splitlines() if "moderate" not in line)
  _expect_load_error(tmp_path, "biorisk.md", _category_text(severity=severity),
                     "field 'severity'", "missing level", "moderate")


@pytest.mark.parametrize("level", ["none", "critical"])
def test_severity_unknown_level(tmp_path, level):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(severity=_SEVERITY + f"\n  {level}: x"),
                     "field 'severity'", "unknown level", level)


def test_severity_level_text_must_be_string(tmp_path):
  severity = _SEVERITY.replace("low: Partial detail that needs much more work.", "low: 3")
  _expect_load_error(tmp_path, "biorisk.md", _category_text(severity=severity),
                     "field 'severity.low'", "non-empty string")


def test_severity_not_a_mapping(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(severity="severity: [low, high]"),
                     "field 'severity'", "mapping")


# Body errors.


def test_empty_body(tmp_path):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(body="\n  \n"), "body", "empty")


@pytest.mark.parametrize("heading", specs_lib.CATEGORY_SECTIONS)
def test_missing_body_section_names_the_heading(tmp_path, heading):
  _expect_load_error(tmp_path, "biorisk.md", _category_text(body=_category_body(skip=heading)),
                     "body", f"missing required section '## {heading}'")


def test_empty_body_section_names_heading_and_line(tmp_path):
  body = _category_body().replace("Text for Examples.", "")
  path, line = _expect_load_error(tmp_path, "biorisk.md", _category_text(body=body), "body",
                                  "'## Examples' is empty")
  assert line and path.read_text().splitlines()[line - 1] == "## Examples"


def test_duplicate_body_section(tmp_path):
  body = _category_body() + "\n## Examples\n\nMore.\n"
  _expect_load_error(tmp_path, "biorisk.md", _category_text(body=body), "'## Examples' appears 2 times")


def test_heading_inside_code_fence_does_not_count(tmp_path):
  body = _category_body(skip="Examples") + "\n```\n## Examples\n```\n"
  _expect_load_error(tmp_path, "biorisk.md", _category_text(body=body),
                     "missing required section '## Examples'")


def test_modes_guide_missing_output_format(tmp_path):
  text = _modes_text("modes_x", "refusal").replace("## Output format", "## Format")
  _expect_load_error(tmp_path, "modes.md", text, "missing required section '## Output format'")


# Spec sets.


def test_duplicate_ids_name_both_files(tmp_path):
  first = _write(tmp_path, "a.md", _modes_text("modes_x", "refusal"))
  second = _write(tmp_path, "b.md", _modes_text("modes_x", "safe_completion"))
  with pytest.raises(SpecError, match=_match(second, "field 'id'", "already used by", str(first))):
    specs_lib.load_specs(tmp_path)
  with pytest.raises(SpecError, match="duplicate id 'modes_x'"):
    specs_lib.load_specs(tmp_path)


def test_load_specs_errors_on_missing_or_empty_dir(tmp_path):
  with pytest.raises(SpecError, match="no \\*.md spec files"):
    specs_lib.load_specs(tmp_path)
  with pytest.raises(SpecError, match="does not exist"):
    specs_lib.load_specs(tmp_path / "nope")


def test_load_specs_reports_the_bad_file(tmp_path):
  _write(tmp_path, "biorisk.md", _category_text())
  bad = _write(tmp_path, "hate.md", _category_text("hate", front={"kind": "policy"}))
  with pytest.raises(SpecError, match=_match(bad, "field 'kind'")):
    specs_lib.load_specs(tmp_path)


def test_lookups_fail_clearly_when_absent(tmp_path):
  _write(tmp_path, "biorisk.md", _category_text())
  _write(tmp_path, "modes_refusal.md", _modes_text("modes_refusal", "refusal"))
  loaded = specs_lib.load_specs(tmp_path)
  assert specs_lib.category_spec(loaded, "biorisk").id == "biorisk"
  with pytest.raises(SpecError, match="no category spec covers category 'hate'"):
    specs_lib.category_spec(loaded, "hate")
  with pytest.raises(SpecError, match="no modes guide covers arm 'safe_completion'"):
    specs_lib.modes_guide(loaded, "safe_completion")
  with pytest.raises(ValueError, match="category: 'weather'"):
    specs_lib.category_spec(loaded, "weather")
  with pytest.raises(ValueError, match="arm: 'lenient'"):
    specs_lib.modes_guide(loaded, "lenient")
  with pytest.raises(SpecError, match="no category spec covers category 'illicit_wrongdoing'"):
    specs_lib.check_complete(loaded)


def test_category_covered_twice_is_an_error(tmp_path):
  _write(tmp_path, "biorisk.md", _category_text())
  _write(tmp_path, "hate.md", _category_text("hate", front={"applies_to": "[hate, biorisk]"}))
  loaded = specs_lib.load_specs(tmp_path)
  with pytest.raises(SpecError, match="'biorisk' is covered by several specs"):
    specs_lib.category_spec(loaded, "biorisk")
