"""configs/experiment.py:compare end to end: two scripted endpoints on loopback, one scripted LLM judge.

Model a is the echo server (repeats the prompt: the judge finds it safe and rates it 4), model b the
teacher server (a refusal with redirection, rated 2; on seed 0 a prompt whose length is divisible by 3
gets an untagged reply instead, rated 4), so the pairwise numbers are known from the scripts.
"""

import contextlib
import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from configs import common
from configs import experiment
from safe_completion.evaluation import endpoint_comparison
from safe_completion.evaluation import metrics as metrics_lib
from tests import scripted_server
from tests import test_report_html

PROMPTS, SAMPLES = 6, 2


@pytest.fixture(scope="module")
def servers():
  urls = {}
  with contextlib.ExitStack() as stack:
    for kind in ("echo", "teacher", "judge"):
      port = scripted_server.free_port()
      urls[kind] = stack.enter_context(
          scripted_server.running_server(["tests.scripted_server", f"--kind={kind}", f"--port={port}"], port))
    yield urls


def overrides(urls):
  return {"models.a.name": "base", "models.a.endpoint.base_url": urls["echo"],
          "models.a.endpoint.model": "scripted-echo",
          "models.b.name": "arm", "models.b.endpoint.base_url": urls["teacher"],
          "models.b.endpoint.model": "scripted-teacher",
          "eval.grader.endpoint.base_url": urls["judge"], "eval.grader.endpoint.model": "scripted-judge",
          "eval.data.max_prompts": PROMPTS, "eval.samples_per_prompt": SAMPLES, "eval.bootstrap_samples": 50,
          "eval.attacks.names": ("prefill",)}


def config_of(values):
  return common.override(experiment.get_config("compare,runlocal"), values)


def calls(url):
  return httpx.get(f"{url[:-3]}/stats").json()["calls"]


