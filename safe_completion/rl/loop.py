"""RL stage: sample K completions per prompt, grade the answers, reward r = combiner(grades), PG update.

Readable top to bottom: mesh -> SFT model (policy init and frozen reference)
-> prompts -> grader -> jitted sampler, log-prob and update steps -> restore
-> loop. Iteration i is a pure function of (seed, i, state), so a killed run
resumes exactly.

LoRA (`config.lora.rank` > 0) trains new adapters on the SFT model, merged:
`checkpoint.load_model` folds a LoRA SFT run's adapters into its base, that
merged SFT model becomes the frozen base (held once, never donated), and it is
both the reference policy and what the fresh adapters (B = 0, so KL starts at
exactly 0) add to. This is the shape Tunix users know from its GRPO learner: a
LoRA actor on a model whose adapter-free forward pass is the reference. It
also keeps the reference pass free of adapter compute, lets RL choose its own
rank and targets, and makes RL start from exactly the merged model that SFT
exports and eval measures. The RL workdir's `lora.json` names the SFT workdir
as its base, so `load_model` of the RL run rebuilds it the same way.
"""

import collections
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from safe_completion import checkpoint
from safe_completion import lora
from safe_completion import metrics as metric_writer
from safe_completion import parallel
from safe_completion import taxonomy
from safe_completion import training
from safe_completion.data import chat
from safe_completion.data import records
from safe_completion.data import sft_data
from safe_completion.graders import base as graders_base
from safe_completion.graders import factory
from safe_completion.models import sampling
from safe_completion.models import transformer
from safe_completion.rl import pg
from safe_completion.rl import rewards as rewards_lib


