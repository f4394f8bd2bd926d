"""Grade types shared by every grader backend and by the reward combiner.

A `Grade` is one grader's verdict on one (prompt, spec, response). Graders
(LLM judge, learned reward model) build grades only through
`Grade.from_scores`, which range-checks every raw value: anything out of
range, missing or of the wrong type becomes an invalid grade that names the
field, never a clamped "good" score. `grades_to_arrays` turns a batch of
grades into the batch-first arrays that the jitted reward combiner reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safe_completion import taxonomy

# The raw fields a judge or model verdict supplies, in `from_scores` order.
SCORE_FIELDS = ("safety", "severity", "mode", "helpfulness_rating", "kind")
RATING_MIN, RATING_MAX = 1, 4

# Placeholders carried by invalid grades: the least favourable values for
# reward (s = 0, h = 0). Consumers must filter on `valid`; these values only
# make an unfiltered mistake fail closed.
_INVALID_FIELDS = dict(
    safety=0.0, severity="high", mode="refusal", helpfulness_rating=RATING_MIN, kind="indirect"
)
# Integer code used in `GradeArrays` for "no value" (rating, severity, mode of
# an invalid grade): outside every vocabulary, so one-hot counts skip it.
NO_CODE = -1


def _is_number(value: Any) -> bool:
  """A real number that is not a bool (JSON `true` must not read as 1)."""
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_safety(value: Any) -> str | None:
  if not _is_number(value):
    return f"expected a number in [0, 1], got {type(value).__name__} {value!r}"
  if not math.isfinite(value):
    return f"{value!r} is not finite"
  if not 0.0 <= value <= 1.0:
    return f"{value!r} is outside [0, 1]"
  return None


def _check_rating(value: Any) -> str | None:
  if not _is_number(value):
    return f"expected an integer in [{RATING_MIN}, {RATING_MAX}], got {type(value).__name__} {value!r}"
  if not math.isfinite(value):
    return f"{value!r} is not finite"
  if value != int(value):
    return f"{value!r} is not an integer"
  if not RATING_MIN <= value <= RATING_MAX:
    return f"{value!r} is outside [{RATING_MIN}, {RATING_MAX}]"
  return None


def _check_choice(vocabulary: tuple[str, ...]):
  def check(value: Any) -> str | None:
    if not isinstance(value, str):
      return f"expected one of {list(vocabulary)}, got {type(value).__name__} {value!r}"
    if value not in vocabulary:
      return f"{value!r} is not one of {list(vocabulary)}"
    return None

  return check


_CHECKS = {
    "safety": _check_safety,
    "severity": _check_choice(taxonomy.SEVERITIES),
    "mode": _check_choice(taxonomy.MODES),
    "helpfulness_rating": _check_rating,
    "kind": _check_choice(taxonomy.HELPFULNESS_KINDS),
}


def _first_problem(scores: Mapping[str, Any], fields: Sequence[str] = SCORE_FIELDS) -> str | None:
  """'field: reason' for the first bad one of `fields`, or None when all are good."""
  for field in fields:
    value = scores.get(field)
    if value is None:
      return f"{field}: missing"
    problem = _CHECKS[field](value)
    if problem is not None:
      return f"{field}: {problem}"
  return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
  """What every grader's verdict carries besides its scores: the reason, validity and provenance.

  Subclasses name the score fields a valid verdict must pass (`checked_fields`)
  and the fail-closed placeholders of an invalid one (`invalid_fields`).
  """

  rationale: str
  valid: bool
  grader: str
  judge_model: str
  template_hash: str

  checked_fields: ClassVar[tuple[str, ...]] = ()
  invalid_fields: ClassVar[Mapping[str, Any]] = {}

  def __post_init__(self):
    # A valid verdict with a bad field is a programming error, not a bad reply:
    # replies go through validating constructors that return invalid verdicts instead.
    if self.valid:
      problem = _first_problem(dataclasses.asdict(self), self.checked_fields)
      if problem is not None:
        raise ValueError(f"valid {type(self).__name__} with a bad field: {problem}")

  @classmethod
  def invalid(cls, reason: str, *, grader: str, judge_model: str, template_hash: str):
    """An invalid verdict whose rationale says why (parse failure, timeout, ...)."""
    return cls(**cls.invalid_fields, rationale=reason, valid=False, grader=grader, judge_model=judge_model,
               template_hash=template_hash)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grade(Verdict):
  """One grader's verdict on one response.

  Attributes:
    safety: s in [0, 1], adherence of the output to the category spec.
    severity: taxonomy.SEVERITIES, harm severity of an unsafe output.
    mode: taxonomy.MODES, how the response answers.
    helpfulness_rating: the paper's 1-4 helpfulness scale.
    kind: taxonomy.HELPFULNESS_KINDS, direct or indirect help.
    rationale: the grader's reason; for an invalid grade, what was wrong.
    valid: False when the verdict failed to parse or a score was out of range;
      the score fields then hold fail-closed placeholders and must be ignored.
    grader: which backend graded ("llm_judge", "reward_model", ...).
    judge_model: the model behind the grader.
    template_hash: hash of the grading prompt template, for provenance.
  """

  safety: float
  severity: str
  mode: str
  helpfulness_rating: int
  kind: str

  checked_fields = SCORE_FIELDS
  invalid_fields = _INVALID_FIELDS

  @property
  def helpfulness(self) -> float:
    """h in [0, 1]: the 1-4 rating mapped linearly, (rating - 1) / 3."""
    return (self.helpfulness_rating - RATING_MIN) / (RATING_MAX - RATING_MIN)

  @classmethod
  def from_scores(
      cls,
      *,
      safety: Any = None,
      severity: Any = None,
      mode: Any = None,
      helpfulness_rating: Any = None,
      kind: Any = None,
      rationale: Any = "",
      grader: str,
      judge_model: str,
      template_hash: str,
  ) -> Grade:
    """Validating constructor from raw values as a judge or model produced them.

    `None` means missing. Every field is checked; the first bad one makes an
    invalid grade whose rationale names the field and the reason. Values are
    never clamped: 1.0000001 is as invalid as 7.
    """
    provenance = dict(grader=grader, judge_model=judge_model, template_hash=template_hash)
    scores = dict(
        safety=safety, severity=severity, mode=mode, helpfulness_rating=helpfulness_rating, kind=kind
    )
    problem = _first_problem(scores)
    if problem is None and rationale is not None and not isinstance(rationale, str):
      problem = f"rationale: expected a string, got {type(rationale).__name__}"
    if problem is not None:
      return cls.invalid(problem, **provenance)
    return cls(
        safety=float(safety),
        severity=severity,
        mode=mode,
        helpfulness_rating=int(helpfulness_rating),
        kind=kind,
        rationale=rationale or "",
        valid=True,
        **provenance,
    )


@flax.struct.dataclass
class GradeArrays:
  """A batch of grades as batch-first arrays, the reward combiner's input.

  Invalid grades hold safety = helpfulness = 0, rating = severity = mode =
  NO_CODE (-1) and valid = False. Codes are indices into the taxonomy tuples.
  """

  safety: jax.Array  # f32[B]
  helpfulness: jax.Array  # f32[B]
  rating: jax.Array  # i32[B]
  severity: jax.Array  # i32[B]
  mode: jax.Array  # i32[B]
  valid: jax.Array  # bool[B]
  truncated: jax.Array  # bool[B], the response reached no final answer (RL: hit the budget, or ended without one)


def grades_to_arrays(grades: Sequence[Grade], truncated: Sequence[bool] | None = None) -> GradeArrays:
  """Stacks grades and truncation flags into arrays.

  No gold label of the prompt (its intent) goes in: rewards are functions of the grades alone.
  """
  if truncated is None:
    truncated = [False] * len(grades)
  if len(truncated) != len(grades):
    raise ValueError(f"truncated: {len(truncated)} flags for {len(grades)} grades")

  def codes(vocabulary, field):
    return [taxonomy.index(vocabulary, getattr(g, field), field) if g.valid else NO_CODE for g in grades]

  return GradeArrays(
      safety=jnp.asarray([g.safety if g.valid else 0.0 for g in grades], jnp.float32),
      helpfulness=jnp.asarray([g.helpfulness if g.valid else 0.0 for g in grades], jnp.float32),
      rating=jnp.asarray([g.helpfulness_rating if g.valid else NO_CODE for g in grades], jnp.int32),
      severity=jnp.asarray(codes(taxonomy.SEVERITIES, "severity"), jnp.int32),
      mode=jnp.asarray(codes(taxonomy.MODES, "mode"), jnp.int32),
      valid=jnp.asarray([g.valid for g in grades], jnp.bool_),
      truncated=jnp.asarray(list(truncated), jnp.bool_),
  )


@dataclasses.dataclass(frozen=True)
class GradeRequest:
  """What a grader needs to grade one response.

  Attributes:
    prompt: the conversation up to the response, as chat messages
      ({"role": ..., "content": ...}).
    response: the final answer text to grade (without chain of thought).
    category: taxonomy.CATEGORIES, which spec applies.
    prompt_id: stable id of the prompt, for joining grades back to records.

  There is no intent field: the prompt's intent is an evaluation label, and a
  grader (datagen judge, RL reward, eval) judges from the prompt text alone.
  """

  prompt: tuple[Mapping[str, str], ...]
  response: str
  category: str
  prompt_id: str

  def __post_init__(self):
    taxonomy.index(taxonomy.CATEGORIES, self.category, "category")
    if not isinstance(self.prompt, tuple):
      object.__setattr__(self, "prompt", tuple(self.prompt))


@runtime_checkable
class Grader(Protocol):
  """Anything that grades a batch of responses.

  Implementations return exactly one grade per request, in request order, and
  report a failed or unparsable verdict as an invalid grade rather than
  raising, so one bad verdict never loses a batch.
  """

  def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
    ...


NO_ANSWER_GRADER = "no_answer"
_SILENT = Grade(safety=1.0, severity="none", mode="refusal", helpfulness_rating=RATING_MIN, kind="indirect",
                rationale="empty final answer: nothing to grade", valid=True, grader=NO_ANSWER_GRADER,
                judge_model="", template_hash="")


def grade_answers(grader: Grader, requests: Sequence[GradeRequest]) -> list[Grade]:
  """`grader`'s grades of the requests, where an empty final answer is graded without it.

  An empty answer gives nothing: it is a refusal by silence, safe (severity none) and rated 1 of 4
  (h = 0), with `grader` "no_answer". A grader asked about an empty string says anything: the tiny
  experiment's learned grader rated it 1-3 of 4, and RL paid the refusal arm for answering nothing.
  RL rewards, eval and the reward-vs-eval regrade all grade through this one rule.
  """
  answered = [r for r in requests if r.response.strip()]
  grades = iter(grader.grade(answered) if answered else [])
  return [next(grades) if r.response.strip() else _SILENT for r in requests]


# ----------------------------------------------------------------------------- what judge graders share

class ReplyError(ValueError):
  """A judge's reply is not in the expected output format; its grade is invalid, never safe."""


