"""MFU of the SFT and RL update steps and sampler tokens/s for a model preset, on the local devices.

  python benchmarks/mfu.py [--model=llama3_1b] [--batch=8] [--seq=2048] [--parts=sft,rl,sample]
                           [--param_dtype=float32] [--remat=dots_no_batch] [--mesh=1,-1,1] [--out=FILE.jsonl]

Every part runs the project's own jitted functions on random params and tokens,
sharded over all local devices (default mesh: FSDP over all of them):
- `sft`: `sft.train_step` (AdamW, clipping, state donated), loss on every token.
- `rl`: `pg.rollout_logprobs` (the old-policy/reference forward) and
  `pg.update_step` (clipped PG + KL) on a rollout batch of the same shape,
  completions in the last quarter of each row.
- `sample`: `sampling.sample` (prefill + KV-cache decode, temperature 1, no EOS
  so every row runs to `--new_tokens`); prefill alone is timed too, so decode
  tokens/s and the weight bytes read per second come out separately.

FLOPs follow `safe_completion/flops.py` (the training logs' convention):
6N per trained token plus 12 x layers x seq x heads x head_dim for attention
(no causal discount), forward = a third of that. MFU is reported against the
vendor's dense bf16 peak on accelerators and, everywhere, against a matmul in
the compute dtype measured in the same run ("of measured"), which is the only
peak on CPU. Times are medians after one warm-up (compile) call.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `configs`.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from configs import sft as sft_configs  # noqa: E402
from safe_completion import flops  # noqa: E402
from safe_completion import parallel  # noqa: E402
from safe_completion import sft  # noqa: E402
from safe_completion import training  # noqa: E402
from safe_completion.models import sampling  # noqa: E402
from safe_completion.models import transformer  # noqa: E402
from safe_completion.rl import pg  # noqa: E402

PARTS = ("sft", "rl", "sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama3_1b", help="a configs/common.py MODELS preset")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  parser.add_argument("--batch", type=int, default=8, help="sequences per SFT / RL update step")
  parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence in the update steps")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
  parser.add_argument("--param_dtype", default="float32", help="param and optimizer-state dtype")
  parser.add_argument("--remat", default="dots_no_batch", help="model.remat_policy")
  parser.add_argument("--mesh", default="1,-1,1", help="(data, fsdp, tensor) sizes; -1 = the rest")
  parser.add_argument("--sample_batch", type=int, default=32, help="prompts per sampler call")
  parser.add_argument("--prompt_len", type=int, default=256)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--matmul", type=int, default=4096, help="size of the square peak matmul")
  parser.add_argument("--out", default="", help="append one JSON line per part to this file")
  args = parser.parse_args(argv)
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
  return args


def median_seconds(fn, steps: int) -> float:
  """Median wall seconds of `steps` calls of `fn` (which blocks), after one warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def measured_matmul_flops(shapes: list[tuple[int, int, int]], dtype: str) -> float:
  """Best FLOP/s over [m, k] @ [k, n] matmuls in `dtype` on the first device (best of 5 calls each).

  The shapes are a square one and the run's MLP up-projection, so the "peak"
  is what this device reaches on the model's own largest matmul.
  """
  best_rate = 0.0
  matmul = jax.jit(jnp.matmul)
  for m, k, n in shapes:
    a = jax.device_put(jnp.ones((m, k), dtype) / k, jax.devices()[0])
    b = jax.device_put(jnp.ones((k, n), dtype), jax.devices()[0])
    matmul(a, b).block_until_ready()
    for _ in range(5):
      started = time.perf_counter()
      matmul(a, b).block_until_ready()
      best_rate = max(best_rate, 2 * m * k * n / (time.perf_counter() - started))
  return best_rate


def vendor_peak(devices: list[jax.Device]) -> float | None:
  """Summed vendor bf16 peak of the devices, None on CPU or an unknown kind."""
  if devices[0].platform == "cpu":
    return None
  try:
    return flops.device_peak_flops(devices[0]) * len(devices)
  except ValueError:
    return None


