"""A pure-functional decoder-only transformer for the Llama, Qwen2 and Gemma families.

One module with config switches for the families (not one class per family):
Llama (RMSNorm, RoPE with optional Llama-3 scaling, SwiGLU, grouped-query
attention), Qwen2 (q/k/v bias, tied or untied embeddings) and Gemma / Gemma 2
(sqrt(d) embedding scale, GeGLU, RMSNorm with (1 + w), tied embeddings, logit
soft-capping, post-norms and alternating sliding-window layers).

Layers are scanned with `nn.scan` (params carry a leading `layers` axis) and
rematerialised by a named policy. Every param carries logical axis names, so
`parallel.py` maps them onto any mesh with rules from the config.

Attention is driven by explicit positions and segment ids: segment id 0 is
padding, equal non-zero ids attend to each other causally. This one mechanism
covers left-padded batches, packed sequences and KV-cache decoding.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True), "gelu": lambda x: nn.gelu(x, approximate=False)}
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder. Hashable, so it can be a static jit arg."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_offset: bool = False  # Gemma: scale by (1 + w), weights initialised at 0.
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  qkv_bias: bool = False
  tie_embeddings: bool = False
  scale_embeddings: bool = False
  query_pre_attn_scalar: float | None = None  # Gemma 2; None means head_dim.
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  post_norms: bool = False  # Gemma 2: norms after attention and MLP too.
  sliding_window: int | None = None
  sliding_window_pattern: int = 2  # Every n-th layer is global, the others slide.
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_unroll: int = 1  # Layers per iteration of the layer scan; num_layers unrolls it (fast CPU decode).
  attention_block: int = 128  # Query rows per block of uncached attention (causal blocks skip later keys); 0: one.
  # Projection weight gradients with the narrower of x, dy transposed first (`project`): XLA:CPU's YNNPACK
  # runs that layout; left alone, XLA picks one it hands to Eigen at half the speed. CPU presets set it.
  transposed_weight_grads: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for field, value, choices in (("activation", self.activation, _ACTIVATIONS),
                                  ("remat_policy", self.remat_policy, _REMAT_POLICIES),
                                  ("dtype", self.dtype, _DTYPES), ("param_dtype", self.param_dtype, _DTYPES),
                                  ("rope_type", self.rope_type, ("default", "linear", "llama3"))):
      if value not in choices:
        raise ValueError(f"model.{field}={value!r} is not one of {sorted(choices)}")
    if self.scan_unroll < 1:
      raise ValueError(f"model.scan_unroll={self.scan_unroll} must be at least 1")
    if self.attention_block < 0:
      raise ValueError(f"model.attention_block={self.attention_block} must be 0 (one block) or positive")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def sliding_layers(self) -> tuple[bool, ...]:
    """Which layers use the sliding window (Gemma 2: layers 0, 2, 4, ...)."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    return tuple((i + 1) % self.sliding_window_pattern != 0 for i in range(self.num_layers))


