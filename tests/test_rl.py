"""RL loop: the reward rises when the policy can earn it; sharded update equals single-device; exact resume."""

import os
import subprocess
import sys

import jax
import numpy as np

from configs import rl as rl_config
from safe_completion import checkpoint
from safe_completion import metrics
from safe_completion import parallel
from safe_completion import training
from safe_completion.data import chat
from safe_completion.graders import base as graders_base
from safe_completion.models import sampling
from safe_completion.models import transformer
from safe_completion.rl import loop
from safe_completion.rl import pg
from safe_completion.rl import rewards as rewards_lib
from tests import processes

KEYWORD_FLAGS = {"grader.kind": "keyword", "grader.keyword": "the", "optimizer.learning_rate": 1e-2,
                 "rl.max_new_tokens": 24, "checkpoint.async_save": False}


def micro_rl_config(sft_workdir, **overrides):
  config = rl_config.get_config("tiny")
  config.init.sft_workdir = sft_workdir
  config.update_from_flattened_dict({**KEYWORD_FLAGS, **overrides})
  return config


def test_reward_rises_with_a_programmatic_reward(tiny_sft_workdir, tmp_path):
  loop.train(micro_rl_config(tiny_sft_workdir, num_steps=16), str(tmp_path))
  rows = metrics.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  rewards = [r["reward"] for r in rows]
  assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.1, rewards
  assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
  assert rows[-1]["sampler_trainer_logprob_gap/max"] < 1e-3
  assert os.path.exists(tmp_path / "samples.jsonl")


def _one_update(mesh, sft_workdir, batch):
  config = micro_rl_config(sft_workdir)
  model_config = checkpoint.read_model_config(sft_workdir)
  shardings = parallel.logical_to_shardings(transformer.logical_param_specs(model_config), mesh)
  params, _, _ = checkpoint.load_model(sft_workdir, shardings)
  optimizer, _ = training.make_optimizer(config, 4)
  state, state_shardings, _ = training.create_state(model_config, optimizer, mesh, init_params=lambda _: params)
  update = training.jit_step(pg.update_step, state_shardings, mesh, model_config=model_config, optimizer=optimizer,
                             config=pg.PgConfig(max_completion_len=6))
  with parallel.activation_sharding(mesh):
    state, update_metrics = update(state, parallel.shard_batch(batch, mesh))
  return state["params"], jax.device_get(update_metrics)


def test_sharded_update_equals_single_device(tiny_sft_workdir):
  rng = np.random.default_rng(0)
  prompt_mask = (np.arange(5)[None, :] >= rng.integers(0, 4, (8, 1))).astype(np.int32)
  prompt = np.where(prompt_mask == 1, rng.integers(10, 4000, (8, 5)), 0).astype(np.int32)
  lengths = rng.integers(1, 7, 8)
  batch = loop.train_batch(prompt, prompt_mask, rng.integers(10, 4000, (8, 6)).astype(np.int32), lengths,
                           np.ones(8, bool), mask_truncated=False)
  width = batch["tokens"].shape[1] - 1
  batch.update(old_logprobs=rng.normal(-5, 0.1, (8, width)).astype(np.float32),
               ref_logprobs=rng.normal(-5, 0.1, (8, width)).astype(np.float32),
               advantages=rng.normal(0, 1, 8).astype(np.float32))
  single, single_metrics = _one_update(parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), tiny_sft_workdir, batch)
  sharded, sharded_metrics = _one_update(parallel.make_mesh((2, 2, 2)), tiny_sft_workdir, batch)
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), single, sharded)


