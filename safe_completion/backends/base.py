"""What every generation backend speaks: sampling params in, completions out.

A backend turns chat conversations into assistant completions: an
OpenAI-compatible HTTP server (`http.HttpBackend`: vLLM, SGLang, hosted APIs,
our own `serve`) or our Flax model in process (`local.LocalBackend`). Teachers
and LLM judges take any `Backend`, so a pipeline swaps one for the other by
config.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from safe_completion.data import chat

FINISH_REASONS = ("stop", "length")


class BackendError(RuntimeError):
  """A backend could not produce completions (unreachable, bad request, unknown model, ...)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample, in the OpenAI chat-completions vocabulary.

  temperature 0 is greedy; `seed` makes sampling reproducible where the
  backend supports it; `stop` strings end a completion (not included in it).
  """

  max_tokens: int = 512
  temperature: float = 1.0
  top_p: float = 1.0
  n: int = 1
  seed: int | None = None
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
    object.__setattr__(self, "stop", stop)
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens} must be at least 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.n < 1:
      raise ValueError(f"n={self.n} must be at least 1")
    if not all(isinstance(s, str) and s for s in stop):
      raise ValueError(f"stop={self.stop!r} must be non-empty strings")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One assistant completion.

  Attributes:
    text: the answer, without any reasoning block.
    reasoning: the chain of thought (the server's `reasoning_content`, or the
      `<think>` block of the raw text); empty when there is none.
    finish_reason: "stop" (EOS or a stop string) or "length" (hit max_tokens).
    prompt_tokens: tokens of the rendered prompt.
    completion_tokens: tokens generated.
  """

  text: str
  reasoning: str
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int

  @classmethod
  def from_raw(cls, raw_text: str, *, reasoning: str | None = None, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> "Completion":
    """Splits `<think>` reasoning off `raw_text` unless the server already gave it separately."""
    if reasoning:
      text = raw_text.strip()
    else:
      reasoning, text = chat.split_reasoning(raw_text)
    return cls(text=text, reasoning=reasoning, finish_reason=finish_reason,
               prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def sampled_completion(text: str, *, finished: bool, stop: Sequence[str], prompt_tokens: int,
                       completion_tokens: int) -> Completion:
  """A local sampler's decoded text as a `Completion`, cut before the first stop string.

  finish_reason is "stop" when the text was cut or the row ended (EOS), else "length".
  """
  finish_reason = "stop" if finished else "length"
  cuts = [text.find(s) for s in stop if s in text]
  if cuts:
    text, finish_reason = text[:min(cuts)], "stop"
  return Completion.from_raw(text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens)


@runtime_checkable
class Backend(Protocol):
  """Anything that completes chat conversations.

  `generate` returns `params.n` completions per conversation, in conversation
  order. `model_id` names the model, for provenance of grades and records.
  """

  model_id: str

  def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]],
               params: SamplingParams) -> list[list[Completion]]:
    ...
