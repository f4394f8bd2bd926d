"""Hugging Face checkpoints <-> our decoder params: import, export, tokenizer.

Import reads `config.json` and `model.safetensors` (or a sharded checkpoint
with `model.safetensors.index.json`) of a Llama, Qwen2, Mistral, Gemma or
Gemma 2 model into a `ModelConfig` and the scanned params pytree of
`transformer.py`. Export writes the inverse: a `config.json` built with the
`transformers` config class of the chosen architecture and safetensors in torch
layout, so `AutoModelForCausalLM.from_pretrained` (and vLLM) can load it.

The checkpoint is checked strictly: missing tensors, unexpected tensors and
shape mismatches are errors naming the tensors; unreadable safetensors, a
config.json that is not a JSON object or whose sizes are not positive
integers, and an index whose shards lie outside the model directory are errors
naming the file and field; and config settings the
decoder cannot express (an unknown rope type, Qwen2's sliding window, biases
other than Qwen2's q/k/v biases) are errors rather than silently ignored.
Only the tensor layout changes: q/k/v need no rotary permutation because the
decoder uses the half-split RoPE layout of HF checkpoints, and norm scales are
kept as stored (Gemma's `1 + w` convention is the decoder's `norm_offset`).
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import contextlib
from collections.abc import Iterator

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from safe_completion.models import transformer

ModelConfig = transformer.ModelConfig
PathLike = str | os.PathLike

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# HF class defaults (transformers 5) for keys a config.json may leave out.
_FAMILY_DEFAULTS = {
    "LlamaForCausalLM": dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=2048),
    "MistralForCausalLM": dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=4096 * 32,
                               sliding_window=4096),
    "Qwen2ForCausalLM": dict(tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768),
    "GemmaForCausalLM": dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                             head_dim=256),
    "Gemma2ForCausalLM": dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                              max_position_embeddings=8192, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILY_DEFAULTS)
_HF_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                      "Qwen2ForCausalLM": "Qwen2Config", "GemmaForCausalLM": "GemmaConfig",
                      "Gemma2ForCausalLM": "Gemma2Config"}
_GEMMA_FAMILY = ("GemmaForCausalLM", "Gemma2ForCausalLM")
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Config fields that must be positive integers when present (a float or string size is an error, not cast).
_POSITIVE_INT_KEYS = (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings",
                      "sliding_window")
_NUMBER_KEYS = ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping")
_ACTIVATIONS_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                        "gelu": "gelu"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# Tensors some checkpoints carry that the decoder recomputes.
_IGNORED_TENSORS = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


class CheckpointError(ValueError):
  """A checkpoint or config that cannot be converted; the message names what is wrong."""


# ----------------------------------------------------------------------------- config


def _read_json(path: PathLike) -> dict:
  """A JSON object from `path`; anything else (bad bytes, bad JSON, a list) is a CheckpointError naming it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep, too many digits.
    raise CheckpointError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _check_field_types(raw: Mapping[str, Any], source: str) -> None:
  for key in _POSITIVE_INT_KEYS:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise CheckpointError(f"{source}: {key}: expected a positive integer, got {value!r}")
  for key in _NUMBER_KEYS:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
      raise CheckpointError(f"{source}: {key}: expected a number, got {value!r}")