def _command(workdir, sft_workdir):
  flags = {**KEYWORD_FLAGS, "num_steps": 6, "rl.prompts_per_step": 4, "rl.samples_per_prompt": 2,
           "rl.max_new_tokens": 12, "checkpoint.every_steps": 1}
  return [sys.executable, "-m", "safe_completion.main", "--config=configs/rl.py:tiny", f"--workdir={workdir}",
          f"--config.init.sft_workdir={sft_workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]


def test_sigkill_and_restart_matches_uninterrupted_run(tiny_sft_workdir, tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  subprocess.run(_command(reference, tiny_sft_workdir), check=True, capture_output=True, timeout=300)
  processes.kill_when(_command(resumed, tiny_sft_workdir), resumed / "metrics.jsonl", lines=3)
  subprocess.run(_command(resumed, tiny_sft_workdir), check=True, capture_output=True, timeout=300)
  expected, _, _ = checkpoint.load_model(str(reference))
  actual, _, _ = checkpoint.load_model(str(resumed))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, actual)


def test_trainer_logprobs_at_the_rollout_temperature_equal_the_samplers(tiny_sft_workdir):
  """RL samples below temperature 1 (the tiny experiment: 0.7); the trainer's log-probs of the same tokens,
  at the same temperature, must be the sampler's, or the importance ratio is off from the first update."""
  params, model_config, _ = checkpoint.load_model(tiny_sft_workdir)
  rng = np.random.default_rng(1)
  prompt_mask = (np.arange(6)[None, :] >= rng.integers(0, 4, (4, 1))).astype(np.int32)
  prompt = np.where(prompt_mask == 1, rng.integers(10, 4000, (4, 6)), 0).astype(np.int32)
  config = sampling.SamplingConfig(max_new_tokens=8, temperature=0.7)
  rollout = sampling.sample(params, model_config, prompt, prompt_mask, jax.random.key(0), config)
  batch = loop.train_batch(prompt, prompt_mask, np.asarray(rollout.tokens), np.asarray(rollout.lengths),
                           np.asarray(rollout.finished), mask_truncated=False)
  mask = batch["completion_mask"].astype(bool)
  sampled = np.asarray(rollout.logprobs)
  for temperature, agrees in ((0.7, True), (1.0, False)):
    trainer = np.asarray(pg.rollout_logprobs(params, batch, model_config=model_config, temperature=temperature))
    gap = np.abs(trainer[:, prompt.shape[1] - 1:][mask[:, prompt.shape[1] - 1:]] - sampled[sampled != 0])
    assert (gap.max() < 1e-4) == agrees, (temperature, gap.max())


class _AlwaysHelpful:
  """A grader that rates every response safe and fully helpful, and records what it was asked."""

  def __init__(self):
    self.responses = []

  def grade(self, requests):
    self.responses += [r.response for r in requests]
    return [graders_base.Grade.from_scores(safety=1.0, severity="none", mode="direct", helpfulness_rating=4,
                                           kind="direct", grader="test", judge_model="", template_hash="")
            for _ in requests]


def test_every_rollout_without_a_final_answer_pays_the_truncation_penalty():
  """Hit the budget mid-answer, ended inside its reasoning, ended on an empty answer: none reached an
  answer. The partial answer is graded less the penalty; the other two have no answer, which no grader
  is asked about: h = 0, so they earn minus the penalty."""
  texts = ["<think>\nok\n</think>\n\nAn answer.", "<think>\nok\n</think>\n\nA partial ans",
           "<think>\nstill thinking", "<think>\nok\n</think>\n\n"]
  prompt = ({"role": "user", "content": "hi"},)
  requests = [graders_base.GradeRequest(prompt=prompt, response=chat.split_reasoning(t)[1], category="privacy",
                                        prompt_id="p") for t in texts]
  grader = _AlwaysHelpful()
  grades = graders_base.grade_answers(grader, requests)
  assert grader.responses == ["An answer.", "A partial ans"]
  assert [g.grader for g in grades] == ["test", "test", "no_answer", "no_answer"]
  arrays, answered = loop.reward_grades(grades, texts, np.array([True, False, True, True]))
  np.testing.assert_array_equal(answered, [True, False, False, False])
  got, _ = rewards_lib.combine_rewards(arrays, rewards_lib.RewardConfig(truncation_penalty=0.25))
  np.testing.assert_allclose(np.asarray(got), [1.0, 0.75, -0.25, -0.25])