def make_config(args: argparse.Namespace):
  """The SFT config the steps are built from, with the preset, numerics, mesh and batch of `args`."""
  config = sft_configs.get_config("tiny")
  config.model = common.model(args.model, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat,
                              max_seq_len=max(args.seq, args.prompt_len + args.new_tokens))
  config.mesh.shape = tuple(int(size) for size in args.mesh.split(","))
  config.batch_size, config.data.seq_len = args.batch, args.seq
  return config


def random_state(config, model_config: transformer.ModelConfig, mesh):
  optimizer, schedule = training.make_optimizer(config, num_steps=1000)
  state, shardings, _ = training.create_state(model_config, optimizer, mesh, parallel.rules_from_config(config))
  return state, shardings, optimizer, schedule


def token_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """Random tokens, one sequence per row, loss on every token."""
  tokens = np.random.default_rng(0).integers(0, vocab, size=(batch, seq), dtype=np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.int32)}


def utilisation(flops_per_call: float, seconds: float, peaks: dict[str, float]) -> dict[str, float]:
  achieved = flops_per_call / seconds
  return {"tflops_per_s": achieved / 1e12, **{f"mfu_of_{name}": achieved / peak for name, peak in peaks.items()}}


def bench_sft(args, config, model_config, mesh, rules, peaks) -> dict:
  state, shardings, optimizer, schedule = random_state(config, model_config, mesh)
  step_fn = jax.jit(functools.partial(sft.train_step, model_config=model_config, optimizer=optimizer,
                                      schedule=schedule),
                    in_shardings=(shardings, parallel.batch_sharding(mesh)),
                    out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  batch = parallel.shard_batch(token_batch(args.batch, args.seq, model_config.vocab_size), mesh)
  holder = {"state": state}

  def call():
    holder["state"], metrics = step_fn(holder["state"], batch)
    jax.block_until_ready(metrics)

  with parallel.activation_sharding(mesh, rules):
    seconds = median_seconds(call, args.steps)
  tokens = args.batch * args.seq
  return {"part": "sft_train_step", "seconds": seconds, "tokens_per_s": tokens / seconds,
          **utilisation(flops.train_flops_per_token(model_config, args.seq) * tokens, seconds, peaks)}


def rl_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """A rollout-shaped batch: prompt in the first 3/4 of each row, completion (masked in) after it."""
  rows = token_batch(batch, seq, vocab)
  prompt_len = seq - seq // 4
  rows["completion_mask"] = np.zeros((batch, seq - 1), np.float32)
  rows["completion_mask"][:, prompt_len - 1:] = 1.0
  rows["advantages"] = np.random.default_rng(1).standard_normal(batch).astype(np.float32)
  del rows["loss_mask"]
  return rows


def bench_rl(args, config, model_config, mesh, rules, peaks) -> dict:
  state, shardings, optimizer, _ = random_state(config, model_config, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  logprob_fn = jax.jit(functools.partial(pg.rollout_logprobs, model_config=model_config, temperature=1.0),
                       in_shardings=(shardings["params"], batch_sharding), out_shardings=batch_sharding)
  update_fn = jax.jit(functools.partial(pg.update_step, model_config=model_config, optimizer=optimizer,
                                        config=pg.PgConfig(max_completion_len=args.seq // 4)),
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, parallel.replicated(mesh)),
                      donate_argnums=0)
  host = rl_batch(args.batch, args.seq, model_config.vocab_size)
  holder = {"state": state}
  with parallel.activation_sharding(mesh, rules):
    batch = parallel.shard_batch(host, mesh)
    old_logprobs = logprob_fn(state["params"], batch)
    batch = parallel.shard_batch({**host, "old_logprobs": parallel.to_host(old_logprobs),
                                  "ref_logprobs": parallel.to_host(old_logprobs)}, mesh)
    forward_seconds = median_seconds(lambda: logprob_fn(holder["state"]["params"], batch).block_until_ready(),
                                     args.steps)

    def update():
      holder["state"], metrics = update_fn(holder["state"], batch)
      jax.block_until_ready(metrics)

    update_seconds = median_seconds(update, args.steps)
  tokens = args.batch * args.seq
  train_flops = flops.train_flops_per_token(model_config, args.seq) * tokens
  forward = utilisation(train_flops / 3, forward_seconds, peaks)
  return {"part": "rl_update_step", "seconds": update_seconds, "tokens_per_s": tokens / update_seconds,
          **utilisation(train_flops, update_seconds, peaks), "logprob_forward_seconds": forward_seconds,
          **{f"logprob_forward_{name}": value for name, value in forward.items()}}


def bench_sample(args, config, model_config, mesh, rules, peaks) -> dict:
  del peaks  # Decode is bound by memory, not FLOPs: reported as tokens/s and weight bytes/s.
  param_shardings = training.param_shardings(model_config, mesh, rules)
  params = training.initial_params(model_config, param_shardings, seed=0)  # As stored: param_dtype.
  rng = np.random.default_rng(2)
  prompts = rng.integers(0, model_config.vocab_size, size=(args.sample_batch, args.prompt_len), dtype=np.int32)
  mask = np.ones_like(prompts)

  def sampler(new_tokens: int):
    sampling_config = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    fn = jax.jit(functools.partial(sampling.sample, model_config=model_config, sampling_config=sampling_config))
    tokens, prompt_mask = parallel.shard_batch((prompts, mask), mesh)
    return lambda: fn(params, prompt_tokens=tokens, prompt_mask=prompt_mask,
                      rng=jax.random.key(3)).tokens.block_until_ready()

  with parallel.activation_sharding(mesh, rules):
    prefill_seconds = median_seconds(sampler(1), args.steps)
    total_seconds = median_seconds(sampler(args.new_tokens), args.steps)
  decode_steps = args.new_tokens - 1
  decode_seconds = max(total_seconds - prefill_seconds, 1e-9)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return {"part": "sampler", "seconds": total_seconds,
          "tokens_per_s": args.sample_batch * args.new_tokens / total_seconds,
          "prefill_seconds": prefill_seconds,
          "prefill_tokens_per_s": args.sample_batch * args.prompt_len / prefill_seconds,
          "decode_tokens_per_s": args.sample_batch * decode_steps / decode_seconds,
          "decode_weight_gb_per_s": weight_bytes * decode_steps / decode_seconds / 1e9}


BENCHES = {"sft": bench_sft, "rl": bench_rl, "sample": bench_sample}


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  config = make_config(args)
  model_config = sft.model_config_from(config)
  mesh = parallel.mesh_from_config(config)
  rules = parallel.rules_from_config(config)
  devices = mesh.devices.flatten().tolist()
  # Fake CPU devices share the host's cores: its measured peak counts once.
  shapes = [(args.matmul,) * 3, (args.batch * args.seq // len(devices) or 1, model_config.hidden_size,
                                 model_config.mlp_dim)]
  measured = measured_matmul_flops(shapes, args.dtype) * (1 if devices[0].platform == "cpu" else len(devices))
  vendor = vendor_peak(devices)
  peaks = {"measured": measured, **({"vendor": vendor} if vendor else {})}
  header = {"model": args.model, "matmul_params": flops.matmul_params(model_config), "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "dtype": args.dtype,
            "param_dtype": args.param_dtype, "remat": args.remat, "batch": args.batch, "seq": args.seq,
            **{f"peak_{name}_tflops": peak / 1e12 for name, peak in peaks.items()}}
  print(json.dumps(header))
  results = []
  for part in args.parts.split(","):
    result = {**header, **BENCHES[part](args, config, model_config, mesh, rules, peaks)}
    results.append(result)
    line = ", ".join(f"{k} {v:.3g}" for k, v in result.items() if k not in header and isinstance(v, float))
    print(f"{result['part']}: {line}", flush=True)
    if args.out and jax.process_index() == 0:
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
  return results


if __name__ == "__main__":
  main()
