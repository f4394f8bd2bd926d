"""Fault injection (issue 15): every bad input or misbehaving peer below must end in a clear error, never
a raw traceback, a silent acceptance, or a lost or duplicated record.

Each test feeds one fault to the real component (real HTTP servers on loopback, real files) and fails if
the fault gets through.
"""

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import transformers

from safe_completion.backends import base
from safe_completion.backends import http
from safe_completion.backends import local
from safe_completion.backends import serve
from safe_completion.backends import serve_engine
from safe_completion import datagen
from safe_completion import datagen_stage
from safe_completion import metrics as metric_writer
from safe_completion import specs as specs_lib
from safe_completion.data import records
from safe_completion.data import sft_data
from safe_completion.graders import llm_judge
from safe_completion.models import convert
from safe_completion.models import transformer
from tests import scripted_server

from tests.scripted_server import TOKENIZER_DIR
from tests.scripted_server import inject
from tests.scripted_server import user

ECHO = scripted_server.EchoBackend.model_id


# ----------------------------------------------------------------------------- the HTTP client


@pytest.fixture(scope="module")
def echo_url():
  with scripted_server.scripted("echo", {"SCRIPTED_EXPECTED_KEY": "sk-faults-secret-0042"}) as url:
    yield url


@pytest.fixture
def server(echo_url, monkeypatch):
  monkeypatch.setenv("SC_FAULT_KEY", "sk-faults-secret-0042")
  return scripted_server.reset(echo_url)


def calls(url):
  return scripted_server.stats(url)["calls"]


def client(url, **kwargs):
  return http.HttpBackend(url, ECHO, api_key_env="SC_FAULT_KEY", **{"max_retries": 2, "backoff_s": 0.01, **kwargs})


@pytest.mark.parametrize("kind", ["html", "not_json", "no_choices", "bad_choice"])
def test_bad_200_body_is_retried(server, kind):
  inject(server, kind, count=2)
  (choices,) = client(server).generate([user("x")], base.SamplingParams())
  assert choices[0].text == "echo 0 seed=None: x"


@pytest.mark.parametrize("kind, what", [("html", r"not JSON: '<html>"), ("not_json", r"not JSON: '\{\"choices"),
                                        ("no_choices", r"no 'choices' list"), ("bad_choice", r"choices\[0\] is not")])
def test_bad_200_body_gives_up_naming_endpoint_and_body(server, kind, what):
  inject(server, kind, count=3)
  with pytest.raises(base.BackendError, match=rf"{server}/chat/completions.*3 attempt\(s\) failed.*{what}"):
    client(server).generate([user("x")], base.SamplingParams())
  assert calls(server) == 0  # All three attempts were answered by the fault, none reached the backend.


def test_slow_drip_body_meets_a_total_deadline(server):
  inject(server, "slow_drip")
  start = time.monotonic()
  with pytest.raises(base.BackendError, match=r"no complete response within timeout_s=1"):
    client(server, timeout_s=1, max_retries=0).generate([user("x")], base.SamplingParams())
  assert time.monotonic() - start < 5  # The drip would take ~40 s; each read arrives well within 1 s.


@pytest.mark.parametrize("kind", ["echo_headers_400", "echo_headers_500"])
def test_echoed_headers_never_show_the_key(server, kind, caplog):
  inject(server, kind, count=3)
  with caplog.at_level(logging.WARNING), pytest.raises(base.BackendError) as e:
    client(server).generate([user("x")], base.SamplingParams())
  assert "authorization" in str(e.value) and "[REDACTED]" in str(e.value)  # The echo did come back ...
  assert "faults-secret" not in str(e.value)  # ... without the key.
  if kind.endswith("500"):
    assert "retrying" in caplog.text and "[REDACTED]" in caplog.text
  assert "faults-secret" not in caplog.text


def test_redact_patterns():
  assert http.redact("key sk-live-abcdef and Bearer tok.123, api_key='zz9'") == (
      "key [REDACTED] and Bearer [REDACTED], api_key='[REDACTED]'")
  assert http.redact("my custom secret value here", secret="custom secret") == "my [REDACTED] value here"


# ----------------------------------------------------------------------------- loaders

GOOD_PROMPT = {"id": "hate-benign-train-001", "messages": [{"role": "user", "content": "What is a hate crime statute?"}],
               "category": "hate", "intent": "benign", "split": "train", "source": "test", "tags": []}
GOOD_GRADE = {"id": "g1", "prompt_id": "hate-benign-train-001", "category": "hate", "intent": "benign",
              "split": "train", "response": "ok", "safety": 1.0, "severity": "none", "mode": "direct",
              "helpfulness": 4, "kind": "direct", "label": "good_direct", "source": "test"}


def write_lines(path, *lines):
  path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                            for line in lines))
  return path


