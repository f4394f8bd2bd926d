r"""Validate any grader on labeled responses before trusting its reward (`graders.validation`).

  python -m safe_completion.graders.validate --grader=reward_model --reward_model_dir=workdir/reward_model \
    --labels='data/grader_data/heldout/*.jsonl' --policy=safe_completion --out=validation.json
  python -m safe_completion.graders.validate --grader=llama_guard --base_url=http://judge:8001/v1 \
    --model=meta-llama/Llama-Guard-3-8B --labels='data/grader_data/heldout/*.jsonl'
  python -m safe_completion.graders.validate --config=configs/eval.py --labels=FILE.jsonl  # uses config.grader

Prints the table and writes the JSON report to --out (stdout when unset).
"""

import glob
import json
import sys

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from safe_completion.data import labeled
from safe_completion.graders import factory
from safe_completion.graders import validation

_GRADER = flags.DEFINE_enum("grader", None, factory.GRADER_KINDS, "Grader kind (or use --config).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A config whose `grader` section is used.")
_LABELS = flags.DEFINE_list("labels", None, "Labeled JSONL files or globs (data/grader_data/SCHEMA.md).")
_POLICY = flags.DEFINE_enum("policy", "safe_completion", labeled.POLICIES, "Whose labels are the truth.")
_REWARD_MODEL_DIR = flags.DEFINE_string("reward_model_dir", "", "reward_model: its workdir.")
_BASE_URL = flags.DEFINE_string("base_url", "", "Judge endpoint, e.g. http://127.0.0.1:8001/v1.")
_MODEL = flags.DEFINE_string("model", "", "Judge model name at the endpoint.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "", "Environment variable holding the judge's API key.")
_ARM = flags.DEFINE_string("arm", "", "Judge's modes guide (llm_judge, gpt_oss_safeguard); default: --policy.")
_CLASSIFIER = flags.DEFINE_list("classifier", [], "Safety classifier options key=value (style=granite_guardian, "
                                "reasoning_effort=high, logprobs=false, unmapped=invalid, ...).")
_THRESHOLD = flags.DEFINE_float("threshold", validation.THRESHOLD, "Predicted unsafe: s below this.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON report.")


def _value(text: str):
  return {"true": True, "false": False}.get(text.lower(), int(text) if text.isdigit() else text)


def grader_config() -> ml_collections.ConfigDict:
  """The grader section: from --config, or built from --grader and its flags."""
  if _CONFIG.value is not None:
    return _CONFIG.value.grader if "grader" in _CONFIG.value else _CONFIG.value
  if _GRADER.value is None:
    raise app.UsageError("pass --grader=KIND or --config=FILE")
  classifier = {}
  for item in _CLASSIFIER.value:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--classifier: {item!r} is not key=value")
    classifier[key] = _value(value)
  return ml_collections.ConfigDict(dict(
      kind=_GRADER.value, reward_model_dir=_REWARD_MODEL_DIR.value, keyword="", saturation=4,
      arm=_ARM.value or _POLICY.value, classifier=classifier,
      endpoint=dict(base_url=_BASE_URL.value, model=_MODEL.value, api_key_env=_API_KEY_ENV.value or None)))


def main(argv) -> None:
  del argv
  if not _LABELS.value:
    raise app.UsageError("--labels is required")
  paths = sorted({p for pattern in _LABELS.value for p in (glob.glob(pattern) or [pattern])})
  rows, _ = labeled.load_labeled(paths)
  grader = factory.make_grader(grader_config(), allow_safety_only=True)
  report = validation.validate(grader, rows, _POLICY.value, threshold=_THRESHOLD.value)
  report["labels"] = paths
  print(validation.format_table(report), file=sys.stderr if not _OUT.value else sys.stdout)
  text = json.dumps(report, indent=2)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  else:
    print(text)


if __name__ == "__main__":
  app.run(main)
