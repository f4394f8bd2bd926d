"""Chat streaming carries the reasoning block as `reasoning_content`: the streamed deltas add up to the
fields of the same request unstreamed, with an engine that reports progress and with a plain backend."""

import json

import httpx
import jax
import pytest

from safe_completion.backends import base
from safe_completion.backends import local
from safe_completion.backends import serve
from safe_completion.backends import serve_engine
from safe_completion.data import chat
from safe_completion.models import transformer
from tests import scripted_server
from tests.scripted_server import opening_tokenizer

RAW = ("<think>\nThe request is about home canning; nothing in it seeks harm, so a direct answer.\n</think>\n\n"
       "Discard it unopened: a bulging lid can mean botulism.\n1. Bag the jar.\n2. Wash your hands.")
TRUNCATED = "<think>\nThe user asks about a bulging lid and I am still thinking about"
PLAIN = "No reasoning block here, just the answer."


@pytest.mark.parametrize("raw", [RAW, TRUNCATED, PLAIN])
def test_streamed_parts_grow_into_the_split_of_the_finished_text(raw):
  final = chat.split_reasoning(raw)
  seen = ("", "")
  for end in range(len(raw) + 1):
    parts = serve.streamed_chat_parts(raw[:end])
    if parts is None:  # Only while the start may still become the opening tag.
      assert chat.REASONING_OPEN.startswith(raw[:end].lstrip())
      continue
    for part, before, whole in zip(parts, seen, final):
      assert part.startswith(before) and whole.startswith(part), (end, parts)
      assert chat.REASONING_OPEN not in part and chat.REASONING_CLOSE not in part
    seen = parts
  assert serve.streamed_chat_parts(raw) == final


def test_a_closing_tag_still_arriving_is_held_back():
  assert serve.streamed_chat_parts("<think>\nweighing it </thi") == ("weighing it", "")
  assert serve.streamed_chat_parts("<think>\na<b") == ("a<b", "")
  assert serve.streamed_chat_parts("<thi") is None


class ScriptedEngine:
  """Reports a fixed completion a few characters at a time, as `ServeEngine.generate` reports progress."""

  model_id = "scripted"
  context = 4096

  def __init__(self, raw: str):
    self.raw = raw

  def encode_chat(self, messages):
    del messages
    return [1, 2, 3]

  def encode_text(self, text):
    del text
    return [1, 2, 3]

  def max_new_tokens(self, prompt_len: int) -> int:
    return self.context - prompt_len

  def generate(self, prompt, params, *, deadline, cancel, on_progress=None):
    del deadline, cancel
    for end in range(0, len(self.raw) + 1, 5):
      if on_progress is not None:
        on_progress(0, self.raw[:end])
    return [base.sampled_completion(self.raw, finished=True, stop=params.stop, prompt_tokens=len(prompt),
                                    completion_tokens=len(self.raw))]


class ScriptedBackend:
  """A plain backend (no progress): the whole completion at the end."""

  model_id = "scripted"

  def generate(self, conversations, params):
    return [[base.Completion.from_raw(RAW, finish_reason="stop", prompt_tokens=3, completion_tokens=40)
             for _ in range(params.n)] for _ in conversations]


def streamed_and_whole(url: str, **sampling) -> tuple[list[dict], dict]:
  body = {"model": "scripted", "messages": [{"role": "user", "content": "My jar lid bulges. Safe to eat?"}],
          "max_tokens": 200, **sampling}
  whole = httpx.post(f"{url}/chat/completions", json=body, timeout=30).json()["choices"][0]
  deltas = []
  with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=30) as response:
    for line in response.iter_lines():
      if line.startswith("data: ") and line != "data: [DONE]":
        deltas.append(json.loads(line[len("data: "):])["choices"][0])
  return deltas, whole


@pytest.mark.parametrize("backend", [ScriptedEngine(RAW), ScriptedBackend()], ids=["engine", "plain"])
def test_streamed_reasoning_and_content_add_up_to_the_unstreamed_message(backend):
  with scripted_server.in_thread(serve.make_app(backend)) as url:
    deltas, whole = streamed_and_whole(url)
  reasoning = [d["delta"]["reasoning_content"] for d in deltas if "reasoning_content" in d["delta"]]
  content = [d["delta"]["content"] for d in deltas if "content" in d["delta"]]
  expected_reasoning, expected_content = chat.split_reasoning(RAW)
  assert (whole["message"]["reasoning_content"], whole["message"]["content"]) == (expected_reasoning,
                                                                                  expected_content)
  assert "".join(reasoning) == expected_reasoning and "".join(content) == expected_content
  assert deltas[-1]["finish_reason"] == whole["finish_reason"] == "stop"
  if isinstance(backend, ScriptedEngine):  # Really streamed: several deltas of each part.
    assert len(reasoning) >= 3 and len(content) >= 3


def test_a_chat_template_that_opens_the_block_streams_reasoning_only():
  """A real engine whose chat template opens the reasoning block in the prompt: a completion cut inside the
  block is all reasoning, streamed or not, and has no answer."""
  tokenizer = opening_tokenizer()
  config = transformer.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)
  backend = local.LocalBackend(transformer.init_params(config, jax.random.key(0)), config, tokenizer,
                               max_prompt_len=48, batch_size=1, model_id="scripted")
  with scripted_server.in_thread(serve.make_app(serve_engine.ServeEngine(backend, chunk_tokens=2))) as url:
    deltas, whole = streamed_and_whole(url, max_tokens=8, temperature=0.0)
  assert whole["message"]["content"] == "" and whole["message"]["reasoning_content"]
  assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == whole["message"]["reasoning_content"]
  assert not any(d["delta"].get("content") for d in deltas)
