"""Start-up validation of a stage config: every error names the field, before anything is built.

Without it, several bad values train on empty batches, divide by zero after
training, train uphill or exit 0 with no checkpoint. An experiment config is
checked section by section (each section with a `stage` of its own).
"""

import math
import os
from typing import Any

import ml_collections

from safe_completion import lora
from safe_completion import taxonomy
from safe_completion.graders import factory
from safe_completion.models import convert

# Section kinds that talk to an OpenAI-compatible endpoint: the HTTP teacher, an eval model behind an endpoint,
# and the endpoint grader kinds.
ENDPOINT_KINDS = ("http", "endpoint", *factory.ENDPOINT_KINDS)


def _positive(value: Any) -> str | None:
  return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
  return None if value >= 0 else "must be >= 0 (0 = all rows)"


def _fraction(value: Any) -> str | None:
  return None if 0 <= value < 1 else "must be in [0, 1)"


def _learning_rate(value: Any) -> str | None:
  return None if math.isfinite(value) and value >= 0 else "must be finite and >= 0"


def _arm(value: Any) -> str | None:
  return None if value in taxonomy.ARMS else f"is not one of {sorted(taxonomy.ARMS)}"


def _keep(value: Any) -> str | None:
  # A non-finite step deletes the checkpoint its state came from; one kept checkpoint would leave none.
  return None if value >= 2 else "must be >= 2 (the non-finite stop needs an earlier checkpoint to keep)"


def _lora_rank(value: Any) -> str | None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
  return None if ok else "must be an integer >= 0 (0 = LoRA off)"


def _lora_alpha(value: Any) -> str | None:
  return None if isinstance(value, int | float) and math.isfinite(value) and value > 0 else "must be finite and > 0"


def _lora_targets(value: Any) -> str | None:
  names = (value,) if isinstance(value, str) else tuple(value)
  unknown = sorted(set(names) - set(lora.TARGETS))
  if not names or unknown:
    return f"must be a non-empty subset of {list(lora.TARGETS)}" + (f" (unknown: {unknown})" if unknown else "")
  return None


def _export_dtype(value: Any) -> str | None:
  # Checked here too: `convert.export_hf` would refuse it only after the whole run has trained.
  return None if value in ("", *convert.EXPORT_DTYPES) else f"is not one of {['', *convert.EXPORT_DTYPES]}"


_TRAINING = {"num_steps": _positive, "checkpoint.every_steps": _positive, "checkpoint.keep": _keep,
             "optimizer.learning_rate": _learning_rate, "optimizer.grad_accum_steps": _positive,
             "lora.rank": _lora_rank, "lora.alpha": _lora_alpha, "lora.target_modules": _lora_targets}
CHECKS = {
    "sft": {**_TRAINING, "batch_size": _positive, "data.seq_len": _positive, "data.eval_fraction": _fraction,
            "data.arm": _arm, "log_every": _positive, "eval_every": _positive, "export_dtype": _export_dtype},
    "rl": {**_TRAINING, "rl.prompts_per_step": _positive, "rl.samples_per_prompt": _positive,
           "rl.minibatches": _positive, "rl.epochs": _positive, "rl.max_new_tokens": _positive,
           "rl.max_prompt_len": _positive, "sample_table_every": _positive},
    "reward_model": {"num_steps": _positive, "batch_size": _non_negative, "learning_rate": _learning_rate,
                     "max_len": _positive},
    "datagen": {"batch_size": _positive},
    "eval": {"batch_size": _positive, "samples_per_prompt": _positive},
}


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for name in dotted.split("."):
    value = value[name]
  return value


def check_endpoint(endpoint: ml_collections.ConfigDict, field: str, what: str) -> None:
  """Raises ValueError naming `config.<field>.base_url` or `.model` when it is empty; `what` needs it."""
  for key, example in (("base_url", "http://host:8000/v1"), ("model", "the served model id")):
    if not endpoint[key]:
      raise ValueError(f"config.{field}.{key} is empty: {what} needs its OpenAI-compatible endpoint "
                       f"(--config.{field}.{key}=..., e.g. {example})")


def _endpoint_sections(config: ml_collections.ConfigDict, prefix: str):
  """(dotted path, section) of every section with a `kind` that needs its `endpoint`."""
  for name, section in config.items():
    if isinstance(section, ml_collections.ConfigDict):
      if section.get("kind") in ENDPOINT_KINDS and "endpoint" in section:
        yield f"{prefix}{name}", section
      yield from _endpoint_sections(section, f"{prefix}{name}.")


def _check_inputs(config: ml_collections.ConfigDict, prefix: str) -> None:
  """An experiment's outside inputs, before any compute: the base model's HF directory (real presets), every
  endpoint its roles use, and an eval grader that is not the RL reward grader's model."""
  hf_dir = config.sft.init.hf_dir
  if not hf_dir and config.preset.split(",")[0] != "tiny":
    raise ValueError(f"config.{prefix}sft.init.hf_dir is empty: set it to the base model's HF directory "
                     "(config.json + safetensors)")
  if hf_dir and not os.path.isfile(os.path.join(hf_dir, "config.json")):
    raise ValueError(f"config.{prefix}sft.init.hf_dir={hf_dir!r} has no config.json: not an HF model directory")
  for path, section in _endpoint_sections(config, prefix):
    check_endpoint(section.endpoint, f"{path}.endpoint", f"{path} (kind {section.kind!r})")
  rl_grader, eval_grader = config.rl.grader, config.eval.grader
  if (rl_grader.kind in ENDPOINT_KINDS and eval_grader.kind in ENDPOINT_KINDS
      and rl_grader.endpoint.model == eval_grader.endpoint.model):
    raise ValueError(f"config.{prefix}eval.grader.endpoint.model={eval_grader.endpoint.model!r} is the RL reward "
                     f"grader's model (config.{prefix}rl.grader.endpoint.model): the eval grader must be another "
                     "model, or reward hacking of the RL grader cannot show in the eval")


def validate(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Raises ValueError naming the first bad field (`sft.num_steps=0 must be > 0`)."""
  if config.get("stage") == "experiment":
    _check_inputs(config, prefix)
  for dotted, check in CHECKS.get(config.get("stage"), {}).items():
    value = _get(config, dotted)
    problem = check(value)
    if problem:
      raise ValueError(f"config.{prefix}{dotted}={value!r} {problem}")
  for name, section in config.items():
    if isinstance(section, ml_collections.ConfigDict) and "stage" in section:
      validate(section, f"{prefix}{name}.")
