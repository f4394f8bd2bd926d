"""LoRA (qwix adapters): only adapters train and are saved, the base stays bit-identical, the merged HF
export matches the adapted forward pass, sharded equals single-device, and RL's reference is the base."""

import os

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from configs import rl as rl_config
from configs import sft as sft_config
from safe_completion import checkpoint
from safe_completion import config_checks
from safe_completion import lora
from safe_completion import metrics
from safe_completion import parallel
from safe_completion import plan
from safe_completion import sft
from safe_completion import slices
from safe_completion import training
from safe_completion.data import sft_data
from safe_completion.models import convert
from safe_completion.models import transformer
from safe_completion.rl import loop
from safe_completion.rl import pg
from tests.test_rl import micro_rl_config
from tests.test_sft import micro_config
from tests.test_sft_hf import write_tiny_llama

LORA = {"lora.rank": 4, "lora.alpha": 8.0}


def _host(tree):
  return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _is_adapter_path(path) -> bool:
  return str(path[-1]).endswith(("_lora_a", "_lora_b"))


def _sft_steps(mesh, config, num_steps):
  """(state, losses, base before training, held-out loss before and after) of `num_steps` LoRA SFT steps."""
  model_config = sft.model_config_from(config)
  dataset = sft_data.build_dataset(config, sft_data.load_tokenizer(config))
  optimizer, schedule = training.make_optimizer(config, config.num_steps)
  state, shardings, _ = training.create_state(model_config, optimizer, mesh, lora_config=lora.from_config(config))
  base_before = _host(state["base"].params)
  eval_fn = jax.jit(lambda params, batch: sft.eval_step(params, batch, model_config=model_config))
  eval_losses = [sft.evaluate(eval_fn, training.model_params(state), dataset, mesh)]
  step = training.jit_step(sft.train_step, shardings, mesh, model_config=model_config, optimizer=optimizer,
                           schedule=schedule)
  losses = []
  with parallel.activation_sharding(mesh):
    for i in range(num_steps):
      state, step_metrics = step(state, parallel.shard_batch(dataset.train_batch(i), mesh))
      losses.append(float(step_metrics["loss"]))
  eval_losses.append(sft.evaluate(eval_fn, training.model_params(state), dataset, mesh))
  return state, losses, base_before, eval_losses


def test_lora_sft_lowers_the_loss_trains_only_adapters_and_keeps_the_base_bit_identical():
  config = micro_config(num_steps=12, **LORA, **{"optimizer.learning_rate": 1e-2})
  state, losses, base_before, eval_losses = _sft_steps(parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                                                       config, 12)
  # The random base's frozen 0.02-scale tied embeddings bound every logit near +-1.3, so even a perfect
  # adapter moves the loss of this tiny model only by tenths: the bar is a clear, deterministic fall.
  assert eval_losses[1] < eval_losses[0] - 0.05, eval_losses
  assert np.mean(losses[-3:]) < losses[0] - 0.05, losses
  jax.tree.map(np.testing.assert_array_equal, base_before, _host(state["base"].params))
  # Params and optimizer moments are adapter-sized: every param path is an adapter, and far fewer values.
  paths = [path for path, _ in flax.traverse_util.flatten_dict(state["params"]).items()]
  assert paths and all(_is_adapter_path(p) for p in paths)
  assert len(paths) == 2 * 7  # q, k, v, o, gate, up, down.
  adapter_count = transformer.num_params(state["params"])
  assert transformer.num_params(state["opt_state"]) <= 2 * adapter_count + 16
  assert adapter_count < transformer.num_params(state["base"].params) / 10
  b = state["params"]["layers"]["mlp"]["down_proj"]["kernel_lora_b"]
  assert np.abs(np.asarray(b)).max() > 0  # B starts at zero; training moved it.


def test_only_targeted_modules_get_adapters():
  config = micro_config(**LORA, **{"lora.target_modules": ("q", "v")})
  model_config = sft.model_config_from(config)
  adapters = lora.init_adapters(model_config, lora.from_config(config), jax.random.key(0))
  assert sorted(adapters["layers"]["attn"]) == ["q_proj", "v_proj"] and "mlp" not in adapters["layers"]


@pytest.mark.parametrize("field,value,message", [
    ("lora.rank", -1, "integer >= 0"), ("lora.alpha", 0.0, "> 0"),
    ("lora.target_modules", ("q", "qkv"), "unknown: ['qkv']"), ("lora.target_modules", (), "non-empty")])
def test_bad_lora_config_is_rejected_naming_the_field(field, value, message):
  config = micro_config(**{field: value})
  with pytest.raises(ValueError, match=rf"config\.{field}=.*{message}".replace("[", r"\[").replace("]", r"\]")):
    config_checks.validate(config)