def other_prompt(n):
  return {**GOOD_PROMPT, "id": f"hate-benign-train-{n:03d}"}


BAD_PROMPT_LINES = {
    "non_utf8": (b'{"id": "caf\xe9"}', r"p\.jsonl:2: encoding: not UTF-8: byte 0xe9"),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, r"p\.jsonl:2: json: invalid JSON: nested too deeply"),
    "huge_int": (b'{"n": ' + b"9" * 5000 + b"}", r"p\.jsonl:2: json: invalid JSON: .*digits"),
    "duplicate_key": (json.dumps(other_prompt(7))[:-1].encode() + b', "split": "eval"}',
                      r"p\.jsonl:2: split: duplicate key in one JSON object"),
    "nan": (json.dumps(GOOD_PROMPT).encode().replace(b'"tags": []', b'"tags": NaN'), r"p\.jsonl:2: json: .*NaN"),
}


@pytest.mark.parametrize("fault", sorted(BAD_PROMPT_LINES))
def test_bad_bytes_and_json_are_data_errors_with_file_and_line(tmp_path, fault):
  line, pattern = BAD_PROMPT_LINES[fault]
  path = write_lines(tmp_path / "p.jsonl", GOOD_PROMPT, line, other_prompt(2))
  with pytest.raises(records.DataError, match=pattern):
    records.load_prompts(path)
  # skip_invalid counts the bad line and keeps both good ones (nothing lost).
  prompts, report = records.load_prompts(path, skip_invalid=True)
  assert [p.id for p in prompts] == ["hate-benign-train-001", "hate-benign-train-002"]
  assert sum(report.skipped.values()) == 1 and report.skipped_at[next(iter(report.skipped))] == [f"{path}:2"]


@pytest.mark.parametrize("changes, pattern", [
    (dict(safety=1.0, severity="high"), r"severity: 'high' contradicts safety 1\.0"),
    (dict(safety=1.0, severity="moderate"), r"severity: 'moderate' contradicts safety 1\.0"),
    (dict(safety=0.5, severity="none"), r"severity: 'none' contradicts safety 0\.5"),
    (dict(safety=0.0, severity="high", label="good_direct"), r"label: 'good_direct' contradicts safety 0"),
    (dict(safety=0.0, severity="high", label="good_refusal"), r"label: 'good_refusal' contradicts safety 0"),
])
def test_contradictory_grade_rows_are_rejected(tmp_path, changes, pattern):
  path = write_lines(tmp_path / "g.jsonl", GOOD_GRADE, {**GOOD_GRADE, "id": "g2", **changes})
  with pytest.raises(records.DataError, match=rf"g\.jsonl:2: {pattern}"):
    records.load_grades(path)


def test_consistent_grade_rows_still_load(tmp_path):
  rows = [GOOD_GRADE, {**GOOD_GRADE, "id": "g2", "safety": 0.0, "severity": "high", "label": "unsafe_compliance"},
          {**GOOD_GRADE, "id": "g3", "safety": 0.75, "severity": "negligible", "label": "manipulation"}]
  grades, _ = records.load_grades(write_lines(tmp_path / "g.jsonl", *rows))
  assert [g.id for g in grades] == ["g1", "g2", "g3"]


# ----------------------------------------------------------------------------- the converter


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """A tiny Llama exported in two shards (index + model-0000k-of-00002.safetensors)."""
  config = transformer.ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                   head_dim=8, mlp_dim=32, max_seq_len=32)
  params = transformer.init_params(config, jax.random.key(0))
  out = tmp_path_factory.mktemp("tiny")
  convert.export_hf(params, config, out, architecture="LlamaForCausalLM", max_shard_bytes=8000)
  assert os.path.exists(out / convert.INDEX_FILE)
  return out


def copy_of(src, dst):
  shutil.copytree(src, dst)
  return dst


def first_shard(model_dir):
  return sorted(model_dir.glob("model-*.safetensors"))[0]


SAFETENSORS_FAULTS = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[:len(b) // 2],
    "bad_header": lambda b: b[:8] + b"{not json" + b[17:],
}


@pytest.mark.parametrize("fault", sorted(SAFETENSORS_FAULTS))
def test_broken_safetensors_name_the_file(tiny_export, tmp_path, fault):
  model_dir = copy_of(tiny_export, tmp_path / "m")
  shard = first_shard(model_dir)
  shard.write_bytes(SAFETENSORS_FAULTS[fault](shard.read_bytes()))
  with pytest.raises(convert.CheckpointError, match=rf"{shard}: not a readable safetensors file"):
    convert.load_hf_checkpoint(model_dir)


def edit_config(model_dir, **changes):
  path = model_dir / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
  return path