def model_config(**fields) -> ModelConfig:
  """A ModelConfig from a config section (e.g. `config.model.to_dict()`); unknown fields are errors."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
  return ModelConfig(**fields)


def rope_inv_freq(config: ModelConfig) -> Array:
  """Inverse frequencies of the rotary embedding, with linear or Llama-3 scaling."""
  exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  if config.rope_type == "linear":
    return inv_freq / config.rope_factor
  if config.rope_type == "llama3":
    low_freq_wavelen = config.rope_original_max_position / config.rope_low_freq_factor
    high_freq_wavelen = config.rope_original_max_position / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / config.rope_factor, inv_freq)
    smooth = (config.rope_original_max_position / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates [B, T, H, D] by positions [B, T] (the half-split layout of HF checkpoints)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_mask(query_slots: Array, key_slots: Array, query_segments: Array, key_segments: Array,
                   window: int | None = None) -> Array:
  """[B, T, S] bool: causal in slot order, same segment, key not padding, optional window."""
  causal = key_slots[None, None, :] <= query_slots[None, :, None]
  same_segment = query_segments[:, :, None] == key_segments[:, None, :]
  mask = causal & same_segment & (key_segments[:, None, :] != 0)
  if window is not None:
    mask &= (query_slots[None, :, None] - key_slots[None, None, :]) < window
  return mask


def _attention_scores(q: Array, k: Array, mask: Array, softcap: float | None) -> tuple[Array, Array]:
  """f32 scores [B, Hkv, G, T, S] of q [B, Hkv, G, T, D] and k [B, Hkv, S, D]: soft-capped, then masked."""
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  return scores, jnp.where(mask[:, None, None], scores, _MASK_VALUE)


def _query_blocks(length: int, num_keys: int, block: int) -> list[tuple[int, int, int]]:
  """(first row, end row, keys seen) per query block; causal blocks see the keys up to their last row."""
  if not block or block >= length:
    return [(0, length, num_keys)]
  return [(lo, min(lo + block, length), min(lo + block, num_keys)) for lo in range(0, length, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, softcap: float | None = None,
                          causal_block: int = 0) -> Array:
  """softmax(mask(softcap(q k^T))) v, computed by query blocks without storing the probabilities.

  q [B, T, Hkv, G, D] (scaled), k and v [B, Hkv, S, D], mask [B, T, S] bool;
  returns [B, T, Hkv, G, D]. The backward pass recomputes each block's
  probabilities from the saved log-sum-exp (as flash attention does), so
  neither pass holds a [B, H, T, S] tensor for the whole sequence or layer
  stack. `causal_block` > 0 promises that no query attends to a later key
  slot (mask[b, t, s] is False for s > t): query rows then go in blocks of that
  size and each block reads only the keys up to its last row, about half the
  work at long lengths. A row that attends to nothing gets the mean of the
  values it was offered, as a softmax over masked scores does.
  """
  return _attention_fwd(q, k, v, mask, softcap, causal_block)[0]


def _attention_fwd(q, k, v, mask, softcap, causal_block):
  qt = q.transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]: every dot below is a plain batched matmul.
  outs, lses = [], []
  for lo, hi, end in _query_blocks(q.shape[1], k.shape[2], causal_block):
    _, scores = _attention_scores(qt[:, :, :, lo:hi], k[:, :, :end], mask[:, lo:hi, :end], softcap)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(v.dtype), v[:, :, :end],
                     preferred_element_type=jnp.float32) / total
    outs.append(out.astype(v.dtype))
    lses.append(top + jnp.log(total))
  out = jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4), (qt, k, v, mask, out, jnp.concatenate(lses, axis=3))


def _attention_bwd(softcap, causal_block, residuals, grad_out):
  qt, k, v, mask, out, lse = residuals
  grad_out = grad_out.transpose(0, 2, 3, 1, 4)
  # d softmax: p * (dp - sum(p * dp)), and sum(p * dp) = sum(out * grad_out) over the head dim.
  delta = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq_blocks = []
  # dk and dv contract the query rows: accumulated as [B, Hkv, D, S] from the small transposed q / grad_out
  # block, so no [T, S] block of dscores or probs is transposed (XLA:CPU would copy each one).
  batch, kv_heads, groups, _, dim = qt.shape
  dk_t, dv_t = (jnp.zeros((batch, kv_heads, dim, k.shape[2]), jnp.float32) for _ in range(2))
  rows_t = lambda x: jax.lax.optimization_barrier(
      x.transpose(0, 1, 4, 2, 3).reshape(batch, kv_heads, dim, -1))  # [B, Hkv, D, G * rows]
  for lo, hi, end in _query_blocks(qt.shape[3], k.shape[2], causal_block):
    block_mask = mask[:, lo:hi, :end]
    capped, scores = _attention_scores(qt[:, :, :, lo:hi], k[:, :, :end], block_mask, softcap)
    probs = jnp.exp(scores - lse[:, :, :, lo:hi])
    dprobs = jnp.einsum("bkgtd,bksd->bkgts", grad_out[:, :, :, lo:hi], v[:, :, :end],
                        preferred_element_type=jnp.float32)
    dscores = jnp.where(block_mask[:, None, None], probs * (dprobs - delta[:, :, :, lo:hi]), 0.0)
    if softcap is not None:
      dscores = dscores * (1.0 - jnp.square(capped / softcap))
    dscores = dscores.astype(qt.dtype)
    dq_blocks.append(jnp.einsum("bkgts,bksd->bkgtd", dscores, k[:, :, :end], preferred_element_type=jnp.float32))
    flat = lambda x: x.reshape(batch, kv_heads, groups * (hi - lo), end)  # [B, Hkv, G * rows, keys]
    dk_t = dk_t.at[..., :end].add(jnp.einsum("bkdt,bkts->bkds", rows_t(qt[:, :, :, lo:hi]), flat(dscores),
                                             preferred_element_type=jnp.float32))
    dv_t = dv_t.at[..., :end].add(jnp.einsum("bkdt,bkts->bkds", rows_t(grad_out[:, :, :, lo:hi]),
                                             flat(probs.astype(v.dtype)), preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4)
  dk, dv = (jax.lax.optimization_barrier(x).transpose(0, 1, 3, 2) for x in (dk_t, dv_t))
  return dq.astype(qt.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: Array, kernel: Array, contract_dims: int = 1) -> Array:
  """x @ kernel over x's last `contract_dims` axes, the same dot as `Dense`'s; only its gradient differs.

  The weight gradient contracts the token axes, the leading ones of x and dy. XLA:CPU lays that dot out
  as x^T dy with x in place (contracting dim 0), which YNNPACK does not take, so Eigen runs it at about
  half the speed; here the narrower of x and dy is transposed first (an optimization barrier keeps XLA
  from folding the transpose back into the dot), a copy that costs far less than the dot saves.
  """
  return _dot(x, kernel, contract_dims)


def _dot(x, kernel, contract_dims):
  contract = (tuple(range(x.ndim - contract_dims, x.ndim)), tuple(range(contract_dims)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def _project_fwd(x, kernel, contract_dims):
  return _dot(x, kernel, contract_dims), (x, kernel)


def _project_bwd(contract_dims, residuals, grad):
  x, kernel = residuals
  inputs = math.prod(kernel.shape[:contract_dims])
  x2 = x.reshape(-1, inputs)
  grad2 = grad.reshape(x2.shape[0], -1)
  kernel2 = kernel.reshape(inputs, -1)
  dx = jax.lax.dot_general(grad2, kernel2, (((1,), (1,)), ((), ())))
  if x2.shape[1] <= grad2.shape[1]:
    dkernel = jax.lax.dot_general(jax.lax.optimization_barrier(x2.T), grad2, (((1,), (0,)), ((), ())))
  else:  # Transposing dy and then the (small) result moves less memory than transposing a wide x.
    dkernel_t = jax.lax.dot_general(jax.lax.optimization_barrier(grad2.T), x2, (((1,), (0,)), ((), ())))
    dkernel = jax.lax.optimization_barrier(dkernel_t).T  # Else XLA folds this transpose into the dot too.
  return dx.reshape(x.shape).astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Dense(nn.Module):
  """x @ kernel over the last `contract_dims` axes of x, with named kernel axes.

  Kernels keep their multi-axis shape (e.g. [embed, heads, head_dim]) so each
  axis can be sharded on its own.
  """

  features: tuple[int, ...]
  logical_axes: tuple[str, ...]
  config: ModelConfig
  contract_dims: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    in_shape = x.shape[-self.contract_dims:]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.logical_axes),
                        in_shape + self.features, cfg.weight_dtype)
    x, kernel = x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype)
    if cfg.transposed_weight_grads:  # Off in LoRA models (lora.py): qwix must see the plain dot_general.
      y = project(x, kernel, self.contract_dims)
    else:
      y = _dot(x, kernel, self.contract_dims)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             self.logical_axes[-len(self.features):]),
                        self.features, cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


class RMSNorm(nn.Module):
  """RMSNorm in float32; Gemma's variant scales by (1 + w)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    init = nn.initializers.zeros_init() if cfg.norm_offset else nn.initializers.ones_init()
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
    scale = scale.astype(jnp.float32) + (1.0 if cfg.norm_offset else 0.0)
    return (normed * scale).astype(cfg.compute_dtype)


