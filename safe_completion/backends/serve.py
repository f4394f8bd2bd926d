"""An OpenAI-compatible server over any `Backend`: chat and text completions, streaming, API keys, bounds.

Serves our local model to anything that speaks the OpenAI API (the HTTP
backend, the `openai` client, eval harnesses, curl), and lets tests put a
scripted backend behind a real server.

  SERVE_KEY=... python -m safe_completion.backends.serve --model_dir=/path/to/hf_model --api_key_env=SERVE_KEY
  python -m safe_completion.backends.serve --checkpoint_dir=/path/to/sft_workdir --allow_no_auth  # loopback only

Routes: `GET /v1/models`, `POST /v1/chat/completions` (messages, model,
max_tokens / max_completion_tokens, temperature, top_p, n, seed, stop, stream)
and `POST /v1/completions` (prompt instead of messages). `stream=true` answers
with server-sent events as the OpenAI API does (`data: {chunk}` ... `data: [DONE]`).
A chat completion's reasoning block is `reasoning_content`, streamed or not (vLLM's
reasoning-parser field): a completion that opens with it streams `reasoning_content`
deltas, then `content` deltas after the block closes, and the deltas of each add up
to the fields of the same request unstreamed.

Hardening: with an API key every /v1 route needs `Authorization: Bearer <key>`
(compared in constant time; 401 otherwise). `max_tokens` is bounded by the
model's context (400 with the limit); each request has a deadline (504); at
most `max_queue` requests are admitted at once (429 beyond, with Retry-After);
a local model decodes in bounded chunks and stops for a client that left
(`serve_engine`). Errors use the OpenAI body `{"error": {"message", "type",
"param", "code"}}`: 400 for invalid requests (also huge seeds and lone
surrogates), 404 for an unknown model.
"""

import asyncio
import functools
import hashlib
import ipaddress
import json
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import fastapi
import pydantic
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import concurrency

from safe_completion.backends import base
from safe_completion.data import chat as chat_lib

MAX_SEED = 2**63 - 1
MAX_TOKENS = 2**31 - 1


def _utf8(value: str) -> str:
  """Rejects strings Python can hold but no tokenizer can: lone surrogates (from JSON "\\ud800")."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"not valid Unicode: lone surrogate {value[e.start]!r} at index {e.start}") from None
  return value


Text = Annotated[str, pydantic.AfterValidator(_utf8)]


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  role: Literal["system", "user", "assistant"]
  content: Text


class _SamplingFields(pydantic.BaseModel):
  """What both endpoints share; other OpenAI fields are ignored."""

  model_config = pydantic.ConfigDict(extra="ignore")
  model: Text
  max_tokens: int | None = pydantic.Field(None, ge=1, le=MAX_TOKENS)
  temperature: float = pydantic.Field(1.0, ge=0, le=2)
  top_p: float = pydantic.Field(1.0, gt=0, le=1)
  n: int = pydantic.Field(1, ge=1, le=128)
  seed: int | None = pydantic.Field(None, ge=0, le=MAX_SEED)
  stop: Text | list[Text] | None = None
  stream: bool = False


class ChatRequest(_SamplingFields):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1, le=MAX_TOKENS)


class CompletionRequest(_SamplingFields):
  prompt: Text | list[Text]


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, headers: dict | None = None, **kwargs) -> responses.JSONResponse:
  return responses.JSONResponse(error_body(message, **kwargs), status_code=status, headers=headers)


class Cancelled(Exception):
  """Generation stopped before the end: `reason` is "deadline" or "disconnected"."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class _HttpError(Exception):
  def __init__(self, status: int, message: str, headers: dict | None = None, **kwargs):
    super().__init__(message)
    self.response = _error(status, message, headers, **kwargs)


def _sampling_params(request: _SamplingFields, max_tokens: int | None) -> base.SamplingParams:
  return base.SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                             n=request.n, seed=request.seed, stop=request.stop or ())