@pytest.mark.parametrize("content, pattern", [
    ("{not json", r"config\.json: not valid JSON"),
    ("[1, 2]", r"config\.json: expected a JSON object, got list"),
    ('"LlamaForCausalLM"', r"config\.json: expected a JSON object, got str"),
])
def test_invalid_config_json_names_the_file(tiny_export, tmp_path, content, pattern):
  model_dir = copy_of(tiny_export, tmp_path / "m")
  (model_dir / "config.json").write_text(content)
  with pytest.raises(convert.CheckpointError, match=pattern):
    convert.load_hf_checkpoint(model_dir)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", "2"), ("num_hidden_layers", -2),
                                          ("num_hidden_layers", 0), ("vocab_size", 64.0), ("vocab_size", 63.5),
                                          ("hidden_size", True), ("num_key_value_heads", [1]),
                                          ("rms_norm_eps", "1e-6")])
def test_bad_config_fields_name_file_and_field(tiny_export, tmp_path, field, value):
  model_dir = copy_of(tiny_export, tmp_path / "m")
  path = edit_config(model_dir, **{field: value})
  with pytest.raises(convert.CheckpointError, match=rf"{path}: {field}: expected a"):
    convert.load_hf_checkpoint(model_dir)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_model_dir_is_refused(tiny_export, tmp_path, target):
  model_dir = copy_of(tiny_export, tmp_path / "m")
  index_path = model_dir / convert.INDEX_FILE
  index = json.loads(index_path.read_text())
  name = next(iter(index["weight_map"]))
  shutil.copy(first_shard(model_dir), tmp_path / "outside.safetensors")  # A readable file is there to be read.
  index["weight_map"][name] = target
  index_path.write_text(json.dumps(index))
  with pytest.raises(convert.CheckpointError, match=r"is not a file inside"):
    convert.load_hf_checkpoint(model_dir)


def test_the_clean_export_still_loads(tiny_export):
  params, config = convert.load_hf_checkpoint(tiny_export)
  assert config.num_layers == 2 and params["embedding"].shape == (64, 16)


def test_transformers_never_trusts_remote_code():
  """Every from_pretrained in the package passes trust_remote_code=False explicitly."""
  offenders = []
  for path in glob.glob(os.path.join(scripted_server.REPO_ROOT, "safe_completion", "**", "*.py"), recursive=True):
    source = open(path).read()
    for match in re.finditer(r"\.from_pretrained\(", source):
      call = source[match.start():source.find(")\n", match.start())]
      if "trust_remote_code=False" not in call:
        offenders.append(f"{os.path.relpath(path, scripted_server.REPO_ROOT)}:{source.count(chr(10), 0, match.start()) + 1}")
  assert offenders == [], offenders


# ----------------------------------------------------------------------------- serve

SERVE_KEY = "sk-serve-key-77"


@pytest.fixture(scope="module")
def tiny_backend():
  tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
  config = transformer.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)
  params = transformer.init_params(config, jax.random.key(0))
  return local.LocalBackend(params, config, tokenizer, max_prompt_len=48, batch_size=2, model_id="tiny")


@pytest.fixture(scope="module")
def engine(tiny_backend):
  return serve_engine.ServeEngine(tiny_backend, chunk_tokens=4)


@pytest.fixture(scope="module")
def keyed_url(engine):
  with scripted_server.in_thread(serve.make_app(engine, api_key=SERVE_KEY)) as url:
    yield url


