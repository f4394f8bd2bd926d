"""What every trainer shares (SFT, RL, reward model): optimizer, train state, guarded update, checkpoints,
resume.

Not a stage: trainers import it, it imports no trainer.

- The train state is a plain dict {params, opt_state, step}; `step` counts optimizer
  updates. Data order and rollout keys are pure functions of (seed, loop step).
- Resume convention: checkpoint N holds the state after N loop steps (SFT train
  steps, RL iterations); a run starts at the latest checkpoint, else at 0 and
  saves its initial state as checkpoint 0.
- State creation is abstract first: shapes -> shardings -> restore the latest
  checkpoint into them; only without one are params initialised (jitted random
  init, HF conversion or the SFT model) onto the mesh. A restart never converts
  again and never holds two states.
- LoRA (`config.lora.rank` > 0): `params` are the adapters (only they train and
  live in the optimizer state and checkpoints); the frozen base rides along as
  `state["base"]` (a `lora.Base`), is rebuilt by `init_params` on every start,
  and is never donated. `model_params(state)` is what the forward pass takes.
- Non-finite policy: `apply_gradients` keeps the old state when the loss, the
  gradient or the new params are not finite; `stop_if_non_finite` then deletes
  every checkpoint from that step on (a state whose step failed is suspect) and
  raises, so the latest checkpoint on disk is finite and a rerun with a lower
  learning rate resumes from it.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from safe_completion import checkpoint
from safe_completion import lora
from safe_completion import parallel
from safe_completion.models import transformer

State = dict[str, Any]


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW from `config.optimizer` (warmup, then decay; global-norm clipping); and the LR of a train step.

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


def token_logprobs(params: Any, model_config: transformer.ModelConfig, batch: dict,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Log-probs [B, T-1] of each next token at `temperature`, and the per-token entropy (SFT and RL alike).

  `params` are decoder params, or `lora.LoraParams` for the adapted model.
  """
  forward = lora.forward if isinstance(params, lora.LoraParams) else transformer.forward
  logits = forward(params, model_config, batch["tokens"], batch["positions"], batch["segment_ids"])
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  # logit[target] - logsumexp over all T positions, then the last dropped: slicing the [B, T, V] logits first
  # costs a pad and a transposed copy of their gradient, and no [B, T, V] log-softmax is materialised.
  targets = jnp.concatenate([batch["tokens"][:, 1:], batch["tokens"][:, :1]], axis=1)
  normalizer = jax.nn.logsumexp(logits, axis=-1)
  logprobs = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - normalizer
  entropy = normalizer - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
  return logprobs[:, :-1], entropy[:, :-1]


def model_params(state: State) -> Any:
  """What the forward pass takes: the params, or with LoRA the frozen base and the adapters (`lora.LoraParams`)."""
  if "base" in state:
    return lora.LoraParams(state["base"], state["params"])
  return state["params"]


def trained(state: State) -> State:
  """The state without the frozen LoRA base: what the optimizer updates and checkpoints hold."""
  return {name: value for name, value in state.items() if name != "base"}


def value_and_grad(loss_fn: Callable, state: State, *args) -> tuple[tuple[jax.Array, Any], Any]:
  """((loss, aux), grads) of `loss_fn(model_params(state), *args)`, the gradient w.r.t. `state["params"]` only."""
  if "base" not in state:
    return jax.value_and_grad(loss_fn, has_aux=True)(state["params"], *args)
  adapted = lambda adapters, *rest: loss_fn(lora.LoraParams(state["base"], adapters), *rest)
  return jax.value_and_grad(adapted, has_aux=True)(state["params"], *args)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def apply_gradients(state: State, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation,
                    has_signal: jax.Array | bool = True) -> tuple[State, dict]:
  """The one guarded optimizer step of every trainer.

  The state stays unchanged when the loss, the gradient or the new params are
  not finite (`non_finite` = 1; the host then stops), or when the batch
  carries no signal (no loss tokens, no nonzero advantage). Both count in
  `update_skipped`.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
  apply = finite & jnp.asarray(has_signal)
  new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
  new_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, trained(state))
  return {**state, **new_state}, {"loss": loss, "grad_norm": grad_norm, "non_finite": 1.0 - finite.astype(jnp.float32),
                     "update_skipped": 1.0 - apply.astype(jnp.float32)}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json`: the resolved config of the run (mesh and sharding rules included), from process 0."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))


def checkpoint_manager(config: ml_collections.ConfigDict, workdir: str) -> ocp.CheckpointManager:
  """The manager of `<workdir>/checkpoints`, as `config.checkpoint` says."""
  return checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                            save_interval_steps=config.checkpoint.every_steps,
                            async_save=config.checkpoint.async_save)


def param_shardings(model_config: transformer.ModelConfig, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings of the model's params by the logical `rules`; a param dimension the mesh cannot
  split evenly is an error naming the param, before anything is loaded or allocated."""
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(model_config), mesh, rules)
  shapes = jax.eval_shape(lambda rng: transformer.init_params(model_config, rng), jax.random.key(0))
  parallel.check_divisible(shapes, shardings)
  return shardings