def _key_digest(key: str) -> bytes:
  return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def make_app(backend: Any, *, default_max_tokens: int = 256, api_key: str | None = None, max_queue: int = 16,
             request_timeout_s: float = 300.0, max_tokens_limit: int = 32768) -> fastapi.FastAPI:
  """The FastAPI app serving `backend` (a `base.Backend` or a `serve_engine.ServeEngine`) as `backend.model_id`.

  Args:
    backend: what generates. A ServeEngine is cancellable and streams chunk by chunk; any other
      backend runs to the end in a worker thread (its stream is one chunk).
    default_max_tokens: max_tokens when a request gives none.
    api_key: the bearer key every /v1 route requires; None serves everyone.
    max_queue: requests generating or waiting at once; more get 429.
    request_timeout_s: deadline of each request (504 past it).
    max_tokens_limit: the bound on max_tokens for a backend without a context (an engine uses its context).
  """
  engine = backend if hasattr(backend, "encode_chat") and hasattr(backend, "max_new_tokens") else None
  app = fastapi.FastAPI(title=f"safe_completion serve: {backend.model_id}")
  created = int(time.time())
  expected = _key_digest(api_key) if api_key is not None else None
  admitted = [0]

  @app.middleware("http")
  async def authenticate(request: fastapi.Request, call_next):
    if expected is not None and request.url.path.startswith("/v1/"):
      given = request.headers.get("authorization", "")
      token = given[7:] if given[:7].lower() == "bearer " else ""
      if not secrets.compare_digest(_key_digest(token), expected):
        return _error(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
    return await call_next(request)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def invalid_request(request: fastapi.Request, exc: fastapi_exceptions.RequestValidationError):
    del request
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
    return _error(400, f"invalid request: {problems}", param=".".join(str(p) for p in first) or None)

  @app.exception_handler(_HttpError)
  async def http_error(request: fastapi.Request, exc: _HttpError):
    del request
    return exc.response

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list",
            "data": [{"id": backend.model_id, "object": "model", "created": created, "owned_by": "safe_completion"}]}

  def prepare(request: _SamplingFields, max_tokens: int | None, encode: Callable[[], Any]):
    """(prompt for the backend, sampling params) after the checks every request gets; raises _HttpError."""
    if request.model != backend.model_id:
      raise _HttpError(404, f"The model {request.model!r} does not exist; available models: {[backend.model_id]}",
                       param="model", code="model_not_found")
    try:
      prompt = encode()
    except ValueError as e:  # e.g. a prompt longer than the backend takes.
      raise _HttpError(400, str(e)) from None
    max_tokens = max_tokens or default_max_tokens
    limit = engine.max_new_tokens(len(prompt)) if engine is not None else max_tokens_limit
    if max_tokens > limit:
      where = f"the prompt has {len(prompt)} tokens of a {engine.context}-token context" if engine else "this server"
      raise _HttpError(400, f"max_tokens={max_tokens} is more than {where} allows: at most {limit}",
                       param="max_tokens")
    try:
      return prompt, _sampling_params(request, max_tokens)
    except ValueError as e:
      raise _HttpError(400, str(e)) from None

  async def run(http_request: fastapi.Request, prompt: Any, params: base.SamplingParams,
                on_progress: Callable[[int, str], None] | None, cancel: threading.Event) -> list[base.Completion]:
    """Generates within the deadline, stopping (engine) when the client disconnects; raises _HttpError."""
    if admitted[0] >= max_queue:
      raise _HttpError(429, f"the server is busy ({max_queue} requests in progress); retry later",
                       {"retry-after": "1"}, type_="server_error", code="queue_full")
    admitted[0] += 1
    deadline = time.monotonic() + request_timeout_s
    if engine is not None:
      work = functools.partial(engine.generate, prompt, params, deadline=deadline, cancel=cancel,
                               on_progress=on_progress)
    else:
      work = lambda: backend.generate([prompt], params)[0]  # pylint: disable=unnecessary-lambda-assignment
    task = asyncio.ensure_future(concurrency.run_in_threadpool(work))
    # The slot is held until the work ends, also when we answer first (a plain backend cannot be stopped).
    task.add_done_callback(lambda _: admitted.__setitem__(0, admitted[0] - 1))
    try:
      while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and await http_request.is_disconnected():
          cancel.set()
        if not task.done() and time.monotonic() > deadline + (1.0 if engine else 0.0):
          cancel.set()
          raise Cancelled("deadline")
      return task.result()
    except Cancelled as e:
      if e.reason == "deadline":
        raise _HttpError(504, f"the request did not finish within its {request_timeout_s}s deadline",
                         type_="server_error", code="timeout") from None
      raise _HttpError(499, "client disconnected", type_="server_error") from None
    except ValueError as e:
      raise _HttpError(400, str(e)) from None
    except base.BackendError as e:
      raise _HttpError(502, str(e), type_="server_error") from None
    finally:
      if not task.done():
        cancel.set()

  def stream(http_request, prompt, params, chunk: Callable[[int, str | None, str | None, str | None], dict],
             parts: Callable[[str], tuple[str, str] | None], final_parts: Callable[[base.Completion], tuple[str, str]]):
    """Server-sent events: each choice's (reasoning, content) deltas as the engine reports its text, then
    [DONE]. `parts` maps a partial text to the (reasoning, content) final so far (None: undecided);
    `final_parts` gives them from the finished completion; `chunk(index, reasoning, content, finish)`."""
    if admitted[0] >= max_queue:  # Refused with a status while one can still be sent.
      raise _HttpError(429, f"the server is busy ({max_queue} requests in progress); retry later",
                       {"retry-after": "1"}, type_="server_error", code="queue_full")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    sent = [("", "")] * params.n
    cancel = threading.Event()

    def on_progress(index: int, text: str) -> None:
      loop.call_soon_threadsafe(queue.put_nowait, (index, text))

    def deltas(index: int, now: tuple[str, str]) -> tuple[str | None, str | None]:
      """The new text of each part since the last event of `index` (None: nothing new or not a continuation)."""
      new = [part[len(old):] if part.startswith(old) and len(part) > len(old) else None
             for part, old in zip(now, sent[index])]
      sent[index] = tuple(part if d is not None else old for part, old, d in zip(now, sent[index], new))
      return new[0], new[1]

    async def events() -> AsyncIterator[str]:
      task = asyncio.ensure_future(run(http_request, prompt, params, on_progress if engine else None, cancel))
      try:
        while not (task.done() and queue.empty()):
          getter = asyncio.ensure_future(queue.get())
          await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
          if not getter.done():
            getter.cancel()
            continue
          index, text = getter.result()
          # As the final text: cut at a stop string; a split multi-byte character is held back.
          now = parts(_before_stop(text, params.stop).rstrip("\ufffd"))
          reasoning, content = deltas(index, now) if now is not None else (None, None)
          if reasoning is not None or content is not None:
            yield _sse(chunk(index, reasoning, content, None))
        try:
          completions = task.result()
        except _HttpError as e:
          yield _sse(json.loads(e.response.body))
          return
        for index, c in enumerate(completions):
          reasoning, content = deltas(index, final_parts(c))
          yield _sse(chunk(index, reasoning, content, c.finish_reason))
        yield "data: [DONE]\n\n"
      finally:
        cancel.set()  # A client that left cancels the stream, and with it the generation.

    return responses.StreamingResponse(events(), media_type="text/event-stream")

  @app.post("/v1/chat/completions")
  async def chat_completions(request: ChatRequest, http_request: fastapi.Request):
    messages = [m.model_dump() for m in request.messages]
    encode = (lambda: engine.encode_chat(messages)) if engine else (lambda: messages)
    prompt, params = prepare(request, request.max_completion_tokens or request.max_tokens, encode)
    response_id = f"chatcmpl-{secrets.token_hex(12)}"
    if request.stream:
      def chunk(index, reasoning, content, finish_reason):
        delta = {"role": "assistant", **({"reasoning_content": reasoning} if reasoning is not None else {}),
                 **({"content": content} if content is not None else {})}
        return {"id": response_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": backend.model_id, "choices": [{"index": index, "delta": delta,
                                                        "finish_reason": finish_reason}]}
      return stream(http_request, prompt, params, chunk, streamed_chat_parts, lambda c: (c.reasoning, c.text))
    completions = await run(http_request, prompt, params, None, threading.Event())
    return _chat_response(response_id, backend.model_id, completions)

  @app.post("/v1/completions")
  async def text_completions(request: CompletionRequest, http_request: fastapi.Request):
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
      raise _HttpError(400, f"prompt: give one prompt per request, got {len(request.prompt)}", param="prompt")
    text = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    messages = [{"role": "user", "content": text}]
    encode = (lambda: engine.encode_text(text)) if engine else (lambda: messages)
    prompt, params = prepare(request, request.max_tokens or 16, encode)  # 16: the OpenAI default here.
    response_id = f"cmpl-{secrets.token_hex(12)}"

    def chunk(index, reasoning, content, finish_reason):
      del reasoning  # A text completion's text is the raw text; it has no reasoning field.
      return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": backend.model_id,
              "choices": [{"index": index, "text": content or "", "logprobs": None, "finish_reason": finish_reason}]}

    def raw_text(c: base.Completion) -> tuple[str, str]:
      if c.reasoning and not engine:
        return "", f"{chat_lib.REASONING_OPEN}{c.reasoning}{chat_lib.REASONING_CLOSE}{c.text}"
      return "", c.text

    if request.stream:
      return stream(http_request, prompt, params, chunk, lambda text: ("", text.lstrip()), raw_text)
    completions = await run(http_request, prompt, params, None, threading.Event())
    body = _chat_response(response_id, backend.model_id, completions)
    body.update(object="text_completion", choices=[
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(completions)])
    return body

  return app


