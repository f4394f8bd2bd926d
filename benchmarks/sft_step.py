"""Tokens/s and MFU of our SFT train step against the same model's training step in PyTorch.

  python benchmarks/sft_step.py [--batch=4] [--seq=512] [--steps=5] [--rounds=5] [--threads=2]
                                [--xla_flags="..."] [--remat=none] [--scan_unroll=1] [--skip_torch]

Both sides train `configs/common.py` MODELS["small"] (d=512, 8 layers, 8 heads,
MLP 1536, vocab 4096, tied embeddings) in float32 on the same token batch with
the loss on every next token: ours is `sft.train_step` (AdamW, global-norm
clipping, jitted with the state donated) on a one-device mesh; PyTorch is
`LlamaForCausalLM` with `torch.optim.AdamW` and `clip_grad_norm_`. Rounds
alternate the two (and an f32 matmul on each side, for the peak) so that load
from other processes hits both alike; reported times are medians of all timed
steps after warm-up; the ratios are also given per round (min-max over
rounds), and the load average before and after says whether the machine was
quiet (see benchmarks/README.md).

FLOPs: 6 * N * tokens per step, N = the matmul params (every layer's
projections plus the tied embedding used as the LM head; the embedding lookup
and norms are not matmuls). Attention adds 12 * layers * seq * d per token
(scores and values, forward and backward, no causal discount); it is reported
separately and not counted in MFU. MFU = model FLOP/s / the larger measured
matmul rate.
"""

import argparse
import os
import resource
import statistics
import sys
import time

# XLA reads its flags once, at backend start: they must be set before jax is imported.
# YNNPACK for dots only, as `safe_completion/main.py` sets it: XLA's default also hands
# elementwise/reduce fusions to YNNPACK (slow transposing fusions around the MLP and
# attention backward); dots-only cut the step's CPU time by 20-25% on 2-core Zen 4 and Xeon.
DEFAULT_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot"


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4, help="sequences per step (both sides)")
  parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
  parser.add_argument("--rounds", type=int, default=5, help="alternating jax/torch rounds")
  parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
  parser.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS, help="appended to $XLA_FLAGS")
  parser.add_argument("--remat", default="none", help="model.remat_policy of our step")
  parser.add_argument("--scan_unroll", type=int, default=1, help="model.scan_unroll of our step (8: no layer loop)")
  parser.add_argument("--matmul", type=int, default=2048, help="size of the square f32 peak matmul")
  parser.add_argument("--skip_torch", action="store_true")
  return parser.parse_args()


ARGS = _parse_args()
LOAD_AT_START = os.getloadavg()[0]  # Before this process adds its own threads: other processes' load.
if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
  sys.exit("sft_step: unset --xla_force_host_platform_device_count; the benchmark runs on the real CPU device")
os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), ARGS.xla_flags) if f)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # For `configs`.

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from configs import sft as sft_configs  # noqa: E402
from safe_completion import parallel  # noqa: E402
from safe_completion import sft  # noqa: E402
from safe_completion import training  # noqa: E402
from safe_completion.models import transformer  # noqa: E402


def timed(fn, repeats: int) -> tuple[list[float], list[float], list[tuple[float, int]]]:
  """Wall and process-CPU seconds of each of `repeats` calls of `fn` (which must block until done),
  and each call's kernel CPU seconds and minor page faults (memory the allocator mapped anew)."""
  wall, cpu, kernel = [], [], []
  for _ in range(repeats):
    usage, start, start_cpu = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel.append((after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt))
  return wall, cpu, kernel


def preloaded_allocator() -> str:
  """The malloc library named in LD_PRELOAD (tcmalloc, jemalloc, ...), else glibc's."""
  names = [os.path.basename(p) for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
  return ", ".join(n for n in names if "malloc" in n) or "glibc malloc"


def host_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """Random tokens, one sequence per row, loss on every token."""
  tokens = np.random.default_rng(0).integers(0, vocab, size=(batch, seq), dtype=np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.int32)}