class Attention(nn.Module):
  """Grouped-query attention with RoPE, optional qkv bias, soft-capping and a KV cache.

  With a cache, `kv` holds this layer's keys/values [B, Hkv, S, D]; the new
  keys/values are written at `cache_index` in place; the [.., Hkv, S, D] layout lets both
  einsums contract the cache without transposing it.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, kv, cache_index):
    cfg = self.config
    batch, length, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = Dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg, use_bias=cfg.qkv_bias, name="q_proj")(x)
    k = Dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg, use_bias=cfg.qkv_bias, name="k_proj")(x)
    v = Dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg, use_bias=cfg.qkv_bias, name="v_proj")(x)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if kv is not None:
      new = {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}
      kv = {n: jax.lax.dynamic_update_slice(kv[n], new[n].astype(kv[n].dtype), (0, 0, cache_index, 0)) for n in kv}
      k, v = kv["k"], kv["v"]
      k, v = k.astype(cfg.compute_dtype), v.astype(cfg.compute_dtype)
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim) * jnp.asarray(scale, q.dtype)
    if kv is None or length > 1:  # Training, log-probs and prefill.
      if kv is None:  # Query slot i is key slot i, so the attention is causal in blocks.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      out = dot_product_attention(q, k, v, mask, cfg.attn_logit_softcap, cfg.attention_block if kv is None else 0)
      out = out.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    else:
      # One query per row against a cache (decoding): a multiply-reduce reads the cache once; XLA:CPU runs
      # the equivalent batched dots, with only `groups` columns each, about 3x slower.
      f32 = jnp.float32
      scores = jnp.sum(q[:, 0, :, :, None, None, :].astype(f32) * k[:, :, None, None].astype(f32), axis=-1)
      if cfg.attn_logit_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
      scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1)
      out = jnp.sum(probs[..., None] * v[:, :, None, None].astype(f32), axis=-2).transpose(0, 3, 1, 2, 4)
      out = out.astype(cfg.compute_dtype).reshape(batch, length, cfg.num_heads, cfg.head_dim)
    out = Dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, contract_dims=2, name="o_proj")(out)
    return out, kv


class Mlp(nn.Module):
  """Gated MLP: SwiGLU (Llama, Qwen2) or GeGLU (Gemma)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gate = Dense((cfg.mlp_dim,), ("embed", "mlp"), cfg, name="gate_proj")(x)
    up = Dense((cfg.mlp_dim,), ("embed", "mlp"), cfg, name="up_proj")(x)
    hidden = _ACTIVATIONS[cfg.activation](gate) * up
    hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense((cfg.hidden_size,), ("mlp", "embed"), cfg, name="down_proj")(hidden)


