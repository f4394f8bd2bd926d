r"""Two OpenAI-compatible endpoints, one eval grader, one report with pairwise tests (the paper's production view).

Run as `configs/experiment.py:compare` (this file holds its fields). Model a is the baseline, b the candidate:
the pairwise table reads "b vs a" and a win is b scoring higher. Both are graded by the same `eval.grader`
(any kind `graders.factory` knows) under the safe-completion policy:
  python -m safe_completion.main --config=configs/experiment.py:compare --workdir=workdir/compare \
    --config.models.a.name=base --config.models.a.endpoint.base_url=http://host-a:8000/v1 \
    --config.models.a.endpoint.model=meta-llama/Llama-3.1-8B-Instruct \
    --config.models.b.name=safe_completion --config.models.b.endpoint.base_url=http://host-b:8000/v1 \
    --config.models.b.endpoint.model=our-rl-arm \
    --config.eval.grader.endpoint.base_url=http://judge:8001/v1 --config.eval.grader.endpoint.model=judge
A learned grader instead: --config.eval.grader.kind=reward_model --config.eval.grader.reward_model_dir=DIR.
A safety-only classifier: --config.eval.grader.kind=llama_guard plus --config.eval.grader.helpfulness.kind=...
`configs/experiment.py:compare,runlocal` shrinks prompts, samples and tokens for a smoke run.
"""

import ml_collections as mlc

from configs import common
from configs import eval as eval_config
from safe_completion.graders import factory

PRESETS = {"compare": {}}


def model_slot() -> mlc.ConfigDict:
  """One compared model: an OpenAI-compatible endpoint and its name in the report (empty: endpoint.model)."""
  return mlc.ConfigDict(dict(name="", endpoint=common.endpoint()))


def get_config(arg: str = "compare") -> mlc.ConfigDict:
  name, runlocal = common.parse_arg(arg, PRESETS, "compare")
  config = mlc.ConfigDict()
  config.stage = "compare"
  config.preset = name
  config.models = mlc.ConfigDict({"a": model_slot(), "b": model_slot()})
  # The eval stage's endpoint preset without its single model: data, sampling, attacks and the grader.
  config.eval = eval_config.get_config("endpoint,runlocal" if runlocal else "endpoint")
  del config.eval.model
  del config.eval.name
  # The safety classifier kinds need a helpfulness grader beside them (docs/graders.md).
  config.eval.grader.classifier = factory.classifier_config()
  config.eval.grader.helpfulness = mlc.ConfigDict(dict(kind="", reward_model_dir="", keyword="", saturation=4,
                                                       endpoint=common.endpoint(), arm="safe_completion"))
  common.override(config, PRESETS[name])
  return config