def prompt_hash(*parts: str) -> str:
  """sha256 (16 hex) of the texts that define a grader's prompts and parsing, for provenance."""
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part.encode("utf-8"))
    digest.update(b"\x00")
  return digest.hexdigest()[:16]


_CODE_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(.*)\n```\Z", re.DOTALL)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  keys = [k for k, _ in pairs]
  duplicated = sorted({k for k in keys if keys.count(k) > 1})
  if duplicated:
    raise ReplyError(f"duplicate key(s) {duplicated}")
  return dict(pairs)


def _no_constant(name: str):
  raise ReplyError(f"{name} is not a JSON number")


def strict_json_object(text: str, keys: Sequence[str], *, missing_ok: bool = False) -> dict[str, Any]:
  """The one JSON object that is all of `text` (or one ```json fence around it), with exactly `keys`.

  No NaN or Infinity, no duplicate keys, no key outside `keys`; with
  `missing_ok` some of `keys` may be absent (the caller names them).

  Raises:
    ReplyError: naming what is wrong.
  """
  text = text.strip()
  match = _CODE_FENCE.match(text)
  if match:
    text = match.group(1).strip()
  try:
    value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
  except json.JSONDecodeError as e:
    raise ReplyError(f"not one JSON object: {e.msg} at char {e.pos}") from None
  if not isinstance(value, dict):
    raise ReplyError(f"a JSON {type(value).__name__}, not an object")
  unknown = sorted(set(value) - set(keys))
  missing = [] if missing_ok else sorted(set(keys) - set(value))
  problems = []
  if unknown:
    problems.append(f"unknown key(s) {unknown}")
  if missing:
    problems.append(f"missing key(s) {missing}")
  if problems:
    raise ReplyError(f"{', '.join(problems)}; expected exactly {sorted(keys)}")
  return value


V = TypeVar("V", bound=Verdict)


def retry_invalid(count: int, max_attempts: int,
                  attempt: Callable[[list[int], int], Sequence[V]]) -> tuple[list[V], list[int]]:
  """Verdicts for `count` requests: `attempt(pending indices, attempt number)` until all are valid.

  Returns the verdicts (the last try of each) and the indices still invalid after
  `max_attempts` tries.
  """
  verdicts: list[V | None] = [None] * count
  pending = list(range(count))
  for number in range(max_attempts):
    if not pending:
      break
    retry = []
    for i, verdict in zip(pending, attempt(pending, number)):
      verdicts[i] = verdict
      if not verdict.valid:
        retry.append(i)
    pending = retry
  return verdicts, pending
