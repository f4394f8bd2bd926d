"""Orbax checkpoints of a train state (a plain pytree) plus JSON metadata.

Resume is exact because everything that decides the future of a run lives in
the state (params, optimizer state, step) and the data order and rollout keys
are pure functions of (seed, step). `training` holds the resume convention.

A LoRA run's checkpoints hold only its adapters; `lora.json` in its workdir
says how to rebuild the frozen base they apply to (the HF checkpoint or random
init an SFT run started from, or the SFT workdir an RL run started from), and
`load_model` returns base and adapters merged, so every reader of a trained
workdir (RL, eval, `serve`) gets plain decoder params.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import transformers

from safe_completion import lora
from safe_completion.models import transformer

MODEL_CONFIG_FILE = "model_config.json"
LORA_FILE = "lora.json"
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


def save_model_metadata(workdir: str, model_config: transformer.ModelConfig, tokenizer,
                        lora_config: lora.LoraConfig | None = None, lora_base: dict | None = None) -> None:
  """Writes what a later stage needs to rebuild the model: its config, its tokenizer and, for LoRA, `lora.json`.

  `lora_base` names the frozen base: {"hf_dir": ..., "seed": ...} (what `training.initial_params` built it
  from) or {"sft_workdir": ...} (an RL run's: the SFT model, merged); paths are made absolute.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(model_config), f, indent=2)
  tokenizer.save_pretrained(os.path.join(workdir, TOKENIZER_DIR))
  lora_path = os.path.join(workdir, LORA_FILE)
  if lora_config is None:
    if os.path.exists(lora_path):  # A full fine-tuning run in a reused workdir: its checkpoints are plain params.
      os.remove(lora_path)
    return
  base = {name: os.path.abspath(value) if name in ("hf_dir", "sft_workdir") and value else value
          for name, value in (lora_base or {}).items()}
  with open(lora_path, "w") as f:
    json.dump({**dataclasses.asdict(lora_config), "base": base}, f, indent=2)


def read_model_config(workdir: str, **overrides) -> transformer.ModelConfig:
  """The model config a training stage wrote into its workdir (fields overridable, e.g. remat)."""
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not the workdir of a finished training stage")
  with open(path) as f:
    return transformer.model_config(**{**json.load(f), **overrides})


def read_lora(workdir: str) -> tuple[lora.LoraConfig, dict] | None:
  """(adapter config, base source) of a LoRA run's workdir; None for a full fine-tuning run."""
  path = os.path.join(workdir, LORA_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  try:
    base = meta["base"]
    config = lora.LoraConfig(int(meta["rank"]), float(meta["alpha"]), tuple(meta["target_modules"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: malformed LoRA metadata ({type(e).__name__}: {e}); it needs rank, alpha, "
                     "target_modules and base") from e
  if not isinstance(base, dict) or not (base.get("sft_workdir") or "seed" in base):
    raise ValueError(f"{path}: field 'base' must name an 'sft_workdir', or an 'hf_dir' and a 'seed', not {base!r}")
  return config, base


def _on(shapes: Any, shardings: Any) -> Any:
  if shardings is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _jit(fn, out_shardings: Any, **kwargs):
  return jax.jit(fn, **kwargs) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings, **kwargs)


def _lora_base(workdir: str, base: dict, model_config: transformer.ModelConfig, param_shardings: Any,
               config_overrides: dict) -> Any:
  """The frozen base of a LoRA run, rebuilt as the run built it."""
  where = os.path.join(workdir, LORA_FILE)
  if base.get("sft_workdir"):
    if not os.path.isdir(base["sft_workdir"]):
      raise FileNotFoundError(f"{where}: base.sft_workdir={base['sft_workdir']} is not a directory")
    return load_model(base["sft_workdir"], param_shardings, **config_overrides)[0]
  if base.get("hf_dir"):
    from safe_completion.models import convert  # Needs only the file system, not torch.
    if not os.path.isdir(base["hf_dir"]):
      raise FileNotFoundError(f"{where}: base.hf_dir={base['hf_dir']} is not a directory")
    return jax.device_put(convert.load_hf_params(base["hf_dir"], model_config), param_shardings)
  # The same jitted init (and key) as `training.initial_params`: the identical random base.
  return _jit(lambda r: transformer.init_params(model_config, r), param_shardings)(jax.random.key(base["seed"]))


def load_model(workdir: str, param_shardings: Any = None, **config_overrides) -> tuple[Any, transformer.ModelConfig, Any]:
  """(params, model config, tokenizer) of a trained run's workdir (SFT or RL), latest step.

  With `param_shardings`, params are restored straight onto the mesh. A LoRA
  run's params are its base with the adapters merged in (`lora.merge`, in the
  base's dtype; the base's buffers are donated to the merge, so one copy).
  """
  model_config = read_model_config(workdir, **config_overrides)
  shapes = jax.eval_shape(lambda rng: transformer.init_params(model_config, rng), jax.random.key(0))
  directory = os.path.join(workdir, "checkpoints")
  adapted = read_lora(workdir)
  if adapted is None:
    params = restore_params(directory, _on(shapes, param_shardings))
  else:
    lora_config, base_source = adapted
    base = _lora_base(workdir, base_source, model_config, param_shardings, config_overrides)
    adapter_shapes = jax.eval_shape(lambda rng: lora.init_adapters(model_config, lora_config, rng),
                                    jax.random.key(0))
    if param_shardings is not None:  # Adapters are small: replicated on the params' mesh.
      mesh = jax.tree.leaves(param_shardings)[0].mesh
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      adapter_shapes = _on(adapter_shapes, jax.tree.map(lambda _: replicated, adapter_shapes))
    adapters = restore_params(directory, adapter_shapes)
    merge = _jit(lambda b, a: lora.merge(lora.LoraParams(lora.Base(b, lora_config), a)), param_shardings,
                 donate_argnums=0)
    params = merge(base, adapters)
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, TOKENIZER_DIR),
                                                        trust_remote_code=False)
  return params, model_config, tokenizer
