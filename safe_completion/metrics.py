"""Metrics sinks: JSON lines in the workdir always, wandb when enabled (offline by default).

Only process 0 writes, so multi-host runs produce one file and one wandb run.
A resumed run redoes the steps after its last checkpoint: the first write of
a step the file already holds drops the rows from that step on (written before
the restart), so every step appears once, with the values of the run that kept them.
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
    self._steps_written: set[int] = set()
    self._last_step_on_disk: int | None = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      self._last_step_on_disk = max((row["step"] for row in read_metrics(self.path)), default=None)
    if wandb_config is not None and wandb_config.get("enabled", False):
      import wandb  # Imported lazily: most runs and all tests never need it.
      self._wandb_run = wandb.init(project=wandb_config.get("project", "safe_completion"),
                                   mode=wandb_config.get("mode", "offline"), dir=workdir,
                                   name=wandb_config.get("name") or None, config=run_config)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    step = int(step)
    if (self._last_step_on_disk is not None and step <= self._last_step_on_disk
        and step not in self._steps_written):
      self._drop_from(step)
    self._steps_written.add(step)
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._wandb_run is not None:
      self._wandb_run.log(record, step=int(step))

  def _drop_from(self, step: int) -> None:
    """Rewrites the file without rows at or after `step` (atomically: a crash leaves the old or the new file)."""
    kept = [row for row in read_metrics(self.path) if row["step"] < step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(tmp, self.path)
    self._last_step_on_disk = None

  def close(self) -> None:
    if self._wandb_run is not None:
      self._wandb_run.finish()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
