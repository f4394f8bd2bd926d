"""The eval stage against an OpenAI-compatible endpoint (the real local server), graded by the reward model."""

import json

from configs import eval as eval_config
from safe_completion.evaluation import attacks
from safe_completion.evaluation import evaluate
from safe_completion.evaluation import metrics as metrics_lib
from safe_completion.graders import factory
from tests import scripted_server


def echo_endpoint():
  """The real local OpenAI-compatible server with the echo model; yields its URL."""
  port = scripted_server.free_port()
  return scripted_server.running_server(["tests.scripted_server", "--kind=echo", f"--port={port}"], port)


def endpoint_config(url, reward_model_dir, *, samples_per_prompt, bootstrap_samples, attack_names):
  """The `endpoint` eval preset against `url`, graded by the reward model, on 6 prompts."""
  config = eval_config.get_config("endpoint")
  config.model.endpoint.base_url, config.model.endpoint.model = url, "scripted-echo"
  config.grader.kind, config.grader.reward_model_dir = "reward_model", reward_model_dir
  config.data.max_prompts, config.samples_per_prompt, config.bootstrap_samples = 6, samples_per_prompt, bootstrap_samples
  config.attacks.names, config.attacks.samples_per_prompt = attack_names, 1
  return config



def test_eval_of_an_endpoint_writes_graded_completions_metrics_and_report(tiny_reward_model_dir, tmp_path):
  with echo_endpoint() as url:
    config = endpoint_config(url, tiny_reward_model_dir, samples_per_prompt=2, bootstrap_samples=50,
                             attack_names=("rot13",))
    results = evaluate.run(config, str(tmp_path))

  completions = metrics_lib.read_completions(str(tmp_path / "completions.jsonl"))
  assert len(completions) == 6 * 2 and {c.sample_index for c in completions} == {0, 1}
  assert all(c.response.startswith(f"echo {c.sample_index}") and c.grade.grader == "reward_model" for c in completions)
  assert results["model"] == "scripted-echo" and results["metrics"]["overall"]["n_completions"] == 12
  assert "rot13" in results["attacks"]
  report = json.loads((tmp_path / "report" / "report.json").read_text())
  assert set(report["arms"]) == {"scripted-echo"} and "rot13" in report["attacks"]["scripted-echo"]


class RecordingGrader:
  """The real reward-model grader, keeping every request it was asked to grade."""

  def __init__(self, inner):
    self.inner, self.requests = inner, []

  def grade(self, requests):
    self.requests += list(requests)
    return self.inner.grade(requests)


def test_attacked_responses_are_graded_against_the_original_request(tiny_reward_model_dir, tmp_path):
  with echo_endpoint() as url:
    config = endpoint_config(url, tiny_reward_model_dir, samples_per_prompt=1, bootstrap_samples=0,
                             attack_names=("prefill", "base64"))
    grader = RecordingGrader(factory.make_grader(config.grader))
    evaluate.evaluate_model(config, str(tmp_path), evaluate.make_backend(config.model), grader)

  originals = {p.id: p.messages for p in evaluate.eval_prompts(config)}
  attacked = [r for r in grader.requests if "@" in r.prompt_id]
  assert {r.prompt_id.split("@")[1] for r in attacked} == {"prefill", "base64"}
  for request in attacked:
    assert request.prompt == originals[request.prompt_id.split("@")[0]]
    assert attacks.CONTINUE_TEXT not in request.prompt[-1]["content"]
  # The responses themselves answered the attacked wording (the echo repeats the last turn).
  completions = metrics_lib.read_completions(str(tmp_path / "attacks.jsonl"))
  assert any(attacks.CONTINUE_TEXT in c.response for c in completions if c.prompt_id.endswith("@prefill"))
