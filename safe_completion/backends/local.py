"""Our Flax decoder as a backend: chat template, left padding, the jitted sampler, decoding.

Prompts are left-padded to the fixed `max_prompt_len` and batches to the fixed
`batch_size`, so the sampler compiles once per sampling setting (temperature,
top_p, max_tokens), never per request. Calls are serialised by a lock, so one
backend can sit behind a threaded server. Given a mesh (params already placed on
it), each batch is split over its data-parallel axes and sampled inside
`parallel.activation_sharding`, so a model too big for one device generates.
"""

import random
import threading
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from safe_completion import parallel
from safe_completion.backends import base
from safe_completion.data import chat
from safe_completion.models import sampling
from safe_completion.models import transformer


class LocalBackend:
  """Completions from `params` of a `transformer.Decoder`, in process.

  Args:
    params: decoder params.
    model_config: the decoder's config.
    tokenizer: an HF tokenizer with a chat template (its EOS ends a completion).
    max_prompt_len: prompts are left-padded to this many tokens; longer ones are an error.
    model_id: the name served and recorded in provenance.
    batch_size: rows per sampler call (conversations x n are split into batches).
    eos_ids: token ids that end a completion; default the tokenizer's EOS.
    top_k: top-k filter (0 is off); the OpenAI schema has no field for it.
    mesh: the mesh `params` are sharded over; None: one device, as placed.
    rules: the (logical axis, mesh axes) rules of the activation constraints on `mesh`.
  """

  def __init__(self, params: dict, model_config: transformer.ModelConfig, tokenizer, max_prompt_len: int, *,
               model_id: str = "local", batch_size: int = 8, eos_ids: Sequence[int] | None = None, top_k: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=parallel.DEFAULT_RULES):
    if eos_ids is None:
      if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; pass eos_ids")
      eos_ids = (tokenizer.eos_token_id,)
    if mesh is not None:
      shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.axis_names]))
      if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} is not divisible by the mesh's {shards} data-parallel shards "
                         f"(data x fsdp of {dict(mesh.shape)}): use a multiple of {shards}")
    self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
    self.max_prompt_len, self.batch_size, self.top_k = max_prompt_len, batch_size, top_k
    self.model_id, self.mesh, self.rules = model_id, mesh, rules
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
    self._lock = threading.Lock()

  def sampling_config(self, params: base.SamplingParams) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                   top_k=self.top_k, top_p=params.top_p, eos_ids=self.eos_ids, pad_id=self.pad_id)

  def encode(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[list[int]]:
    """Prompt token ids through the chat template; raises if one exceeds max_prompt_len."""
    prompts = [chat.encode_prompt(self.tokenizer, [dict(m) for m in c]) for c in conversations]
    for i, prompt in enumerate(prompts):
      if len(prompt) > self.max_prompt_len:
        raise ValueError(f"conversation {i}: prompt of {len(prompt)} tokens exceeds max_prompt_len="
                         f"{self.max_prompt_len}")
    return prompts

  def left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[batch_size, max_prompt_len] tokens and mask; missing rows are one pad token (discarded)."""
    return chat.left_pad(prompts, self.max_prompt_len, self.pad_id, rows=self.batch_size)

  def generate(self, conversations: Sequence[Sequence[Mapping[str, str]]],
               params: base.SamplingParams) -> list[list[base.Completion]]:
    prompts = self.encode(conversations)
    rows = [prompt for prompt in prompts for _ in range(params.n)]
    opened = [chat.prompt_opens_reasoning(self.tokenizer, prompt) for prompt in prompts]
    config = self.sampling_config(params)
    seed = params.seed if params.seed is not None else random.getrandbits(31)
    rng = jax.random.key(seed)
    flat: list[base.Completion] = []
    with self._lock:
      for b, start in enumerate(range(0, len(rows), self.batch_size)):
        chunk = rows[start:start + self.batch_size]
        out = self.sample(chunk, config, jax.random.fold_in(rng, b))
        for r, prompt in enumerate(chunk):
          flat.append(self._completion(out.tokens[r], int(out.lengths[r]), bool(out.finished[r]), len(prompt),
                                       params.stop, opened[(start + r) // params.n]))
    return [flat[i * params.n:(i + 1) * params.n] for i in range(len(conversations))]

  def sample(self, prompts: Sequence[Sequence[int]], config: sampling.SamplingConfig,
             rng: jax.Array) -> sampling.SampleOutput:
    """Host arrays of the sampler's output for up to `batch_size` prompts (rows past them are padding)."""
    tokens, mask = self.left_pad(prompts)
    if self.mesh is None:
      return jax.device_get(sampling.sample(self.params, self.model_config, tokens, mask, rng, config))
    with parallel.activation_sharding(self.mesh, self.rules):
      tokens, mask = parallel.shard_batch((tokens, mask), self.mesh)
      return parallel.to_host(sampling.sample(self.params, self.model_config, tokens, mask, rng, config))

  def _completion(self, tokens: np.ndarray, length: int, finished: bool, prompt_tokens: int,
                  stop: Sequence[str], opened: bool) -> base.Completion:
    return base.sampled_completion(chat.decode_completion(self.tokenizer, tokens, length, finished, opened),
                                   finished=finished, stop=stop, prompt_tokens=prompt_tokens,
                                   completion_tokens=length)