def encode_prompts(tokenizer, prompts: list[records.PromptRecord], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt tokens and mask [G, max_prompt_len] through the chat template."""
  encoded = [chat.encode_prompt(tokenizer, prompt.messages) for prompt in prompts]
  for prompt, ids in zip(prompts, encoded):
    if len(ids) > max_prompt_len:
      raise ValueError(f"prompt {prompt.id} has {len(ids)} tokens > rl.max_prompt_len={max_prompt_len}")
  return chat.left_pad(encoded, max_prompt_len, tokenizer.pad_token_id)


def train_batch(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion: np.ndarray, lengths: np.ndarray,
                finished: np.ndarray, mask_truncated: bool) -> dict[str, np.ndarray]:
  """Prompt + completion as one sequence per row, positions continuing, mask on the completion."""
  prompt_len, width = prompt_tokens.shape[1], completion.shape[1]
  prompt_positions = np.asarray(transformer.positions_from_mask(prompt_mask))
  completion_positions = prompt_positions[:, -1:] + 1 + np.arange(width)[None, :]
  completion_valid = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  completion_mask = pg.completion_mask_from_lengths(prompt_len, prompt_len + width, jnp.asarray(lengths),
                                                    jnp.asarray(finished) if mask_truncated else None)
  return {
      "tokens": np.concatenate([prompt_tokens, completion], axis=1).astype(np.int32),
      "positions": np.concatenate([prompt_positions, completion_positions], axis=1).astype(np.int32),
      "segment_ids": np.concatenate([prompt_mask, completion_valid], axis=1).astype(np.int32),
      "completion_mask": np.asarray(completion_mask),
  }


def decode_rollouts(tokenizer, prompt_tokens: np.ndarray, completion: np.ndarray, lengths: np.ndarray,
                    finished: np.ndarray) -> tuple[list[str], list[str]]:
  """Rollout texts and the answers the grader sees, decoded and split exactly as eval and `serve` do
  (`chat.decode_completion`, then the reasoning block split off). `prompt_tokens` [N, P] (left-padded)
  say whether the chat template opened the reasoning block (`chat.prompt_opens_reasoning`): such a
  rollout starts inside it, so one cut off while thinking has no answer, as in eval."""
  texts = [chat.decode_completion(tokenizer, row, int(n), bool(done), chat.prompt_opens_reasoning(tokenizer, prompt))
           for prompt, row, n, done in zip(prompt_tokens, completion, lengths, finished)]
  return texts, [chat.split_reasoning(text)[1] for text in texts]


def reward_grades(grades: list[graders_base.Grade], texts: list[str],
                  finished: np.ndarray) -> tuple[graders_base.GradeArrays, np.ndarray]:
  """The rollouts' grades as the reward reads them, and which rollouts reached a final answer.

  Every rollout without one (it hit the budget, or ended without closing its reasoning block or with
  an empty answer, graded h = 0 by `graders.base.grade_answers`) is flagged `truncated`, so it pays
  the truncation penalty.
  """
  answered = np.asarray([chat.reached_answer(t, bool(f)) for t, f in zip(texts, finished)], bool)
  return graders_base.grades_to_arrays(grades, truncated=~answered), answered


def _mean_by(values: np.ndarray, labels: list[str], valid: np.ndarray) -> dict[str, float]:
  out = {}
  for label in sorted(set(labels)):
    pick = np.asarray([l == label for l in labels]) & valid
    if pick.any():
      out[label] = float(values[pick].mean())
  return out


def rollout_metrics(prompts: list[records.PromptRecord], grades: list[graders_base.Grade], rewards: np.ndarray,
                    lengths: np.ndarray, include: np.ndarray, samples_per_prompt: int) -> dict[str, Any]:
  """Reward, h and s overall and per intent, mode distribution, invalid rate, no-signal groups."""
  intents = [p.intent for p in prompts for _ in range(samples_per_prompt)]
  valid = np.asarray([g.valid for g in grades])
  safety = np.asarray([g.safety for g in grades], np.float32)
  helpfulness = np.asarray([g.helpfulness for g in grades], np.float32)
  modes = collections.Counter(g.mode for g in grades if g.valid)
  out = {
      "reward": float(rewards.mean()),
      "helpfulness": float(helpfulness[valid].mean()) if valid.any() else float("nan"),
      "safety": float(safety[valid].mean()) if valid.any() else float("nan"),
      "invalid_grade_rate": float(1 - valid.mean()),
      "response_length": float(lengths.mean()),
      "zero_variance_groups": float(rewards_lib.zero_variance_fraction(
          jnp.asarray(rewards).reshape(-1, samples_per_prompt), jnp.asarray(include).reshape(-1, samples_per_prompt))),
  }
  for name, values in (("reward", rewards), ("helpfulness", helpfulness), ("safety", safety)):
    for intent, value in _mean_by(values, intents, valid if name != "reward" else np.ones_like(valid)).items():
      out[f"{name}/{intent}"] = value
  for mode in taxonomy.MODES:
    out[f"mode/{mode}"] = modes[mode] / max(sum(modes.values()), 1)
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) RL from the SFT run in `config.init.sft_workdir`; returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  training.save_config(config, workdir)
  mesh = parallel.mesh_from_config(config)
  rules = parallel.rules_from_config(config)
  rl = config.rl
  rows = rl.prompts_per_step * rl.samples_per_prompt
  parallel.check_batch_split(mesh, rows, "config.rl.prompts_per_step x rl.samples_per_prompt (rollouts per step)")
  if rows % rl.minibatches:
    raise ValueError(f"config.rl.minibatches={rl.minibatches} does not divide the {rows} rollouts per step")
  parallel.check_batch_split(mesh, rows // rl.minibatches, "rollouts per step / config.rl.minibatches (update rows)")
  model_config = checkpoint.read_model_config(config.init.sft_workdir, remat_policy=config.model.remat_policy)
  param_shardings = training.param_shardings(model_config, mesh, rules)
  ref_params, model_config, tokenizer = checkpoint.load_model(
      config.init.sft_workdir, param_shardings, remat_policy=config.model.remat_policy)

  prompts, _ = records.load_prompts(config.data.prompts_path or records.DEFAULT_DATA_DIR / "prompts",
                                    split=config.data.split)
  prompts = records.spread_subset(prompts, config.data.max_prompts)
  grader = factory.make_grader(config.grader)
  reward_config = rewards_lib.RewardConfig(**config.reward.to_dict())
  pg_config = pg.PgConfig(clip_low=rl.clip_low, clip_high=rl.clip_high, kl_mode=rl.kl_mode, kl_coef=rl.kl_coef,
                          aggregation=rl.aggregation, max_completion_len=rl.max_new_tokens,
                          temperature=rl.temperature)
  # Training rollouts sample exactly the distribution the trainer's log-probs assume: no top-k/top-p.
  sampling_config = sampling.SamplingConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                            eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)

  updates_per_step = rl.epochs * rl.minibatches
  optimizer, schedule = training.make_optimizer(config, config.num_steps * updates_per_step)
  ckpt = training.checkpoint_manager(config, workdir)
  lora_config = lora.from_config(config)
  checkpoint.save_model_metadata(workdir, model_config, tokenizer, lora_config,
                                 {"sft_workdir": config.init.sft_workdir})
  if lora_config is None:
    # The policy starts as a copy of the frozen reference (the state owns, and donates, its params).
    state, shardings, start = training.create_state(model_config, optimizer, mesh, rules, ckpt,
                                                    lambda _: jax.tree.map(jnp.copy, ref_params))
  else:
    # The reference is the frozen base itself (one copy of the weights); the policy adds adapters to it.
    state, shardings, start = training.create_state(model_config, optimizer, mesh, rules, ckpt,
                                                    lambda _: ref_params, lora_config=lora_config, seed=config.seed)
  batch_sharding = parallel.batch_sharding(mesh)
  logprobs = functools.partial(pg.rollout_logprobs, model_config=model_config, temperature=rl.temperature)
  if lora_config is None:
    sample_fn = jax.jit(functools.partial(sampling.sample, model_config=model_config,
                                          sampling_config=sampling_config))
    ref_logprob_fn = logprob_fn = jax.jit(logprobs, in_shardings=(shardings["params"], batch_sharding),
                                          out_shardings=batch_sharding)
  else:  # The sampler runs the merged weights; the trainer's log-probs, the adapters (the gap is logged).
    sample_fn = jax.jit(lambda params, **kw: sampling.sample(lora.merge(params), model_config=model_config,
                                                             sampling_config=sampling_config, **kw))
    logprob_fn = jax.jit(logprobs, in_shardings=(training.model_params(shardings), batch_sharding),
                         out_shardings=batch_sharding)
    ref_logprob_fn = jax.jit(logprobs, in_shardings=(shardings["base"].params, batch_sharding),
                             out_shardings=batch_sharding)
    ref_params = state["base"].params
  update_fn = training.jit_step(pg.update_step, shardings, mesh, model_config=model_config, optimizer=optimizer,
                                config=pg_config)
  writer = metric_writer.MetricsWriter(workdir, wandb_config=config.wandb, run_config=config.to_dict())
  samples_path = os.path.join(workdir, "samples.jsonl")
  base_rng = jax.random.key(config.seed + 1)
  group, k = rl.prompts_per_step, rl.samples_per_prompt
  last = {}
  with parallel.activation_sharding(mesh, rules):
    for step in tqdm.trange(start, config.num_steps, initial=start, total=config.num_steps, desc="rl",
                            disable=jax.process_index() != 0):
      timings = {}
      started = time.perf_counter()
      step_prompts = [prompts[i] for i in sft_data.batch_indices(len(prompts), group, step, config.seed)]
      prompt_tokens, prompt_mask = encode_prompts(tokenizer, step_prompts, rl.max_prompt_len)
      prompt_tokens, prompt_mask = np.repeat(prompt_tokens, k, axis=0), np.repeat(prompt_mask, k, axis=0)
      rollout = sample_fn(training.model_params(state), prompt_tokens=parallel.shard_batch(prompt_tokens, mesh),
                          prompt_mask=parallel.shard_batch(prompt_mask, mesh),
                          rng=jax.random.fold_in(base_rng, step))
      completion, lengths, finished, sampler_logprobs = parallel.to_host(
          (rollout.tokens, rollout.lengths, rollout.finished, rollout.logprobs))
      timings["time/sample"] = time.perf_counter() - started

      started = time.perf_counter()
      texts, answers = decode_rollouts(tokenizer, prompt_tokens, completion, lengths, finished)
      expanded = [p for p in step_prompts for _ in range(k)]
      requests = [graders_base.GradeRequest(prompt=p.messages, response=a, category=p.category,
                                            prompt_id=p.id) for p, a in zip(expanded, answers)]
      grades = graders_base.grade_answers(grader, requests)
      grade_arrays, answered = reward_grades(grades, texts, finished)
      rewards, aux = rewards_lib.combine_rewards(grade_arrays, reward_config)
      timings["time/grade"] = time.perf_counter() - started

      started = time.perf_counter()
      batch = train_batch(prompt_tokens, prompt_mask, completion, lengths, finished, rl.mask_truncated)
      device_batch = parallel.shard_batch(batch, mesh)
      old_logprobs = logprob_fn(training.model_params(state), device_batch)
      ref_logprobs = ref_logprob_fn(ref_params, device_batch)
      host_old, host_ref = parallel.to_host((old_logprobs, ref_logprobs))
      mask = batch["completion_mask"]
      if rl.kl_mode == "k1_reward":
        rewards = pg.kl_penalized_rewards(rewards, host_old, host_ref, mask, rl.kl_coef)
      advantages = rewards_lib.group_advantages(jnp.asarray(rewards).reshape(group, k),
                                                jnp.asarray(aux["include"]).reshape(group, k), rl.advantage)
      width = completion.shape[1]
      gap = np.abs(host_old[:, -width:] - sampler_logprobs) * mask[:, -width:]
      batch.update(old_logprobs=host_old, ref_logprobs=host_ref, advantages=np.asarray(advantages).reshape(-1))
      order = np.random.default_rng([config.seed, step]).permutation(group * k)
      skipped, non_finite = [], []
      for _ in range(rl.epochs):
        for chunk in np.array_split(order, rl.minibatches):
          minibatch = {name: value[np.sort(chunk)] for name, value in batch.items()}
          state, update_metrics = update_fn(state, parallel.shard_batch(minibatch, mesh))
          skipped.append(update_metrics["update_skipped"])
          non_finite.append(update_metrics["non_finite"])
      update_metrics = {**parallel.to_host(update_metrics), "update_skipped": np.mean(parallel.to_host(skipped)),
                        "non_finite": np.max(parallel.to_host(non_finite))}
      timings["time/update"] = time.perf_counter() - started

      last = {**rollout_metrics(step_prompts, grades, np.asarray(rewards), lengths, np.asarray(aux["include"]), k),
              **{k_: float(v) for k_, v in update_metrics.items()}, **timings,
              "sampler_trainer_logprob_gap/mean": float(gap.sum() / max(mask[:, -width:].sum(), 1)),
              "sampler_trainer_logprob_gap/max": float(gap.max()),
              "learning_rate": float(schedule(int(state["step"]) - 1)),
              "truncated_rate": float(1 - finished.mean()),
              "answer_rate": float(answered.mean())}
      training.stop_if_non_finite(ckpt, step, bool(last["non_finite"]), f"an RL update (last loss {last['loss']})")
      writer.write(step + 1, last)
      if (step + 1) % config.sample_table_every == 0 and jax.process_index() == 0:
        with open(samples_path, "a") as f:
          for request, text, grade, reward in list(zip(requests, texts, grades, np.asarray(rewards)))[:config.sample_table_rows]:
            f.write(json.dumps({"step": step + 1, "prompt_id": request.prompt_id, "completion": text,
                                "reward": float(reward), "safety": grade.safety, "helpfulness": grade.helpfulness,
                                "mode": grade.mode, "valid": grade.valid}) + "\n")
      training.save(ckpt, step + 1, state, config.num_steps)
  training.close(ckpt)
  writer.close()
  return last
