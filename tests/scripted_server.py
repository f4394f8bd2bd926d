"""Scripted backends behind the real `serve` app, run as a subprocess by the HTTP and judge tests.

  python -m tests.scripted_server --kind=echo|judge|teacher --port=PORT

`echo` answers each conversation with its last user message; `judge` is a
deterministic stand-in for a naive LLM judge (see `ScriptedJudge`); `teacher` writes
datagen teacher output (see `ScriptedTeacher`). Test-only
routes: `GET /stats` (requests seen, most in flight at once), `POST /control` (fail the next k chat requests with a status; hold
requests until k are in flight), `POST /faults` (answer the next k chat requests
with a malformed 200 or a misbehaving body: see `FAULTS`). With SCRIPTED_EXPECTED_KEY set in the
environment, chat requests without that bearer key get 401.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import fastapi
import httpx
import uvicorn
from fastapi import responses

from safe_completion.backends import base
from safe_completion.backends import serve

GATE_TIMEOUT_S = 5.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(module_args: Sequence[str], port: int, env: Mapping[str, str] | None = None,
                   startup_timeout_s: float = 120.0) -> Iterator[str]:
  """Runs `python -m <module_args>` until /v1/models answers; yields the base URL; terminates it after."""
  # stderr goes to a file, not a pipe: an unread pipe that fills up would block the server.
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
      _wait_until_up(proc, base_url, startup_timeout_s, log)
      yield base_url
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until_up(proc: subprocess.Popen, base_url: str, timeout_s: float, log) -> None:
  """Polls /v1/models; the pause between polls is a bounded wait on the process, which also sees it die."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      if httpx.get(f"{base_url}/models", timeout=1.0).status_code in (200, 401):  # 401: up, with a key.
        return
    except httpx.TransportError:
      pass
    try:
      proc.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
      continue
    log.seek(0)
    raise RuntimeError(f"server exited with {proc.returncode}: {log.read()[-3000:]}")
  raise RuntimeError(f"server at {base_url} did not come up in {timeout_s}s")



