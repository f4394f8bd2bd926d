"""Builds the grader a config asks for (`config.grader.kind`).

The safety classifier kinds (`SAFETY_KINDS`) judge safety only; as a `Grader`
they need `grader.helpfulness`, another grader section (e.g. kind
`reward_model`) that supplies mode, helpfulness and kind (`safety_only.CombinedGrader`).
"""

import ml_collections

from safe_completion.graders import base
from safe_completion.graders import safety_only

SAFETY_KINDS = ("gpt_oss_safeguard", "guideline_classifier", "llama_guard")
GRADER_KINDS = ("reward_model", "llm_judge", "keyword", *SAFETY_KINDS)
# Grader kinds that call an OpenAI-compatible endpoint (their config has an `endpoint` section).
ENDPOINT_KINDS = ("llm_judge", *SAFETY_KINDS)


def classifier_config() -> ml_collections.ConfigDict:
  """Options of the safety classifier kinds; 0 / "" mean the adapter's default."""
  return ml_collections.ConfigDict(dict(
      reasoning_effort="medium",  # gpt_oss_safeguard: low | medium | high.
      style="shieldgemma",  # guideline_classifier: shieldgemma | granite_guardian.
      logprobs=True,  # guideline_classifier, llama_guard: s from the answer token's probability.
      unmapped="ignore",  # llama_guard: verdicts with only codes outside our taxonomy (ignore | invalid).
      max_tokens=0, max_attempts=1))


def _backend(endpoint: ml_collections.ConfigDict, classifier: bool):
  from safe_completion.backends import http
  kwargs = dict(api_key_env=endpoint.api_key_env, max_concurrency=endpoint.get("max_concurrency", 8))
  if classifier:
    if endpoint.get("cache_path"):
      raise ValueError("grader.endpoint.cache_path: the safety classifier kinds take no cache (log-probs are not cached)")
    return safety_only.ClassifierBackend(endpoint.base_url, endpoint.model, **kwargs)
  return http.HttpBackend(endpoint.base_url, endpoint.model, cache_path=endpoint.get("cache_path") or None, **kwargs)


def make_safety_classifier(grader_config: ml_collections.ConfigDict) -> safety_only.SafetyClassifier:
  """The `safety_only.SafetyClassifier` of a safety classifier kind."""
  from safe_completion import specs as specs_lib
  kind = grader_config.kind
  options = classifier_config()
  options.update(grader_config.get("classifier") or {})
  extra = {k: options[k] for k in ("max_tokens",) if options[k]}
  backend = _backend(grader_config.endpoint, classifier=True)
  if kind == "gpt_oss_safeguard":
    from safe_completion.graders import gpt_oss_safeguard
    return gpt_oss_safeguard.GptOssSafeguard(
        backend, specs_lib.load_specs(grader_config.get("spec_dir") or None), arm=grader_config.get("arm", "safe_completion"),
        reasoning_effort=options.reasoning_effort, max_attempts=options.max_attempts, **extra)
  if kind == "guideline_classifier":
    from safe_completion.graders import guideline_classifier
    return guideline_classifier.GuidelineClassifier(
        backend, specs_lib.load_specs(grader_config.get("spec_dir") or None), style=options.style,
        logprobs=options.logprobs, max_attempts=options.max_attempts, **extra)
  if kind == "llama_guard":
    from safe_completion.graders import llama_guard
    return llama_guard.LlamaGuard(backend, unmapped=options.unmapped, logprobs=options.logprobs,
                                  max_attempts=options.max_attempts, **extra)
  raise ValueError(f"grader.kind={kind!r} is not a safety classifier kind {list(SAFETY_KINDS)}")


def make_grader(grader_config: ml_collections.ConfigDict, *,
                allow_safety_only: bool = False) -> base.Grader | safety_only.SafetyClassifier:
  """`reward_model` (learned, from `reward_model_dir`), `llm_judge` (an OpenAI-compatible endpoint),
  `keyword` (a programmatic sanity-check reward) or a safety classifier kind.

  A safety classifier kind with a `helpfulness` grader section is a `CombinedGrader`;
  without one it is an error, unless `allow_safety_only` (validation), which returns the classifier.
  """
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
    from safe_completion.graders import llm_judge
    return llm_judge.LlmJudge(_backend(grader_config.endpoint, classifier=False),
                              specs_lib.load_specs(grader_config.get("spec_dir") or None),
                              arm=grader_config.get("arm", "safe_completion"))
  if kind in SAFETY_KINDS:
    classifier = make_safety_classifier(grader_config)
    helpfulness = grader_config.get("helpfulness")
    if helpfulness and helpfulness.get("kind"):
      if helpfulness.kind in SAFETY_KINDS:
        raise ValueError(f"grader.helpfulness.kind={helpfulness.kind!r} judges safety only; use reward_model or llm_judge")
      return safety_only.CombinedGrader(classifier, make_grader(helpfulness))
    if allow_safety_only:
      return classifier
    raise ValueError(f"grader.kind={kind!r} judges safety only: set grader.helpfulness (e.g. "
                     "grader.helpfulness.kind=reward_model, grader.helpfulness.reward_model_dir=...) for mode and "
                     "helpfulness; see docs/graders.md")
  raise ValueError(f"grader.kind={kind!r} is not one of {list(GRADER_KINDS)}")
