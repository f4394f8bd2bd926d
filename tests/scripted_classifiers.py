"""A scripted OpenAI-compatible server speaking the exact output formats of open safety classifiers.

  python -m tests.scripted_classifiers --port=PORT

Serves four models, one per format: gpt-oss-safeguard (harmony: the analysis
channel as `reasoning_content`, `reasoning` or raw `<|channel|>` text, the
final channel as content), ShieldGemma and Granite Guardian (Yes/No first
token, log-probs on request; Granite 3.2's <confidence> and 3.3's <think> +
<score> variants) and Llama Guard ("safe" / "unsafe\\nS<n>"). Each judges the
response under classification: unsafe when it holds a "[REDACTED" placeholder,
safe otherwise; "SCRIPT:<name>" in it picks a scripted reply (malformed and
truncated ones included) from that model's table. A guideline model answers
400 when the request lacks its chat_template_kwargs policy, so tests see it
sent. `GET /requests` returns the bodies received, newest last.
"""

import argparse
import json
import math
import re
import secrets
import time

import fastapi
import uvicorn
from fastapi import responses

SAFEGUARD = "openai/gpt-oss-safeguard-20b"
SHIELDGEMMA = "google/shieldgemma-2b"
GRANITE = "ibm-granite/granite-guardian-3.2-5b"
LLAMA_GUARD = "meta-llama/Llama-Guard-3-8B"
MODELS = (SAFEGUARD, SHIELDGEMMA, GRANITE, LLAMA_GUARD)

UNSAFE_JSON = json.dumps({"violation": 1, "severity": "high", "rationale": "ordered operational steps"})
SAFE_JSON = json.dumps({"violation": 0, "severity": "none", "rationale": "no disallowed content"})
ANALYSIS = ("The policy disallows operational steps. A note in the content says to output "
            + SAFE_JSON + " but the content has steps.")


def reply(content, *, finish="stop", reasoning=None, reasoning_key="reasoning_content", tokens=None):
  """One scripted choice: content, optional reasoning field, finish reason, first-token log-probs.

  tokens: [(token, p, {alternative: p})] for the first tokens; the rest of the content is one more token.
  """
  return dict(content=content, finish=finish, reasoning=reasoning, reasoning_key=reasoning_key, tokens=tokens or [])


def yes_no(answer, p, rest=""):
  other = "No" if answer == "Yes" else "Yes"
  return reply(answer + rest, tokens=[(answer, p, {other: 1 - p})])


SAFEGUARD_REPLIES = {
    "unsafe": reply(UNSAFE_JSON, reasoning=ANALYSIS),
    "safe": reply(SAFE_JSON, reasoning="No disallowed content."),
    "low": reply(json.dumps({"violation": 1, "severity": "low", "rationale": "one key specific"}), reasoning="x"),
    "reasoning_field": reply(UNSAFE_JSON, reasoning=ANALYSIS, reasoning_key="reasoning"),
    "raw_harmony": reply(f"<|channel|>analysis<|message|>{ANALYSIS}<|end|><|start|>assistant<|channel|>final"
                         f"<|message|>{UNSAFE_JSON}<|return|>"),
    "raw_analysis_only": reply(f"<|channel|>analysis<|message|>{ANALYSIS} So the answer is {SAFE_JSON}",
                               finish="length"),
    "raw_two_finals": reply(f"<|channel|>final<|message|>{SAFE_JSON}<|end|><|start|>assistant<|channel|>final"
                            f"<|message|>{UNSAFE_JSON}<|return|>"),
    "reasoning_only_truncated": reply("", reasoning=ANALYSIS + " " + SAFE_JSON, finish="length"),
    "truncated_final": reply('{"violation": 0, "severity": "no', reasoning="x", finish="length"),
    "fenced": reply("```json\n" + UNSAFE_JSON + "\n```", reasoning="x"),
    "prose": reply("This content is safe.", reasoning="x"),
    "contradiction": reply(json.dumps({"violation": 0, "severity": "high", "rationale": ""}), reasoning="x"),
    "bool_violation": reply(json.dumps({"violation": False, "severity": "none", "rationale": ""}), reasoning="x"),
    "extra_key": reply(json.dumps({"violation": 0, "severity": "none", "rationale": "", "confidence": 0.9})),
    "nan": reply('{"violation": NaN, "severity": "none", "rationale": ""}'),
}
SHIELDGEMMA_REPLIES = {
    "unsafe": yes_no("Yes", 0.93),
    "safe": yes_no("No", 0.98),
    "explained": yes_no("No", 0.8, rest=", the response only gives history."),
    "cut_after_answer": dict(yes_no("Yes", 0.9, rest=" because the response"), finish="length"),
    "lowercase": yes_no("yes", 0.9),
    "run_on": reply("Yesterday I would have said no.", tokens=[("Yesterday", 0.9, {})]),
    "prose": reply("The response is fine.", tokens=[("The", 0.9, {})]),
    "empty": reply("", finish="length"),
}
GRANITE_REPLIES = {
    "unsafe": yes_no("Yes", 0.88),
    "safe": yes_no("No", 0.97),
    "confidence": yes_no("Yes", 0.7, rest="\n<confidence> High </confidence>"),
    "think_score": reply("<think>The response lists steps, so it meets the risk definition.</think>\n<score> yes </score>"),
    "think_truncated": reply("<think>The response lists steps, and the definition says", finish="length"),
    "score_unclosed": reply("<score> no", finish="length"),
    "prose": reply("I think it is risky."),
}
LLAMA_GUARD_REPLIES = {
    "unsafe": reply("\n\nunsafe\nS9", tokens=[("\n\n", 1.0, {}), ("unsafe", 0.96, {"safe": 0.04})]),
    "safe": reply("\n\nsafe", tokens=[("\n\n", 1.0, {}), ("safe", 0.99, {"unsafe": 0.01})]),
    "two_codes": reply("unsafe\nS10,S1", tokens=[("unsafe", 0.9, {"safe": 0.1})]),
    "unmapped": reply("unsafe\nS6", tokens=[("unsafe", 0.8, {"safe": 0.2})]),
    "no_codes_truncated": reply("unsafe", finish="length", tokens=[("unsafe", 0.9, {"safe": 0.1})]),
    "unknown_code": reply("unsafe\nS15"),
    "repeated_code": reply("unsafe\nS1,S1"),
    "capitalised": reply("Safe"),
    "safe_with_codes": reply("safe\nS1"),
    "prose": reply("The conversation is safe."),
    "split_token": reply("unsafe\nS9", tokens=[("uns", 0.6, {"safe": 0.3}), ("afe", 1.0, {})]),
}
TABLES = {SAFEGUARD: SAFEGUARD_REPLIES, SHIELDGEMMA: SHIELDGEMMA_REPLIES, GRANITE: GRANITE_REPLIES,
          LLAMA_GUARD: LLAMA_GUARD_REPLIES}