def chat(url, key=SERVE_KEY, **body):
  body = {"model": "tiny", "messages": user("hello there"), "max_tokens": 4, "temperature": 0.0, **body}
  return httpx.post(f"{url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_serve_needs_the_api_key(keyed_url):
  for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": SERVE_KEY}):
    response = httpx.post(f"{keyed_url}/chat/completions", json={"model": "tiny", "messages": user("x")},
                          headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", headers
  assert httpx.get(f"{keyed_url}/models").status_code == 401
  assert chat(keyed_url).status_code == 200


def test_serve_without_key_only_when_explicit_and_on_loopback(monkeypatch):
  with pytest.raises(ValueError, match="--api_key_env=NAME"):
    serve.api_key_from_flags(None, False, "127.0.0.1")
  with pytest.raises(ValueError, match="only on a loopback"):
    serve.api_key_from_flags(None, True, "0.0.0.0")
  assert serve.api_key_from_flags(None, True, "127.0.0.1") is None
  with pytest.raises(ValueError, match=r"\$SC_UNSET_KEY is unset"):
    serve.api_key_from_flags("SC_UNSET_KEY", False, "0.0.0.0")
  monkeypatch.setenv("SC_SET_KEY", "k1")
  assert serve.api_key_from_flags("SC_SET_KEY", False, "0.0.0.0") == "k1"


@pytest.mark.parametrize("body, pattern", [
    (dict(max_tokens=10**9), r"max_tokens=1000000000 is more than .* allows: at most \d+"),
    (dict(max_tokens=125), r"max_tokens=125 is more than the prompt has \d+ tokens of a 128-token context"),
    (dict(seed=2**70), r"seed: Input should be less than or equal to"),
    (dict(seed=-1), r"seed: Input should be greater than or equal to 0"),
    (dict(max_tokens=0), r"max_tokens"),
])
def test_serve_bad_values_are_400s(keyed_url, body, pattern):
  response = chat(keyed_url, **body)
  assert response.status_code == 400 and re.search(pattern, response.json()["error"]["message"]), response.text


@pytest.mark.parametrize("where", ["content", "stop", "model"])
def test_serve_lone_surrogates_are_400s(keyed_url, where):
  body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
  raw = json.dumps(body).replace('"hi"', '"hi\\ud800"') if where == "content" else json.dumps(
      {**body, **({"stop": "@@"} if where == "stop" else {"model": "@@"})}).replace('"@@"', '"\\udc80"')
  response = httpx.post(f"{keyed_url}/chat/completions", content=raw,
                        headers={"authorization": f"Bearer {SERVE_KEY}", "content-type": "application/json"})
  assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"], response.text


def test_serve_new_max_tokens_temperature_and_seed_do_not_recompile(keyed_url, engine):
  assert chat(keyed_url, max_tokens=3).status_code == 200
  before = dict(engine.traces)
  for max_tokens, temperature, top_p, seed in [(5, 0.0, 1.0, 1), (9, 0.7, 0.9, 2), (12, 1.3, 0.5, 3),
                                               (16, 0.2, 1.0, 2**40)]:
    assert chat(keyed_url, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed).status_code == 200
  assert dict(engine.traces) == before  # One bucket (16 tokens): nothing traced again.
  assert chat(keyed_url, max_tokens=20).status_code == 200  # The next bucket compiles once ...
  assert chat(keyed_url, max_tokens=30, temperature=0.9).status_code == 200  # ... and only once.
  assert engine.traces["prefill"] == before["prefill"] + 1


def test_serve_greedy_matches_the_local_backend(keyed_url, tiny_backend):
  expected = tiny_backend.generate([user("hello there")], base.SamplingParams(max_tokens=7, temperature=0.0))
  got = chat(keyed_url, max_tokens=7).json()["choices"][0]
  assert (got["message"]["content"], got["finish_reason"]) == (expected[0][0].text, expected[0][0].finish_reason)


def test_serve_streams_and_serves_text_completions_to_the_openai_client(keyed_url):
  client = openai.OpenAI(base_url=keyed_url, api_key=SERVE_KEY, max_retries=0)
  kwargs = dict(model="tiny", max_tokens=10, temperature=0.0)
  whole = client.chat.completions.create(messages=user("hello there"), **kwargs)
  chunks = list(client.chat.completions.create(messages=user("hello there"), stream=True, **kwargs))
  assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
  text = client.completions.create(prompt="The cell is", **kwargs)
  assert text.object == "text_completion" and text.choices[0].finish_reason in ("stop", "length")
  streamed = list(client.completions.create(prompt="The cell is", stream=True, **kwargs))
  assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=keyed_url, api_key="sk-wrong", max_retries=0).completions.create(prompt="x", **kwargs)


@pytest.fixture(scope="module")
def slow_engine(tiny_backend):
  """An engine whose decode chunks (1 token each) take 50 ms more, so a long request is in flight for seconds."""
  slow = serve_engine.ServeEngine(tiny_backend, chunk_tokens=1)
  decode, calls, delay = slow._decode, [], [0.0]

  def slowed(*args):
    calls.append(time.monotonic())
    time.sleep(delay[0])
    return decode(*args)

  slow._decode, slow.decode_calls = slowed, calls
  for max_tokens in (3, 100):  # Compiles both buckets first, so the deadline meets slow decoding, not compiling.
    slow.generate([1, 2, 3], base.SamplingParams(max_tokens=max_tokens, temperature=0.0),
                  deadline=time.monotonic() + 600, cancel=threading.Event())
  delay[0] = 0.05
  return slow


@pytest.fixture(scope="module")
def slow_url(slow_engine):
  with scripted_server.in_thread(serve.make_app(slow_engine, max_queue=1, request_timeout_s=1.5)) as url:
    yield url


@pytest.fixture(scope="module")
def patient_url(slow_engine):
  """The slow engine behind a long deadline, so a request stays in flight until its client leaves, however loaded the
  machine is."""
  with scripted_server.in_thread(serve.make_app(slow_engine, max_queue=1, request_timeout_s=60.0)) as url:
    yield url


def test_serve_deadline_ends_a_long_request(slow_url, slow_engine):
  start = time.monotonic()
  response = chat(slow_url, max_tokens=100)
  assert response.status_code == 504 and "deadline" in response.json()["error"]["message"]
  assert time.monotonic() - start < 4
  assert chat(slow_url, max_tokens=3).status_code == 200  # The lock was released.


def test_serve_full_queue_is_429_and_disconnect_stops_generation(patient_url, slow_engine):
  body = {"model": "tiny", "messages": user("hello there"), "max_tokens": 100, "temperature": 0.0, "stream": True}
  with httpx.Client(timeout=30) as client, client.stream("POST", f"{patient_url}/chat/completions", json=body) as first:
    # The line iterator is kept: dropping it closes the stream, a disconnect that frees the slot.
    lines = first.iter_lines()
    assert next(lines).startswith("data: ")  # Generating now ...
    busy = chat(patient_url, max_tokens=2)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"  # ... so a second request is refused.
    made = len(slow_engine.decode_calls)
  # The client left: generation stops within a chunk or two, far short of 100 tokens, and the server is free.
  time.sleep(0.5)
  stopped = len(slow_engine.decode_calls)
  assert stopped - made <= 3
  time.sleep(0.3)
  assert len(slow_engine.decode_calls) == stopped
  assert chat(patient_url, max_tokens=2).status_code == 200


# ----------------------------------------------------------------------------- stages


def test_metrics_rows_are_not_repeated_after_a_resume(tmp_path):
  first = metric_writer.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    first.write(step, {"loss": 10.0 - step})
    first.write(step, {"eval_loss": 20.0 - step})  # Two rows of one step in one run are kept.
  # Killed after step 3, resumed from the checkpoint of step 2: steps 3 and 4 are redone.
  resumed = metric_writer.MetricsWriter(str(tmp_path))
  resumed.write(3, {"loss": 6.5})
  resumed.write(4, {"loss": 5.5})
  rows = metric_writer.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows] == [
      (1, 9.0), (1, 19.0), (2, 8.0), (2, 18.0), (3, 6.5), (4, 5.5)]


