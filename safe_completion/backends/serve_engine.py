"""The sampler behind `serve`: bucketed shapes, traced sampling settings, decoding in bounded chunks.

`sampling.sample` takes its settings as static jit arguments and runs to the
end in one call, which suits training loops. A server sees a new `max_tokens`
or `temperature` with nearly every request and must stop for a client that
left, so here:
- the KV cache and the output buffer are sized by a power-of-two bucket of
  `max_tokens` (one compilation per bucket, not per value);
- temperature, top_p, max_tokens and the rng are traced values;
- decoding runs at most `chunk_tokens` steps per call; between calls the
  engine checks the request's deadline and cancel event, and reports the text
  so far (what streaming sends).
Prompts are left-padded to the backend's fixed `max_prompt_len` and rows to its
`batch_size`, as in `LocalBackend`.
"""

import collections
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safe_completion.backends import base
from safe_completion.backends import local
from safe_completion.backends.serve import Cancelled
from safe_completion.data import chat
from safe_completion.models import transformer

# (choice index, raw text so far) after each chunk.
ProgressFn = Callable[[int, str], None]


def bucket(max_tokens: int, minimum: int) -> int:
  """The smallest power of two >= max_tokens (at least `minimum`): the compiled output length."""
  return max(minimum, 1 << (max_tokens - 1).bit_length())


