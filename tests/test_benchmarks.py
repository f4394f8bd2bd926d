"""benchmarks/mfu.py runs end to end on the 8 fake CPU devices (FSDP mesh), so it cannot rot unnoticed."""

import importlib.util
import json
from pathlib import Path

import pytest

from configs import common
from safe_completion import flops
from safe_completion import sft

MFU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mfu.py"


def _load_mfu():
  spec = importlib.util.spec_from_file_location("benchmarks_mfu", MFU_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_mfu_benchmark_reports_every_part_on_a_sharded_mesh(tmp_path):
  mfu = _load_mfu()
  out = tmp_path / "mfu.jsonl"
  results = mfu.main(["--model=tiny", "--batch=8", "--seq=32", "--steps=1", "--sample_batch=8", "--prompt_len=8",
                      "--new_tokens=4", "--matmul=64", "--dtype=float32", "--remat=none", f"--out={out}"])
  assert [r["part"] for r in results] == ["sft_train_step", "rl_update_step", "sampler"]
  assert [json.loads(line)["part"] for line in out.read_text().splitlines()] == [r["part"] for r in results]
  sft_result, rl_result, sampler_result = results
  assert sft_result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  model_config = sft.model_config_from(mfu.make_config(mfu.parse_args(["--model=tiny", "--dtype=float32"])))
  assert sft_result["matmul_params"] == flops.matmul_params(model_config)
  assert model_config.hidden_size == common.MODELS["tiny"]["hidden_size"]
  for result in (sft_result, rl_result):
    assert result["tokens_per_s"] == pytest.approx(8 * 32 / result["seconds"])
    expected_flops = flops.train_flops_per_token(model_config, 32) * 8 * 32
    assert result["tflops_per_s"] * 1e12 == pytest.approx(expected_flops / result["seconds"])
    assert result["mfu_of_measured"] == pytest.approx(result["tflops_per_s"] / result["peak_measured_tflops"])
  assert rl_result["logprob_forward_seconds"] > 0
  assert sampler_result["tokens_per_s"] == pytest.approx(8 * 4 / sampler_result["seconds"])
  assert sampler_result["prefill_seconds"] > 0 and sampler_result["decode_tokens_per_s"] > 0


def test_mfu_benchmark_rejects_unknown_parts():
  with pytest.raises(SystemExit):
    _load_mfu().parse_args(["--parts=sft,decode"])


SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


def test_serve_load_test_counts_requests_latencies_and_errors(tmp_path):
  spec = importlib.util.spec_from_file_location("benchmarks_serve", SERVE_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "serve.jsonl"
  results = module.main(["--clients=1,4", "--requests=6", "--max_seconds=60", "--max_tokens=2", f"--out={out}"])
  assert [r["clients"] for r in results] == [1, 4]
  for r in results:
    assert r["requests"] == 6 and r["ok"] + sum(r["errors"].values()) == 6
    assert r["ok"] == 6 and r["p50_s"] <= r["p99_s"] and r["requests_per_s"] == pytest.approx(6 / r["seconds"])
  assert [json.loads(line)["clients"] for line in out.read_text().splitlines()] == [1, 4]
