"""LoRA adapters on the decoder's projections, through qwix (`qwix.LoraProvider`).

qwix intercepts the `dot_general` of every matched `Dense` in the decoder and
adds (alpha / r) * x A B, creating A [in, r] and B [r, out] next to each
kernel (`kernel_lora_a`, `kernel_lora_b`; scanned layers stack them on the
leading `layers` axis, and qwix carries the kernel's logical axis names over).
B starts at zero, so a fresh adapter computes exactly the base model.

Here the adapters are a tree of their own: the trainer's `params` (what the
optimizer holds and checkpoints save), while the frozen base rides along in
the train state as a `Base`, whose static `config` says how to apply them.
`forward` of `LoraParams(base, adapters)` is the adapted model; the base alone
is the RL reference policy; `merge` folds the adapters into plain params
(for the sampler and HF export).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import qwix

from safe_completion.models import transformer

# config.lora.target_modules names -> the decoder's Dense modules.
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
_SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, alpha and targeted projections; hashable, so it is static under jit."""

  rank: int
  alpha: float
  target_modules: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def from_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
  """The LoraConfig of a stage config's `lora` section; None when absent or rank 0 (LoRA off)."""
  section = config.get("lora")
  if section is None or section.rank == 0:
    return None
  return LoraConfig(int(section.rank), float(section.alpha), tuple(section.target_modules))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Base:
  """The frozen base params of a LoRA run, with the adapter config as static pytree metadata."""

  params: Any
  config: LoraConfig = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraParams:
  """What the adapted forward pass takes: the frozen base and the trained adapters."""

  base: Base
  adapters: Any


def _decoder(model_config: transformer.ModelConfig, lora_config: LoraConfig) -> nn.Module:
  modules = "|".join(TARGETS[name] for name in lora_config.target_modules)
  provider = qwix.LoraProvider(module_path=rf".*/({modules})$", rank=lora_config.rank, alpha=lora_config.alpha)
  # qwix intercepts the projections' dot_general on the kernel param: the custom-VJP projection (a CPU
  # speed-up of the weight gradient) would hide it, so LoRA models run the plain dot.
  plain = dataclasses.replace(model_config, transposed_weight_grads=False)
  return qwix.apply_lora_to_model(transformer.Decoder(plain), provider)


def _is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(_SUFFIXES)


def _select(tree: dict, adapters: bool) -> dict:
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({p: x for p, x in flat.items() if _is_adapter(p) == adapters})


def _boxed_init(model_config: transformer.ModelConfig, lora_config: LoraConfig, rng: jax.Array) -> dict:
  # Traced in the param dtype: qwix creates A and B in it, and a float32 delta on a bfloat16 carry breaks the scan.
  model_config = dataclasses.replace(model_config, dtype=model_config.param_dtype)
  dummy = jnp.ones((1, 1), jnp.int32)
  return _decoder(model_config, lora_config).init(rng, dummy, jnp.zeros_like(dummy), dummy)["params"]


def init_adapters(model_config: transformer.ModelConfig, lora_config: LoraConfig, rng: jax.Array) -> dict:
  """Fresh adapters in float32 (A: he-uniform, B: zeros), whatever the base's param dtype."""
  adapters = _select(nn.meta.unbox(_boxed_init(model_config, lora_config, rng)), adapters=True)
  return jax.tree.map(lambda x: x.astype(jnp.float32), adapters)


def logical_adapter_specs(model_config: transformer.ModelConfig, lora_config: LoraConfig) -> dict:
  """PartitionSpecs of logical axis names of the adapters (those qwix derives from each kernel's)."""
  boxed = jax.eval_shape(functools.partial(_boxed_init, model_config, lora_config), jax.random.key(0))
  return _select(nn.get_partition_spec(boxed), adapters=True)


def _combined(params: LoraParams, dtype) -> dict:
  # Adapters are cast to the compute dtype, as Dense casts its kernel; the gradient flows back in float32.
  adapters = jax.tree.map(lambda x: x.astype(dtype), params.adapters)
  flat = {**flax.traverse_util.flatten_dict(params.base.params), **flax.traverse_util.flatten_dict(adapters)}
  return flax.traverse_util.unflatten_dict(flat)


def forward(params: LoraParams, model_config: transformer.ModelConfig, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array) -> jax.Array:
  """Logits [B, T, V] of the adapted model (base + (alpha / r) x A B on every target)."""
  decoder = _decoder(model_config, params.base.config)
  logits, _ = decoder.apply({"params": _combined(params, model_config.compute_dtype)}, tokens, positions,
                            segment_ids)
  return logits


def merge(params: LoraParams) -> dict:
  """Plain decoder params with W + (alpha / r) A B folded into each targeted kernel, in the base's dtype."""
  flat = flax.traverse_util.flatten_dict(params.base.params)
  adapters = flax.traverse_util.flatten_dict(params.adapters)
  scale = params.base.config.scale
  out = dict(flat)
  for path, kernel in flat.items():
    a, b = adapters.get(path[:-1] + (path[-1] + "_lora_a",)), adapters.get(path[:-1] + (path[-1] + "_lora_b",))
    if a is None:
      continue
    # qwix flattens the kernel's contracted axes into A's rows and its output axes into B's columns.
    delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
    out[path] = (kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(out)


def num_adapter_params(model_config: transformer.ModelConfig, lora_config: LoraConfig) -> int:
  shapes = jax.eval_shape(functools.partial(init_adapters, model_config, lora_config), jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes))