def _pick(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-p sampling; both settings traced."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  descending = -jnp.sort(-scaled, axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(descending, jnp.maximum(kept, 1) - 1, axis=-1)
  filtered = jnp.where((top_p < 1.0) & (scaled < threshold), -jnp.inf, scaled)
  sampled = jax.random.categorical(rng, filtered, axis=-1)
  return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


class ServeEngine:
  """Cancellable, chunked generation for one `LocalBackend`; calls are serialised by a lock.

  `traces` counts how often each jitted function was traced (= compiled): a
  new max_tokens within a bucket, a new temperature or seed must not add any.
  """

  def __init__(self, backend: local.LocalBackend, *, chunk_tokens: int = 16, min_bucket: int = 16):
    self.backend, self.model_id = backend, backend.model_id
    self.config = backend.model_config
    self.context = self.config.max_seq_len
    self.chunk_tokens, self.min_bucket = chunk_tokens, min_bucket
    self.traces: collections.Counter = collections.Counter()
    self._params = transformer.unstack_params(backend.params, self.config)
    self._decoder = transformer.Decoder(self.config, unstacked=True)
    self._eos = jnp.asarray(backend.eos_ids, jnp.int32)
    self._lock = threading.Lock()
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "out_len"))
    self._decode = jax.jit(self._decode_impl, donate_argnums=1)

  # Prompts and limits.

  def encode_chat(self, messages: Sequence[dict]) -> list[int]:
    return self.backend.encode([messages])[0]

  def encode_text(self, prompt: str) -> list[int]:
    ids = self.backend.tokenizer(prompt)["input_ids"]
    if not ids:
      raise ValueError("prompt: empty")
    if len(ids) > self.backend.max_prompt_len:
      raise ValueError(f"prompt of {len(ids)} tokens exceeds max_prompt_len={self.backend.max_prompt_len}")
    return ids

  def max_new_tokens(self, prompt_len: int) -> int:
    """The most tokens a completion of a `prompt_len`-token prompt can have in the model's context."""
    return self.context - prompt_len

  # Jitted pieces.

  def _emit(self, state: dict, logits: jax.Array, temperature, top_p) -> dict:
    rng, step_rng = jax.random.split(state["rng"])
    token = jnp.where(state["done"], self.backend.pad_id, _pick(logits, step_rng, temperature, top_p))
    return {**state, "rng": rng, "step": state["step"] + 1, "last_token": token,
            "tokens": jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, state["step"])),
            "lengths": state["lengths"] + (~state["done"]).astype(jnp.int32),
            "done": state["done"] | jnp.isin(token, self._eos)}

  def _prefill_impl(self, params, tokens, mask, rng, temperature, top_p, *, cache_len: int, out_len: int):
    self.traces["prefill"] += 1
    batch = tokens.shape[0]
    positions = transformer.positions_from_mask(mask)
    cache = transformer.init_cache(self.config, batch, cache_len)
    logits, cache = self._decoder.apply({"params": params}, tokens, positions, mask, cache, last_only=True)
    state = {"step": jnp.zeros((), jnp.int32), "tokens": jnp.full((batch, out_len), self.backend.pad_id, jnp.int32),
             "lengths": jnp.zeros((batch,), jnp.int32), "done": jnp.zeros((batch,), bool),
             "last_token": jnp.zeros((batch,), jnp.int32), "last_position": positions[:, -1], "cache": cache,
             "rng": rng}
    return self._emit(state, logits[:, -1], temperature, top_p)

  def _decode_impl(self, params, state, limit, temperature, top_p):
    """Up to `chunk_tokens` more tokens, fewer when every row is done or `limit` tokens were made."""
    self.traces["decode"] += 1
    stop_at = jnp.minimum(limit, state["step"] + self.chunk_tokens)
    batch = state["tokens"].shape[0]

    def keep_going(s):
      return (s["step"] < stop_at) & ~jnp.all(s["done"])

    def step(s):
      position = s["last_position"] + 1
      logits, cache = self._decoder.apply({"params": params}, s["last_token"][:, None], position[:, None],
                                          jnp.ones((batch, 1), jnp.int32), s["cache"])
      return self._emit({**s, "last_position": position, "cache": cache}, logits[:, 0], temperature, top_p)

    return jax.lax.while_loop(keep_going, step, state)

  # Generation.

  def generate(self, prompt: Sequence[int], params: base.SamplingParams, *, deadline: float,
               cancel: threading.Event, on_progress: ProgressFn | None = None) -> list[base.Completion]:
    """`params.n` completions of one tokenized prompt; raises Cancelled at the deadline or when `cancel` is set."""
    if params.max_tokens > self.max_new_tokens(len(prompt)):
      raise ValueError(f"max_tokens={params.max_tokens} exceeds the model's context: the prompt has {len(prompt)} "
                       f"tokens of {self.context}, so at most {self.max_new_tokens(len(prompt))}")
    if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
      raise Cancelled("deadline")
    try:
      seed = params.seed if params.seed is not None else int(np.random.randint(2**31))
      rng = jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)
      out: list[base.Completion] = []
      for b, start in enumerate(range(0, params.n, self.backend.batch_size)):
        rows = min(self.backend.batch_size, params.n - start)
        out += self._batch(prompt, rows, start, params, jax.random.fold_in(rng, b), deadline, cancel, on_progress)
      return out
    finally:
      self._lock.release()

  def _batch(self, prompt, rows, first_choice, params, rng, deadline, cancel, on_progress) -> list[base.Completion]:
    tokens, mask = self.backend.left_pad([prompt] * rows)
    opened = chat.prompt_opens_reasoning(self.backend.tokenizer, prompt)
    out_len = bucket(params.max_tokens, self.min_bucket)
    temperature, top_p = jnp.float32(params.temperature), jnp.float32(params.top_p)
    limit = jnp.int32(params.max_tokens)
    state = self._prefill(self._params, tokens, mask, rng, temperature, top_p,
                          cache_len=tokens.shape[1] + out_len - 1, out_len=out_len)
    while True:
      step, done, ids, lengths = jax.device_get((state["step"], state["done"], state["tokens"], state["lengths"]))
      texts = [chat.decode_completion(self.backend.tokenizer, ids[r], int(lengths[r]), bool(done[r]), opened)
               for r in range(rows)]
      if on_progress is not None:
        for r, text in enumerate(texts):
          on_progress(first_choice + r, text)
      stopped = [d or any(s in t for s in params.stop) for d, t in zip(done, texts)]
      if all(stopped) or step >= params.max_tokens:
        break
      if cancel.is_set():
        raise Cancelled("disconnected")
      if time.monotonic() > deadline:
        raise Cancelled("deadline")
      state = self._decode(self._params, state, limit, temperature, top_p)
    return [base.sampled_completion(texts[r], finished=bool(done[r]), stop=params.stop, prompt_tokens=len(prompt),
                                    completion_tokens=int(lengths[r])) for r in range(rows)]
