"""Supervised fine-tuning: masked next-token loss on the assistant's tokens.

Readable top to bottom: mesh -> data -> model and optimizer -> restore or
sharded init -> jitted step -> loop. The train state, its creation, the guarded
update, checkpoints and the non-finite policy are `training`'s.
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from safe_completion import checkpoint
from safe_completion import flops
from safe_completion import lora
from safe_completion import metrics as metric_writer
from safe_completion import parallel
from safe_completion import training
from safe_completion.data import sft_data
from safe_completion.models import transformer

def token_nll(params: Any, model_config: transformer.ModelConfig, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood of the next token, and its loss mask ([B, T-1] each)."""
  logprobs, _ = training.token_logprobs(params, model_config, batch)
  return -logprobs, batch["loss_mask"][:, 1:].astype(jnp.float32)


def loss_fn(params: Any, model_config: transformer.ModelConfig, batch: dict) -> tuple[jax.Array, dict]:
  """Mean NLL over the assistant's tokens of the batch (a token-level mean)."""
  nll, mask = token_nll(params, model_config, batch)
  num_tokens = jnp.sum(mask)
  loss = jnp.sum(nll * mask) / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss_tokens": num_tokens}


def train_step(state: training.State, batch: dict, *, model_config: transformer.ModelConfig,
               optimizer: optax.GradientTransformation, schedule: Callable) -> tuple[training.State, dict]:
  """One guarded optimizer step (`training.apply_gradients`); a batch without loss tokens is skipped."""
  (loss, aux), grads = training.value_and_grad(loss_fn, state, model_config, batch)
  new_state, metrics = training.apply_gradients(state, grads, loss, optimizer, has_signal=aux["loss_tokens"] > 0)
  return new_state, {**metrics, "learning_rate": schedule(state["step"]), "loss_tokens": aux["loss_tokens"]}


def eval_step(params: Any, batch: dict, *, model_config: transformer.ModelConfig) -> dict:
  nll, mask = token_nll(params, model_config, batch)
  return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}


def model_config_from(config: ml_collections.ConfigDict) -> transformer.ModelConfig:
  """The architecture: the HF checkpoint's config.json when one is given, else `config.model`."""
  if config.init.hf_dir:
    from safe_completion.models import convert
    return convert.load_hf_config(config.init.hf_dir, dtype=config.model.dtype,
                                  param_dtype=config.model.param_dtype, remat_policy=config.model.remat_policy)
  return transformer.model_config(**config.model.to_dict())


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) SFT into `workdir`; returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  training.save_config(config, workdir)
  mesh = parallel.mesh_from_config(config)
  parallel.check_batch_split(mesh, config.batch_size, "config.batch_size")
  rules = parallel.rules_from_config(config)
  model_config = model_config_from(config)
  tokenizer = sft_data.load_tokenizer(config)
  dataset = sft_data.build_dataset(config, tokenizer)
  num_steps = config.num_steps
  optimizer, schedule = training.make_optimizer(config, num_steps)
  ckpt = training.checkpoint_manager(config, workdir)
  lora_config = lora.from_config(config)
  state, shardings, start_step = training.create_state(
      model_config, optimizer, mesh, rules, ckpt,
      lambda param_shardings: training.initial_params(model_config, param_shardings, seed=config.seed,
                                                      hf_dir=config.init.hf_dir),
      lora_config=lora_config, seed=config.seed)

  step_fn = training.jit_step(train_step, shardings, mesh, model_config=model_config, optimizer=optimizer,
                              schedule=schedule)
  eval_fn = jax.jit(functools.partial(eval_step, model_config=model_config),
                    in_shardings=(training.model_params(shardings), parallel.batch_sharding(mesh)),
                    out_shardings=parallel.replicated(mesh))
  checkpoint.save_model_metadata(workdir, model_config, tokenizer, lora_config,
                                {"hf_dir": config.init.hf_dir, "seed": config.seed})
  flops_per_token = flops.train_flops_per_token(model_config, config.data.seq_len)
  peak_flops = flops.peak_flops(mesh.devices.flatten().tolist())
  writer = metric_writer.MetricsWriter(workdir, wandb_config=config.wandb, run_config=config.to_dict())
  last = {}
  with parallel.activation_sharding(mesh, rules):
    progress = tqdm.tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, desc="sft",
                         disable=jax.process_index() != 0)
    for step in progress:
      host_batch = dataset.train_batch(step)
      batch = parallel.shard_batch(host_batch, mesh)
      started = time.perf_counter()
      state, step_metrics = step_fn(state, batch)
      step_metrics = jax.device_get(step_metrics)
      seconds = time.perf_counter() - started
      training.stop_if_non_finite(ckpt, step, bool(step_metrics["non_finite"]),
                                  f"SFT loss {step_metrics['loss']} / gradient norm {step_metrics['grad_norm']}")
      tokens_per_second = int((host_batch["segment_ids"] > 0).sum()) / seconds
      last = {**step_metrics, "tokens_per_second": tokens_per_second, "step_seconds": seconds,
              "mfu": tokens_per_second * flops_per_token / peak_flops}
      if (step + 1) % config.eval_every == 0 or step + 1 == num_steps:
        last["eval_loss"] = evaluate(eval_fn, training.model_params(state), dataset, mesh)
      if (step + 1) % config.log_every == 0 or step + 1 == num_steps or "eval_loss" in last:
        writer.write(step + 1, last)  # Steps with an eval are always written, whatever log_every says.
        progress.set_postfix(loss=f"{last['loss']:.3f}")
      training.save(ckpt, step + 1, state, num_steps)
  training.close(ckpt)
  writer.close()
  if config.export_hf_dir:
    from safe_completion.models import convert
    params = state["params"]
    if lora_config is not None:  # The adapters folded into the base: a plain model for transformers and vLLM.
      params = jax.jit(lora.merge, out_shardings=shardings["base"].params)(training.model_params(state))
    host_params = parallel.to_host(params)  # A collective: every process takes part.
    if jax.process_index() == 0:
      convert.export_hf(host_params, model_config, config.export_hf_dir, architecture=config.export_architecture,
                        tokenizer=tokenizer, dtype=config.export_dtype)
  return last


def evaluate(eval_fn, params, dataset: "sft_data.SftDataset", mesh) -> float:
  """Token-mean NLL over the held-out batches."""
  nll_sum, tokens = 0.0, 0.0
  for batch in dataset.eval_batches():
    out = jax.device_get(eval_fn(params, parallel.shard_batch(batch, mesh)))
    nll_sum += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll_sum / tokens if tokens else float("nan")  # No held-out examples: no figure, not 0.
