"""A backend over any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs, `serve`).

Requests run concurrently on asyncio with at most `max_concurrency` in flight.
Transient failures (429, 5xx, timeouts, connection errors, and 200 responses
whose body is not a chat completion: HTML from a proxy, truncated JSON, no
`choices`) are retried with exponential backoff and jitter (the `openai`
client's own retries are off, so there is one retry policy); any other 4xx
fails at once with the server's message. `timeout_s` is a total deadline per
attempt, so a server that drips its body byte by byte cannot stall a batch. Completions can be cached on disk (`cache.CompletionCache`), keyed by
model, messages and sampling params, so a rerun costs no requests.

The API key is read from the environment variable named by `api_key_env` when
a batch starts; it is kept in no attribute, cache or log, and every error
message and log line passes through `redact` (the key itself, bearer tokens
and `sk-...` strings), so a server that echoes request headers cannot leak it.
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence

import openai

from safe_completion.backends import base
from safe_completion.backends import cache as cache_lib

# What a server without authentication (vLLM, `serve`) gets when the key variable is unset.
NO_KEY = "EMPTY"
# How much of a bad body an error message quotes.
SNIPPET_CHARS = 200
_SECRET_PATTERNS = (re.compile(r"(?i)(bearer\s+)[^\s\"',;}]+"), re.compile(r"(?i)(api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"),
                    re.compile(r"()\bsk-[A-Za-z0-9_\-]{4,}"))


def redact(text: str, secret: str | None = None) -> str:
  """`text` with `secret`, bearer tokens, `api_key=...` values and `sk-...` keys replaced by [REDACTED]."""
  if secret and secret != NO_KEY and len(secret) >= 4:
    text = text.replace(secret, "[REDACTED]")
  for pattern in _SECRET_PATTERNS:
    text = pattern.sub(r"\1[REDACTED]", text)
  return text


class _BadBody(Exception):
  """A 2xx response whose body is not a chat completion (a server error: retried)."""


class HttpBackend:
  """Chat completions from `model` at `base_url` (e.g. "http://127.0.0.1:8000/v1")."""

  def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
               max_concurrency: int = 8, timeout_s: float = 60, max_retries: int = 4,
               cache_path: str | None = None, backoff_s: float = 1.0, max_backoff_s: float = 30.0):
    if max_concurrency < 1:
      raise ValueError(f"max_concurrency={max_concurrency} must be at least 1")
    if max_retries < 0:
      raise ValueError(f"max_retries={max_retries} must be >= 0")
    self.base_url = base_url.rstrip("/")
    self.model_id = model
    self.api_key_env = api_key_env
    self.max_concurrency = max_concurrency
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
    self.cache = cache_lib.CompletionCache(cache_path) if cache_path else None

  def __repr__(self) -> str:
    return f"HttpBackend(base_url={self.base_url!r}, model={self.model_id!r}, api_key_env={self.api_key_env!r})"

  def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]],
               params: base.SamplingParams) -> list[list[base.Completion]]:
    """Sync wrapper of `agenerate`; inside a running event loop (a notebook) it runs in a worker thread."""
    try:
      asyncio.get_running_loop()
    except RuntimeError:
      return asyncio.run(self.agenerate(conversations, params))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      return pool.submit(asyncio.run, self.agenerate(conversations, params)).result()

  async def agenerate(self, conversations: Sequence[Sequence[Mapping[str, str]]],
                      params: base.SamplingParams) -> list[list[base.Completion]]:
    """`params.n` completions per conversation, in order; cached ones cost no request."""
    results: list[list[base.Completion] | None] = [None] * len(conversations)
    pending: dict[str, list[int]] = {}  # Identical requests in one batch are sent once.
    for i, messages in enumerate(conversations):
      key = cache_lib.request_key(self.model_id, messages, params)
      cached = self.cache.get(key) if self.cache is not None else None
      if cached is not None:
        results[i] = cached
      else:
        pending.setdefault(key, []).append(i)
    if pending:
      semaphore = asyncio.Semaphore(self.max_concurrency)
      async with self._client() as client:

        async def complete(key: str, indices: list[int]) -> None:
          async with semaphore:
            completions = await self._request(client, conversations[indices[0]], params)
          if self.cache is not None:
            self.cache.put(key, completions)
          for i in indices:
            results[i] = completions

        await asyncio.gather(*(complete(key, indices) for key, indices in pending.items()))
    return results

  def _client(self) -> openai.AsyncOpenAI:
    # A fresh client per batch: each sync call runs its own event loop, and a
    # client's connection pool must not outlive the loop it was made on.
    api_key = (os.environ.get(self.api_key_env) if self.api_key_env else None) or NO_KEY
    return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, timeout=self.timeout_s, max_retries=0)

  async def _request(self, client: openai.AsyncOpenAI, messages: Sequence[Mapping[str, str]],
                     params: base.SamplingParams) -> list[base.Completion]:
    """One chat-completions call with our retry policy; every message it raises or logs is redacted."""
    kwargs = dict(model=self.model_id, messages=[dict(m) for m in messages], max_tokens=params.max_tokens,
                  temperature=params.temperature, top_p=params.top_p, n=params.n)
    if params.seed is not None:
      kwargs["seed"] = params.seed
    if params.stop:
      kwargs["stop"] = list(params.stop)
    secret = client.api_key
    endpoint = f"{self.base_url}/chat/completions"
    for attempt in range(self.max_retries + 1):
      retry_after = None
      try:
        # wait_for bounds the whole attempt (connect, headers and body), not each read.
        raw = await asyncio.wait_for(client.chat.completions.with_raw_response.create(**kwargs), self.timeout_s)
        return self._completions(_chat_body(raw.content), params.n)
      except _BadBody as e:
        failure = f"HTTP 200 with a body that is not a chat completion ({e})"
      except openai.APIStatusError as e:
        if e.status_code == 404:
          await self._raise_if_unknown_model(client)
        if e.status_code != 429 and e.status_code < 500:
          hint = f" (is ${self.api_key_env} set?)" if e.status_code in (401, 403) and self.api_key_env else ""
          raise base.BackendError(redact(
              f"{endpoint} rejected the request ({e.status_code}): {_server_message(e)}{hint}", secret)) from None
        failure = f"HTTP {e.status_code}: {_server_message(e)}"
        retry_after = _retry_after(e.response)
      except (openai.APITimeoutError, asyncio.TimeoutError):
        failure = f"no complete response within timeout_s={self.timeout_s}s"
      except openai.APIConnectionError as e:
        failure = f"cannot reach the server at {self.base_url} ({e.__cause__ or e}); is it running?"
      failure = redact(failure, secret)
      if attempt < self.max_retries:
        delay = self._backoff(attempt, retry_after)
        logging.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs", endpoint, attempt + 1,
                        self.max_retries + 1, failure, delay)
        await asyncio.sleep(delay)
    raise base.BackendError(
        f"{endpoint}, model {self.model_id!r}: {self.max_retries + 1} attempt(s) failed; last: {failure}")

  def _backoff(self, attempt: int, retry_after: float | None) -> float:
    """Exponential with full jitter in [delay/2, delay]; at least the server's Retry-After."""
    delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
      delay = max(delay, min(retry_after, self.max_backoff_s))
    return delay

  async def _raise_if_unknown_model(self, client: openai.AsyncOpenAI) -> None:
    try:
      available = sorted([m.id async for m in client.models.list()])
    except openai.OpenAIError:
      return  # The 404 was about something else (or /v1/models is missing); report it as is.
    if self.model_id not in available:
      raise base.BackendError(
          f"model {self.model_id!r} is not served at {self.base_url}; available models: {available}")

  def _completions(self, body: dict, n: int) -> list[base.Completion]:
    choices = sorted(body["choices"], key=lambda c: c["index"])
    if len(choices) != n:
      raise base.BackendError(f"{self.base_url} returned {len(choices)} choice(s) for n={n}")
    usage = body.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens") or 0
    # Servers report completion tokens summed over the n choices; each choice gets the mean.
    completion_tokens = round((usage.get("completion_tokens") or 0) / n)
    return [base.Completion.from_raw(c["message"].get("content") or "",
                                     reasoning=c["message"].get("reasoning_content"),
                                     finish_reason=c.get("finish_reason") or "stop", prompt_tokens=prompt_tokens,
                                     completion_tokens=completion_tokens) for c in choices]


