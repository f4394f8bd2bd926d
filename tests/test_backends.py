"""Generation backends against real servers on 127.0.0.1: the HTTP client, `serve`, the local model."""

import asyncio
import glob

import httpx
import jax
import numpy as np
import pytest
import transformers

from safe_completion.backends import base
from safe_completion.backends import http
from safe_completion.backends import local
from safe_completion.data import chat
from safe_completion.models import convert
from safe_completion.models import sampling
from safe_completion.models import transformer
from tests import scripted_server

from tests.scripted_server import TOKENIZER_DIR
from tests.scripted_server import control
from tests.scripted_server import opening_tokenizer
from tests.scripted_server import stats
from tests.scripted_server import user

ECHO = scripted_server.EchoBackend.model_id


@pytest.fixture(scope="module")
def echo_url():
  with scripted_server.scripted("echo") as url:
    yield url


@pytest.fixture
def server(echo_url):
  """The echo server with counters reset and no scripted failures."""
  return scripted_server.reset(echo_url)


def backend(url, model=ECHO, **kwargs):
  return http.HttpBackend(url, model, **{"max_retries": 2, "backoff_s": 0.01, **kwargs})


def test_completions_come_back_in_order_with_n(server):
  out = backend(server).generate([user("first"), user("second"), user("third")], base.SamplingParams(n=2, seed=7))
  assert [[c.text for c in choices] for choices in out] == [
      [f"echo {i} seed=7: {word}" for i in range(2)] for word in ("first", "second", "third")]
  assert all(c.finish_reason == "stop" and c.prompt_tokens == 1 and c.completion_tokens == 3
             for choices in out for c in choices)


def test_reasoning_content_becomes_reasoning(server):
  (choices,) = backend(server).generate([user("think: why")], base.SamplingParams())
  assert (choices[0].reasoning, choices[0].text) == ("pondering", "echo 0 seed=None: think: why")


def test_concurrency_is_bounded(server):
  # Each request is held until 3 are in flight (or all 9 arrived): a client that sends at most 3 at a
  # time shows exactly 3; one that sent more would show up to 9.
  control(server, gate=3, expect=9)
  out = backend(server, max_concurrency=3).generate([user(f"q{i}") for i in range(9)], base.SamplingParams())
  assert len(out) == 9
  assert stats(server)["max_in_flight"] == 3


def test_rerun_hits_the_cache_without_requests(server, tmp_path, monkeypatch):
  monkeypatch.setenv("SC_TEST_KEY", "sk-not-to-be-stored-4711")
  cache_path = str(tmp_path / "cache" / "completions.sqlite")
  conversations = [user("a"), user("b"), user("a")]
  params = base.SamplingParams(n=2, seed=1)
  first = backend(server, cache_path=cache_path, api_key_env="SC_TEST_KEY").generate(conversations, params)
  assert stats(server)["calls"] == 2  # The repeated conversation is sent once.
  # Same request, another (dead) base URL: the key ignores where it was served.
  rerun = backend("http://127.0.0.1:9/v1", cache_path=cache_path, max_retries=0).generate(conversations, params)
  assert rerun == first
  assert stats(server)["calls"] == 2
  changed = base.SamplingParams(n=2, seed=2)
  backend(server, cache_path=cache_path).generate([user("a")], changed)
  assert stats(server)["calls"] == 3
  for path in glob.glob(cache_path + "*"):
    with open(path, "rb") as f:
      assert b"sk-not-to-be-stored-4711" not in f.read()


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_failures_are_retried(server, status):
  control(server, fail_next=2, fail_status=status)
  (choices,) = backend(server, max_retries=2).generate([user("x")], base.SamplingParams())
  assert choices[0].text == "echo 0 seed=None: x"


def test_retries_give_up_with_the_last_failure(server):
  control(server, fail_next=3, fail_status=503)
  with pytest.raises(base.BackendError, match=r"3 attempt\(s\) failed; last: HTTP 503"):
    backend(server, max_retries=2).generate([user("x")], base.SamplingParams())