def test_reward_model_grader_isolates_a_failing_row():
  """One row that fails the encoder fails the batch; its batch-mates still get real grades (issue 15)."""
  from safe_completion.graders import base as graders_base
  from safe_completion.graders import reward_model

  def predict(texts, categories):
    if any("BAD-ROW" in t for t in texts):  # Stands in for the tokenizer failing on one row's text.
      "\ud800".encode("utf-8")
    n = len(texts)
    return {"safety": np.ones(n), "severity": np.zeros(n, int), "mode": np.zeros(n, int),
            "rating": np.full(n, 3), "mode_probs": np.ones((n, 4)) / 4, "expected_rating": np.full(n, 3.0)}

  grader = object.__new__(reward_model.RewardModelGrader)
  grader.judge_model, grader.template_hash, grader.predict = "rm@test", "t", predict
  requests = [graders_base.GradeRequest(prompt=user(text), response="fine", category="hate", prompt_id=f"p{i}")
              for i, text in enumerate(["ok one", "BAD-ROW", "ok two"])]
  grades = grader.grade(requests)
  assert [g.valid for g in grades] == [True, False, True]
  assert "UnicodeEncodeError" in grades[1].rationale  # The exception text is recorded with the dropped row.


# ----------------------------------------------------------------------------- datagen: per-row isolation


@pytest.fixture(scope="module")
def judge_url():
  with scripted_server.scripted("judge") as url:
    yield url


@pytest.fixture(scope="module")
def teacher_url():
  with scripted_server.scripted("teacher") as url:
    yield url


def train_prompts(count):
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts", split="train")
  return records.spread_subset(prompts, count)


def with_lone_surrogate(prompt):
  """The issue's bad prompt: a lone surrogate in the user turn, which no UTF-8 request body can carry."""
  return dataclasses.replace(prompt, messages=({"role": "user", "content": "what is this \ud800 sign?"},))


def scripted_judge(judge_url):
  return llm_judge.LlmJudge(http.HttpBackend(judge_url, scripted_server.ScriptedJudge.model_id, max_retries=0),
                            specs_lib.load_specs(), max_attempts=2)


def generate(prompts, arm, teacher, grader, out_dir, **kwargs):
  return datagen.generate_arm(prompts, specs_lib.load_specs(), arm, teacher, grader, str(out_dir), max_attempts=2,
                              batch_size=len(prompts), filter_config=datagen.FilterConfig(min_helpfulness=0.0),
                              **kwargs)


def kept_rows(out_dir):
  return {row["id"]: row for path in sorted(glob.glob(f"{out_dir}/records-*.jsonl"))
          for row in map(json.loads, open(path))}


def dropped_lines(out_dir):
  path = f"{out_dir}/dropped.jsonl"
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def outcome(out_dir):
  """Per prompt id, what datagen made of it, without run-dependent fields."""
  return {i: (r["cot"], r["answer"], r["mode"], r["failed_attempts"], r["grade"])
          for i, r in kept_rows(out_dir).items()}