def _snippet(content: bytes) -> str:
  text = content[:SNIPPET_CHARS].decode("utf-8", errors="replace")
  return repr(text) + (f" ... ({len(content)} bytes)" if len(content) > SNIPPET_CHARS else "")


def _chat_body(content: bytes) -> dict:
  """The parsed body of a 200 response, checked to be a chat completion; else `_BadBody` saying what came back."""
  try:
    body = json.loads(content)
  except (ValueError, RecursionError):
    raise _BadBody(f"not JSON: {_snippet(content)}") from None
  if not isinstance(body, dict):
    raise _BadBody(f"a JSON {type(body).__name__}, not an object: {_snippet(content)}")
  choices = body.get("choices")
  if not isinstance(choices, list):
    raise _BadBody(f"no 'choices' list: {_snippet(content)}")
  for i, c in enumerate(choices):
    ok = (isinstance(c, dict) and isinstance(c.get("index", i), int) and isinstance(c.get("message"), dict)
          and isinstance(c["message"].get("content"), str | None)
          and isinstance(c["message"].get("reasoning_content"), str | None)
          and isinstance(c.get("finish_reason"), str | None))
    if not ok:
      raise _BadBody(f"choices[{i}] is not {{index, message: {{content: str}}, finish_reason}}: {_snippet(content)}")
    c.setdefault("index", i)
  usage = body.get("usage")
  if usage is not None and not (isinstance(usage, dict) and all(
      isinstance(usage.get(k), int | None) and not isinstance(usage.get(k), bool)
      for k in ("prompt_tokens", "completion_tokens"))):
    raise _BadBody(f"'usage' is not token counts: {_snippet(content)}")
  return body


def _server_message(error: openai.APIStatusError) -> str:
  """The server's own error message (the OpenAI body's error.message), else the client's summary."""
  body = error.body
  if isinstance(body, dict):
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    if isinstance(inner.get("message"), str):
      return inner["message"]
  return error.message


def _retry_after(response) -> float | None:
  try:
    return float(response.headers.get("retry-after"))
  except (TypeError, ValueError, AttributeError):
    return None

