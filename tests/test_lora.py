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

from safe_completion import checkpoint
from safe_completion import config_checks
from safe_completion import lora
from safe_completion import metrics
from safe_completion import parallel
from safe_completion import sft
from safe_completion import training
from safe_completion.data import sft_data
from safe_completion.models import convert
from safe_completion.models import transformer
from safe_completion.rl import loop
from safe_completion.rl import pg
from tests.test_rl import micro_rl_config
from tests.test_sft import micro_config

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
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))
  hf_config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=False)
  torch.manual_seed(0)
  hf_dir, export_dir, workdir = tmp_path / "hf", tmp_path / "export", tmp_path / "sft"
  transformers.LlamaForCausalLM(hf_config).save_pretrained(hf_dir)
  tokenizer.save_pretrained(hf_dir)

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
