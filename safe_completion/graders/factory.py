"""Builds the grader a config asks for (`config.grader.kind`)."""

import ml_collections

from safe_completion.graders import base

GRADER_KINDS = ("reward_model", "llm_judge", "keyword")


def make_grader(grader_config: ml_collections.ConfigDict) -> base.Grader:
  """`reward_model` (learned, from `reward_model_dir`), `llm_judge` (an OpenAI-compatible endpoint or a
  local model directory) or `keyword` (a programmatic sanity-check reward)."""
  kind = grader_config.kind
  if kind == "keyword":
    from safe_completion.graders import rule_based
    return rule_based.KeywordGrader(grader_config.keyword, grader_config.get("saturation", 4))
  if kind == "reward_model":
    from safe_completion.graders import reward_model
    if not grader_config.reward_model_dir:
      raise ValueError("grader.kind='reward_model' needs grader.reward_model_dir (train one with "
                       "--config=configs/reward_model.py:tiny)")
    return reward_model.RewardModelGrader.load(grader_config.reward_model_dir)
  if kind == "llm_judge":
    from safe_completion import specs as specs_lib
    from safe_completion.backends import http
    from safe_completion.graders import llm_judge
    endpoint = grader_config.endpoint
    backend = http.HttpBackend(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
                               max_concurrency=endpoint.get("max_concurrency", 8),
                               cache_path=endpoint.get("cache_path") or None)
    return llm_judge.LlmJudge(backend, specs_lib.load_specs(grader_config.get("spec_dir") or None),
                              arm=grader_config.get("arm", "safe_completion"))
  raise ValueError(f"grader.kind={kind!r} is not one of {list(GRADER_KINDS)}")
