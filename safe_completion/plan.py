r"""Memory plan: bytes per device of a stage config on a mesh, before renting the slice.

  python -m safe_completion.plan --config=configs/sft.py:llama3_8b --slice=v5p-8
  python -m safe_completion.plan --config=configs/rl.py:llama3_8b --sft_config=configs/sft.py:llama3_8b \
      --slice=v5p-8
  python -m safe_completion.plan --config=configs/sft.py:llama3_8b --config.batch_size=4 \
      --mesh=1,-1,4 --devices=16 --hbm_gib=16

Params, gradients and AdamW moments come from the real param shapes
(`jax.eval_shape` of `init_params`) and the real shardings (the config's logical
axis rules mapped over the mesh), so they are exact. Activations and logits are
estimates (formulas in `activation_bytes_per_token` and `logits_bytes`); XLA
also keeps some HBM for itself, so treat a plan above ~90% of HBM as a no.

Everything about the run comes from the stage config, as `main` reads it (any
field overridable with `--config.a.b=v`): the model, batch sizes, lengths,
gradient accumulation, LoRA and sharding rules. An RL config takes its model
from the SFT run it starts from: `config.init.sft_workdir` when set, else the
SFT config of `--sft_config`. The mesh is `--mesh`, else the slice's, else the
config's.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from safe_completion import checkpoint
from safe_completion import lora
from safe_completion import parallel
from safe_completion import slices
from safe_completion.models import sampling
from safe_completion.models import transformer

GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def make_plan(config: transformer.ModelConfig, mesh_shape: Sequence[int], devices: int, hbm_gib: float,
              batch_size: int, seq_len: int, stage: str = "sft", rl_batch: int = 0, max_new_tokens: int = 0,
              grad_accum_steps: int = 1, rules=parallel.DEFAULT_RULES, lora_rank: int = 0, name: str = "model") -> Plan:
  """Per-device memory of one SFT train step, or of one RL step (rollout, log-probs, update).

  For RL, `seq_len` is the prompt length, `rl_batch` the rollout batch (prompts x samples)
  and `batch_size` the update minibatch; sequences are prompt + `max_new_tokens` long.
  With `lora_rank` > 0 (adapters on q, k, v, o, gate, up, down) the base is frozen: gradients
  and moments are the float32 adapters'; RL's reference is the base itself, and the sampler runs
  merged weights (a params-sized copy). The adapters' own activations (r per target) are ignored.
  """
  if stage not in ("sft", "rl"):
    raise ValueError(f"stage={stage!r} is not one of ['rl', 'sft']")
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
  header = (f"{name} {stage} on {devices} devices (mesh {mesh}), params {config.param_dtype}, "
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


def model_of(config: ml_collections.ConfigDict,
             sft_config: ml_collections.ConfigDict | None = None) -> transformer.ModelConfig:
  """The architecture a stage config trains, as the stage builds it.

  SFT: the HF checkpoint's config.json when `init.hf_dir` is set, else `config.model`.
  RL: the model of the SFT run it starts from (`init.sft_workdir`, else `sft_config`), with RL's remat policy.
  """
  if config.stage == "sft":
    if config.init.hf_dir:
      from safe_completion.models import convert
      return convert.load_hf_config(config.init.hf_dir, dtype=config.model.dtype,
                                    param_dtype=config.model.param_dtype, remat_policy=config.model.remat_policy)
    return transformer.model_config(**config.model.to_dict())
  if config.stage != "rl":
    raise ValueError(f"config.stage={config.stage!r}: plan sizes 'sft' and 'rl' configs")
  if config.init.sft_workdir:
    return checkpoint.read_model_config(config.init.sft_workdir, remat_policy=config.model.remat_policy)
  if sft_config is None:
    raise ValueError("an RL config takes its model from the SFT run: set config.init.sft_workdir or pass "
                     "--sft_config=configs/sft.py:<preset>")
  return dataclasses.replace(model_of(sft_config), remat_policy=config.model.remat_policy)


def plan_config(config: ml_collections.ConfigDict, mesh_shape: Sequence[int], devices: int, hbm_gib: float,
                sft_config: ml_collections.ConfigDict | None = None, name: str = "model") -> Plan:
  """`make_plan` of an SFT or RL stage config: model, batches, lengths, accumulation, LoRA and rules from it."""
  sizes = {"grad_accum_steps": config.optimizer.grad_accum_steps, "rules": parallel.rules_from_config(config),
           "lora_rank": config.lora.rank}
  if config.stage == "rl":
    rl = config.rl
    rl_batch = rl.prompts_per_step * rl.samples_per_prompt
    sizes.update(batch_size=rl_batch // rl.minibatches, seq_len=rl.max_prompt_len, rl_batch=rl_batch,
                 max_new_tokens=rl.max_new_tokens)
  else:
    sizes.update(batch_size=config.batch_size, seq_len=config.data.seq_len)
  return make_plan(model_of(config, sft_config), mesh_shape, devices, hbm_gib, stage=config.stage, name=name,
                   **sizes)


def preset_name(config_arg: str) -> str:
  """`configs/sft.py:llama3_8b,runlocal` -> `llama3_8b,runlocal` (the file's stem without a preset)."""
  path, _, arg = config_arg.partition(":")
  return arg or path.rsplit("/", 1)[-1].removesuffix(".py")


def _define_flags() -> None:
  """The CLI's flags, defined only when plan runs as a program: `main` imported beside it defines `config` too."""
  config_flags.DEFINE_config_file("config", None, "Stage config, e.g. configs/sft.py:llama3_8b.")
  config_flags.DEFINE_config_file(
      "sft_config", None, "RL only: the SFT config whose model RL starts from (when config.init.sft_workdir is empty).")
  flags.DEFINE_string("slice", None, f"TPU slice or GPU host {sorted(slices.SLICES)} "
                      f"{sorted(slices.GPU_HOSTS)}: devices, HBM, mesh.")
  flags.DEFINE_list("mesh", None, "Mesh shape data,fsdp,tensor (-1 = the rest); default: the slice's, "
                    "else config.mesh.shape.")
  flags.DEFINE_integer("devices", None, "Number of devices; default: the slice's.")
  flags.DEFINE_float("hbm_gib", None, "HBM per device, GiB; default: the slice's or --device_kind's.")
  flags.DEFINE_enum("device_kind", None, sorted(slices.DEVICE_HBM_GIB), "Device whose HBM to use.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  machine = slices.get_slice(f.slice) if f.slice else None
  hbm = f.hbm_gib or (slices.DEVICE_HBM_GIB[f.device_kind] if f.device_kind else None)
  hbm = hbm or (machine.hbm_gib if machine else None)
  devices = f.devices or (machine.devices if machine else None)
  mesh = [int(s) for s in f.mesh] if f.mesh else machine.mesh if machine else f.config.mesh.shape
  missing = [name for name, value in {"--devices or --slice": devices,
                                      "--hbm_gib, --device_kind or --slice": hbm}.items() if value is None]
  if missing:
    raise app.UsageError(f"pass {', '.join(missing)}")
  try:
    plan = plan_config(f.config, mesh, devices, hbm, f.sft_config, name=preset_name(f["config"].config_filename))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(format_plan(plan))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
