"""Fault injection (issue 15): every bad input or misbehaving peer below must end in a clear error, never
a raw traceback, a silent acceptance, or a lost or duplicated record.

Each test feeds one fault to the real component (real HTTP servers on loopback, real files) and fails if
the fault gets through.
"""

import glob
import json
import logging
import os
import re
import shutil
import time

import httpx
import jax
import pytest

from safe_completion.backends import base
from safe_completion.backends import http
from safe_completion.data import records
from safe_completion.models import convert
from safe_completion.models import transformer
from tests import scripted_server

ECHO = scripted_server.EchoBackend.model_id


def user(text):
  return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- the HTTP client


@pytest.fixture(scope="module")
def echo_url():
  port = scripted_server.free_port()
  env = {"SCRIPTED_EXPECTED_KEY": "sk-faults-secret-0042"}
  with scripted_server.running_server(["tests.scripted_server", "--kind=echo", f"--port={port}"], port, env) as url:
    yield url


@pytest.fixture
def server(echo_url, monkeypatch):
  monkeypatch.setenv("SC_FAULT_KEY", "sk-faults-secret-0042")
  root = echo_url[:-3]
  httpx.post(f"{root}/control", json={"reset": True, "fail_next": 0, "gate": 0}).raise_for_status()
  httpx.post(f"{root}/faults", json={"kind": "html", "count": 0}).raise_for_status()
  return echo_url


def inject(url, kind, count=1):
  httpx.post(f"{url[:-3]}/faults", json={"kind": kind, "count": count}).raise_for_status()


def calls(url):
  return httpx.get(f"{url[:-3]}/stats").json()["calls"]


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
