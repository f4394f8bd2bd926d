"""Fault injection (issue 15): every bad input or misbehaving peer below must end in a clear error, never
a raw traceback, a silent acceptance, or a lost or duplicated record.

Each test feeds one fault to the real component (real HTTP servers on loopback, real files) and fails if
the fault gets through.
"""

import logging
import time

import httpx
import pytest

from safe_completion.backends import base
from safe_completion.backends import http
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
