"""Orbax checkpoints of a train state (a plain pytree) plus JSON metadata.

Resume is exact because everything that decides the future of a run lives in
the state (params, optimizer state, step) and the data order and rollout keys
are pure functions of (seed, step). `training` holds the resume convention.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import transformers

from safe_completion.models import transformer

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"


def manager(directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `max_to_keep` steps; async saves by default.

  A relative `directory` is taken from the working directory (orbax refuses relative paths).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict | None = None, *,
         force: bool = False) -> bool:
  """Saves `state` at `step` (when the save interval allows, or `force`)."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta or {})), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
  """Restores (state, meta) at `step` (default: latest) with the shardings of `abstract_state`.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct (with .sharding) or arrays.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the params of a train-state checkpoint (e.g. the SFT model that starts RL)."""
  with manager(directory, async_save=False) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)}
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return restored["state"]["params"]


def save_model_metadata(workdir: str, model_config: transformer.ModelConfig, tokenizer) -> None:
  """Writes what a later stage needs to rebuild the model: its config and its tokenizer."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(model_config), f, indent=2)
  tokenizer.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))


def read_model_config(workdir: str, **overrides) -> transformer.ModelConfig:
  """The model config a training stage wrote into its workdir (fields overridable, e.g. remat)."""
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not the workdir of a finished training stage")
  with open(path) as f:
    return transformer.model_config(**{**json.load(f), **overrides})


def load_model(workdir: str, param_shardings: Any = None, **config_overrides) -> tuple[Any, transformer.ModelConfig, Any]:
  """(params, model config, tokenizer) of a trained run's workdir (SFT or RL), latest step.

  With `param_shardings`, params are restored straight onto the mesh.
  """
  model_config = read_model_config(workdir, **config_overrides)
  shapes = jax.eval_shape(lambda rng: transformer.init_params(model_config, rng), jax.random.key(0))
  if param_shardings is not None:
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings)
  params = restore_params(os.path.join(workdir, "checkpoints"), shapes)
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, TOKENIZER_DIR),
                                                        trust_remote_code=False)
  return params, model_config, tokenizer
