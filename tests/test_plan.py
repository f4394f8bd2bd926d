"""The memory plan: exact param/cache bytes from real shapes and shardings, the table, the fit verdict."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from configs import rl as rl_config
from configs import sft as sft_config
from safe_completion import checkpoint
from safe_completion import parallel
from safe_completion import plan
from safe_completion import slices
from safe_completion.models import transformer


def _model(name, **overrides):
  """The ModelConfig of a `configs/common.py` model preset."""
  return transformer.model_config(**common.model(name, **overrides).to_dict())


def test_llama3_8b_param_count_is_8b():
  stats = plan.param_stats(_model("llama3_8b"), plan.axis_sizes((1, -1, 4), 16))
  assert stats.count == pytest.approx(8.03e9, rel=2e-3)
  assert not stats.indivisible


def test_bytes_per_device_halve_when_fsdp_doubles():
  config = _model("llama3_8b")
  fsdp2 = plan.param_stats(config, plan.axis_sizes((1, 2, 4), 8)).bytes_per_device
  fsdp4 = plan.param_stats(config, plan.axis_sizes((1, 4, 4), 16)).bytes_per_device
  # Norm scales (2 per layer + the final one) map to no mesh axis: they stay whole; everything else halves.
  replicated = (2 * config.num_layers + 1) * config.hidden_size * 4
  assert fsdp4 - replicated == (fsdp2 - replicated) // 2


def test_param_bytes_equal_the_shards_of_real_shardings():
  config = _model("tiny")
  mesh = parallel.make_mesh((2, 2, 2))
  shapes = jax.eval_shape(lambda rng: transformer.init_params(config, rng), jax.random.key(0))
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(config), mesh)
  expected = sum(int(np.prod(sharding.shard_shape(shape.shape))) * shape.dtype.itemsize
                 for shape, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
  assert plan.param_stats(config, plan.axis_sizes((2, 2, 2), 8)).bytes_per_device == expected


def test_only_mapped_dimensions_are_split():
  sizes = {"data": 2, "fsdp": 4, "tensor": 8}
  assert plan.split_factors(("layers", "embed", "mlp"), sizes) == [1, 4, 8]
  assert plan.split_factors(("norm",), sizes) == [1]
  assert plan.split_factors(("activation_batch", None), sizes) == [8, 1]


def test_kv_cache_formula_equals_init_cache_bytes():
  config = _model("tiny", dtype="bfloat16")
  cache = transformer.init_cache(config, batch_size=6, max_len=40)
  actual = sum(x.nbytes for x in jax.tree.leaves(cache))
  assert plan.kv_cache_bytes(config, 6, 40, plan.axis_sizes((1, 1, 1), 1)) == actual
  # Split over the batch axes (data x fsdp = 2 x 3): k, v and segment ids shrink 6x, the index does not.
  assert plan.kv_cache_bytes(config, 6, 40, plan.axis_sizes((2, 3, 1), 6)) == (actual - 4) // 6 + 4


def test_remat_policies_order_activation_memory():
  config = _model("small")
  per_layer = {policy: plan.activation_bytes_per_token(config, policy, 512)["per_layer"]
               for policy in ("full", "dots_no_batch", "dots", "none")}
  assert per_layer["full"] < per_layer["dots_no_batch"] < per_layer["dots"] < per_layer["none"]
  assert per_layer["full"] == config.hidden_size * 4  # Only the f32 layer input.


def test_table_has_the_rows_and_fits_on_a_big_device():
  text = plan.format_plan(plan.make_plan(_model("tiny"), (1, -1, 1), 8, hbm_gib=80, batch_size=8, seq_len=128,
                                         stage="rl", rl_batch=32, max_new_tokens=64))
  for row in ("params", "optimizer (AdamW mu, nu)", "gradients", "reference params", "KV cache (rollout)",
              "logits (log-prob pass)", "activations (update)", "total", "HBM"):
    assert row in text
  assert "fits:" in text and "does not fit" not in text


def test_too_small_hbm_does_not_fit():
  result = plan.make_plan(_model("llama3_8b"), (1, -1, 4), 16, hbm_gib=16, batch_size=256, seq_len=4096)
  text = plan.format_plan(result)
  assert not result.fits
  assert "does not fit: needs" in text and "16.00 GiB" in text
  assert "largest batch_size whose update fits: 4" in text
  assert plan.make_plan(_model("llama3_8b"), (1, -1, 4), 16, hbm_gib=16, batch_size=4, seq_len=4096).fits


def test_grad_accumulation_adds_a_params_sized_buffer():
  base = plan.make_plan(_model("tiny"), (1, -1, 1), 8, hbm_gib=16, batch_size=8, seq_len=64)
  accum = plan.make_plan(_model("tiny"), (1, -1, 1), 8, hbm_gib=16, batch_size=8, seq_len=64, grad_accum_steps=4)
  assert accum.total - base.total == base.params.bytes_per_device
  assert "gradient accumulator" in plan.format_plan(accum)


def test_indivisible_mesh_is_reported():
  # gemma_2b has one kv head: a tensor axis of 2 cannot split it.
  text = plan.format_plan(plan.make_plan(_model("gemma_2b"), (1, -1, 2), 8, hbm_gib=32, batch_size=8, seq_len=512))
  assert "ERROR: indivisible param" in text and "k_proj" in text


def test_batch_not_divisible_by_batch_axes_is_an_error():
  with pytest.raises(ValueError, match="not divisible by the batch axes"):
    plan.make_plan(_model("tiny"), (1, -1, 1), 8, hbm_gib=16, batch_size=12, seq_len=64)


def test_sft_config_plans_its_model_batch_accumulation_and_rules():
  config = sft_config.get_config("llama3_8b")
  config.mesh.rules = tuple((name, None if name == "mlp" else axes) for name, axes in config.mesh.rules)
  result = plan.plan_config(config, (1, -1, 4), 16, hbm_gib=95)
  rules = parallel.rules_from_config(config)
  expected = plan.make_plan(_model("llama3_8b"), (1, -1, 4), 16, 95, batch_size=config.batch_size,
                            seq_len=config.data.seq_len, grad_accum_steps=config.optimizer.grad_accum_steps,
                            rules=rules)
  assert result.rows == expected.rows and config.optimizer.grad_accum_steps > 1
  assert "gradient accumulator" in plan.format_plan(result)
  # The config's rules are used: unsharding the MLP weights over `tensor` grows the params.
  assert result.params.bytes_per_device > plan.make_plan(_model("llama3_8b"), (1, -1, 4), 16, 95, batch_size=8,
                                                         seq_len=64).params.bytes_per_device


def test_rl_config_takes_the_model_of_its_sft_run(tmp_path):
  sft_model = _model("tiny", num_layers=3)  # What a finished SFT run wrote into its workdir.
  (tmp_path / checkpoint.MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(sft_model)))
  config = rl_config.get_config("tiny")
  with pytest.raises(ValueError, match="init.sft_workdir or pass --sft_config"):
    plan.plan_config(config, (-1, 1, 1), 8, hbm_gib=16)
  from_sft_config = plan.plan_config(config, (-1, 1, 1), 8, hbm_gib=16, sft_config=sft_config.get_config("tiny"))
  config.init.sft_workdir = str(tmp_path)
  from_workdir = plan.plan_config(config, (-1, 1, 1), 8, hbm_gib=16)
  assert from_workdir.params.count == plan.param_stats(sft_model, plan.axis_sizes((-1, 1, 1), 8)).count
  rl_batch = config.rl.prompts_per_step * config.rl.samples_per_prompt
  assert f"{rl_batch} seqs x {config.rl.max_prompt_len + config.rl.max_new_tokens - 1} slots" in plan.format_plan(
      from_workdir)
  assert from_sft_config.params.count == plan.param_stats(_model("tiny"), plan.axis_sizes((-1, 1, 1), 8)).count


def test_rl_plan_counts_the_samplers_per_layer_weight_copy():
  config = _model("tiny")
  mesh = parallel.make_mesh((2, 2, 2))
  layers = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))["layers"]
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(config)["layers"], mesh)
  # The layer axis is not split, so the per-layer copies hold as many bytes per device as the stack.
  copy = sum(int(np.prod(sharding.shard_shape(shape.shape))) * shape.dtype.itemsize
             for shape, sharding in zip(jax.tree.leaves(layers), jax.tree.leaves(shardings)))
  result = plan.make_plan(_model("tiny"), (2, 2, 2), 8, hbm_gib=16, batch_size=8, seq_len=64, stage="rl", rl_batch=16,
                          max_new_tokens=16)
  rows = {row.name: row for row in result.rows}
  assert rows["sampler weights (rollout)"].nbytes == result.params.layer_bytes_per_device == copy
  big = plan.make_plan(_model("llama3_8b"), (1, -1, 1), 4, hbm_gib=95, batch_size=8, seq_len=2048, stage="rl", rl_batch=32,
                       max_new_tokens=1024)
  assert 6.0 < {r.name: r for r in big.rows}["sampler weights (rollout)"].nbytes / plan.GIB < 7.5


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_h100_host_plans_fsdp_over_its_8_gpus(stage):
  host = slices.get_slice("h100x8")
  assert (host.devices, host.hbm_gib) == (8, 80.0)
  command = [sys.executable, "-m", "safe_completion.plan", f"--config=configs/{stage}.py:llama3_8b",
             "--sft_config=configs/sft.py:llama3_8b", "--slice=h100x8"]
  text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  assert f"llama3_8b {stage} on 8 devices (mesh data=1,fsdp=8,tensor=1)" in text and "HBM                                80.00" in text
  assert "fits:" in text and "does not fit" not in text
  # Params are split 8 ways: the same bytes as planning the mesh directly.
  params = plan.param_stats(_model("llama3_8b"), plan.axis_sizes((1, -1, 1), 8))
  assert f"params                              {params.bytes_per_device / plan.GIB:.2f}" in text


def test_plan_and_main_import_into_one_process():
  # Both are programs with a `config` flag; plan defines its flags only when it runs as one.
  result = subprocess.run([sys.executable, "-c", "import safe_completion.plan, safe_completion.main"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