class JaxStep:
  """Our jitted SFT step on a one-device mesh; `__call__` runs one step and blocks."""

  def __init__(self, batch: dict[str, np.ndarray], remat: str, scan_unroll: int):
    config = sft_configs.get_config("tiny")
    config.model = common.model("small", max_seq_len=max(batch["tokens"].shape[1], 1024), remat_policy=remat,
                                scan_unroll=scan_unroll)
    config.mesh.shape = (1, 1, 1)
    config.batch_size, config.data.seq_len = batch["tokens"].shape
    self.model_config = sft.model_config_from(config)
    self.mesh = parallel.mesh_from_config(config)
    self.rules = parallel.rules_from_config(config)
    optimizer, schedule = training.make_optimizer(config, num_steps=1000)
    self.state, shardings, _ = training.create_state(self.model_config, optimizer, self.mesh, self.rules)
    self.num_params = transformer.num_params(self.state["params"])
    self.batch = parallel.shard_batch(batch, self.mesh)
    self.step_fn = jax.jit(
        functools.partial(sft.train_step, model_config=self.model_config, optimizer=optimizer, schedule=schedule),
        in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
        out_shardings=(shardings, parallel.replicated(self.mesh)), donate_argnums=0)
    self.loss = float("nan")

  def __call__(self):
    with parallel.activation_sharding(self.mesh, self.rules):
      self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.loss = float(metrics["loss"])


class TorchStep:
  """`LlamaForCausalLM` with the same dims, AdamW and clipping; `__call__` runs one step."""

  def __init__(self, batch: dict[str, np.ndarray], model_config: transformer.ModelConfig):
    import torch
    import transformers
    self.torch = torch
    hf_config = transformers.LlamaConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        intermediate_size=model_config.mlp_dim, num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_heads, num_key_value_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim, max_position_embeddings=model_config.max_seq_len,
        rms_norm_eps=model_config.norm_eps, rope_theta=model_config.rope_theta, tie_word_embeddings=True,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    self.model = transformers.LlamaForCausalLM(hf_config).float().train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    self.tokens = torch.from_numpy(batch["tokens"]).long()
    self.loss = float("nan")

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.loss = float(loss.detach())


def matmul_fns(size: int):
  """Blocking f32 [size, size] @ [size, size] in jax and in torch."""
  import torch
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
  ja, jb = jax.device_put(a), jax.device_put(b)
  jax_matmul = jax.jit(jnp.matmul)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  return (lambda: jax_matmul(ja, jb).block_until_ready()), (lambda: torch.matmul(ta, tb))


