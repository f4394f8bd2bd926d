"""Metrics sinks: JSON lines in the workdir always, wandb when enabled (offline by default).

Only process 0 writes, so multi-host runs produce one file and one wandb run.
"""

import json
import os
from typing import Any

import jax
import numpy as np


def _plain(value: Any) -> Any:
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricsWriter:
  """Appends one JSON object per step to `<workdir>/<name>.jsonl`; mirrors to wandb if asked."""

  def __init__(self, workdir: str, name: str = "metrics", *, wandb_config: Any = None, run_config: Any = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._wandb_run = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if wandb_config is not None and wandb_config.get("enabled", False):
      import wandb  # Imported lazily: most runs and all tests never need it.
      self._wandb_run = wandb.init(project=wandb_config.get("project", "safe_completion"),
                                   mode=wandb_config.get("mode", "offline"), dir=workdir,
                                   name=wandb_config.get("name") or None, config=run_config)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._wandb_run is not None:
      self._wandb_run.log(record, step=int(step))

  def close(self) -> None:
    if self._wandb_run is not None:
      self._wandb_run.finish()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