def test_sharded_lora_step_equals_single_device():
  config = micro_config(**LORA)
  single, single_losses, _, _ = _sft_steps(parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), config, 2)
  sharded, sharded_losses, _, _ = _sft_steps(parallel.make_mesh((1, 8, 1)), config, 2)
  assert sharded["params"]["layers"]["mlp"]["up_proj"]["kernel_lora_a"].sharding.spec[1] == "fsdp"
  assert sharded["base"].params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[1] == "fsdp"
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               single["params"], sharded["params"])


def _checkpointed_state_paths(workdir):
  """Key paths of the train state in the latest checkpoint, read from its metadata (no arrays)."""
  directory = os.path.join(workdir, "checkpoints")
  latest = max(int(name) for name in os.listdir(directory) if name.isdigit())
  tree = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, str(latest), "state")).item_metadata
  return [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(dict(tree))[0]]


def test_lora_sft_from_hf_exports_a_merged_model_matching_the_adapter_forward_pass(tmp_path):
  hf_dir, export_dir, workdir = tmp_path / "hf", tmp_path / "export", tmp_path / "sft"
  tokenizer = write_tiny_llama(hf_dir)

  config = micro_config(num_steps=4, **LORA, **{"init.hf_dir": str(hf_dir), "export_hf_dir": str(export_dir)})
  final = sft.train(config, str(workdir))
  assert np.isfinite(final["loss"]) and np.isfinite(final["eval_loss"])

  # The checkpoint holds the adapters, the optimizer state and the step; no base weight.
  paths = _checkpointed_state_paths(str(workdir))
  param_paths = [p for p in paths if p[0] == "params"]
  assert param_paths and all(_is_adapter_path(p) for p in param_paths)
  assert not any(p[-1] == "kernel" or p[-1] == "embedding" for p in paths)

  base, model_config = convert.load_hf_checkpoint(hf_dir)
  lora_config = lora.from_config(config)
  adapter_shapes = jax.eval_shape(lambda r: lora.init_adapters(model_config, lora_config, r), jax.random.key(0))
  adapters = checkpoint.restore_params(str(workdir / "checkpoints"), adapter_shapes)
  tokens = np.asarray([tokenizer("how do I stop a runaway process?")["input_ids"]], np.int32)
  positions = np.arange(tokens.shape[1])[None]
  ours = lora.forward(lora.LoraParams(lora.Base(base, lora_config), adapters), model_config, tokens, positions,
                      np.ones_like(tokens))
  exported = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
  initial = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens).long()).logits.numpy()
    before = initial(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  assert np.abs(before - theirs).max() > 1e-3  # The adapters moved the model, and the export carries them.
  # Eval and serve load the workdir itself: the HF base of lora.json with the adapters merged in.
  loaded, _, _ = checkpoint.load_model(str(workdir))
  np.testing.assert_allclose(_logits(loaded, model_config, tokens), theirs, atol=1e-4)


def test_lora_rl_reference_is_the_frozen_base_and_an_update_trains_only_adapters(tiny_sft_workdir, tmp_path):
  config = micro_rl_config(tiny_sft_workdir, num_steps=2, **LORA)
  last = loop.train(config, str(tmp_path))
  rows = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert len(rows) == 2 and np.isfinite(last["loss"])
  assert rows[0]["kl"] == 0.0  # Fresh adapters (B = 0): the policy is exactly the reference.
  assert rows[-1]["sampler_trainer_logprob_gap/max"] < 1e-3  # Merged sampler vs adapted trainer.
  paths = [p for p in _checkpointed_state_paths(str(tmp_path)) if p[0] == "params"]
  assert paths and all(_is_adapter_path(p) for p in paths)

  # One update with signal: the adapters move, the base (the reference) does not, and the reference
  # log-probs are the base model's.
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model_config = checkpoint.read_model_config(tiny_sft_workdir)
  sft_params, _, _ = checkpoint.load_model(tiny_sft_workdir)
  config.optimizer.warmup_steps = 0  # The first update moves the adapters.
  optimizer, _ = training.make_optimizer(config, 4)
  state, shardings, _ = training.create_state(model_config, optimizer, mesh, init_params=lambda _: sft_params,
                                              lora_config=lora.from_config(config))
  rng = np.random.default_rng(0)
  prompt_mask = np.ones((4, 5), np.int32)
  batch = loop.train_batch(rng.integers(10, 4000, (4, 5)).astype(np.int32), prompt_mask,
                           rng.integers(10, 4000, (4, 6)).astype(np.int32), np.full(4, 6), np.ones(4, bool),
                           mask_truncated=False)
  logprobs = jax.jit(lambda p, b: pg.rollout_logprobs(p, b, model_config=model_config, temperature=1.0))
  base_logprobs = np.asarray(logprobs(sft_params, batch))
  np.testing.assert_array_equal(np.asarray(logprobs(state["base"].params, batch)), base_logprobs)
  np.testing.assert_array_equal(np.asarray(logprobs(training.model_params(state), batch)), base_logprobs)
  batch.update(old_logprobs=base_logprobs, ref_logprobs=base_logprobs,
               advantages=np.asarray([1.0, -1.0, 0.5, -0.5], np.float32))
  update = training.jit_step(pg.update_step, shardings, mesh, model_config=model_config, optimizer=optimizer,
                             config=pg.PgConfig(max_completion_len=6))
  with parallel.activation_sharding(mesh):
    state, update_metrics = update(state, parallel.shard_batch(batch, mesh))
  assert float(update_metrics["update_skipped"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, _host(sft_params), _host(state["base"].params))
  np.testing.assert_array_equal(np.asarray(logprobs(state["base"].params, batch)), base_logprobs)
  assert np.abs(np.asarray(logprobs(training.model_params(state), batch)) - base_logprobs).max() > 1e-6


# ----------------------------------------------------------------------------- from a LoRA workdir: eval, RL

@pytest.fixture(scope="module")
def lora_sft_workdir(tmp_path_factory):
  """A finished LoRA SFT run on a random float32 base (its adapters trained away from B = 0)."""
  workdir = str(tmp_path_factory.mktemp("lora_sft"))
  sft.train(micro_config(num_steps=4, **LORA, **{"optimizer.learning_rate": 1e-2}), workdir)
  return workdir


def _logits(params, model_config, tokens):
  positions = np.arange(tokens.shape[1])[None].repeat(tokens.shape[0], 0)
  forward = lora.forward if isinstance(params, lora.LoraParams) else transformer.forward
  return np.asarray(forward(params, model_config, tokens, positions, np.ones_like(tokens)))


def _restored_adapters(workdir, model_config):
  lora_config, _ = checkpoint.read_lora(workdir)
  shapes = jax.eval_shape(lambda r: lora.init_adapters(model_config, lora_config, r), jax.random.key(0))
  return lora_config, checkpoint.restore_params(os.path.join(workdir, "checkpoints"), shapes)


TOKENS = np.random.default_rng(0).integers(10, 4000, (2, 9)).astype(np.int32)


def test_load_model_of_a_lora_run_gives_the_merged_model_whose_logits_equal_the_adapted_ones(lora_sft_workdir):
  params, model_config, _ = checkpoint.load_model(lora_sft_workdir)
  assert not any(_is_adapter_path(p) for p in flax.traverse_util.flatten_dict(params))
  # The base rebuilt independently: the run's random init (config.seed = 0), as training.initial_params made it.
  base = transformer.init_params(model_config, jax.random.key(0))
  lora_config, adapters = _restored_adapters(lora_sft_workdir, model_config)
  adapted = _logits(lora.LoraParams(lora.Base(base, lora_config), adapters), model_config, TOKENS)
  np.testing.assert_allclose(_logits(params, model_config, TOKENS), adapted, atol=1e-5)
  assert np.abs(_logits(base, model_config, TOKENS) - adapted).max() > 1e-3  # The adapters matter.
  # Onto a mesh (as RL and eval load it): the same model, sharded like full params.
  mesh = parallel.make_mesh((1, 8, 1))
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(model_config), mesh)
  sharded, _, _ = checkpoint.load_model(lora_sft_workdir, shardings)
  assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec[1] == "fsdp"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), sharded, params)


