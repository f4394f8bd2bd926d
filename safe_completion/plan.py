r"""Memory plan: bytes per device of a model preset on a mesh, before renting the slice.

  python -m safe_completion.plan --model=llama3_8b --mesh=1,-1,4 --devices=16 --hbm_gib=16
  python -m safe_completion.plan --model=llama3_8b --slice=v5p-8 --stage=rl

Params, gradients and AdamW moments come from the real param shapes
(`jax.eval_shape` of `init_params`) and the real shardings (the logical axis
rules mapped over the mesh), so they are exact. Activations and logits are
estimates (formulas in `activation_bytes_per_token` and `logits_bytes`); XLA
also keeps some HBM for itself, so treat a plan above ~90% of HBM as a no.

Batch sizes and sequence lengths default to the stage config's preset of the
same name (`configs/sft.py:llama3_8b`); the mesh to the one `launch/tpu.py`
passes on `--slice`, else to the stage preset's.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags

from configs import common
from configs import launch as launch_presets
from safe_completion import lora
from safe_completion import parallel
from safe_completion.models import sampling
from safe_completion.models import transformer

GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_config(name: str, **overrides) -> transformer.ModelConfig:
  """The ModelConfig of a `configs/common.py` preset (TPU numerics for real models)."""
  if name not in common.MODELS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(common.MODELS)}")
  return transformer.model_config(**common.model(name, **overrides).to_dict())


def axis_sizes(mesh_shape: Sequence[int], devices: int) -> dict[str, int]:
  """{mesh axis: size} with -1 resolved against the device count."""
  return dict(zip(parallel.MESH_AXES, parallel.resolve_mesh_shape(mesh_shape, devices)))


def split_factors(logical_spec: Sequence[Any], sizes: dict[str, int], rules=parallel.DEFAULT_RULES) -> list[int]:
  """How many ways each dimension is split: the product of the mesh axes its logical name maps to."""
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
  factors = []
  for axes in tuple(mesh_spec) + (None,) * (len(logical_spec) - len(mesh_spec)):
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    factors.append(int(np.prod([sizes[a] for a in axes])))
  return factors


def sharded_nbytes(shape: Sequence[int], dtype: Any, factors: Sequence[int]) -> int:
  """Bytes of one device's shard (uneven splits rounded up, as XLA pads them)."""
  elements = math.prod(-(-dim // factor) for dim, factor in zip(shape, factors))
  return elements * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ParamStats:
  count: int  # Parameters in the model.
  bytes_per_device: int  # One device's shard of all params, in param_dtype.
  layer_bytes_per_device: int  # The part in the stacked decoder layers (what the sampler copies per layer).
  indivisible: tuple[str, ...]  # Params whose dimension the mesh cannot split evenly (an error at run time).


def param_stats(config: transformer.ModelConfig, sizes: dict[str, int], rules=parallel.DEFAULT_RULES) -> ParamStats:
  """Param count and per-device bytes from the real shapes and logical shardings, without allocating."""
  shapes = jax.eval_shape(lambda rng: transformer.init_params(config, rng), jax.random.key(0))
  specs = transformer.logical_param_specs(config)
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  count = per_device = layers = 0
  indivisible = []
  for (path, shape), spec in zip(flat_shapes, flat_specs):
    factors = split_factors(spec, sizes, rules)
    count += math.prod(shape.shape)
    nbytes = sharded_nbytes(shape.shape, shape.dtype, factors)
    per_device += nbytes
    layers += nbytes if jax.tree_util.keystr(path).startswith("['layers']") else 0
    if any(dim % factor for dim, factor in zip(shape.shape, factors)):
      indivisible.append(f"{jax.tree_util.keystr(path)} {shape.shape} split {tuple(factors)}")
  return ParamStats(count, per_device, layers, tuple(indivisible))


def adapter_bytes(config: transformer.ModelConfig, lora_config: lora.LoraConfig, sizes: dict[str, int],
                  rules=parallel.DEFAULT_RULES) -> tuple[int, int]:
  """(count, one device's bytes) of the float32 LoRA adapters, sharded as qwix names their axes."""
  shapes = jax.eval_shape(lambda rng: lora.init_adapters(config, lora_config, rng), jax.random.key(0))
  specs = lora.logical_adapter_specs(config, lora_config)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  nbytes = sum(sharded_nbytes(x.shape, x.dtype, split_factors(spec, sizes, rules))
               for x, spec in zip(jax.tree.leaves(shapes), flat_specs))
  return count, nbytes


def kv_cache_bytes(config: transformer.ModelConfig, batch: int, max_len: int, sizes: dict[str, int],
                   rules=parallel.DEFAULT_RULES) -> int:
  """One device's share of `init_cache(config, batch, max_len)`, laid out as `sampling.cache_layout()` says.

  k and v: one [batch, kv_heads, max_len, head_dim] array per layer in the compute dtype,
  plus the int32 key segment ids [batch, max_len] and the write index.
  """
  layout = sampling.cache_layout()
  layer_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  kv = sum(sharded_nbytes(layer_shape, config.compute_dtype, split_factors(layout[name], sizes, rules))
           for name in ("k", "v"))
  segments = sharded_nbytes((batch, max_len), np.int32, split_factors(layout["segment_ids"], sizes, rules))
  return config.num_layers * kv + segments + np.dtype(np.int32).itemsize


def activation_bytes_per_token(config: transformer.ModelConfig, policy: str, seq_len: int, heads_split: int = 1,
                               mlp_split: int = 1) -> dict[str, float]:
  """Estimated bytes per token that the backward pass keeps, per layer and transiently.

  Per layer and token, in compute-dtype elements (d = hidden, H/K = query/kv heads,
  D = head_dim, F = mlp_dim, T = seq_len; head and MLP widths divided by their
  tensor split):
    carry  (every policy: the scanned layer's input)      d
    proj   (weight matmul outputs: q, k, v, o, gate, up, down)  (H + 2K) D + 2 d + 2 F
    attn   (batched matmuls: scores, probs @ v)            H T + H D
    other  (norms, residual, RoPE, f32 softmax, GLU)       3 d + (H + K) D + 4 H T + 2 F
  Saved per layer: full = carry; dots_no_batch = carry + proj; dots = carry + proj + attn;
  none = all four. With remat, backward recomputes one layer at a time, so one layer's
  full set is alive on top ("transient").
  """
  d, dk = config.hidden_size, config.head_dim
  heads, kv_heads, mlp = config.num_heads / heads_split, config.num_kv_heads / heads_split, config.mlp_dim / mlp_split
  carry = d
  proj = (heads + 2 * kv_heads) * dk + 2 * d + 2 * mlp
  attn = heads * seq_len + heads * dk
  other = 3 * d + (heads + kv_heads) * dk + 4 * heads * seq_len + 2 * mlp
  saved = {"full": carry, "dots_no_batch": carry + proj, "dots": carry + proj + attn,
           "none": carry + proj + attn + other}
  if policy not in saved:
    raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(saved)}")
  width = _BYTES[config.dtype]
  transient = 0 if policy == "none" else saved["none"]
  return {"per_layer": saved[policy] * width, "transient": transient * width}


def logits_bytes(config: transformer.ModelConfig, tokens: int, vocab_split: int) -> int:
  """f32 logits and their log-softmax (or its gradient), [tokens, vocab / split] each."""
  return 2 * tokens * -(-config.vocab_size // vocab_split) * 4


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  nbytes: int
  phase: str  # "state" is always resident; of the other phases only the largest is alive at once.
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
  header: str
  rows: tuple[Row, ...]
  hbm_bytes: int
  params: ParamStats
  batch_split: int = 1  # Devices a batch is split over (data x fsdp).
  update_batch: int = 0  # The batch of the update phase, for the "largest batch" hint.

  def phase_bytes(self) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in self.rows:
      totals[row.phase] = totals.get(row.phase, 0) + row.nbytes
    return totals

  @property
  def peak_phase(self) -> str:
    phases = {k: v for k, v in self.phase_bytes().items() if k != "state"}
    return max(phases, key=phases.get) if phases else "state"

  @property
  def total(self) -> int:
    totals = self.phase_bytes()
    return totals.get("state", 0) + (totals.get(self.peak_phase, 0) if self.peak_phase != "state" else 0)

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm_bytes

  def largest_update_batch(self) -> int:
    """The largest batch_size whose update phase fits next to the state (update bytes are linear in it)."""
    totals = self.phase_bytes()
    rows_per_device = self.update_batch // self.batch_split
    if not rows_per_device or not totals.get("update"):
      return 0
    free = self.hbm_bytes - totals.get("state", 0)
    return max(free // (totals["update"] // rows_per_device), 0) * self.batch_split


def _split(name: str, sizes: dict[str, int], rules) -> int:
  return split_factors((name,), sizes, rules)[0]


def _batch_per_device(batch: int, sizes: dict[str, int], rules, what: str) -> int:
  split = _split("activation_batch", sizes, rules)
  if batch % split:
    raise ValueError(f"{what}={batch} is not divisible by the batch axes (data x fsdp = {split})")
  return batch // split


def _update_rows(config, batch: int, seq_len: int, sizes, rules, label: str, phase: str) -> list[Row]:
  """Activations and logits of a forward + backward pass over [batch, seq_len]."""
  tokens = _batch_per_device(batch, sizes, rules, "batch_size") * seq_len
  per_token = activation_bytes_per_token(config, config.remat_policy, seq_len, _split("activation_heads", sizes, rules),
                                         _split("activation_mlp", sizes, rules))
  activations = tokens * (config.num_layers * per_token["per_layer"] + per_token["transient"])
  return [Row(f"activations ({label})", int(activations), phase,
              f"remat={config.remat_policy}, {tokens} tokens/device x {config.num_layers} layers"),
          Row(f"logits ({label})", logits_bytes(config, tokens, _split("vocab", sizes, rules)), phase,
              "f32 logits + log-softmax")]


def make_plan(model: str, mesh_shape: Sequence[int], devices: int, hbm_gib: float, batch_size: int, seq_len: int,
              stage: str = "sft", rl_batch: int = 0, max_new_tokens: int = 0, grad_accum_steps: int = 1,
              rules=parallel.DEFAULT_RULES, lora_rank: int = 0, **model_overrides) -> Plan:
  """Per-device memory of one SFT train step, or of one RL step (rollout, log-probs, update).

  For RL, `seq_len` is the prompt length, `rl_batch` the rollout batch (prompts x samples)
  and `batch_size` the update minibatch; sequences are prompt + `max_new_tokens` long.
  With `lora_rank` > 0 (adapters on q, k, v, o, gate, up, down) the base is frozen: gradients
  and moments are the float32 adapters'; RL's reference is the base itself, and the sampler runs
  merged weights (a params-sized copy). The adapters' own activations (r per target) are ignored.
  """
  if stage not in ("sft", "rl"):
    raise ValueError(f"stage={stage!r} is not one of ['rl', 'sft']")
  config = model_config(model, **model_overrides)
  sizes = axis_sizes(mesh_shape, devices)
  params = param_stats(config, sizes, rules)
  # Moments take the params' dtype (optax's mu_dtype=None); gradients are params-shaped too.
  rows = [Row("params", params.bytes_per_device, "state", f"{params.count / 1e9:.2f}B x {config.param_dtype}"
               + (", frozen base" if lora_rank else ""))]
  trained, trained_dtype = params.bytes_per_device, config.param_dtype
  if lora_rank:
    lora_config = lora.LoraConfig(lora_rank, 2.0 * lora_rank, tuple(lora.TARGETS))
    count, trained = adapter_bytes(config, lora_config, sizes, rules)
    trained_dtype = "float32 adapters"
    rows.append(Row("LoRA adapters", trained, "state", f"rank {lora_rank}, {count / 1e6:.1f}M x float32"))
  rows += [Row("optimizer (AdamW mu, nu)", 2 * trained, "state", f"2 x {trained_dtype}"),
           Row("gradients", trained, "state", trained_dtype)]
  if grad_accum_steps > 1:  # optax.MultiSteps keeps a params-shaped sum of the micro-batch gradients.
    rows.append(Row("gradient accumulator", trained, "state", f"{grad_accum_steps} micro-batches"))
  if stage == "sft":
    rows += _update_rows(config, batch_size, seq_len, sizes, rules, "train step", "update")
  else:
    total_len = seq_len + max_new_tokens
    if lora_rank:  # The reference is the frozen base; the sampler runs base + adapters merged.
      rows.append(Row("merged weights (rollout)", params.bytes_per_device, "rollout", "lora.merge for the sampler"))
    else:
      rows.append(Row("reference params", params.bytes_per_device, "state", "frozen SFT model"))
    cache_len = total_len - 1  # The sampler never feeds back its last token.
    # `sampling.sample` splits the stacked layer weights into per-layer arrays (`unstack_params`): a copy.
    rows.append(Row("sampler weights (rollout)", params.layer_bytes_per_device, "rollout",
                    "per-layer copy of the stacked layers"))
    rows.append(Row("KV cache (rollout)", kv_cache_bytes(config, rl_batch, cache_len, sizes, rules), "rollout",
                    f"{rl_batch} seqs x {cache_len} slots, {config.dtype}"))
    tokens = _batch_per_device(rl_batch, sizes, rules, "rl_batch") * total_len
    rows.append(Row("logits (log-prob pass)", logits_bytes(config, tokens, _split("vocab", sizes, rules)), "logprobs",
                    f"whole rollout batch, {tokens} tokens/device"))
    rows += _update_rows(config, batch_size, total_len, sizes, rules, "update", "update")
  mesh = ",".join(f"{axis}={size}" for axis, size in sizes.items())
  header = (f"{model} {stage} on {devices} devices (mesh {mesh}), params {config.param_dtype}, "
            f"compute {config.dtype}" + (f", LoRA rank {lora_rank}" if lora_rank else ""))
  return Plan(header, tuple(rows), int(hbm_gib * GIB), params, _split("activation_batch", sizes, rules), batch_size)


def format_plan(plan: Plan) -> str:
  """The table, the total against HBM, and a fit verdict."""
  lines = [plan.header, f"{'row':<28}{'GiB/device':>12}  {'phase':<9}note"]
  lines += [f"{row.name:<28}{row.nbytes / GIB:>12.2f}  {row.phase:<9}{row.note}" for row in plan.rows]
  lines.append(f"{'total (state + ' + plan.peak_phase + ')':<28}{plan.total / GIB:>12.2f}")
  lines.append(f"{'HBM':<28}{plan.hbm_bytes / GIB:>12.2f}")
  for problem in plan.params.indivisible:
    lines.append(f"ERROR: indivisible param {problem}: change the mesh or config.mesh.rules")
  if plan.fits:
    lines.append(f"fits: {plan.total / GIB:.2f} GiB of {plan.hbm_bytes / GIB:.2f} GiB per device "
                 f"({100 * plan.total / plan.hbm_bytes:.0f}%)")
  else:
    lines.append(f"does not fit: needs {plan.total / GIB:.2f} GiB per device, the device has "
                 f"{plan.hbm_bytes / GIB:.2f} GiB (peak phase: {plan.peak_phase})")
    totals = plan.phase_bytes()
    for phase in sorted(set(totals) - {"state", "update"}):
      if totals["state"] + totals[phase] > plan.hbm_bytes:
        lines.append(f"the {phase} phase alone needs {(totals['state'] + totals[phase]) / GIB:.2f} GiB: "
                     "lower --rl_batch or --max_new_tokens")
    largest = plan.largest_update_batch()
    lines.append(f"largest batch_size whose update fits: {largest}" if largest else
                 "no batch_size fits next to the state: use more devices or shard more (fsdp)")
  return "\n".join(lines)


def stage_defaults(stage: str, model: str) -> dict[str, Any]:
  """batch/seq/mesh of `configs/<stage>.py:<model>` when that preset exists, else {}."""
  module = __import__(f"configs.{stage}", fromlist=["get_config"])
  try:
    config = module.get_config(model)
  except ValueError:
    return {}
  if stage == "sft":
    return {"batch_size": config.batch_size, "seq_len": config.data.seq_len, "mesh": tuple(config.mesh.shape)}
  rl = config.rl
  rl_batch = rl.prompts_per_step * rl.samples_per_prompt
  return {"batch_size": rl_batch // rl.minibatches, "seq_len": rl.max_prompt_len, "rl_batch": rl_batch,
          "max_new_tokens": rl.max_new_tokens, "mesh": tuple(config.mesh.shape)}


def launch_mesh(model: str, slice_name: str | None) -> tuple[int, ...] | None:
  """The mesh `launch/tpu.py` passes on this slice: the model preset's on its own slice, else the slice's."""
  if not slice_name:
    return None
  preset = launch_presets.MODEL_PRESETS.get(model)
  if preset and preset.slice == slice_name:
    return preset.mesh
  return launch_presets.get_slice(slice_name).mesh


_MODEL = flags.DEFINE_string("model", "llama3_8b", "Model preset of configs/common.py.")
_STAGE = flags.DEFINE_enum("stage", "sft", ["sft", "rl"], "Which step to plan.")
_SLICE = flags.DEFINE_string("slice", None, f"TPU slice or GPU host {sorted(launch_presets.SLICES)} "
                             f"{sorted(launch_presets.GPU_HOSTS)}: devices, HBM, mesh.")
_MESH = flags.DEFINE_list("mesh", None, "Mesh shape data,fsdp,tensor (-1 = the rest); default: stage preset or slice.")
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices; default: the slice's.")
_HBM = flags.DEFINE_float("hbm_gib", None, "HBM per device, GiB; default: the slice's or --device_kind's.")
_DEVICE_KIND = flags.DEFINE_enum("device_kind", None, sorted(launch_presets.DEVICE_HBM_GIB), "Device whose HBM to use.")
_BATCH = flags.DEFINE_integer("batch_size", None, "SFT batch, or RL update minibatch; default: stage preset.")
_SEQ = flags.DEFINE_integer("seq_len", None, "SFT sequence length, or RL prompt length; default: stage preset.")
_RL_BATCH = flags.DEFINE_integer("rl_batch", None, "RL rollout batch (prompts x samples); default: stage preset.")
_NEW = flags.DEFINE_integer("max_new_tokens", None, "RL completion length; default: stage preset.")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "config.optimizer.grad_accum_steps (adds an accumulator).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "config.lora.rank: > 0 trains only LoRA adapters on a frozen base.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                                 "Override the preset's (a frozen LoRA base needs no float32 master copy).")
_REMAT = flags.DEFINE_enum("remat_policy", None, ["none", "full", "dots", "dots_no_batch"], "Override the preset's.")


def main(argv: Sequence[str]) -> None:
  del argv
  defaults = stage_defaults(_STAGE.value, _MODEL.value)
  tpu = launch_presets.get_slice(_SLICE.value) if _SLICE.value else None
  hbm = _HBM.value or (launch_presets.DEVICE_HBM_GIB[_DEVICE_KIND.value] if _DEVICE_KIND.value else None)
  hbm = hbm or (tpu.hbm_gib if tpu else None)
  devices = _DEVICES.value or (tpu.devices if tpu else None)
  mesh = launch_mesh(_MODEL.value, _SLICE.value) or defaults.get("mesh")
  mesh = [int(s) for s in _MESH.value] if _MESH.value else mesh
  values = {"batch_size": _BATCH.value, "seq_len": _SEQ.value, "rl_batch": _RL_BATCH.value,
            "max_new_tokens": _NEW.value}
  values = {k: v if v is not None else defaults.get(k) for k, v in values.items()}
  needed = {"--devices or --slice": devices, "--hbm_gib, --device_kind or --slice": hbm, "--mesh": mesh,
            "--batch_size": values["batch_size"], "--seq_len": values["seq_len"]}
  if _STAGE.value == "rl":
    needed.update({"--rl_batch": values["rl_batch"], "--max_new_tokens": values["max_new_tokens"]})
  missing = [name for name, value in needed.items() if value is None]
  if missing:
    raise app.UsageError(f"no preset default for {_MODEL.value} {_STAGE.value}; pass {', '.join(missing)}")
  overrides = {"remat_policy": _REMAT.value} if _REMAT.value else {}
  if _PARAM_DTYPE.value:
    overrides["param_dtype"] = _PARAM_DTYPE.value
  plan = make_plan(_MODEL.value, mesh, devices, hbm, stage=_STAGE.value, rl_batch=values["rl_batch"] or 0,
                   max_new_tokens=values["max_new_tokens"] or 0, grad_accum_steps=_ACCUM.value,
                   batch_size=values["batch_size"],
                   seq_len=values["seq_len"], lora_rank=_LORA_RANK.value, **overrides)
  print(format_plan(plan))


if __name__ == "__main__":
  app.run(main)