class Block(nn.Module):
  """One decoder layer; the scanned unit.

  The carry is (x, this layer's KV cache or None); scanned (training, log-probs) there is no cache.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, carry, positions, global_mask, local_mask, cache_index, is_sliding):
    cfg = self.config
    x, kv = carry
    mask = global_mask if local_mask is None else jnp.where(is_sliding, local_mask, global_mask)
    attn_out, kv = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="pre_attn_norm")(x), positions, mask, kv, cache_index)
    if cfg.post_norms:
      attn_out = RMSNorm(cfg, name="post_attn_norm")(attn_out)
    x = x + attn_out
    mlp_out = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x))
    if cfg.post_norms:
      mlp_out = RMSNorm(cfg, name="post_mlp_norm")(mlp_out)
    x = x + mlp_out
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, kv), None


class Decoder(nn.Module):
  """Tokens -> logits. With a cache, writes the new keys/values at `cache["index"]`.

  Call as `Decoder(cfg).apply({"params": params}, tokens, positions, segment_ids, cache)`:
  tokens, positions, segment_ids are [B, T] int32; returns (logits f32 [B, T, V], new cache or None).
  `last_only` computes logits at the last position only ([B, 1, V]), which is
  all a sampler's prefill needs.

  `unstacked=True` runs the layers as a Python loop over separate submodules
  `layers_0`, `layers_1`, ... (params from `unstack_params`, cache from
  `init_cache`), so no layer's weights or cache are sliced out of a stack:
  inside a decode loop, XLA would copy them every step. A cache needs it; the
  scanned layers (training, log-probs) run without one.
  """

  config: ModelConfig
  unstacked: bool = False

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array, cache: Cache | None = None,
               last_only: bool = False):
    cfg = self.config
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    length = tokens.shape[1]
    if cache is None:
      cache_index = jnp.zeros((), jnp.int32)
      query_slots = key_slots = jnp.arange(length)
      key_segments, kv = segment_ids, None
    else:
      cache_index = cache["index"]
      key_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))
      query_slots = cache_index + jnp.arange(length)
      key_slots = jnp.arange(key_segments.shape[1])
      kv = cache["layers"]
    global_mask = attention_mask(query_slots, key_slots, segment_ids, key_segments)
    local_mask = None
    if cfg.sliding_window is not None:
      local_mask = attention_mask(query_slots, key_slots, segment_ids, key_segments, cfg.sliding_window)

    block = Block
    if _REMAT_POLICIES[cfg.remat_policy] is not None:
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    sliding = cfg.sliding_layers()
    if self.unstacked:
      new_kv = []
      for i in range(cfg.num_layers):
        (x, layer_kv), _ = block(cfg, name=f"layers_{i}")(
            (x, None if kv is None else kv[i]), positions, global_mask, local_mask, cache_index, sliding[i])
        new_kv.append(layer_kv)
      kv = None if kv is None else tuple(new_kv)
    else:
      if kv is not None:
        raise ValueError("a KV cache needs Decoder(config, unstacked=True) with unstack_params (as sampling.sample)")
      layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
          unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
      (x, _), _ = layers((x, None), positions, global_mask, local_mask, cache_index, jnp.asarray(sliding))

    x = RMSNorm(cfg, name="final_norm")(x)
    if last_only:
      x = x[:, -1:]
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    else:
      head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                        (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    new_cache = None
    if cache is not None:
      new_cache = {"index": cache_index + length, "segment_ids": key_segments, "layers": kv}
    return logits, new_cache


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache for `Decoder(config, unstacked=True)`: per-layer keys/values [B, Hkv, S, D] (a tuple),
  key segment ids [B, S] and the write index."""
  dtype = dtype or config.compute_dtype
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers))
  return {"index": jnp.zeros((), jnp.int32), "segment_ids": jnp.zeros((batch_size, max_len), jnp.int32),
          "layers": layers}