def test_other_client_errors_fail_at_once(server):
  # One scripted 400, then the server would answer: an error proves there was no retry.
  control(server, fail_next=1, fail_status=400)
  with pytest.raises(base.BackendError, match=r"rejected the request \(400\): scripted failure"):
    backend(server, max_retries=4).generate([user("x")], base.SamplingParams())
  with pytest.raises(base.BackendError, match=r"\(400\).*temperature"):
    backend(server).generate([user("x")], base.SamplingParams(temperature=3.0))


def test_unreachable_server_is_named():
  url = f"http://127.0.0.1:{scripted_server.free_port()}/v1"
  with pytest.raises(base.BackendError, match=rf"cannot reach the server at {url}"):
    backend(url, max_retries=1).generate([user("x")], base.SamplingParams())


def test_unknown_model_lists_available_models(server):
  with pytest.raises(base.BackendError, match=r"'gpt-x' is not served at .*available models: \['scripted-echo'\]"):
    backend(server, model="gpt-x").generate([user("x")], base.SamplingParams())


def test_generate_works_inside_a_running_event_loop(server):
  async def notebook_cell():
    return backend(server).generate([user("x")], base.SamplingParams())

  assert asyncio.run(notebook_cell())[0][0].text == "echo 0 seed=None: x"


def test_serve_errors_use_the_openai_body(server):
  response = httpx.post(f"{server}/chat/completions", json={"model": "nope", "messages": user("x")})
  assert response.status_code == 404
  assert response.json()["error"]["code"] == "model_not_found"
  assert "scripted-echo" in response.json()["error"]["message"]
  for bad in ({"messages": user("x")}, {"model": ECHO, "messages": []}, {"model": ECHO, "messages": user("x"), "n": 0},
              {"model": ECHO, "messages": [{"role": "robot", "content": "x"}]},
              {"model": ECHO, "messages": user("x"), "max_tokens": 0}):
    response = httpx.post(f"{server}/chat/completions", json=bad)
    assert response.status_code == 400, bad
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_serve_response_schema(server):
  body = httpx.post(f"{server}/chat/completions", json={"model": ECHO, "messages": user("think: hi"), "n": 2,
                                                        "max_completion_tokens": 5}).json()
  assert body["object"] == "chat.completion" and body["model"] == ECHO
  assert [c["index"] for c in body["choices"]] == [0, 1]
  assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo 0 seed=None: think: hi",
                                           "reasoning_content": "pondering"}
  assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_api_key_comes_from_the_named_env_var(monkeypatch):
  with scripted_server.scripted("echo", {"SCRIPTED_EXPECTED_KEY": "sk-test-123"}) as url:
    monkeypatch.setenv("SC_TEST_KEY", "sk-test-123")
    keyed = backend(url, api_key_env="SC_TEST_KEY")
    assert keyed.generate([user("x")], base.SamplingParams())[0][0].text == "echo 0 seed=None: x"
    assert "sk-test-123" not in repr(keyed)
    monkeypatch.setenv("SC_TEST_KEY", "sk-wrong")
    with pytest.raises(base.BackendError, match=r"\(401\): bad API key \(is \$SC_TEST_KEY set\?\)"):
      keyed.generate([user("y")], base.SamplingParams())


# ----------------------------------------------------------------------------- local model


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
  config = transformer.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)
  return transformer.init_params(config, jax.random.key(0)), config


CONVERSATIONS = [user("hello there"), [{"role": "system", "content": "be brief"}, *user("what is a cell?")],
                 user("hi")]


def reference_greedy(params, config, tokenizer, conversations, max_new_tokens, eos_ids, width=48):
  """Greedy completions by calling `sample` on hand-padded prompts, one row per conversation."""
  prompts = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"] for c in conversations]
  tokens = np.full((len(prompts), width), tokenizer.pad_token_id, np.int32)
  mask = np.zeros_like(tokens)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p):], mask[row, width - len(p):] = p, 1
  sampling_config = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos_ids,
                                            pad_id=tokenizer.pad_token_id)
  return sampling.sample(params, config, tokens, mask, jax.random.key(0), sampling_config), prompts