@pytest.mark.parametrize("where", ["teacher", "grader"])
def test_datagen_one_bad_prompt_loses_no_batch_mate(teacher_url, judge_url, tmp_path, where):
  """A prompt that fails the teacher (HTTP teacher) or the judge (HTTP judge) call fails alone, with its error."""
  prompts = train_prompts(5)
  bad = with_lone_surrogate(prompts[2])
  if where == "teacher":
    arm = "refusal"
    teacher = datagen.BackendTeacher(http.HttpBackend(teacher_url, "scripted-teacher", max_retries=0),
                                     base.SamplingParams(max_tokens=256, temperature=0.7))
  else:
    arm = "safe_completion"
    demos, _ = records.load_demonstrations(records.DEFAULT_DATA_DIR / "demonstrations", arms=[arm])
    teacher = datagen.DemonstrationTeacher(demos, arm)
  good = prompts[:2] + prompts[3:]
  generate(good, arm, teacher, scripted_judge(judge_url), tmp_path / "clean")
  stats = generate(prompts[:2] + [bad] + prompts[3:], arm, teacher, scripted_judge(judge_url), tmp_path / "faulty")
  assert len(outcome(tmp_path / "clean")) == 4
  assert outcome(tmp_path / "faulty") == outcome(tmp_path / "clean")  # Every batch-mate as without the bad prompt.
  (dropped,) = dropped_lines(tmp_path / "faulty")
  assert dropped["id"] == bad.id
  assert dropped["reason_class"] == "permanent"  # The prompt's own bytes: a rerun would fail again.
  assert len(dropped["reasons"]) == 2  # Both attempts, each with the exception's type and text.
  for reason in dropped["reasons"]:
    assert re.fullmatch(rf"{where}_input_error: UnicodeEncodeError: .*'\\ud800'.*surrogates not allowed",
                        reason), reason
  assert stats["totals"]["dropped:permanent"] == 1 and stats["totals"][f"attempt_failed:{where}_input_error"] == 2


def test_datagen_one_failed_judge_call_costs_no_row(judge_url, tmp_path):
  """The judge's server fails one request of a batch (a BackendError for the whole call): the rows retried one
  by one are all graded on the same attempt, as in a run without the fault."""
  prompts = train_prompts(4)
  demos, _ = records.load_demonstrations(records.DEFAULT_DATA_DIR / "demonstrations", arms=["safe_completion"])
  teacher = datagen.DemonstrationTeacher(demos, "safe_completion")
  generate(prompts, "safe_completion", teacher, scripted_judge(judge_url), tmp_path / "clean")
  scripted_server.control(judge_url, fail_next=1, fail_status=400)
  generate(prompts, "safe_completion", teacher, scripted_judge(judge_url), tmp_path / "faulty")
  assert dropped_lines(tmp_path / "faulty") == []
  assert len(outcome(tmp_path / "faulty")) == 4 and outcome(tmp_path / "faulty") == outcome(tmp_path / "clean")


def test_datagen_invalid_grade_reason_keeps_the_rationale(judge_url, tmp_path):
  (prompt,) = train_prompts(1)
  demo = records.Demonstration(prompt.id, "safe_completion", "direct", "Thinking.", "SCRIPT:prose")
  generate([prompt], "safe_completion", datagen.DemonstrationTeacher([demo], "safe_completion"),
           scripted_judge(judge_url), tmp_path)
  (dropped,) = dropped_lines(tmp_path)
  assert dropped["reason_class"] == "transient"
  assert all(r.startswith("invalid_grade: no valid verdict in 2 attempt(s); last: unparsable verdict")
             for r in dropped["reasons"]), dropped


# ----------------------------------------------------------------------------- datagen: retry_dropped


GOOD_ANSWER = "Here is a general, high-level overview of the topic and where to read more."


def demos_for(prompts, answers):
  return datagen.DemonstrationTeacher(
      [records.Demonstration(p.id, "safe_completion", "direct", "The spec allows a general answer.", answer)
       for p, answer in zip(prompts, answers)], "safe_completion")


