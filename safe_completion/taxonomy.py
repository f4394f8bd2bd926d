"""The fixed vocabularies of the method: categories, intents, modes, severities, arms.

Kept in one place so specs, data, graders, rewards and reports agree on
spelling and order (the order is the integer code used in arrays).
"""

CATEGORIES = (
    "illicit_wrongdoing",
    "biorisk",
    "cybersecurity",
    "violent_weapons",
    "hate",
    "sexual_content",
    "privacy",
    "self_harm",
)
INTENTS = ("benign", "dual_use", "malicious")
MODES = ("direct", "safe_completion", "refusal")
SEVERITIES = ("none", "negligible", "low", "moderate", "high")
SPLITS = ("train", "eval")
HELPFULNESS_KINDS = ("direct", "indirect")

# The modes each training arm may answer in: the safe-completion arm has three,
# the refusal-training baseline only comply-or-refuse.
ARM_MODES = {
    "safe_completion": ("direct", "safe_completion", "refusal"),
    "refusal": ("direct", "refusal"),
}
ARMS = tuple(ARM_MODES)


def index(vocabulary: tuple[str, ...], value: str, field: str) -> int:
  """Integer code of `value` in `vocabulary`; a clear error naming `field` otherwise."""
  try:
    return vocabulary.index(value)
  except ValueError:
    raise ValueError(f"{field}: {value!r} is not one of {list(vocabulary)}") from None