def streamed_chat_parts(text: str) -> tuple[str, str] | None:
  """(reasoning, content) of a partly generated chat completion, each only as far as it is final, so that
  the streamed deltas add up to `chat.split_reasoning` of the finished text.

  A completion that opens with a reasoning block streams it as reasoning until the block closes, then the
  rest as content; any other completion streams as content. Held back: text that may still become the
  opening or closing tag (None while the start is undecided) and trailing whitespace, which the final
  split strips.
  """
  opening, closing = chat_lib.REASONING_OPEN, chat_lib.REASONING_CLOSE
  body = text.lstrip()
  if not body.startswith(opening):
    return None if opening.startswith(body) else ("", body.rstrip())
  if closing in body:
    return chat_lib.split_reasoning(body)
  reasoning = body[len(opening):]
  for keep in range(min(len(closing) - 1, len(reasoning)), 0, -1):  # A tag still arriving is held back.
    if closing.startswith(reasoning[-keep:]):
      reasoning = reasoning[:-keep]
      break
  return reasoning.strip(), ""


def _before_stop(text: str, stop) -> str:
  cuts = [text.find(s) for s in stop if s in text]
  return text[:min(cuts)] if cuts else text


def _sse(data: dict) -> str:
  return f"data: {json.dumps(data)}\n\n"


