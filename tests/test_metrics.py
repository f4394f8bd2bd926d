"""Metrics sinks: JSON lines always; wandb offline (no key, no network) when enabled."""

import glob
import os

import ml_collections as mlc

from safe_completion import metrics


def test_jsonl_metrics_round_trip(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.5, "by_intent": {"benign": 0.5}})
  writer.close()
  assert metrics.read_metrics(str(tmp_path / "metrics.jsonl")) == [
      {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "by_intent": {"benign": 0.5}}]


def test_wandb_logs_an_offline_run_without_a_key(tmp_path, monkeypatch):
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  config = mlc.ConfigDict(dict(enabled=True, project="safe_completion_test", mode="offline", name="t"))
  writer = metrics.MetricsWriter(str(tmp_path), wandb_config=config, run_config={"seed": 0})
  writer.write(1, {"loss": 1.0})
  writer.close()
  runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
  assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
  assert metrics.read_metrics(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 1.0}]