def test_local_greedy_equals_sample(tiny_model, tokenizer):
  params, config = tiny_model
  out, prompts = reference_greedy(params, config, tokenizer, CONVERSATIONS, 6, (tokenizer.eos_token_id,))
  # batch_size 2 splits the three rows over two sampler calls with a filler row.
  backend_ = local.LocalBackend(params, config, tokenizer, max_prompt_len=48, batch_size=2)
  got = backend_.generate(CONVERSATIONS, base.SamplingParams(max_tokens=6, temperature=0.0, n=2))
  for row, choices in enumerate(got):
    expected = tokenizer.decode(out.tokens[row, :int(out.lengths[row])].tolist(), skip_special_tokens=False)
    assert [c.text for c in choices] == [expected.strip()] * 2
    assert choices[0].prompt_tokens == len(prompts[row])
    assert choices[0].finish_reason == ("stop" if out.finished[row] else "length")


def test_a_prompt_that_opens_the_reasoning_block_is_split_inside_it(tiny_model, tokenizer):
  params, config = tiny_model
  opening = opening_tokenizer()
  out, prompts = reference_greedy(params, config, opening, CONVERSATIONS, 6, (tokenizer.eos_token_id,))
  assert all(chat.prompt_opens_reasoning(opening, p) for p in prompts)
  assert not any(chat.prompt_opens_reasoning(tokenizer, chat.encode_prompt(tokenizer, c)) for c in CONVERSATIONS)
  got = local.LocalBackend(params, config, opening, max_prompt_len=48, batch_size=2).generate(
      CONVERSATIONS, base.SamplingParams(max_tokens=6, temperature=0.0))
  for row, (completion,) in enumerate(got):
    sampled = tokenizer.decode(out.tokens[row, :int(out.lengths[row])].tolist(), skip_special_tokens=False)
    assert chat.REASONING_CLOSE not in sampled  # Cut inside the block the prompt opened: reasoning, no answer.
    assert (completion.reasoning, completion.text) == (sampled.strip(), "")


def test_local_eos_ends_with_stop_and_is_not_text(tiny_model, tokenizer):
  params, config = tiny_model
  out, _ = reference_greedy(params, config, tokenizer, CONVERSATIONS, 6, (tokenizer.eos_token_id,))
  first, second = int(out.tokens[0, 0]), int(out.tokens[0, 1])
  # The greedy second token as EOS: one token of text, then a "stop".
  backend_ = local.LocalBackend(params, config, tokenizer, max_prompt_len=48, eos_ids=(second,))
  (choices,) = backend_.generate(CONVERSATIONS[:1], base.SamplingParams(max_tokens=6, temperature=0.0))
  assert (choices[0].finish_reason, choices[0].completion_tokens) == ("stop", 2)
  assert choices[0].text == tokenizer.decode([first], skip_special_tokens=False).strip()
  with pytest.raises(ValueError, match="exceeds max_prompt_len=4"):
    local.LocalBackend(params, config, tokenizer, max_prompt_len=4).generate(CONVERSATIONS[:1], base.SamplingParams())


def test_serve_local_model_over_http_matches_in_process(tiny_model, tokenizer, tmp_path):
  params, config = tiny_model
  model_dir = tmp_path / "tiny-llama"
  convert.export_hf(params, config, model_dir, architecture="LlamaForCausalLM", tokenizer=tokenizer)
  port = scripted_server.free_port()
  args = ["safe_completion.backends.serve", f"--model_dir={model_dir}", f"--port={port}", "--max_prompt_len=48",
          "--batch_size=2", "--allow_no_auth"]
  sampling_params = base.SamplingParams(max_tokens=5, temperature=0.0, n=2)
  expected = local.LocalBackend(params, config, tokenizer, max_prompt_len=48, batch_size=2).generate(
      CONVERSATIONS, sampling_params)
  with scripted_server.running_server(args, port, {"XLA_FLAGS": ""}) as url:
    got = http.HttpBackend(url, "tiny-llama", max_retries=0, timeout_s=120).generate(CONVERSATIONS, sampling_params)
  assert [[c.text for c in choices] for choices in got] == [[c.text for c in choices] for choices in expected]
  assert [choices[0].finish_reason for choices in got] == [choices[0].finish_reason for choices in expected]
  assert got[0][0].prompt_tokens == expected[0][0].prompt_tokens