def _chat_response(response_id: str, model: str, completions: list[base.Completion]) -> dict[str, Any]:
  choices = []
  for i, c in enumerate(completions):
    message = {"role": "assistant", "content": c.text}
    if c.reasoning:
      message["reasoning_content"] = c.reasoning
    choices.append({"index": i, "message": message, "finish_reason": c.finish_reason})
  prompt_tokens = completions[0].prompt_tokens if completions else 0
  completion_tokens = sum(c.completion_tokens for c in completions)
  return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
          "model": model, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def load_local_backend(*, model_dir: str | None, checkpoint_dir: str | None, max_prompt_len: int,
                       batch_size: int, model_id: str | None = None, mesh: Any = None, rules: Any = None) -> base.Backend:
  """A LocalBackend from an HF model directory or a training workdir (SFT/RL orbax checkpoints).

  With a `mesh` (a `jax.sharding.Mesh`), params are placed on it by the logical `rules` (default
  `parallel.DEFAULT_RULES`) as they load, and generation runs sharded; without one, on one device.
  """
  import jax  # JAX and orbax: only when serving a model.

  from safe_completion import checkpoint
  from safe_completion import parallel
  from safe_completion import training
  from safe_completion.backends import local
  from safe_completion.models import convert

  if (model_dir is None) == (checkpoint_dir is None):
    raise ValueError("pass exactly one of --model_dir (HF safetensors) and --checkpoint_dir (a training workdir)")
  rules = rules or parallel.DEFAULT_RULES
  model_config = (convert.load_hf_config(model_dir) if model_dir is not None
                  else checkpoint.read_model_config(checkpoint_dir))
  shardings = None
  if mesh is not None:
    shardings = training.param_shardings(model_config, mesh, rules)  # Checked: an error names the param.
  if model_dir is not None:
    params = convert.load_hf_params(model_dir, model_config)
    params = params if shardings is None else jax.device_put(params, shardings)
    tokenizer = convert.load_tokenizer(model_dir)
  else:
    params, model_config, tokenizer = checkpoint.load_model(checkpoint_dir, shardings)
  name = model_id or os.path.basename(os.path.normpath(model_dir or checkpoint_dir))
  return local.LocalBackend(params, model_config, tokenizer, max_prompt_len, model_id=name, batch_size=batch_size,
                            mesh=mesh, rules=rules)