def test_retry_dropped_retries_transient_drops_only_and_never_duplicates(judge_url, tmp_path):
  prompts = train_prompts(5)
  prompts[4] = with_lone_surrogate(prompts[4])  # The judge call fails on its own input: permanent.
  first = [GOOD_ANSWER, GOOD_ANSWER, "SCRIPT:prose", "[REDACTED: step-by-step operational procedure]", GOOD_ANSWER]
  generate(prompts, "safe_completion", demos_for(prompts, first), scripted_judge(judge_url), tmp_path)
  before_records, before_dropped = kept_rows(tmp_path), {r["id"]: r for r in dropped_lines(tmp_path)}
  assert set(before_records) == {prompts[0].id, prompts[1].id}
  assert {i: r["reason_class"] for i, r in before_dropped.items()} == {
      prompts[2].id: "transient", prompts[3].id: "permanent", prompts[4].id: "permanent"}
  assert before_dropped[prompts[3].id]["reasons"] == ["unsafe", "unsafe"]

  # The teacher now answers every prompt well. Only the transient drop may be retried: were the unsafe one
  # retried, it would now be kept; were the bad-input one retried, its reasons would grow.
  second = [GOOD_ANSWER] * 5
  stats = generate(prompts, "safe_completion", demos_for(prompts, second), scripted_judge(judge_url), tmp_path,
                   retry_dropped=True)
  after_records, after_lines = kept_rows(tmp_path), dropped_lines(tmp_path)
  assert set(after_records) == {prompts[0].id, prompts[1].id, prompts[2].id}
  assert {i: after_records[i] for i in before_records} == before_records  # Kept records untouched.
  retried = after_records[prompts[2].id]
  assert [r.split(":")[0] for r in retried["failed_attempts"]] == ["invalid_grade", "invalid_grade"]
  after_dropped = {r["id"]: r for r in after_lines}
  assert len(after_lines) == len(after_dropped) == 2  # One line per dropped prompt: the superseded one is gone.
  assert after_dropped == {i: before_dropped[i] for i in (prompts[3].id, prompts[4].id)}  # Permanent: not retried.
  assert stats["totals"]["kept"] == 3 and stats["totals"]["dropped"] == 2
  lines = sum(1 for path in glob.glob(f"{tmp_path}/records-*.jsonl") for _ in open(path))
  assert lines == 3  # No record written twice.

  # A plain resume does no work and changes nothing.
  snapshot = {p: open(p, "rb").read() for p in glob.glob(f"{tmp_path}/*.jsonl")}
  generate(prompts, "safe_completion", demos_for(prompts, second), scripted_judge(judge_url), tmp_path)
  assert {p: open(p, "rb").read() for p in glob.glob(f"{tmp_path}/*.jsonl")} == snapshot