@contextlib.contextmanager
def _open_safetensors(path: str) -> Iterator[Any]:
  """`safe_open` whose failures (empty, truncated, a bad header) are CheckpointErrors naming the file."""
  try:
    with safe_open(path, framework="np") as f:
      yield f
  except SafetensorError as e:
    raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def _architecture(raw: Mapping[str, Any], source: str) -> str:
  architectures = raw.get("architectures") or []
  if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
    raise CheckpointError(f"{source}: architectures: expected a list of class names, got {architectures!r}")
  if not architectures:
    raise CheckpointError(f"{source}: no 'architectures' entry; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  if architectures[0] not in _FAMILY_DEFAULTS:
    raise CheckpointError(f"{source}: unsupported architecture {architectures[0]!r}; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  return architectures[0]


def _rope_fields(raw: Mapping[str, Any], source: str) -> dict:
  """Rope settings from the transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
  params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
  theta = params.get("rope_theta") or raw.get("rope_theta") or 10000.0
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields = dict(rope_theta=float(theta), rope_type=rope_type)
  if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
  if rope_type == "linear":
    fields.update(rope_factor=float(params["factor"]))
  elif rope_type == "llama3":
    try:
      fields.update(rope_factor=float(params["factor"]), rope_low_freq_factor=float(params["low_freq_factor"]),
                    rope_high_freq_factor=float(params["high_freq_factor"]),
                    rope_original_max_position=int(params["original_max_position_embeddings"]))
    except KeyError as e:
      raise CheckpointError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None
  elif rope_type != "default":
    raise CheckpointError(f"{source}: unsupported rope type {rope_type!r}; supported: default, linear, llama3")
  return fields


def _sliding_fields(layer_types: list[str], window: int | None, num_layers: int, source: str) -> dict:
  """(sliding_window, sliding_window_pattern) reproducing HF's per-layer attention types."""
  if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
    raise CheckpointError(f"{source}: layer_types {layer_types} is not {num_layers} of "
                          "'sliding_attention' / 'full_attention'")
  sliding = tuple(t == "sliding_attention" for t in layer_types)
  if window is None or not any(sliding):
    return dict(sliding_window=None)
  pattern = num_layers + 1 if all(sliding) else sliding.index(False) + 1
  if tuple((i + 1) % pattern != 0 for i in range(num_layers)) != sliding:
    raise CheckpointError(f"{source}: layer_types {layer_types} is not a repeating 'n-1 sliding, 1 full' pattern")
  return dict(sliding_window=int(window), sliding_window_pattern=pattern)


def config_from_hf_dict(raw: Mapping[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """A ModelConfig from the dict of an HF `config.json`; `overrides` replace any field (e.g. dtype)."""
  arch = _architecture(raw, source)
  raw = {**_FAMILY_DEFAULTS[arch], **raw}  # An explicit null stays null (no window, no soft-cap), as in HF.
  missing = [key for key in _REQUIRED_KEYS if raw.get(key) is None]
  if missing:
    raise CheckpointError(f"{source}: missing required field(s) {missing}")
  _check_field_types(raw, source)
  unsupported = [key for key in ("attention_bias", "mlp_bias", "use_sliding_window", "use_bidirectional_attention")
                 if raw.get(key)]
  if unsupported:
    raise CheckpointError(f"{source}: unsupported setting(s) {unsupported} for {arch}")
  gemma = arch in _GEMMA_FAMILY
  act_key = "hidden_activation" if arch == "Gemma2ForCausalLM" else "hidden_act"
  act_name = raw.get(act_key) or _FAMILY_DEFAULTS[arch][act_key]
  if gemma and act_name == "gelu":  # Legacy Gemma configs mean the tanh approximation (as HF does).
    act_name = "gelu_pytorch_tanh"
  if act_name not in _ACTIVATIONS_FROM_HF:
    raise CheckpointError(f"{source}: unsupported activation {act_name!r}; supported: {sorted(_ACTIVATIONS_FROM_HF)}")
  num_heads, num_layers = raw["num_attention_heads"], raw["num_hidden_layers"]
  fields = dict(
      vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=raw.get("num_key_value_heads") or num_heads,
      head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads, mlp_dim=raw["intermediate_size"],
      activation=_ACTIVATIONS_FROM_HF[act_name], norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
      norm_offset=gemma, scale_embeddings=gemma, qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(raw["tie_word_embeddings"]), max_seq_len=raw["max_position_embeddings"],
      **_rope_fields(raw, source))
  if arch == "Gemma2ForCausalLM":
    fields.update(query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or fields["head_dim"]),
                  attn_logit_softcap=raw.get("attn_logit_softcapping"),
                  final_logit_softcap=raw.get("final_logit_softcapping"), post_norms=True)
  if arch == "Gemma2ForCausalLM":  # HF's default alternates sliding and full layers, starting with sliding.
    layer_types = raw.get("layer_types") or [("full_attention", "sliding_attention")[(i + 1) % 2]
                                             for i in range(num_layers)]
    fields.update(_sliding_fields(layer_types, raw.get("sliding_window"), num_layers, source))
  if arch == "MistralForCausalLM":  # HF's Mistral slides in every layer when a window is set.
    layer_types = ["sliding_attention"] * num_layers
    fields.update(_sliding_fields(layer_types, raw.get("sliding_window"), num_layers, source))
  return transformer.model_config(**{**fields, **overrides})


def load_hf_config(model_dir: PathLike, **overrides) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory; `overrides` set e.g. dtype="bfloat16"."""
  path = os.path.join(model_dir, "config.json")
  return config_from_hf_dict(_read_json(path), source=str(path), **overrides)


# ----------------------------------------------------------------------------- names and layouts
# Each param leaf maps to an HF tensor name and a layout kind:
#   qkv:    ours [D, H, hd]  <-> HF [H*hd, D]      bias: ours [H, hd] <-> HF [H*hd]
#   out:    ours [H, hd, D]  <-> HF [D, H*hd]      linear: ours [in, out] <-> HF [out, in]
#   copy:   same shape (embeddings, norm scales)

_LAYER_NAMES = {
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", "qkv"),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", "qkv"),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", "qkv"),
    ("attn", "q_proj", "bias"): ("self_attn.q_proj.bias", "bias"),
    ("attn", "k_proj", "bias"): ("self_attn.k_proj.bias", "bias"),
    ("attn", "v_proj", "bias"): ("self_attn.v_proj.bias", "bias"),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", "out"),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", "linear"),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", "linear"),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", "linear"),
    ("pre_attn_norm", "scale"): ("input_layernorm.weight", "copy"),
    ("pre_mlp_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
}
# Gemma 2 norms around both sublayers; HF's `post_attention_layernorm` is then a post-norm.
_POST_NORM_LAYER_NAMES = {
    ("pre_mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "copy"),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
    ("post_mlp_norm", "scale"): ("post_feedforward_layernorm.weight", "copy"),
}
_TOP_NAMES = {
    ("embedding",): ("model.embed_tokens.weight", "copy"),
    ("final_norm", "scale"): ("model.norm.weight", "copy"),
    ("lm_head",): ("lm_head.weight", "linear"),
}


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "qkv":
    return (shape[1] * shape[2], shape[0])
  if kind == "bias":
    return (shape[0] * shape[1],)
  if kind == "out":
    return (shape[2], shape[0] * shape[1])
  if kind == "linear":
    return shape[::-1]
  return shape


def _to_ours(x: np.ndarray, shape: tuple[int, ...], kind: str) -> np.ndarray:
  if kind in ("qkv", "out", "linear"):
    x = x.T
  return x.reshape(shape)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "qkv":
    x = x.reshape(x.shape[0], -1).T
  elif kind == "out":
    x = x.reshape(-1, x.shape[-1]).T
  elif kind == "linear":
    x = x.T
  elif kind == "bias":
    x = x.reshape(-1)
  return np.ascontiguousarray(x)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor: where it goes in our pytree (layer index or None), its layout and shapes."""

  path: tuple[str, ...]
  layer: int | None
  kind: str
  shape: tuple[int, ...]  # Ours, per layer.
  hf_shape: tuple[int, ...]


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the decoder params, computed without allocating."""
  return dict(_param_shapes(config))


@functools.lru_cache(maxsize=32)
def _param_shapes(config: ModelConfig) -> tuple:
  shapes = jax.eval_shape(functools.partial(transformer.init_params, config), jax.random.key(0))
  return tuple((path, tuple(x.shape)) for path, x in flax.traverse_util.flatten_dict(shapes).items())


def hf_tensor_map(config: ModelConfig) -> dict[str, _Entry]:
  """{HF tensor name: entry} for every tensor a checkpoint of this config holds, in HF's order."""
  layer_names = {**_LAYER_NAMES, **(_POST_NORM_LAYER_NAMES if config.post_norms else {})}
  shapes = param_shapes(config)
  unnamed = [p for p in shapes if (p[1:] not in layer_names if p[0] == "layers" else p not in _TOP_NAMES)]
  if unnamed:
    raise CheckpointError(f"no HF name for param(s) {_listing('/'.join(p) for p in unnamed)}")

  def top(path):
    if path not in shapes:
      return {}
    name, kind = _TOP_NAMES[path]
    return {name: _Entry(path, None, kind, shapes[path], _hf_shape(shapes[path], kind))}

  entries = top(("embedding",))
  for layer in range(config.num_layers):
    for path, shape in shapes.items():
      if path[0] == "layers":
        name, kind = layer_names[path[1:]]
        entries[f"model.layers.{layer}.{name}"] = _Entry(path, layer, kind, shape[1:], _hf_shape(shape[1:], kind))
  return {**entries, **top(("final_norm", "scale")), **top(("lm_head",))}


# ----------------------------------------------------------------------------- import


def _tensor_files(model_dir: PathLike) -> dict[str, str]:
  """{tensor name: safetensors file} of a single-file or sharded checkpoint."""
  index_path, single_path = os.path.join(model_dir, INDEX_FILE), os.path.join(model_dir, SINGLE_FILE)
  if os.path.exists(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: no 'weight_map'")
    for name, file in weight_map.items():
      # Shards live in the model directory: an index must not make us read files elsewhere.
      if not isinstance(file, str) or os.path.isabs(file) or ".." in os.path.normpath(file).split(os.sep):
        raise CheckpointError(f"{index_path}: weight_map[{name!r}]: {file!r} is not a file inside {model_dir}")
    return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
  if os.path.exists(single_path):
    with _open_safetensors(single_path) as f:
      return {name: single_path for name in f.keys()}
  raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                          "(only safetensors checkpoints are supported)")


def _listing(names, limit: int = 8) -> str:
  names = sorted(names)
  more = f" ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _check_names(expected: Mapping[str, _Entry], available: Mapping[str, str], config: ModelConfig, source: str):
  missing = set(expected) - set(available)
  if missing:
    raise CheckpointError(f"{source}: missing tensor(s) {_listing(missing)}")
  allowed = {"lm_head.weight"} if config.tie_embeddings else set()  # Some tied checkpoints store it anyway.
  extra = {n for n in set(available) - set(expected) - allowed if not _IGNORED_TENSORS.fullmatch(n)}
  if extra:
    raise CheckpointError(f"{source}: unexpected tensor(s) {_listing(extra)} (architecture/config mismatch?)")


def load_hf_params(model_dir: PathLike, config: ModelConfig) -> dict:
  """Params of an HF safetensors checkpoint, as host numpy arrays in `config.param_dtype`.

  Layers are stacked on a leading axis as `nn.scan` expects. Every name and
  shape is checked before any tensor is read. Place the result on devices
  with `jax.device_put(params, shardings)`.
  """
  expected = hf_tensor_map(config)
  available = _tensor_files(model_dir)
  _check_names(expected, available, config, str(model_dir))
  by_file = {}
  for name in expected:
    by_file.setdefault(available[name], []).append(name)
  absent = [file for file in by_file if not os.path.exists(file)]
  if absent:
    raise FileNotFoundError(f"{model_dir}: shard(s) listed in {INDEX_FILE} are missing: {_listing(absent)}")
  mismatches = []
  for file, names in by_file.items():
    with _open_safetensors(file) as f:
      for name in names:
        shape = tuple(f.get_slice(name).get_shape())
        if shape != expected[name].hf_shape:
          mismatches.append(f"{name}: checkpoint {shape}, config expects {expected[name].hf_shape}")
  if mismatches:
    raise CheckpointError(f"{model_dir}: shape mismatch: " + "; ".join(mismatches))

  dtype = np.dtype(config.weight_dtype)
  out = {path: np.empty(shape, dtype) for path, shape in param_shapes(config).items()}
  for file, names in by_file.items():
    with _open_safetensors(file) as f:
      for name in names:
        entry = expected[name]
        value = _to_ours(f.get_tensor(name), entry.shape, entry.kind)
        if entry.layer is None:
          out[entry.path][...] = value
        else:
          out[entry.path][entry.layer] = value
  return flax.traverse_util.unflatten_dict(out)


def load_hf_checkpoint(model_dir: PathLike, **overrides) -> tuple[dict, ModelConfig]:
  """(params, config) of an HF checkpoint directory; `overrides` replace ModelConfig fields."""
  config = load_hf_config(model_dir, **overrides)
  return load_hf_params(model_dir, config), config


def load_tokenizer(model_dir: PathLike):
  """The HF tokenizer (with its chat template) saved in `model_dir`."""
  import transformers  # Heavy; only needed here and in export.
  return transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


# ----------------------------------------------------------------------------- export


def hf_config_dict(config: ModelConfig, architecture: str, **extra) -> dict:
  """The fields of an HF config of `architecture` equivalent to `config`; `extra` adds HF fields (e.g. eos ids)."""
  if architecture not in _FAMILY_DEFAULTS:
    raise CheckpointError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
  if config.rope_type == "linear":
    rope.update(factor=config.rope_factor)
  elif config.rope_type == "llama3":
    rope.update(factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position)
  act_key = "hidden_activation" if architecture == "Gemma2ForCausalLM" else "hidden_act"
  fields = {
      "architectures": [architecture], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, act_key: _ACTIVATIONS_TO_HF[config.activation],
      "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_seq_len, "rope_parameters": rope,
  }
  if architecture == "Gemma2ForCausalLM":
    scalar = config.query_pre_attn_scalar or config.head_dim
    fields.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # HF types it int.
                  attn_logit_softcapping=config.attn_logit_softcap,
                  final_logit_softcapping=config.final_logit_softcap, sliding_window=config.sliding_window,
                  layer_types=["sliding_attention" if s else "full_attention" for s in config.sliding_layers()])
  if architecture == "MistralForCausalLM":
    fields.update(sliding_window=config.sliding_window if all(config.sliding_layers()) else None)
  return {**fields, **extra}


def _behaviour(config: ModelConfig) -> dict:
  """The fields that change what a config computes (not dtypes, remat or unused defaults)."""
  fields = dataclasses.asdict(config)
  for key in ("dtype", "param_dtype", "remat_policy", "sliding_window_pattern", "transposed_weight_grads"):
    fields.pop(key)
  fields["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
  fields["sliding_layers"] = config.sliding_layers()
  if config.rope_type != "llama3":
    for key in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position"):
      fields.pop(key)
  if config.rope_type == "default":
    fields.pop("rope_factor")
  return fields


def _check_expressible(config: ModelConfig, fields: dict, architecture: str):
  """Errors when the HF architecture would compute something else than `config`."""
  ours, theirs = _behaviour(config), _behaviour(config_from_hf_dict(fields, source=architecture))
  diffs = [f"{key}={ours[key]!r} (as {architecture}: {theirs[key]!r})" for key in ours if ours[key] != theirs[key]]
  if diffs:
    raise CheckpointError(f"{architecture} cannot express this model config: " + ", ".join(diffs))


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_hf(params: Mapping, config: ModelConfig, out_dir: PathLike, *, architecture: str, tokenizer=None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, hf_config_overrides: Mapping | None = None,
              dtype: str = "") -> None:
  """Writes an HF checkpoint (config.json, safetensors, tokenizer if given) that transformers/vLLM load.

  Tensors keep the dtype of `params`, or are cast to `dtype` (one of EXPORT_DTYPES): float32 master
  weights exported as bfloat16 are what vLLM serves, at half the size. Above `max_shard_bytes` the weights are
  split into `model-0000k-of-0000n.safetensors` shards with an index.
  `hf_config_overrides` adds HF-only fields (e.g. `eos_token_id`); bos/eos/pad
  ids default to the tokenizer's.
  """
  import transformers
  extra = {}
  if tokenizer is not None:
    if len(tokenizer) > config.vocab_size:
      raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={config.vocab_size}")
    extra = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
  if dtype and dtype not in EXPORT_DTYPES:
    raise CheckpointError(f"export dtype {dtype!r} is not one of {list(EXPORT_DTYPES)}")
  flat = {path: np.asarray(jax.device_get(x)) for path, x in flax.traverse_util.flatten_dict(dict(params)).items()}
  if dtype:
    flat = {path: x.astype(jnp.dtype(dtype)) for path, x in flat.items()}
  _check_param_shapes(flat, config)
  extra["dtype"] = str(flat[("embedding",)].dtype)
  fields = hf_config_dict(config, architecture, **{**extra, **(hf_config_overrides or {})})
  _check_expressible(config, fields, architecture)
  hf_config = getattr(transformers, _HF_CONFIG_CLASSES[architecture])(**fields)
  tensors = {name: _to_hf(flat[e.path] if e.layer is None else flat[e.path][e.layer], e.kind)
             for name, e in hf_tensor_map(config).items()}

  os.makedirs(out_dir, exist_ok=True)
  hf_config.save_pretrained(str(out_dir))
  _write_safetensors(tensors, out_dir, max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out_dir))


def _check_param_shapes(flat: Mapping[tuple[str, ...], np.ndarray], config: ModelConfig):
  expected = param_shapes(config)
  problems = [f"{'/'.join(p)} missing" for p in expected if p not in flat]
  problems += [f"{'/'.join(p)} not in the config" for p in flat if p not in expected]
  problems += [f"{'/'.join(p)} has shape {flat[p].shape}, config expects {shape}"
               for p, shape in expected.items() if p in flat and flat[p].shape != shape]
  if problems:
    raise CheckpointError("params do not match the config: " + "; ".join(problems))


def _write_safetensors(tensors: Mapping[str, np.ndarray], out_dir: PathLike, max_shard_bytes: int):
  shards, size = [{}], 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  for stale in os.listdir(out_dir):  # Weights of an earlier export would mix with these.
    if stale in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
      os.remove(os.path.join(out_dir, stale))
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file), metadata=metadata)
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
