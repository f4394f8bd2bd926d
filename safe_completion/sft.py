"""Supervised fine-tuning: masked next-token loss on the assistant's tokens.

Readable top to bottom: mesh -> data -> model and optimizer -> sharded init ->
jitted step -> restore -> loop. The train state is a plain dict pytree
(params, opt_state, step, rng); the step is `jax.jit` with explicit shardings
and the state donated.
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from safe_completion import checkpoint
from safe_completion import flops
from safe_completion import metrics as metrics_lib
from safe_completion import parallel
from safe_completion.data import sft_data
from safe_completion.models import transformer

State = dict[str, Any]


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warmup then decay and global-norm clipping; and the LR as a function of the train step.

  `num_steps` counts train (micro) steps. With gradient accumulation over k
  micro-steps the inner optimizer steps once per k, so its schedule is sized in
  optimizer steps; the returned schedule maps a micro-step to the LR in force.
  """
  opt = config.optimizer
  accum = max(opt.grad_accum_steps, 1)
  optimizer_steps = max(num_steps // accum, 1)
  decay_steps = max(optimizer_steps - opt.warmup_steps, 1)
  if opt.decay == "cosine":
    decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps, alpha=opt.final_lr_fraction)
  elif opt.decay == "linear":
    decay = optax.linear_schedule(opt.learning_rate, opt.learning_rate * opt.final_lr_fraction, decay_steps)
  elif opt.decay == "constant":
    decay = optax.constant_schedule(opt.learning_rate)
  else:
    raise ValueError(f"optimizer.decay={opt.decay!r} is not one of ['cosine', 'linear', 'constant']")
  schedule = optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), decay],
                                  [opt.warmup_steps])
  optimizer = optax.chain(optax.clip_by_global_norm(opt.clip_norm),
                          optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  if accum > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=accum)
  return optimizer, lambda micro_step: schedule(micro_step // accum)


def token_nll(params: Any, model_config: transformer.ModelConfig, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood of the next token, and its loss mask ([B, T-1] each)."""
  logits = transformer.forward(params, model_config, batch["tokens"], batch["positions"], batch["segment_ids"])
  targets = batch["tokens"][:, 1:]
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return nll, batch["loss_mask"][:, 1:].astype(jnp.float32)


def loss_fn(params: Any, model_config: transformer.ModelConfig, batch: dict) -> tuple[jax.Array, dict]:
  """Mean NLL over the assistant's tokens of the batch (a token-level mean)."""
  nll, mask = token_nll(params, model_config, batch)
  num_tokens = jnp.sum(mask)
  loss = jnp.sum(nll * mask) / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss_tokens": num_tokens}


def train_step(state: State, batch: dict, *, model_config: transformer.ModelConfig,
               optimizer: optax.GradientTransformation, schedule: Callable) -> tuple[State, dict]:
  """One optimizer step. A non-finite loss or gradient leaves the state unchanged (the host then stops)."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], model_config, batch)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
             "loss_tokens": aux["loss_tokens"]}
  return new_state, metrics


def eval_step(params: Any, batch: dict, *, model_config: transformer.ModelConfig) -> dict:
  nll, mask = token_nll(params, model_config, batch)
  return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}


def init_params(config: ml_collections.ConfigDict, model_config: transformer.ModelConfig, rng: jax.Array,
                param_shardings: Any) -> Any:
  """Random init sharded from the start, or a converted HF checkpoint placed on the mesh."""
  if config.init.hf_dir:
    from safe_completion.models import convert  # Needs only the file system, not torch.
    params, _ = convert.load_hf_checkpoint(config.init.hf_dir, dtype=model_config.dtype,
                                           param_dtype=model_config.param_dtype)
    return jax.device_put(params, param_shardings)
  return jax.jit(lambda r: transformer.init_params(model_config, r), out_shardings=param_shardings)(rng)


def build_state(config, model_config, optimizer, mesh, rng, initial_params=None):
  """Sharded train state and its shardings (optimizer moments sharded like their params).

  Params are `initial_params` when given (already on the mesh), else from `config.init`.
  """
  rules = parallel.rules_from_config(config)
  param_shardings = parallel.logical_to_shardings(transformer.logical_param_specs(model_config), mesh, rules)
  param_shapes = jax.eval_shape(lambda r: transformer.init_params(model_config, r), rng)
  parallel.check_divisible(param_shapes, param_shardings)
  if initial_params is None:
    params = init_params(config, model_config, rng, param_shardings)
  else:
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(initial_params)
  replicated = parallel.replicated(mesh)
  opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
  opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_shapes, param_shardings,
                                        transform_non_params=lambda _: replicated)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  # Placed by jit, not device_put: on several processes the replicated sharding is not addressable.
  step, rng = jax.jit(lambda r: (jnp.zeros((), jnp.int32), r), out_shardings=(replicated, replicated))(rng)
  state = {"params": params, "opt_state": opt_state, "step": step, "rng": rng}
  shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated, "rng": replicated}
  return state, shardings


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
  mesh = parallel.mesh_from_config(config)
  rules = parallel.rules_from_config(config)
  model_config = model_config_from(config)
  tokenizer = sft_data.load_tokenizer(config)
  dataset = sft_data.build_dataset(config, tokenizer)
  num_steps = config.num_steps
  optimizer, schedule = make_optimizer(config, num_steps)
  state, shardings = build_state(config, model_config, optimizer, mesh, jax.random.key(config.seed))

  batch_sharding = parallel.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model_config=model_config, optimizer=optimizer, schedule=schedule),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model_config=model_config),
                    in_shardings=(shardings["params"], batch_sharding), out_shardings=parallel.replicated(mesh))

  ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                            save_interval_steps=config.checkpoint.every_steps,
                            async_save=config.checkpoint.async_save)
  if ckpt.latest_step() is not None:
    state, _ = checkpoint.restore(ckpt, jax.tree.map(lambda x: x, state))
  start_step = int(state["step"])
  checkpoint.save_model_metadata(workdir, model_config, tokenizer)
  flops_per_token = flops.train_flops_per_token(model_config, config.data.seq_len)
  writer = metrics_lib.MetricsWriter(workdir, wandb_config=config.wandb, run_config=config.to_dict())
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
      if not (np.isfinite(step_metrics["loss"]) and np.isfinite(step_metrics["grad_norm"])):
        checkpoint.save(ckpt, step, state, {"reason": "non-finite loss or gradient"}, force=True)
        ckpt.wait_until_finished()
        raise FloatingPointError(
            f"SFT loss {step_metrics['loss']} / gradient norm {step_metrics['grad_norm']} at step {step}: "
            f"stopping; the last good state (before this step) is saved in {workdir}/checkpoints/{step}")
      tokens_per_second = int((host_batch["segment_ids"] > 0).sum()) / seconds
      last = {**step_metrics, "tokens_per_second": tokens_per_second, "step_seconds": seconds,
              "mfu": flops.mfu(tokens_per_second * flops_per_token, mesh.devices.flatten().tolist())}
      if (step + 1) % config.eval_every == 0 or step + 1 == num_steps:
        last["eval_loss"] = evaluate(eval_fn, state["params"], dataset, mesh)
      if (step + 1) % config.log_every == 0 or step + 1 == num_steps:
        writer.write(step + 1, last)
        progress.set_postfix(loss=f"{last['loss']:.3f}")
      checkpoint.save(ckpt, step + 1, state, {"num_steps": num_steps}, force=step + 1 == num_steps)
  ckpt.wait_until_finished()
  ckpt.close()
  writer.close()
  if config.export_hf_dir:
    from safe_completion.models import convert
    host_params = parallel.to_host(state["params"])  # A collective: every process takes part.
    if jax.process_index() == 0:
      convert.export_hf(host_params, model_config, config.export_hf_dir, architecture=config.export_architecture,
                        tokenizer=tokenizer)
  return last


def evaluate(eval_fn, params, dataset: "sft_data.SftDataset", mesh) -> float:
  """Token-mean NLL over the held-out batches."""
  nll_sum, tokens = 0.0, 0.0
  for batch in dataset.eval_batches():
    out = jax.device_get(eval_fn(params, parallel.shard_batch(batch, mesh)))
    nll_sum += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll_sum / max(tokens, 1.0)
