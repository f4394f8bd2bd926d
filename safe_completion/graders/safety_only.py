"""Safety-only graders: the shared parts of the policy-reading classifier judges.

Open safety classifiers (gpt-oss-safeguard, ShieldGemma, Granite Guardian,
Llama Guard) judge whether a response violates a policy; none of them rates
helpfulness or names the response mode. So an adapter returns a `SafetyGrade`
(s, severity, provenance), never a full `Grade` with an invented helpfulness,
and `CombinedGrader` makes a `Grade` by taking s and severity from a
classifier and mode, helpfulness and kind from another grader (the learned
reward model or an LLM judge). A classifier alone can still be validated on
its safety figures (`graders.validation`).

`ClassifierBackend` is `HttpBackend` plus what these models need from the
OpenAI-compatible API: extra request fields (vLLM's `chat_template_kwargs`,
`reasoning_effort`, `logprobs`/`top_logprobs`) and per-token log-probs and the
reasoning field in the reply. It has no on-disk cache: a cached completion
would drop its log-probs, and the cache key does not cover the extra fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import openai

from safe_completion.backends import base as backends
from safe_completion.backends import http
from safe_completion.graders import base


# The reply parsing the classifier adapters use lives with every grader's types.
ReplyError = base.ReplyError
prompt_hash = base.prompt_hash
strict_json_object = base.strict_json_object


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetyGrade(base.Verdict):
  """A safety-only verdict: s in [0, 1] and severity, or invalid with the reason in `rationale`."""

  safety: float
  severity: str

  checked_fields = ("safety", "severity")
  invalid_fields = dict(safety=0.0, severity="high")


@runtime_checkable
class SafetyClassifier(Protocol):
  """Anything that judges only safety: one `SafetyGrade` per request, in order, invalid rather than raising."""

  def classify(self, requests: Sequence[base.GradeRequest]) -> list[SafetyGrade]:
    ...


# ----------------------------------------------------------------------------- the HTTP client

@dataclasses.dataclass(frozen=True)
class ClassifierCompletion(backends.Completion):
  """A completion with the server's per-token log-probs: ((token, logprob, ((top token, logprob), ...)), ...)."""

  logprobs: tuple = ()


class _ExtraBodyClient(openai.AsyncOpenAI):
  """AsyncOpenAI that adds fixed fields to every chat-completions body (the client's `extra_body`)."""

  def __init__(self, *args, extra_body: Mapping[str, Any], **kwargs):
    super().__init__(*args, **kwargs)
    self._extra_body = dict(extra_body)

  async def _prepare_options(self, options):
    options = await super()._prepare_options(options)
    if options.url.endswith("/chat/completions") and self._extra_body:
      options.extra_json = {**self._extra_body, **(options.extra_json or {})}
    return options


class ClassifierBackend(http.HttpBackend):
  """`HttpBackend` sending `extra_body` with each request and keeping log-probs and reasoning of each reply."""

  def __init__(self, base_url: str, model: str, *, extra_body: Mapping[str, Any] | None = None, **kwargs):
    if kwargs.get("cache_path"):
      raise ValueError("classifier judges take no cache_path: cached completions lose their log-probs")
    super().__init__(base_url, model, **kwargs)
    self.extra_body = dict(extra_body or {})
    self._kwargs = kwargs

  def with_extra_body(self, **fields: Any) -> ClassifierBackend:
    """A backend like this one whose requests also carry `fields`."""
    return ClassifierBackend(self.base_url, self.model_id, extra_body={**self.extra_body, **fields}, **self._kwargs)

  def _client(self) -> openai.AsyncOpenAI:
    api_key = (os.environ.get(self.api_key_env) if self.api_key_env else None) or http.NO_KEY
    return _ExtraBodyClient(base_url=self.base_url, api_key=api_key, timeout=self.timeout_s, max_retries=0,
                            extra_body=self.extra_body)

  def _completions(self, body: dict, n: int) -> list[backends.Completion]:
    completions = super()._completions(body, n)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    out = []
    for completion, choice in zip(completions, choices):
      message = choice["message"]
      text, reasoning = completion.text, completion.reasoning
      # vLLM names the reasoning field `reasoning_content` (read by HttpBackend) or, newer, `reasoning`.
      if not reasoning and isinstance(message.get("reasoning"), str) and message["reasoning"]:
        text, reasoning = (message.get("content") or "").strip(), message["reasoning"]
      out.append(ClassifierCompletion(**{**dataclasses.asdict(completion), "text": text, "reasoning": reasoning},
                                      logprobs=_token_logprobs(choice)))
    return out


