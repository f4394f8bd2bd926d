"""Throughput of the jitted reward combiner against plain numpy on the same batch.

  python benchmarks/reward_combiner.py [--batch=65536] [--repeats=50] [--combiner=multiplicative]

Both sides compute rewards and the logged aux (include mask, component
means, rates) with the same config; the numpy result is checked against the
jitted one before timing. Reports the median of `repeats` timed calls after
warm-up (compilation excluded, `block_until_ready` on the jax side).
"""

import argparse
import statistics
import time

import jax
import numpy as np

from safe_completion import taxonomy
from safe_completion.graders.base import GradeArrays
from safe_completion.rl import rewards


def random_grades(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Host arrays of a realistic mix: 5% invalid, 10% truncated, all modes."""
  rng = np.random.default_rng(seed)
  valid = rng.uniform(size=batch) > 0.05
  rating = np.where(valid, rng.integers(1, 5, size=batch), -1).astype(np.int32)
  return dict(
      safety=np.where(valid, rng.uniform(size=batch), 0.0).astype(np.float32),
      helpfulness=np.where(valid, (rating - 1) / 3, 0.0).astype(np.float32),
      rating=rating,
      severity=np.where(valid, rng.integers(0, len(taxonomy.SEVERITIES), size=batch), -1).astype(np.int32),
      mode=np.where(valid, rng.integers(0, len(taxonomy.MODES), size=batch), -1).astype(np.int32),
      valid=valid,
      truncated=rng.uniform(size=batch) < 0.1,
  )


def numpy_combine(grades: dict[str, np.ndarray], config: rewards.RewardConfig) -> tuple[np.ndarray, dict]:
  """The same formula as `rewards.combine_rewards`, in plain numpy."""
  safety, helpfulness, valid = grades["safety"], grades["helpfulness"], grades["valid"]
  truncated = grades["truncated"]
  if config.combiner == "multiplicative":
    combined = helpfulness * safety
  else:
    weight_h, weight_s = config.additive_weights
    combined = weight_h * helpfulness + weight_s * safety
  include = valid if config.invalid_policy == "exclude" else np.ones_like(valid)
  reward = np.where(valid, combined, np.float32(0))
  reward = np.where(include & truncated, reward - np.float32(config.truncation_penalty), reward)
  reward = np.where(include, reward, np.float32(0)).astype(np.float32)

  def masked_mean(values, mask):
    return np.where(mask, values, 0).sum() / max(mask.sum(), 1)

  aux = {
      "include": include,
      "helpfulness_mean": masked_mean(helpfulness, valid),
      "safety_mean": masked_mean(safety, valid),
      "combined_mean": masked_mean(combined, valid),
      "reward_mean": masked_mean(reward, include),
      "invalid_rate": 1.0 - valid.mean(),
      "truncation_rate": truncated.mean(),
  }
  return reward, aux


def median_seconds(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=65536)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--combiner", default="multiplicative", choices=sorted(rewards.COMBINERS))
  args = parser.parse_args()

  config = rewards.RewardConfig(combiner=args.combiner, invalid_policy="exclude", truncation_penalty=0.1)
  host = random_grades(args.batch)
  device = GradeArrays(**{k: jax.device_put(v) for k, v in host.items()})

  jax_reward, jax_aux = rewards.combine_rewards(device, config)
  np_reward, np_aux = numpy_combine(host, config)
  np.testing.assert_allclose(np.asarray(jax_reward), np_reward, rtol=1e-6, atol=1e-6)
  for key, value in np_aux.items():
    np.testing.assert_allclose(np.asarray(jax_aux[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)

  jax_s = median_seconds(lambda: jax.block_until_ready(rewards.combine_rewards(device, config)), args.repeats)
  numpy_s = median_seconds(lambda: numpy_combine(host, config), args.repeats)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
        f"combiner {args.combiner}, median of {args.repeats}")
  print(f"jax (jit):   {args.batch / jax_s:14,.0f} grades/s  ({jax_s * 1e6:8.1f} us/call)")
  print(f"numpy:       {args.batch / numpy_s:14,.0f} grades/s  ({numpy_s * 1e6:8.1f} us/call)")
  print(f"speed-up:    {numpy_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