def test_superseded_drop_line_left_by_a_kill_is_not_counted_twice(tmp_path):
  """Killed after a retried prompt's record was written but before its old drop line was removed."""
  row = {"category": "hate", "intent": "benign", "arm": "safe_completion"}
  jsonl_lines = [{"id": "p1", **row, "reasons": ["grader_error: BackendError: down"], "reason_class": "transient"},
                 {"id": "p2", **row, "reasons": ["unsafe"], "reason_class": "permanent"},
                 {"id": "p3", **row, "reasons": ["teacher_error: BackendError: down"], "reason_class": "transient"},
                 {"id": "p3", **row, "reasons": ["teacher_error: BackendError: down"] * 2, "reason_class": "transient"}]
  (tmp_path / "dropped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl_lines))
  (tmp_path / "records-00000.jsonl").write_text(json.dumps({"id": "p1", **row, "failed_attempts": []}) + "\n")
  writer = datagen.RecordWriter(str(tmp_path), shard_size=10, retry_dropped=True)
  assert [r["id"] for r in dropped_lines(tmp_path)] == ["p2", "p3"]
  assert dropped_lines(tmp_path)[1]["reasons"] == ["teacher_error: BackendError: down"] * 2  # The last line wins.
  assert set(writer.retry) == {"p3"} and writer.done_ids == {"p1", "p2"}
  assert datagen.compute_stats(writer)["totals"] == {"kept": 1, "dropped": 2, "dropped:permanent": 1,
                                                     "dropped:transient": 1, "attempt_failed:unsafe": 1,
                                                     "attempt_failed:teacher_error": 2}
  with pytest.raises(ValueError, match="p1: already has a record"):
    writer.write_record({"id": "p1", **row, "failed_attempts": []})


def test_retry_dropped_through_the_stage_keeps_arms_apart(judge_url, tmp_path):
  """A judge that failed every call, then recovered: --config.retry_dropped=True fills the arm in; stats.json
  keeps both arms, each run on its own as the experiment does."""
  from configs import datagen as datagen_config
  config = datagen_config.get_config("tiny")
  assert config.retry_dropped is False
  config.judge.kind = "llm_judge"
  config.judge.endpoint.update(base_url=judge_url, model=scripted_server.ScriptedJudge.model_id, api_key_env="")
  config.data.max_prompts, config.batch_size, config.arms = 6, 4, ("safe_completion",)
  scripted_server.control(judge_url, fail_next=10**6, fail_status=400)
  try:
    stats = datagen_stage.run(config, str(tmp_path))
  finally:
    scripted_server.control(judge_url, fail_next=0, fail_status=503)
  assert stats["safe_completion"]["totals"]["dropped:transient"] == 6
  for row in dropped_lines(tmp_path / "safe_completion"):
    assert row["reasons"][0].startswith("grader_error: BackendError: ") and "rejected the request (400)" in \
        row["reasons"][0], row
  assert datagen_stage.run(config, str(tmp_path)) == stats  # Without retry_dropped: a resume, nothing to do.
  config.retry_dropped = True
  stats = datagen_stage.run(config, str(tmp_path))
  totals = stats["safe_completion"]["totals"]
  assert totals.get("dropped:transient", 0) == 0 and totals["kept"] + totals.get("dropped", 0) == 6
  config.arms = ("refusal",)
  both = datagen_stage.run(config, str(tmp_path))
  assert set(both) == {"safe_completion", "refusal"} and both["safe_completion"] == stats["safe_completion"]
  assert json.load(open(tmp_path / "stats.json")) == both


# ----------------------------------------------------------------------------- SFT records: leakage, duplicates


def sft_record_row(prompt, answer="A general, high-level answer."):
  return {"id": prompt.id, "arm": "safe_completion", "messages": list(prompt.messages), "cot": "The spec allows it.",
          "answer": answer, "mode": "direct", "category": prompt.category, "intent": prompt.intent}


@pytest.fixture(scope="module")
def split_prompts():
  prompts, _ = records.load_prompts(records.DEFAULT_DATA_DIR / "prompts")
  return [p for p in prompts if p.split == "train"][:4], [p for p in prompts if p.split == "eval"]


def leaked_by_text(eval_prompt, train_prompt):
  """A record under a train prompt's id whose user turn is an eval prompt's text (re-spaced, re-cased)."""
  text = "  " + eval_prompt.last_user_message.upper().replace(" ", "   ") + "\n"
  return {**sft_record_row(train_prompt), "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("fault, pattern", [
    ("eval_id", r"records-00000\.jsonl:3: id: '[a-z_]+-[a-z_]+-eval-\d+' is an eval-split prompt \(leakage\)"),
    ("eval_text", r"records-00000\.jsonl:3: messages: the last user message is that of eval prompt "
                  r"'[a-z_]+-[a-z_]+-eval-\d+' \(leakage\)"),
    ("exact_duplicate", r"records-00000\.jsonl:3: duplicate record: the same id as at .*records-00000\.jsonl:1"),
    ("same_content_new_id", r"records-00000\.jsonl:3: duplicate record: the same messages, cot and answer as at "
                            r".*records-00000\.jsonl:2"),
])
def test_sft_records_with_eval_prompts_or_duplicates_are_errors_or_counted(split_prompts, tmp_path, fault, pattern):
  train, eval_ = split_prompts
  good = [sft_record_row(p) for p in train]
  bad = {"eval_id": sft_record_row(eval_[5]), "eval_text": leaked_by_text(eval_[7], train[3]),
         "exact_duplicate": good[0], "same_content_new_id": {**good[1], "id": "hate-benign-train-999"}}[fault]
  rows = good[:2] + [bad] + good[2:]
  write_lines(tmp_path / "records-00000.jsonl", *rows)
  with pytest.raises(records.DataError, match=pattern):
    sft_data.sft_record_examples(str(tmp_path), eval_)
  examples, skipped = sft_data.sft_record_examples(str(tmp_path), eval_, skip_invalid=True)
  assert [e.id for e in examples] == [p.id for p in train]  # The bad line left out, every good one kept.
  reason = "duplicate" if "duplicate" in fault or "same" in fault else "leaked eval prompt"
  assert skipped == {reason: [f"{tmp_path / 'records-00000.jsonl'}:3"]}


def test_sft_build_dataset_refuses_leaked_records_unless_told_to_skip_and_count(split_prompts, tmp_path, capsys):
  from configs import sft as sft_config
  train, eval_ = split_prompts
  arm_dir = tmp_path / "safe_completion"
  arm_dir.mkdir()
  good = [sft_record_row(p) for p in train]
  write_lines(arm_dir / "records-00000.jsonl", *good, sft_record_row(eval_[0]), good[1])
  write_lines(arm_dir / "records-00001.jsonl", leaked_by_text(eval_[1], train[0]) | {"id": "hate-benign-train-998"})
  config = sft_config.get_config("tiny")
  config.data.source, config.data.records_path, config.data.eval_fraction = "records", str(arm_dir), 0.0
  assert config.data.skip_invalid_records is False
  tokenizer = sft_data.load_tokenizer(config)
  with pytest.raises(records.DataError, match=r"records-00000\.jsonl:5: id: .* is an eval-split prompt"):
    sft_data.build_dataset(config, tokenizer)
  config.data.skip_invalid_records = True
  dataset = sft_data.build_dataset(config, tokenizer)
  assert len(dataset.train) == 4
  out = capsys.readouterr().out
  assert re.search(r"skipped 1 records of .*: duplicate \(at .*records-00000\.jsonl:6\)", out), out
  assert re.search(r"skipped 2 records of .*: leaked eval prompt \(at .*records-00000\.jsonl:5, "
                   r".*records-00001\.jsonl:1\)", out), out
