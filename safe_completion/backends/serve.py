"""An OpenAI-compatible chat-completions server over any `Backend`.

Serves our local model to anything that speaks the OpenAI API (the HTTP
backend, eval harnesses, curl), and lets tests put a scripted backend behind a
real server.

  python -m safe_completion.backends.serve --model_dir=/path/to/hf_model --port=8000
  python -m safe_completion.backends.serve --checkpoint_dir=/path/to/sft_workdir --port=8000

Routes: `GET /v1/models`, `POST /v1/chat/completions` (messages, model,
max_tokens / max_completion_tokens, temperature, top_p, n, seed, stop; no
streaming). Errors use the OpenAI body `{"error": {"message", "type", "param",
"code"}}`: 400 for invalid requests, 404 for an unknown model.
"""

import os
import secrets
import time
from typing import Any, Literal

import fastapi
import pydantic
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import concurrency

from safe_completion.backends import base


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(pydantic.BaseModel):
  """The subset of the OpenAI request that a backend can honour; other fields are ignored."""

  model_config = pydantic.ConfigDict(extra="ignore")
  model: str
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_tokens: int | None = pydantic.Field(None, ge=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1)
  temperature: float = pydantic.Field(1.0, ge=0, le=2)
  top_p: float = pydantic.Field(1.0, gt=0, le=1)
  n: int = pydantic.Field(1, ge=1, le=128)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, **kwargs) -> responses.JSONResponse:
  return responses.JSONResponse(error_body(message, **kwargs), status_code=status)


def _sampling_params(request: ChatRequest, default_max_tokens: int) -> base.SamplingParams:
  max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
  return base.SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                             n=request.n, seed=request.seed, stop=request.stop or ())


def make_app(backend: base.Backend, *, default_max_tokens: int = 256) -> fastapi.FastAPI:
  """The FastAPI app serving `backend` under the name `backend.model_id`."""
  app = fastapi.FastAPI(title=f"safe_completion serve: {backend.model_id}")
  created = int(time.time())

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def invalid_request(request: fastapi.Request, exc: fastapi_exceptions.RequestValidationError):
    del request
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
    return _error(400, f"invalid request: {problems}", param=".".join(str(p) for p in first) or None)

  @app.get("/v1/models")
  async def list_models():
    return {"object": "list",
            "data": [{"id": backend.model_id, "object": "model", "created": created, "owned_by": "safe_completion"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: ChatRequest):
    if request.model != backend.model_id:
      return _error(404, f"The model {request.model!r} does not exist; available models: {[backend.model_id]}",
                    param="model", code="model_not_found")
    if request.stream:
      return _error(400, "stream=true is not supported by this server", param="stream")
    try:
      params = _sampling_params(request, default_max_tokens)
    except ValueError as e:
      return _error(400, str(e))
    messages = [m.model_dump() for m in request.messages]
    try:
      (completions,) = await concurrency.run_in_threadpool(backend.generate, [messages], params)
    except ValueError as e:  # e.g. a prompt longer than the backend takes.
      return _error(400, str(e))
    except base.BackendError as e:
      return _error(502, str(e), type_="server_error")
    return _response(backend.model_id, completions)

  return app


def _response(model: str, completions: list[base.Completion]) -> dict[str, Any]:
  choices = []
  for i, c in enumerate(completions):
    message = {"role": "assistant", "content": c.text}
    if c.reasoning:
      message["reasoning_content"] = c.reasoning
    choices.append({"index": i, "message": message, "finish_reason": c.finish_reason})
  prompt_tokens = completions[0].prompt_tokens if completions else 0
  completion_tokens = sum(c.completion_tokens for c in completions)
  return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
          "model": model, "choices": choices,
          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}}


def load_local_backend(*, model_dir: str | None, checkpoint_dir: str | None, max_prompt_len: int,
                       batch_size: int, model_id: str | None = None) -> base.Backend:
  """A LocalBackend from an HF model directory or a training workdir (SFT/RL orbax checkpoints)."""
  from safe_completion import checkpoint  # JAX and orbax: only when serving a model.
  from safe_completion.backends import local
  from safe_completion.models import convert

  if (model_dir is None) == (checkpoint_dir is None):
    raise ValueError("pass exactly one of --model_dir (HF safetensors) and --checkpoint_dir (a training workdir)")
  if model_dir is not None:
    params, model_config = convert.load_hf_checkpoint(model_dir)
    tokenizer = convert.load_tokenizer(model_dir)
  else:
    params, model_config, tokenizer = checkpoint.load_model(checkpoint_dir)
  name = model_id or os.path.basename(os.path.normpath(model_dir or checkpoint_dir))
  return local.LocalBackend(params, model_config, tokenizer, max_prompt_len, model_id=name, batch_size=batch_size)


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

  def serve(argv):
    del argv
    import uvicorn
    f = flags.FLAGS
    backend = load_local_backend(model_dir=f.model_dir, checkpoint_dir=f.checkpoint_dir,
                                 max_prompt_len=f.max_prompt_len, batch_size=f.batch_size, model_id=f.model_id)
    uvicorn.run(make_app(backend, default_max_tokens=f.default_max_tokens), host=f.host, port=f.port,
                log_level="warning")

  absl_app.run(serve)


if __name__ == "__main__":
  main()