def state_shardings(model_config: transformer.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules,
                    lora_config: lora.LoraConfig | None = None) -> tuple[State, State]:
  """(abstract state with shardings, shardings), allocating nothing; optimizer moments shard like their params.

  With `lora_config` the params are the adapters; the abstract state is what a
  checkpoint holds (no base) and the shardings add the base's as `"base"`.
  """
  base_shardings = param_shardings(model_config, mesh, rules)
  if lora_config is None:
    param_shapes = jax.eval_shape(lambda r: transformer.init_params(model_config, r), jax.random.key(0))
    trained_shardings = base_shardings
  else:
    param_shapes = jax.eval_shape(functools.partial(lora.init_adapters, model_config, lora_config), jax.random.key(0))
    trained_shardings = parallel.logical_to_shardings(lora.logical_adapter_specs(model_config, lora_config), mesh,
                                                      rules)
    parallel.check_divisible(param_shapes, trained_shardings)
  replicated = parallel.replicated(mesh)
  opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
  opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_shapes, trained_shardings,
                                        transform_non_params=lambda _: replicated)
  shardings = {"params": trained_shardings, "opt_state": opt_shardings, "step": replicated}
  shapes = {"params": param_shapes, "opt_state": opt_shapes, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  if lora_config is not None:
    shardings = {**shardings, "base": lora.Base(base_shardings, lora_config)}
  return abstract, shardings


def initial_params(model_config: transformer.ModelConfig, param_shardings: Any, *, seed: int,
                   hf_dir: str = "") -> Any:
  """A converted HF checkpoint placed on the mesh when `hf_dir` is set, else a jitted random init sharded from the start."""
  if hf_dir:
    from safe_completion.models import convert  # Needs only the file system, not torch.
    params, _ = convert.load_hf_checkpoint(hf_dir, dtype=model_config.dtype, param_dtype=model_config.param_dtype)
    return jax.device_put(params, param_shardings)
  return jax.jit(lambda r: transformer.init_params(model_config, r), out_shardings=param_shardings)(
      jax.random.key(seed))


def create_state(model_config: transformer.ModelConfig, optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES, ckpt: ocp.CheckpointManager | None = None,
                 init_params: Callable[[Any], Any] | None = None, lora_config: lora.LoraConfig | None = None,
                 seed: int = 0) -> tuple[State, State, int]:
  """(state, shardings, loop step to start at): the latest checkpoint of `ckpt` restored, else a new state.

  `init_params(param_shardings)` returns params on the mesh that the state may
  own (they are donated); it runs only when there is no checkpoint (default: a
  random init from seed 0). A new state is saved as checkpoint 0 of `ckpt`.
  With `lora_config`, `init_params` gives the frozen base on every start (it
  is not donated) and fresh adapters come from `seed`.
  """
  abstract, shardings = state_shardings(model_config, optimizer, mesh, rules, lora_config)
  init_params = init_params or functools.partial(initial_params, model_config, seed=0)
  base = {} if lora_config is None else {"base": lora.Base(init_params(shardings["base"].params), lora_config)}
  if ckpt is not None and ckpt.latest_step() is not None:
    state, _ = checkpoint.restore(ckpt, abstract)
    return {**state, **base}, shardings, ckpt.latest_step()
  # Placed by jit, not device_put: on several processes the replicated sharding is not addressable.
  build = jax.jit(lambda p: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)},
                  out_shardings=trained(shardings), donate_argnums=0)
  if lora_config is None:
    state = build(init_params(shardings["params"]))
  else:
    adapters = jax.jit(functools.partial(lora.init_adapters, model_config, lora_config),
                       out_shardings=shardings["params"])(jax.random.key(seed))
    state = {**build(adapters), **base}
  if ckpt is not None:
    checkpoint.save(ckpt, 0, trained(state), {"reason": "initial state"}, force=True)
  return state, shardings, 0


def jit_step(step_fn: Callable, shardings: State, mesh: jax.sharding.Mesh, **static) -> Callable:
  """`step_fn(state, batch, **static)` jitted with the state donated, the batch split, metrics replicated.

  A LoRA base is an argument of its own, not donated: the step reads it and hands the same arrays back.
  """
  if "base" not in shardings:
    return jax.jit(functools.partial(step_fn, **static), in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)

  def adapted_step(base, state, batch):
    new_state, metrics = step_fn({**state, "base": base}, batch, **static)
    return trained(new_state), metrics

  jitted = jax.jit(adapted_step, in_shardings=(shardings["base"], trained(shardings), parallel.batch_sharding(mesh)),
                   out_shardings=(trained(shardings), parallel.replicated(mesh)), donate_argnums=1)

  def step(state, batch):
    new_state, metrics = jitted(state["base"], trained(state), batch)
    return {**new_state, "base": state["base"]}, metrics

  return step


def stop_if_non_finite(ckpt: ocp.CheckpointManager, step: int, non_finite: bool, what: str) -> None:
  """After loop step `step`: when its update was not finite, keeps only earlier checkpoints and raises."""
  if not non_finite:
    return
  ckpt.wait_until_finished()
  for saved in ckpt.all_steps():
    if saved >= step:  # The state this step started from produced it: not a state to resume from.
      ckpt.delete(saved)
  kept = ckpt.latest_step()
  where = (f"the last finite state is checkpoint {kept} in {ckpt.directory}; lower the learning rate and rerun "
           "to resume from it" if kept is not None else "no earlier checkpoint is kept; a rerun starts afresh")
  raise FloatingPointError(f"{what} at step {step} is not finite: stopping; {where}")


def save(ckpt: ocp.CheckpointManager, step: int, state: State, num_steps: int) -> None:
  """Checkpoint `step` (loop steps done) when the interval says so, and always the last one."""
  checkpoint.save(ckpt, step, trained(state), {"num_steps": num_steps}, force=step == num_steps)


def close(ckpt: ocp.CheckpointManager) -> None:
  ckpt.wait_until_finished()
  ckpt.close()