def api_key_from_flags(api_key_env: str | None, allow_no_auth: bool, host: str) -> str | None:
  """The key from $api_key_env; no key only when explicitly allowed and bound to loopback."""
  if api_key_env:
    key = os.environ.get(api_key_env)
    if not key:
      raise ValueError(f"--api_key_env={api_key_env}: ${api_key_env} is unset or empty")
    return key
  if not allow_no_auth:
    raise ValueError("pass --api_key_env=NAME (clients send that key), or --allow_no_auth to serve without one "
                     "on a loopback --host")
  if not is_loopback(host):
    raise ValueError(f"--allow_no_auth only on a loopback --host, not {host!r}: use --api_key_env")
  return None


def main() -> None:
  """The command line: flags are defined here, not at import, so importing `make_app` defines none."""
  from absl import app as absl_app
  from absl import flags

  flags.DEFINE_string("model_dir", None, "HF model directory (config.json, safetensors, tokenizer).")
  flags.DEFINE_string("checkpoint_dir", None, "Workdir of an SFT/RL run (checkpoints/, model_config.json, tokenizer/).")
  flags.DEFINE_string("model_id", None, "Model name to serve; default the directory's name.")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
  flags.DEFINE_integer("port", 8000, "Port to bind.")
  flags.DEFINE_integer("max_prompt_len", 1024, "Prompts are left-padded to this many tokens.")
  flags.DEFINE_integer("batch_size", 8, "Rows per sampler call.")
  flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request gives none.")
  flags.DEFINE_string("api_key_env", None, "Environment variable holding the API key clients must send.")
  flags.DEFINE_bool("allow_no_auth", False, "Serve without an API key (only on a loopback --host).")
  flags.DEFINE_integer("max_queue", 16, "Requests generating or waiting at once; more get 429.")
  flags.DEFINE_float("request_timeout_s", 300.0, "Deadline of each request.")
  flags.DEFINE_integer("chunk_tokens", 16, "Decode steps per sampler call (cancellation is checked between).")

  def serve(argv):
    del argv
    import uvicorn
    from safe_completion.backends import serve_engine
    f = flags.FLAGS
    api_key = api_key_from_flags(f.api_key_env, f.allow_no_auth, f.host)
    backend = load_local_backend(model_dir=f.model_dir, checkpoint_dir=f.checkpoint_dir,
                                 max_prompt_len=f.max_prompt_len, batch_size=f.batch_size, model_id=f.model_id)
    engine = serve_engine.ServeEngine(backend, chunk_tokens=f.chunk_tokens)
    app = make_app(engine, default_max_tokens=f.default_max_tokens, api_key=api_key, max_queue=f.max_queue,
                   request_timeout_s=f.request_timeout_s)
    uvicorn.run(app, host=f.host, port=f.port, log_level="warning")

  absl_app.run(serve)


if __name__ == "__main__":
  main()