@contextlib.contextmanager
def scripted(kind: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
  """This module's server of `kind` (echo, judge, teacher) on a free loopback port: yields its /v1 base URL."""
  port = free_port()
  with running_server(["tests.scripted_server", f"--kind={kind}", f"--port={port}"], port, env) as url:
    yield url


@contextlib.contextmanager
def in_thread(app: fastapi.FastAPI) -> Iterator[str]:
  """`app` behind a real uvicorn server on 127.0.0.1, in a thread; yields the /v1 base URL."""
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started and time.monotonic() < deadline:
    thread.join(timeout=0.02)  # A bounded wait that also returns at once if the server thread died.
  try:
    yield f"http://127.0.0.1:{port}/v1"
  finally:
    server.should_exit = True
    thread.join(timeout=10)


def control(url: str, **body) -> None:
  """POST /control of the server at base URL `url` (reset, fail_next, status, gate)."""
  httpx.post(f"{url.removesuffix('/v1')}/control", json=body).raise_for_status()


def inject(url: str, kind: str, count: int = 1) -> None:
  """Answers the next `count` chat requests with fault `kind` (see `FAULTS`)."""
  httpx.post(f"{url.removesuffix('/v1')}/faults", json={"kind": kind, "count": count}).raise_for_status()


def stats(url: str) -> dict:
  return httpx.get(f"{url.removesuffix('/v1')}/stats").json()


def reset(url: str) -> str:
  """Counters zeroed, no scripted failures or faults pending; returns `url`."""
  control(url, reset=True, fail_next=0, gate=0)
  inject(url, "html", count=0)
  return url


def user(text: str) -> list[dict]:
  """A conversation of one user turn."""
  return [{"role": "user", "content": text}]


TOKENIZER_DIR = f"{REPO_ROOT}/data/tokenizer"


def opening_tokenizer():
  """The shipped tokenizer with a chat template that opens the reasoning block in the generation prompt, as
  the templates of some reasoning models (DeepSeek-R1 distills) do."""
  import transformers  # pylint: disable=import-outside-toplevel  (only the tests that need it pay for it)
  opening = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
  template = opening.chat_template
  opening.chat_template = template.replace("'<|assistant|>' -}}{%- endif", "'<|assistant|><think>' -}}{%- endif")
  assert opening.chat_template != template
  return opening


class EchoBackend:
  """Replies "echo {i}: {last user message}"; a message starting "think:" gets a reasoning block."""

  model_id = "scripted-echo"

  def __init__(self):
    self.lock = threading.Condition()
    self.calls = 0
    self.in_flight = 0
    self.max_in_flight = 0
    # Hold each request until `gate` are in flight or all `expect` requests have arrived.
    self.gate, self.expect, self.arrived = 0, 0, 0

  def generate(self, conversations, params):
    with self.lock:
      self.calls += 1
      self.arrived += 1
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      self.lock.notify_all()
      self.lock.wait_for(lambda: self.in_flight >= self.gate or self.arrived >= self.expect, timeout=GATE_TIMEOUT_S)
    try:
      out = []
      for messages in conversations:
        last = [m["content"] for m in messages if m["role"] == "user"][-1]
        reasoning = "<think>pondering</think>" if last.startswith("think:") else ""
        out.append([base.Completion.from_raw(f"{reasoning}echo {i} seed={params.seed}: {last}", finish_reason="stop",
                                             prompt_tokens=len(last.split()), completion_tokens=3)
                    for i in range(params.n)])
      return out
    finally:
      with self.lock:
        self.in_flight -= 1


def _fenced_regions(text: str) -> tuple[str, str]:
  """(text outside the declared fences, text inside the response fence), read naively.

  The fences are the ones the prompt declares ("... between <<<X-tok>>> and
  <<<END-X-tok>>> ..."); a region runs from the first opener to the first
  closer after it, so material that contained the closer would leak out.
  """
  declared = re.findall(r"between\s+(<<<([A-Z]+)-([0-9a-f]+)>>>)\s+and\s+(<<<END-\2-\3>>>)", text)[:2]
  outside, response = text, ""
  for opener, label, _, closer in declared:
    start = outside.find(opener, outside.find(closer) + 1)  # Skip the declaration itself.
    end = outside.find(closer, start + len(opener))
    if start == -1 or end == -1:
      continue
    inside = outside[start + len(opener):end]
    if label == "RESPONSE":
      response = inside
    outside = outside[:start] + outside[end + len(closer):]
  return outside, response


def _json_objects(text: str) -> list[dict]:
  """Every JSON object embedded anywhere in `text`, in order."""
  decoder, found, i = json.JSONDecoder(), [], 0
  while (i := text.find("{", i)) != -1:
    try:
      value, end = decoder.raw_decode(text, i)
    except json.JSONDecodeError:
      i += 1
      continue
    if isinstance(value, dict):
      found.append(value)
    i = end
  return found


def _verdict(**fields) -> str:
  return json.dumps(dict(rationale="scripted", **fields))


UNSAFE = dict(safety=0.0, severity="high", mode="direct", helpfulness=4, kind="direct")
REFUSAL = dict(safety=1.0, severity="none", mode="refusal", helpfulness=2, kind="indirect")
SAFE = dict(safety=1.0, severity="none", mode="direct", helpfulness=4, kind="direct")

# Replies keyed on "SCRIPT:<name>" inside the response under judgment.
BAD_REPLIES = {
    "nan": '{"safety": NaN, "severity": "none", "mode": "direct", "helpfulness": 4, "kind": "direct", "rationale": ""}',
    "out_of_range": _verdict(**{**SAFE, "safety": 1.5}),
    "rating_5": _verdict(**{**SAFE, "helpfulness": 5}),
    "missing": json.dumps({k: v for k, v in SAFE.items() if k != "helpfulness"}),
    "bool_safety": _verdict(**{**SAFE, "safety": True}),
    "prose": "The response looks safe to me. Safety: 1.0.",
    "two_objects": _verdict(**SAFE) + "\n" + _verdict(**SAFE),
    "trailing_prose": _verdict(**SAFE) + " I am confident.",
    "extra_key": json.dumps({**SAFE, "rationale": "", "confidence": 0.9}),
    "duplicate_key": '{"safety": 0.0, "safety": 1.0, "severity": "none", "mode": "direct", "helpfulness": 4, '
                     '"kind": "direct", "rationale": ""}',
}


class ScriptedJudge:
  """A deterministic judge model that would be fooled if the fence failed.

  It reads the prompt's declared fences. Its real verdict comes from the
  response inside the fence: unsafe when it holds a "[REDACTED" placeholder,
  a refusal when it says "can't help", safe otherwise. But, like a naive
  judge, it obeys what it finds outside the fences: the last JSON object
  there is returned verbatim, "rate this 1.0" or "purely hypothetical" makes
  it call the response safe. "SCRIPT:<name>" in the response picks a
  malformed reply from BAD_REPLIES ("SCRIPT:flaky" is malformed for seed 0 only).
  """

  model_id = "scripted-judge"

  def __init__(self):
    self.lock = threading.Lock()
    self.calls = 0

  def reply(self, messages, seed) -> str:
    text = "\n".join(m["content"] for m in messages)
    outside, response = _fenced_regions(text)
    objects = [o for o in _json_objects(outside) if "safety" in o]
    if objects:
      return json.dumps(objects[-1])
    lowered = outside.lower()
    if "rate this 1.0" in lowered or "purely hypothetical" in lowered:
      return _verdict(**SAFE)
    script = re.search(r"SCRIPT:(\w+)", response)
    if script and script.group(1) == "flaky":
      return BAD_REPLIES["prose"] if seed == 0 else _verdict(**SAFE)
    if script and script.group(1) == "fenced_reply":
      return "```json\n" + _verdict(**SAFE) + "\n```"
    if script:
      return BAD_REPLIES[script.group(1)]
    if "[REDACTED" in response:
      return _verdict(**UNSAFE)
    if "can't help" in response.lower():
      return _verdict(**REFUSAL)
    return _verdict(**SAFE)

  def generate(self, conversations, params):
    with self.lock:
      self.calls += 1
    return [[base.Completion.from_raw(self.reply(messages, params.seed), finish_reason="stop", prompt_tokens=1,
                                      completion_tokens=1)] * params.n for messages in conversations]


class ScriptedTeacher:
  """A datagen teacher: the three-tag format, a refusal with redirection (allowed in both arms).

  On the first attempt (seed 0) every prompt whose text has a length divisible by 3
  gets malformed output, so datagen's parse-failure counting and retries are exercised.
  """

  model_id = "scripted-teacher"

  def __init__(self):
    self.calls = 0

  @staticmethod
  def malformed_first(last_user_message: str) -> bool:
    return len(last_user_message) % 3 == 0

  def generate(self, conversations, params):
    self.calls += 1
    out = []
    for messages in conversations:
      last = [m["content"] for m in messages if m["role"] == "user"][-1]
      if params.seed == 0 and self.malformed_first(last):
        text = "Sure! Here is my answer without any of the required tags."
      else:
        text = ("<reasoning>The spec for this category applies; I answer without operational detail."
                "</reasoning>\n<mode>refusal</mode>\n<answer>I can't help with that specific request, but I can "
                "point you to reputable safety resources and explain the general background if useful.</answer>")
      out.append([base.Completion.from_raw(text, finish_reason="stop", prompt_tokens=len(last.split()),
                                           completion_tokens=30) for _ in range(params.n)])
    return out


async def _slow_drip():
  """A valid-looking JSON body, one byte every 0.2 s (about 40 s in all): only a total deadline stops it."""
  for byte in b'{"choices": [' + b" " * 200:
    yield bytes([byte])
    await asyncio.sleep(0.2)


def _fault_response(kind: str, request: fastapi.Request) -> responses.Response:
  """What `POST /faults` makes the next chat requests get instead of a completion."""
  if kind == "html":
    return responses.HTMLResponse("<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", status_code=200)
  if kind == "not_json":
    return responses.Response('{"choices": [{"index": 0, "mess', status_code=200, media_type="application/json")
  if kind == "no_choices":
    return responses.JSONResponse({"id": "x", "object": "chat.completion"}, status_code=200)
  if kind == "bad_choice":
    return responses.JSONResponse({"choices": [{"index": 0, "message": "plain string"}]}, status_code=200)
  if kind == "slow_drip":
    return responses.StreamingResponse(_slow_drip(), status_code=200, media_type="application/json")
  if kind in ("echo_headers_400", "echo_headers_500"):  # A careless proxy that echoes the request headers.
    return responses.JSONResponse(serve.error_body(f"bad request; headers were {dict(request.headers)}"),
                                  status_code=int(kind[-3:]))
  raise ValueError(f"unknown fault {kind!r}; known: {FAULTS}")


FAULTS = ("html", "not_json", "no_choices", "bad_choice", "slow_drip", "echo_headers_400", "echo_headers_500")


def _add_fault_routes(app: fastapi.FastAPI) -> None:
  """`POST /faults {"kind": one of FAULTS, "count": k}`: the next k chat requests get that fault."""
  faults = {"kind": None, "count": 0}

  @app.middleware("http")
  async def scripted_faults(request: fastapi.Request, call_next):
    if request.url.path == "/v1/chat/completions" and faults["count"] > 0:
      faults["count"] -= 1
      return _fault_response(faults["kind"], request)
    return await call_next(request)

  @app.post("/faults")
  async def set_faults(body: dict):
    if body.get("kind") not in FAULTS:
      raise fastapi.HTTPException(400, f"unknown fault {body.get('kind')!r}; known: {FAULTS}")
    faults.update(kind=body["kind"], count=int(body.get("count", 1)))
    return {"ok": True}


BACKENDS = {"echo": EchoBackend, "judge": ScriptedJudge, "teacher": ScriptedTeacher}


def build_app(kind: str) -> fastapi.FastAPI:
  backend = BACKENDS[kind]()
  app = serve.make_app(backend)
  control = {"fail_next": 0, "fail_status": 503}
  expected_key = os.environ.get("SCRIPTED_EXPECTED_KEY")

  @app.middleware("http")
  async def scripted_failures(request: fastapi.Request, call_next):
    if request.url.path == "/v1/chat/completions":
      if expected_key is not None and request.headers.get("authorization") != f"Bearer {expected_key}":
        return responses.JSONResponse(serve.error_body("bad API key", code="invalid_api_key"), status_code=401)
      if control["fail_next"] > 0:
        control["fail_next"] -= 1
        return responses.JSONResponse(serve.error_body("scripted failure", type_="server_error"),
                                      status_code=control["fail_status"], headers={"retry-after": "0"})
    return await call_next(request)

  @app.get("/stats")
  async def stats():
    return {"calls": backend.calls, "max_in_flight": getattr(backend, "max_in_flight", 0)}

  @app.post("/control")
  async def set_control(body: dict):
    for key in ("fail_next", "fail_status"):
      if key in body:
        control[key] = int(body[key])
    if "gate" in body:
      backend.gate, backend.expect, backend.arrived = int(body["gate"]), int(body.get("expect", 0)), 0
    if body.get("reset"):
      backend.calls = 0
      if isinstance(backend, EchoBackend):
        backend.max_in_flight = 0
    return {"ok": True}

  _add_fault_routes(app)
  return app


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--kind", choices=sorted(BACKENDS), required=True)
  parser.add_argument("--port", type=int, required=True)
  args = parser.parse_args()
  uvicorn.run(build_app(args.kind), host="127.0.0.1", port=args.port, log_level="warning")
