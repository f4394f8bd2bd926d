"""Greedy decode throughput of the jitted KV-cache sampler against `transformers` generate on CPU.

  python benchmarks/sampler.py [--threads=1] [--batch=8] [--prompt_len=32] [--new_tokens=128] [--repeats=1]

Both sides run the same random-weight Llama (hidden 256, 4 layers, 8 heads,
4 KV heads, vocab 4096): it is built with `transformers`, saved as
safetensors and read back into our params with `convert.load_hf_checkpoint`.
Same prompts, float32, greedy, KV cache on, no EOS stop (both produce every
token). The process is pinned to `--threads` cores and torch uses that many
threads, so XLA and PyTorch get the same CPU. Each side is warmed up once
(compilation excluded), then the two are timed in alternation over `repeats`
full generations each (`block_until_ready` on the jax side), so load from
other processes hits both alike; tokens/s counts generated tokens, prefill
included, and the speed-up is the median of the per-pair ratios (also of
process CPU seconds, which move less with other processes' load).
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from safe_completion.models import convert, sampling, transformer


def build_checkpoint(model_dir: str, vocab_size: int) -> transformers.LlamaForCausalLM:
  """A random Llama saved to `model_dir`; initializer_range 0.1 gives logits with clear argmaxes."""
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
      num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(model_dir)
  return model


def paired_seconds(first, second, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
  """Wall and process-CPU seconds of `repeats` alternating calls of each, after one warm-up call of each."""
  first(), second()  # Warm-up: compilation (jax) and allocator / kernel selection (torch).
  times = {"wall": ([], []), "cpu": ([], [])}
  for _ in range(repeats):
    for i, fn in enumerate((first, second)):
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      times["wall"][i].append(time.perf_counter() - wall)
      times["cpu"][i].append(time.process_time() - cpu)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()

  # Before either runtime starts its thread pool (both start lazily, on first use).
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  torch.set_num_threads(args.threads)

  with tempfile.TemporaryDirectory() as model_dir:
    hf_model = build_checkpoint(model_dir, args.vocab)
    params, model_config = convert.load_hf_checkpoint(model_dir)
  params = jax.device_put(params)

  prompts = np.random.default_rng(0).integers(3, args.vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts)
  torch_prompts, torch_mask = torch.from_numpy(prompts).long(), torch.from_numpy(mask).long()

  # The converted model is the same model: prompt logits agree.
  with torch.no_grad():
    hf_logits = hf_model(input_ids=torch_prompts, attention_mask=torch_mask).logits.numpy()
  our_logits = transformer.forward(params, model_config, prompts, transformer.positions_from_mask(mask), mask)
  logit_diff = float(np.max(np.abs(np.asarray(our_logits) - hf_logits)))

  sampling_config = sampling.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
  rng = jax.random.key(0)

  def run_jax():
    return jax.block_until_ready(sampling.sample(params, model_config, prompts, mask, rng, sampling_config))

  def run_torch():
    with torch.no_grad():
      return hf_model.generate(input_ids=torch_prompts, attention_mask=torch_mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

  times = paired_seconds(run_jax, run_torch, args.repeats)
  jax_s, torch_s = (statistics.median(t) for t in times["wall"])
  speedup, cpu_speedup = (statistics.median(t / j for j, t in zip(*times[clock])) for clock in ("wall", "cpu"))
  ours, theirs = np.asarray(run_jax().tokens), run_torch()[:, args.prompt_len:].numpy()

  generated = args.batch * args.new_tokens
  print(f"Llama hidden 256, 4 layers, 8 heads / 4 kv, vocab {args.vocab}, float32; batch {args.batch} x "
        f"{args.prompt_len} prompt tokens, {args.new_tokens} new tokens, greedy; {args.threads} CPU thread(s); "
        f"median of {args.repeats} alternating runs after 1 warm-up")
  print(f"max |logit diff| on the prompts: {logit_diff:.2e}; identical greedy rows: "
        f"{int(np.sum(np.all(ours == theirs, axis=1)))}/{args.batch}, identical tokens: {np.mean(ours == theirs):.1%}")
  print(f"jax sampler (jit, while_loop):   {generated / jax_s:10,.0f} tokens/s  ({jax_s:7.3f} s)")
  print(f"transformers generate (torch):  {generated / torch_s:10,.0f} tokens/s  ({torch_s:7.3f} s)")
  print(f"speed-up (median of pairs):     {speedup:10.2f}x  (process CPU seconds: {cpu_speedup:.2f}x)")


if __name__ == "__main__":
  main()