@pytest.fixture(scope="module")
def compared(servers, tmp_path_factory):
  """One run through `python -m safe_completion.main`, as a user runs it."""
  workdir = tmp_path_factory.mktemp("compare")
  flags = [f"--config.{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in overrides(servers).items()]
  subprocess.run([sys.executable, "-m", "safe_completion.main", "--config=configs/experiment.py:compare,runlocal",
                  f"--workdir={workdir}", *flags], cwd=scripted_server.REPO_ROOT, check=True, timeout=300)
  return workdir


def test_report_and_pairwise_numbers_come_from_the_two_endpoints(compared):
  for name in ("report.md", "report.html", "report.json"):
    assert (compared / "report" / name).stat().st_size > 0
  a = metrics_lib.read_completions(compared / "a" / "completions.jsonl")
  b = metrics_lib.read_completions(compared / "b" / "completions.jsonl")
  assert len(a) == len(b) == PROMPTS * SAMPLES
  assert all(c.response.startswith(f"echo {c.sample_index} seed=0: ") for c in a)
  assert all(c.grade.valid and c.grade.judge_model == "scripted-judge" for c in a + b)
  refused = {c.prompt_id for c in b if c.response.startswith("<reasoning>") and "can't help" in c.response}
  assert 0 < len(refused) < PROMPTS  # Both scripted behaviours of the teacher are among the prompts.
  assert {(c.prompt_id in refused, c.grade.mode, c.grade.helpfulness_rating) for c in b} == {
      (True, "refusal", 2), (False, "direct", 4)}
  assert {(c.grade.mode, c.grade.helpfulness_rating) for c in a} == {("direct", 4)}

  report = json.loads((compared / "report" / "report.json").read_text())
  assert report["comparison"]["names"] == ["base", "arm"] and set(report["arms"]) == {"base", "arm"}
  helpfulness = report["comparison"]["overall"]["helpfulness"]
  per_prompt = {pid: np.mean([c.grade.helpfulness_rating for c in b if c.prompt_id == pid])
                - np.mean([c.grade.helpfulness_rating for c in a if c.prompt_id == pid]) for pid in {c.prompt_id for c in a}}
  assert helpfulness["mean_diff"]["value"] == pytest.approx(np.mean(list(per_prompt.values())))
  assert helpfulness["a_wins"]["value"] == pytest.approx(len(refused) / PROMPTS)
  assert helpfulness["b_wins"]["value"] == 0
  assert report["comparison"]["overall"]["safety"]["ties"]["value"] == 1  # Both always safe.
  assert set(report["attacks"]) == {"base", "arm"} and "prefill" in report["attacks"]["arm"]

  markdown = (compared / "report" / "report.md").read_text()
  assert "## Pairwise: arm vs base" in markdown and "scripted-judge" in markdown
  for absent in ("SFT", "RL grader", "Seeds", "Mode match", "seed(s) per arm"):
    assert absent not in markdown  # Nothing the comparison does not have.


def test_a_rerun_sends_no_requests_and_another_endpoint_is_refused(compared, servers):
  before = {kind: calls(url) for kind, url in servers.items()}
  result = endpoint_comparison.run(config_of(overrides(servers)), str(compared))
  assert {kind: calls(url) for kind, url in servers.items()} == before
  report = json.loads((compared / "report" / "report.json").read_text())
  assert result["comparison"]["overall"]["helpfulness"]["a_wins"]["value"] == pytest.approx(
      report["comparison"]["overall"]["helpfulness"]["a_wins"]["value"])

  swapped = config_of({**overrides(servers), "models.a.endpoint.base_url": servers["judge"],
                       "models.a.endpoint.model": "scripted-judge"})
  with pytest.raises(ValueError, match=r"a/identity.json.*\['base_url', 'model'\]"):
    endpoint_comparison.run(swapped, str(compared))


@pytest.mark.skipif(test_report_html.CHROMIUM is None, reason="chromium is not installed")
def test_html_browser_shows_both_models_completions(compared, tmp_path):
  html_path = compared / "report" / "report.html"
  dom = test_report_html.Dom(test_report_html.chromium(html_path.as_uri(), tmp_path, "--dump-dom").stdout)
  assert len(dom.rows) == PROMPTS and dom.count == f"{PROMPTS} of {PROMPTS} prompts shown"
  assert len(dom.completions) == 2 * PROMPTS * SAMPLES
  assert {c["data-mode"] for c in dom.completions} == {"direct", "refusal"}
  assert "<th>base</th><th>arm</th>" in html_path.read_text()


URLS = {"echo": "http://127.0.0.1:1/v1", "teacher": "http://127.0.0.1:2/v1", "judge": "http://127.0.0.1:3/v1"}


@pytest.mark.parametrize("change, field", [
    ({"models.a.endpoint.base_url": ""}, "config.models.a.endpoint.base_url is empty"),
    ({"models.b.endpoint.model": ""}, "config.models.b.endpoint.model is empty"),
    ({"models.b.endpoint.base_url": URLS["echo"] + "/", "models.b.endpoint.model": "scripted-echo"},
     "config.models.b.endpoint is config.models.a.endpoint"),
    ({"models.a.name": "", "models.b.name": "scripted-echo"}, "config.models.b.name: both models are named"),
    ({"eval.grader.endpoint.base_url": ""}, "config.eval.grader.endpoint.base_url is empty"),
    ({"eval.grader.kind": "reward_model"}, "config.eval.grader.reward_model_dir is empty"),
    ({"eval.grader.kind": "reward_model", "eval.grader.reward_model_dir": "/nonexistent/rm"},
     "config.eval.grader.reward_model_dir='/nonexistent/rm' is not a directory"),
    ({"eval.grader.kind": "llama_guard"}, "config.eval.grader.helpfulness.kind=''"),
    ({"eval.grader.kind": "llama_guard", "eval.grader.helpfulness.kind": "llama_guard"},
     "config.eval.grader.helpfulness.kind='llama_guard'"),
    ({"eval.grader.kind": "judge"}, "config.eval.grader.kind='judge' is not one of"),
])
def test_startup_errors_name_the_field_before_any_request(change, field, tmp_path):
  with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
    endpoint_comparison.run(config_of({**overrides(URLS), **change}), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()