def test_malformed_lora_metadata_is_an_error_naming_the_file(lora_sft_workdir, tmp_path):
  workdir = tmp_path / "copy"
  workdir.mkdir()
  (workdir / checkpoint.LORA_FILE).write_text('{"rank": 4, "alpha": 8.0, "target_modules": ["q"], "base": {}}')
  with pytest.raises(ValueError, match=r"lora\.json: field 'base' must name"):
    checkpoint.read_lora(str(workdir))
  (workdir / checkpoint.LORA_FILE).write_text(
      '{"rank": 4, "alpha": 8.0, "target_modules": ["q"], "base": {"hf_dir": "/nonexistent", "seed": 0}}')
  for name in (checkpoint.MODEL_CONFIG_FILE, checkpoint.TOKENIZER_DIR, "checkpoints"):
    os.symlink(os.path.join(lora_sft_workdir, name), workdir / name)
  with pytest.raises(FileNotFoundError, match=r"lora\.json: base\.hf_dir=/nonexistent is not a directory"):
    checkpoint.load_model(str(workdir))


def test_rl_from_a_lora_sft_workdir_trains_new_adapters_on_the_frozen_merged_sft_model(lora_sft_workdir, tmp_path,
                                                                                      monkeypatch):
  saved = []  # (base, adapters) of every state the RL loop checkpoints.
  real_save = training.save

  def spy(ckpt, step, state, num_steps):
    saved.append((_host(state["base"].params), _host(state["params"])))
    real_save(ckpt, step, state, num_steps)

  monkeypatch.setattr(training, "save", spy)
  config = micro_rl_config(lora_sft_workdir, num_steps=2, **LORA, **{"optimizer.warmup_steps": 0})
  loop.train(config, str(tmp_path))
  rows = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows[0]["kl"] == 0.0  # Fresh adapters on the merged SFT model: the policy starts as the reference.
  assert min(r["update_skipped"] for r in rows) == 0.0

  sft_model, model_config, _ = checkpoint.load_model(lora_sft_workdir)
  assert len(saved) == 2
  for base, _ in saved:  # The base (and reference) is the merged SFT model, bit for bit, at every step.
    jax.tree.map(np.testing.assert_array_equal, _host(sft_model), base)
  adapters = saved[-1][1]
  assert np.abs(adapters["layers"]["mlp"]["down_proj"]["kernel_lora_b"]).max() > 0  # B left zero: trained.

  # Eval of the RL run: load_model rebuilds base (merged SFT) + RL adapters, merged.
  rl_model, _, _ = checkpoint.load_model(str(tmp_path))
  lora_config, restored = _restored_adapters(str(tmp_path), model_config)
  jax.tree.map(np.testing.assert_array_equal, adapters, _host(restored))
  adapted = _logits(lora.LoraParams(lora.Base(sft_model, lora_config), restored), model_config, TOKENS)
  np.testing.assert_allclose(_logits(rl_model, model_config, TOKENS), adapted, atol=1e-5)
  assert np.abs(_logits(sft_model, model_config, TOKENS) - adapted).max() > 1e-6