def unstack_params(params: dict, config: ModelConfig) -> dict:
  """Params for `Decoder(config, unstacked=True)`: the stacked `layers` split into `layers_0`, `layers_1`, ..."""
  split = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(config.num_layers)}
  return {**{name: value for name, value in params.items() if name != "layers"}, **split}


def _dummy_inputs(batch_size: int = 1, length: int = 1):
  ones = jnp.ones((batch_size, length), jnp.int32)
  return ones, jnp.zeros((batch_size, length), jnp.int32), ones


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Random params as a plain pytree (logical-axis boxes removed)."""
  variables = Decoder(config).init(rng, *_dummy_inputs())
  return nn.meta.unbox(variables["params"])


def logical_param_specs(config: ModelConfig) -> dict:
  """PartitionSpecs of logical axis names for every param, computed without allocating."""
  boxed = jax.eval_shape(lambda rng: Decoder(config).init(rng, *_dummy_inputs()), jax.random.key(0))
  return nn.get_partition_spec(boxed["params"])


def forward(params: dict, config: ModelConfig, tokens: Array, positions: Array, segment_ids: Array) -> Array:
  """Logits [B, T, V] of a full (uncached) forward pass."""
  logits, _ = Decoder(config).apply({"params": params}, tokens, positions, segment_ids)
  return logits


def positions_from_mask(mask: Array) -> Array:
  """Positions for a left- or right-padded batch: 0, 1, ... over the real tokens of each row."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