def _token_logprobs(choice: Mapping[str, Any]) -> tuple:
  """The choice's `logprobs.content` as tuples; () when the server sent none (or in a shape we do not read)."""
  content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
  if not isinstance(content, list):
    return ()
  out = []
  for entry in content:
    if not (isinstance(entry, dict) and isinstance(entry.get("token"), str) and _is_logprob(entry.get("logprob"))):
      return ()
    top = tuple((t["token"], float(t["logprob"])) for t in entry.get("top_logprobs") or ()
                if isinstance(t, dict) and isinstance(t.get("token"), str) and _is_logprob(t.get("logprob")))
    out.append((entry["token"], float(entry["logprob"]), top))
  return tuple(out)


def _is_logprob(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0.0


def answer_probability(logprobs: tuple, position: int, positive: str, negative: str) -> float | None:
  """P(positive) / (P(positive) + P(negative)) at token `position`, from its top log-probs; None without them.

  Tokens match after stripping whitespace (and SentencePiece's "▁"), case-insensitively,
  so "Yes", " Yes" and "▁Yes" pool. A word missing from the top-k counts as probability 0;
  a sampled token that is neither word gives None (the caller falls back to the hard answer).
  """
  if position >= len(logprobs):
    return None
  token, logprob, top = logprobs[position]
  if _word(token) not in (positive, negative):
    return None  # The answer is split over tokens (e.g. "uns" + "afe"): its probability is not one token's.
  candidates = dict(top)
  candidates.setdefault(token, logprob)
  mass = {positive: 0.0, negative: 0.0}
  for text, lp in candidates.items():
    if _word(text) in mass:
      mass[_word(text)] += math.exp(lp)
  if mass[positive] + mass[negative] <= 0.0:
    return None
  return mass[positive] / (mass[positive] + mass[negative])


def _word(token: str) -> str:
  return token.replace("\u2581", " ").strip().lower()


# ----------------------------------------------------------------------------- parsing and the grading loop

def classify_with_retries(backend: backends.Backend, requests: Sequence[base.GradeRequest],
                          build: Callable[[base.GradeRequest], list[dict[str, str]]],
                          parse: Callable[[ClassifierCompletion], tuple[float, str, str]],
                          params: backends.SamplingParams, max_attempts: int,
                          provenance: Mapping[str, str], allow_truncated: bool = False) -> list[SafetyGrade]:
  """Sends each request's conversation; `parse` -> (s, severity, rationale) or ReplyError; retries invalid ones.

  A reply that hit max_tokens is invalid (truncated) whatever it holds, unless
  `allow_truncated` (an answer in the first token, checked by `parse`). Retries
  use seed = attempt; then the grade stays invalid, never safe.
  """
  def attempt(pending: list[int], number: int) -> list[SafetyGrade]:
    completions = backend.generate([build(requests[i]) for i in pending], dataclasses.replace(params, n=1, seed=number))
    return [grade_reply(completion, number) for (completion,) in completions]

  def grade_reply(completion: ClassifierCompletion, number: int) -> SafetyGrade:
    try:
      if completion.finish_reason == "length" and not allow_truncated:
        raise ReplyError(f"truncated: the reply hit max_tokens={params.max_tokens} "
                         f"({len(completion.text)} chars of answer, {len(completion.reasoning)} of reasoning)")
      safety, severity, rationale = parse(completion)
      return SafetyGrade(safety=float(safety), severity=severity, rationale=rationale, valid=True, **provenance)
    except ReplyError as e:
      return SafetyGrade.invalid(f"invalid reply (attempt {number + 1}/{max_attempts}): {e}", **provenance)

  return base.retry_invalid(len(requests), max_attempts, attempt)[0]


# ----------------------------------------------------------------------------- safety + helpfulness

class CombinedGrader:
  """A `Grader`: s and severity from a safety classifier, mode, helpfulness and kind from another grader.

  The grade is valid only when both parts are; its provenance names both
  (grader "a+b", judge_model "a_model+b_model", a hash of both template hashes).
  """

  def __init__(self, safety: SafetyClassifier, helpfulness: base.Grader):
    self.safety, self.helpfulness = safety, helpfulness

  def grade(self, requests: Sequence[base.GradeRequest]) -> list[base.Grade]:
    safety_grades = self.safety.classify(requests)
    other_grades = self.helpfulness.grade(requests)
    grades = []
    for s, h in zip(safety_grades, other_grades, strict=True):
      provenance = dict(grader=f"{s.grader}+{h.grader}", judge_model=f"{s.judge_model}+{h.judge_model}",
                        template_hash=prompt_hash(s.template_hash, h.template_hash))
      if not s.valid:
        grades.append(base.Grade.invalid(f"safety ({s.grader}): {s.rationale}", **provenance))
      elif not h.valid:
        grades.append(base.Grade.invalid(f"helpfulness ({h.grader}): {h.rationale}", **provenance))
      else:
        grades.append(base.Grade.from_scores(
            safety=s.safety, severity=s.severity, mode=h.mode, helpfulness_rating=h.helpfulness_rating,
            kind=h.kind, rationale=f"safety ({s.grader}): {s.rationale} | helpfulness ({h.grader}): {h.rationale}",
            **provenance))
    return grades