# ----------------------------------------------------------------------------- the `,lora` preset variants

@pytest.mark.parametrize("model", ["llama3_8b", "qwen2_7b"])
def test_lora_variants_parse_and_fit_v5e_8_where_full_fine_tuning_does_not(model):
  machine = slices.get_slice("v5e-8")
  sft_lora, rl_lora = sft_config.get_config(f"{model},lora"), rl_config.get_config(f"{model},lora")
  for config in (sft_lora, rl_lora):
    config_checks.validate(config)
    assert (config.lora.rank, config.lora.alpha, tuple(config.lora.target_modules)) == (16, 32.0, tuple(lora.TARGETS))
  assert sft_lora.model.param_dtype == "bfloat16" and sft_config.get_config(model).lora.rank == 0
  plans = {"sft": plan.plan_config(sft_lora, machine.mesh, machine.devices, machine.hbm_gib),
           "rl": plan.plan_config(rl_lora, machine.mesh, machine.devices, machine.hbm_gib, sft_lora)}
  for stage, stage_plan in plans.items():
    assert stage_plan.total < 0.9 * machine.hbm_gib * plan.GIB, (stage, plan.format_plan(stage_plan))
  full = plan.plan_config(sft_config.get_config(model), machine.mesh, machine.devices, machine.hbm_gib)
  assert not full.fits


def test_lora_variant_flags_combine_with_runlocal_and_unknown_flags_are_named():
  config = sft_config.get_config("llama3_8b,lora,runlocal")
  assert config.lora.rank == 16 and config.model.hidden_size == 64 and config.model.param_dtype == "bfloat16"
  assert rl_config.get_config("qwen2_7b,runlocal,lora").lora.rank == 16
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['qlora'\]; choose from \['runlocal', 'lora'\]"):
    sft_config.get_config("llama3_8b,qlora")


def test_lora_runlocal_sft_trains_adapters_on_its_bfloat16_base(tmp_path):
  # The RL side of `,lora` is test_rl_from_a_lora_sft_workdir_... on a float32 base (exact comparisons).
  config = sft_config.get_config("llama3_8b,lora,runlocal")
  config.update_from_flattened_dict({"num_steps": 1, "data.max_examples": 16, "optimizer.warmup_steps": 0,
                                     "optimizer.learning_rate": 1e-2})
  sft.train(config, str(tmp_path))
  params, model_config, _ = checkpoint.load_model(str(tmp_path))
  assert model_config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
  lora_config, adapters = _restored_adapters(str(tmp_path), model_config)
  assert lora_config.rank == 16 and {x.dtype for x in jax.tree.leaves(adapters)} == {np.dtype(np.float32)}
  assert np.abs(np.asarray(adapters["layers"]["attn"]["q_proj"]["kernel_lora_b"])).max() > 0