def main():
  import torch
  torch.set_num_threads(ARGS.threads)
  if len(jax.devices()) != 1:
    sys.exit(f"sft_step: expected one CPU device, found {jax.devices()}")
  batch = host_batch(ARGS.batch, ARGS.seq, common.MODELS["small"]["vocab_size"])
  ours = JaxStep(batch, ARGS.remat, ARGS.scan_unroll)
  cfg = ours.model_config
  embedding = cfg.vocab_size * cfg.hidden_size
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
  matmul_params = ours.num_params - norms  # The tied embedding counts once, as the LM head.
  tokens = ARGS.batch * ARGS.seq
  model_flops = 6 * matmul_params * tokens
  attention_flops = 12 * cfg.num_layers * ARGS.seq * cfg.num_heads * cfg.head_dim * tokens

  theirs = None if ARGS.skip_torch else TorchStep(batch, cfg)
  jax_mm, torch_mm = matmul_fns(ARGS.matmul)
  for fn in (ours, ours, jax_mm, jax_mm) + (() if theirs is None else (theirs, theirs, torch_mm, torch_mm)):
    fn()  # Compile / warm up.
  first_losses = (ours.loss, theirs.loss if theirs else float("nan"))

  times = {"ours": [], "torch": [], "jax_mm": [], "torch_mm": []}
  cpu_times = {k: [] for k in times}
  kernel_times = {k: [] for k in times}
  runs = [("jax_mm", jax_mm, 5), ("ours", ours, ARGS.steps)]
  if theirs is not None:
    runs += [("torch_mm", torch_mm, 5), ("torch", theirs, ARGS.steps)]
  load_before = LOAD_AT_START
  per_round = []  # (tokens/s ratio, CPU-time ratio) of each round's medians.
  for _ in range(ARGS.rounds):
    medians = {}
    for name, fn, repeats in runs:
      wall, cpu, kernel = timed(fn, repeats)
      times[name] += wall
      cpu_times[name] += cpu
      kernel_times[name] += kernel
      medians[name] = (statistics.median(wall), statistics.median(cpu))
    if theirs is not None:
      per_round.append((medians["torch"][0] / medians["ours"][0], medians["torch"][1] / medians["ours"][1]))
  load_after = os.getloadavg()[0]
  med = {k: statistics.median(v) for k, v in times.items() if v}
  cpu_med = {k: statistics.median(v) for k, v in cpu_times.items() if v}
  mm_flops = 2 * ARGS.matmul ** 3
  peaks = {k: mm_flops / med[k] / 1e9 for k in ("jax_mm", "torch_mm") if k in med}
  peak = max(peaks.values())
  cpu_peak = max(mm_flops / cpu_med[k] for k in ("jax_mm", "torch_mm") if k in cpu_med)  # FLOP per CPU-s.

  print(f"device: {jax.devices()[0].device_kind}, {ARGS.threads} threads (torch), XLA_FLAGS={os.environ['XLA_FLAGS']!r}, "
        f"allocator: {preloaded_allocator()}")
  quiet = load_before < 0.3 and load_after < 0.3 + ARGS.threads  # The second counts this benchmark's threads.
  print(f"load average (1 min) at start {load_before:.2f}, at end {load_after:.2f} (with this run's "
        f"{ARGS.threads} threads): "
        + ("quiet" if quiet else "NOT quiet, other processes ran; compare CPU-time ratios only"))
  print(f"model: small d={cfg.hidden_size} L={cfg.num_layers} H={cfg.num_heads} mlp={cfg.mlp_dim} V={cfg.vocab_size} "
        f"f32, remat={cfg.remat_policy}, scan_unroll={cfg.scan_unroll}, "
        f"transposed_weight_grads={cfg.transposed_weight_grads}; {ours.num_params / 1e6:.2f}M params, {matmul_params / 1e6:.2f}M in matmuls "
        f"(embedding {embedding / 1e6:.2f}M as tied head); batch {ARGS.batch}x{ARGS.seq} = {tokens} tokens/step")
  print(f"flops/step: 6N {model_flops / 1e9:.1f} GFLOP + attention {attention_flops / 1e9:.1f} GFLOP")
  print(f"warm-up losses (should be near ln V = {np.log(cfg.vocab_size):.2f}): ours {first_losses[0]:.3f}, "
        f"torch {first_losses[1]:.3f}")
  print(f"matmul {ARGS.matmul}^2 f32: " + ", ".join(f"{k.split('_')[0]} {v:.1f} GFLOP/s" for k, v in peaks.items()))
  rows = {}
  for name in ("ours", "torch"):
    if name not in med:
      continue
    seconds = med[name]
    rows[name] = (tokens / seconds, model_flops / seconds / 1e9, (model_flops + attention_flops) / seconds / 1e9)
    print(f"{name:6s} {seconds * 1e3:8.1f} ms/step (median of {len(times[name])}), {rows[name][0]:8.0f} tok/s, "
          f"{rows[name][1]:6.1f} GFLOP/s (6N) = {rows[name][1] / peak:.0%} MFU, "
          f"{rows[name][2]:6.1f} GFLOP/s with attention; {cpu_med[name]:.2f} CPU-s/step, "
          f"{tokens / cpu_med[name]:.0f} tok per CPU-s, CPU-time MFU {model_flops / cpu_med[name] / cpu_peak:.0%}; "
          f"kernel {statistics.median(k for k, _ in kernel_times[name]):.2f} CPU-s and "
          f"{statistics.median(f for _, f in kernel_times[name]) * resource.getpagesize() / 2**20:.0f} MiB "
          "of page faults per step")
  if per_round:
    spread = lambda i: f"{min(r[i] for r in per_round):.2f}-{max(r[i] for r in per_round):.2f}x"
    print(f"per round (ours/torch, {len(per_round)} rounds): tokens/s {spread(0)}, tokens per CPU-s {spread(1)}")
  if "torch" in rows:
    print(f"CPU-time ratio (less sensitive to other processes' load): ours/torch tokens per CPU-s "
          f"{cpu_med['torch'] / cpu_med['ours']:.2f}x; matmul CPU-s jax {cpu_med['jax_mm']:.3f}, "
          f"torch {cpu_med['torch_mm']:.3f}")
  summary = f"sft_step: ours {rows['ours'][0]:.0f} tok/s"
  if "torch" in rows:
    summary += f", torch {rows['torch'][0]:.0f} tok/s, ratio {rows['ours'][0] / rows['torch'][0]:.2f}x"
  if per_round:
    summary += f" (rounds {spread(0)}), CPU-time ratio {cpu_med['torch'] / cpu_med['ours']:.2f}x (rounds {spread(1)})"
  summary += f"; ours {rows['ours'][1]:.1f} GFLOP/s = {rows['ours'][1] / peak:.0%} of peak {peak:.1f} GFLOP/s"
  if "torch" in rows:
    summary += f" (torch {rows['torch'][1] / peak:.0%})"
  summary += f"; load {load_before:.1f}/{load_after:.1f}"
  print(summary)


if __name__ == "__main__":
  main()
