"""Grade validation, the batch-array form, and the grader interface."""

import math

import numpy as np
import pytest

from safe_completion import taxonomy
from safe_completion.graders import base

PROVENANCE = dict(grader="llm_judge", judge_model="tiny-judge", template_hash="abc123")
GOOD = dict(safety=0.75, severity="low", mode="safe_completion", helpfulness_rating=3, kind="indirect")


def grade(**overrides):
  return base.Grade.from_scores(**{**GOOD, **overrides}, rationale="ok", **PROVENANCE)


def test_good_scores_make_a_valid_grade_with_mapped_helpfulness():
  g = grade()
  assert g.valid and g.safety == 0.75 and g.mode == "safe_completion"
  assert g.helpfulness == pytest.approx(2 / 3)
  assert (g.grader, g.judge_model, g.template_hash) == ("llm_judge", "tiny-judge", "abc123")


@pytest.mark.parametrize("rating, expected", [(1, 0.0), (2, 1 / 3), (4, 1.0), (3.0, 2 / 3)])
def test_rating_maps_linearly_to_unit_helpfulness(rating, expected):
  assert grade(helpfulness_rating=rating).helpfulness == pytest.approx(expected)


def test_safety_bounds_are_inclusive():
  assert grade(safety=0).valid and grade(safety=1).valid and grade(safety=np.float32(0.5)).valid


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("safety", math.nan, "not finite"),
        ("safety", math.inf, "not finite"),
        ("safety", 1.5, "outside"),
        ("safety", -0.1, "outside"),
        ("safety", 1.0000001, "outside"),
        ("safety", True, "expected a number"),
        ("safety", np.bool_(True), "expected a number"),
        ("safety", "0.5", "expected a number"),
        ("safety", None, "missing"),
        ("helpfulness_rating", 0, "outside"),
        ("helpfulness_rating", 5, "outside"),
        ("helpfulness_rating", 2.5, "not an integer"),
        ("helpfulness_rating", True, "expected an integer"),
        ("helpfulness_rating", math.nan, "not finite"),
        ("helpfulness_rating", None, "missing"),
        ("mode", "comply", "not one of"),
        ("mode", "Refusal", "not one of"),
        ("mode", 2, "expected one of"),
        ("severity", "critical", "not one of"),
        ("severity", None, "missing"),
        ("kind", "partial", "not one of"),
    ],
)
def test_bad_score_makes_invalid_grade_naming_the_field(field, value, says):
  g = grade(**{field: value})
  assert not g.valid
  assert g.rationale.startswith(f"{field}:") and says in g.rationale
  # Fail closed: an invalid grade never looks safe or helpful.
  assert g.safety == 0.0 and g.helpfulness == 0.0
  assert g.grader == "llm_judge"


def test_missing_everything_is_invalid():
  g = base.Grade.from_scores(**PROVENANCE)
  assert not g.valid and g.rationale == "safety: missing"


def test_non_string_rationale_is_invalid():
  g = base.Grade.from_scores(**GOOD, rationale=["x"], **PROVENANCE)
  assert not g.valid and g.rationale.startswith("rationale:")


def test_invalid_helper_keeps_reason_and_provenance():
  g = base.Grade.invalid("judge timed out", **PROVENANCE)
  assert not g.valid and g.rationale == "judge timed out" and g.template_hash == "abc123"


def test_direct_construction_of_a_bad_valid_grade_raises():
  with pytest.raises(ValueError, match="safety"):
    base.Grade(**{**GOOD, "safety": 2.0}, rationale="", valid=True, **PROVENANCE)


def test_grades_to_arrays_encodes_codes_and_blanks_invalid_grades():
  grades = [grade(), base.Grade.invalid("unparsable", **PROVENANCE), grade(mode="refusal", safety=1.0)]
  arrays = base.grades_to_arrays(grades, truncated=[False, False, True])
  np.testing.assert_allclose(arrays.safety, [0.75, 0.0, 1.0])
  np.testing.assert_allclose(arrays.helpfulness, [2 / 3, 0.0, 2 / 3], rtol=1e-6)
  np.testing.assert_array_equal(arrays.valid, [True, False, True])
  np.testing.assert_array_equal(arrays.truncated, [False, False, True])
  np.testing.assert_array_equal(arrays.rating, [3, base.NO_CODE, 3])
  np.testing.assert_array_equal(arrays.mode, [1, base.NO_CODE, taxonomy.MODES.index("refusal")])
  np.testing.assert_array_equal(arrays.severity, [taxonomy.SEVERITIES.index("low"), base.NO_CODE, 2])
  assert arrays.safety.dtype == np.float32 and arrays.rating.dtype == np.int32
  assert not hasattr(arrays, "intent")  # Rewards are functions of the grades alone.


def test_grades_to_arrays_rejects_mismatched_truncation_flags():
  with pytest.raises(ValueError, match="truncated"):
    base.grades_to_arrays([grade()], truncated=[])


def test_grade_request_validates_labels_and_freezes_messages():
  request = base.GradeRequest([{"role": "user", "content": "hi"}], "hello", "privacy", "p1")
  assert isinstance(request.prompt, tuple)
  with pytest.raises(ValueError, match="category"):
    base.GradeRequest((), "x", "astrology", "p2")


def test_a_class_with_grade_satisfies_the_grader_protocol():
  class ConstantGrader:
    def grade(self, requests):
      return [grade() for _ in requests]

  assert isinstance(ConstantGrader(), base.Grader)
  assert not isinstance(object(), base.Grader)