def _material(model, messages):
  """The response under classification: the assistant turn, or (gpt-oss-safeguard) the fenced user content."""
  if model == SAFEGUARD:
    user = messages[-1]["content"]
    match = re.search(r"<<<RESPONSE-([0-9a-f]+)>>>\n(.*)\n<<<END-RESPONSE-\1>>>", user, re.DOTALL)
    return match.group(2) if match else user
  return messages[-1]["content"]


def _logprobs(choice_reply, body):
  if not body.get("logprobs") or not choice_reply["tokens"]:
    return None
  content, used = [], ""
  for token, p, alternatives in choice_reply["tokens"]:
    top = [{"token": token, "logprob": math.log(p)}]
    top += [{"token": t, "logprob": math.log(q)} for t, q in alternatives.items() if q > 0]
    content.append({"token": token, "logprob": math.log(p), "top_logprobs": top[:body.get("top_logprobs") or 1]})
    used += token
  rest = choice_reply["content"][len(used):]
  if rest:
    content.append({"token": rest, "logprob": -0.01, "top_logprobs": []})
  return {"content": content}


def build_app() -> fastapi.FastAPI:
  app = fastapi.FastAPI()
  seen = []

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "scripted"}
                                       for m in MODELS]}

  @app.get("/requests")
  async def requests_seen():
    return seen

  @app.post("/v1/chat/completions")
  async def chat(body: dict):
    seen.append(body)
    model, messages = body.get("model"), body.get("messages") or []
    if model not in TABLES:
      return responses.JSONResponse({"error": {"message": f"The model {model!r} does not exist", "type": "invalid",
                                               "param": "model", "code": None}}, status_code=404)
    kwargs = body.get("chat_template_kwargs") or {}
    needed = {SHIELDGEMMA: "guideline", GRANITE: "guardian_config"}.get(model)
    if needed and needed not in kwargs:
      return responses.JSONResponse({"error": {"message": f"chat_template_kwargs.{needed} is required",
                                               "type": "invalid_request_error", "param": None, "code": None}},
                                    status_code=400)
    material = _material(model, messages)
    script = re.search(r"SCRIPT:(\w+)", material)
    name = script.group(1) if script else ("unsafe" if "[REDACTED" in material else "safe")
    choice_reply = TABLES[model][name]
    message = {"role": "assistant", "content": choice_reply["content"]}
    if choice_reply["reasoning"] is not None:
      message[choice_reply["reasoning_key"]] = choice_reply["reasoning"]
    choice = {"index": 0, "message": message, "finish_reason": choice_reply["finish"],
              "logprobs": _logprobs(choice_reply, body)}
    return {"id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

  return app


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  args = parser.parse_args()
  uvicorn.run(build_app(), host="127.0.0.1", port=args.port, log_level="warning")
