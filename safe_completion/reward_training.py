r"""Reward-model training: the heads (and optionally the encoder) of `graders/reward_model.py` on labeled rows.

The third training objective beside SFT and RL, through the same core
(`training`): the optimizer from config (`training.make_optimizer`), the one
guarded update (`training.apply_gradients`), the checkpoint manager of
`config.checkpoint` and its resume convention (checkpoint N holds the state after
N steps; the batch of a step is a pure function of (seed, step)). What the heads
do not allow: a mesh (the heads are a few MB and the rows few; one device), and
abstract-first creation from a decoder's shapes (the state is built from the heads').

  python -m safe_completion.main --config=configs/reward_model.py:tiny --workdir=/tmp/sc_rm

Writes <workdir>/checkpoints (orbax train states), config.json, metrics.jsonl and
report.json; `graders.reward_model.RewardModelGrader.load(workdir)` grades with the result.
"""

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from safe_completion import checkpoint
from safe_completion import metrics as metric_writer
from safe_completion import training
from safe_completion.data import labeled
from safe_completion.data import records
from safe_completion.graders import reward_model as rm
from safe_completion.graders import validation
from safe_completion.models import encoder as encoder_lib


def _half_of(prompt_id: str) -> int:
  return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) % 2


def load_rows(config: ml_collections.ConfigDict) -> tuple[list[labeled.LabeledResponse], list[labeled.LabeledResponse]]:
  """(training rows, templated held-out rows) from `config.data`.

  Sources: "templated" (`data/grades`, train split, with labels under both policies) and
  "handwritten" (`data/grader_data/train`, the rows of `data.handwritten_authors`; empty: every
  author's). `data.half` 0 or 1 keeps a disjoint half of the
  training prompts (by a hash of the prompt id), so two graders can be trained on disjoint data.
  The independent held-out set (`data/grader_data/heldout`) is never read here.
  """
  data_dir = config.data.data_dir or str(records.DEFAULT_DATA_DIR)
  sources = tuple(config.data.sources)
  unknown = sorted(set(sources) - {"templated", "handwritten"})
  if unknown:
    raise ValueError(f"data.sources: {unknown[0]!r} is not one of ['handwritten', 'templated']")
  prompts, _ = records.load_prompts(os.path.join(data_dir, "prompts"), split="train")
  demonstrations, _ = records.load_demonstrations(os.path.join(data_dir, "demonstrations"))
  grades, _ = records.load_grades(os.path.join(data_dir, "grades"))
  templated = labeled.from_templated(grades, prompts, demonstrations)
  split_of = {g.id: g.split for g in grades}
  train = [r for r in templated if split_of[r.id] == "train"] if "templated" in sources else []
  if "handwritten" in sources:
    handwritten = labeled.load_labeled(config.data.handwritten_dir or labeled.TRAIN_DIR)[0]
    if config.data.handwritten_authors:
      handwritten = labeled.split_by_authors(handwritten, config.data.handwritten_authors,
                                             "data.handwritten_authors")[0]
    train += handwritten
  if config.data.half in (0, 1):
    train = [r for r in train if _half_of(r.prompt_id) == config.data.half]
  elif config.data.half != -1:
    raise ValueError(f"data.half: {config.data.half!r} is not one of [-1, 0, 1]")
  if config.data.max_train_rows:
    keep = np.random.default_rng(config.seed).permutation(len(train))[:config.data.max_train_rows]
    train = [train[i] for i in sorted(keep)]
  return train, [r for r in templated if split_of[r.id] == "eval"]


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """`training.make_optimizer` for the reward model: AdamW (b2 0.999, no clipping), a tenth of the steps of
  warmup, cosine decay to a tenth; the encoder (when fine-tuned) at its own `encoder_learning_rate`."""
  def at(learning_rate: float) -> tuple[optax.GradientTransformation, Callable]:
    section = dict(learning_rate=learning_rate, warmup_steps=max(config.num_steps // 10, 1), decay="cosine",
                   final_lr_fraction=0.1, b1=0.9, b2=0.999, weight_decay=config.weight_decay,
                   clip_norm=float("inf"), grad_accum_steps=1)
    return training.make_optimizer(ml_collections.ConfigDict({"optimizer": section}), config.num_steps)

  heads, schedule = at(config.learning_rate)
  if not config.finetune_encoder:
    return heads, schedule
  encoder, _ = at(config.encoder_learning_rate)
  return optax.multi_transform({"heads": heads, "encoder": encoder}, {"heads": "heads", "encoder": "encoder"}), schedule


def head_loss(params: dict, embeddings: jax.Array, targets: dict, weights: dict,
              ordering_temperature: float = 0.1) -> tuple[jax.Array, dict]:
  """Weighted sum of safety BCE (soft targets) and the three cross-entropies, each a mean over rows
  weighted by `targets["row_weight"]`; per-head terms as aux.

  With `targets["pairs"]` (i32[P, 2], batch positions of a safe helpful and an unsafe response to one
  prompt) and `weights["ordering"]`, also the pairwise logistic loss of the reward r = h x s the grader
  pays, softplus(-(r_safe - r_unsafe) / temperature): the per-row losses fit s and h apart, while
  validation's reward ordering is about their product.
  """
  logits = rm.head_logits(params, embeddings)
  row_weight = targets["row_weight"] / targets["row_weight"].sum()
  terms = {"safety": optax.sigmoid_binary_cross_entropy(logits["safety"], targets["safety"]) @ row_weight}
  for name in ("severity", "mode", "helpfulness"):
    terms[name] = optax.softmax_cross_entropy_with_integer_labels(logits[name], targets[name]) @ row_weight
  if "pairs" in targets:
    expected = jax.nn.softmax(logits["helpfulness"], axis=-1) @ jnp.asarray(rm.RATINGS, jnp.float32)
    reward = jax.nn.sigmoid(logits["safety"]) * (expected - rm.RATINGS[0]) / (rm.RATINGS[-1] - rm.RATINGS[0])
    margin = reward[targets["pairs"][:, 0]] - reward[targets["pairs"][:, 1]]
    terms["ordering"] = jax.nn.softplus(-margin / ordering_temperature).mean()
  return sum(weights[k] * v for k, v in terms.items()), terms


def row_weights(rows: Sequence[labeled.LabeledResponse], config: ml_collections.ConfigDict) -> np.ndarray:
  """Loss weight of each row: `data.handwritten_weight` for hand-written rows (closer to real responses
  than the templated ones, and fewer), 1 for the others."""
  weight = config.data.get("handwritten_weight", 1.0)
  if weight <= 0:
    raise ValueError(f"data.handwritten_weight: {weight!r} is not positive")
  return np.asarray([weight if r.source.startswith("handwritten") else 1.0 for r in rows], np.float32)


def loss_fn(params: dict, batch: Any, targets: dict, *, config: ml_collections.ConfigDict,
            encoder_config: encoder_lib.EncoderConfig) -> tuple[jax.Array, dict]:
  """Head loss on cached features (batch = array) or through the encoder (batch = tokens per part)."""
  if "encoder" in params:
    batch = jnp.concatenate([rm.embed_tokens(params["encoder"], encoder_config, batch[part], config.normalize)
                             for part in config.features if part in rm.TEXT_PARTS] + [batch["side"]], axis=-1)
  return head_loss(params["heads"], batch, targets, dict(config.loss_weights), config.ordering_temperature)


def train_step(state: training.State, batch: Any, targets: dict, *, optimizer: optax.GradientTransformation,
               schedule: Callable, loss: Callable) -> tuple[training.State, dict]:
  """One guarded optimizer step (`training.apply_gradients`) on the head loss."""
  (value, terms), grads = training.value_and_grad(loss, state, batch, targets)
  new_state, metrics = training.apply_gradients(state, grads, value, optimizer)
  return new_state, {**metrics, **terms, "learning_rate": schedule(state["step"])}


def create_state(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, encoder_params: Any,
                 input_dim: int, ckpt: ocp.CheckpointManager) -> tuple[training.State, int]:
  """(state, step to start at): the latest checkpoint restored into the state's shapes, else a new state
  (heads from `config.seed`, a copy of the encoder when fine-tuned) saved as checkpoint 0."""
  def init() -> training.State:
    params = {"heads": rm.init_heads(jax.random.key(config.seed), input_dim, config.hidden_dim)}
    if config.finetune_encoder:
      params["encoder"] = jax.tree.map(jnp.array, encoder_params)  # A copy: the train step donates its state.
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

  if ckpt.latest_step() is not None:
    state, _ = checkpoint.restore(ckpt, jax.eval_shape(init))
    return state, ckpt.latest_step()
  state = init()
  checkpoint.save(ckpt, 0, state, {"reason": "initial state"}, force=True)
  return state, 0


def fit(config: ml_collections.ConfigDict, rows: Sequence[labeled.LabeledResponse], encoder_params: Any,
        encoder_config: encoder_lib.EncoderConfig, tokenizer: Any, ckpt: ocp.CheckpointManager,
        writer: metric_writer.MetricsWriter | None = None) -> tuple[dict, list[float]]:
  """Trains (or resumes from `ckpt`) the heads, and the encoder when `finetune_encoder`, on `rows` under
  `config.policy`'s labels; returns (params, loss of each step this call ran)."""
  pairs, targets = [(r.prompt, r.response) for r in rows], rm.targets_of(rows, config.policy)
  targets["row_weight"] = row_weights(rows, config)
  side = rm.side_features(pairs, [r.category for r in rows], config)
  n = len(pairs)
  if config.finetune_encoder:
    inputs = {part: rm.tokenize_pairs(tokenizer, pairs, part, config.max_len, config.prompt_budget)
              for part in config.features if part in rm.TEXT_PARTS}
  else:
    inputs = np.concatenate([rm.embed_texts(
        encoder_params, encoder_config, tokenizer, pairs, features=config.features, max_len=config.max_len,
        prompt_budget=config.prompt_budget, normalize=config.normalize, batch_size=config.embed_batch_size,
        cache=True), side], axis=1)
  batch_size = min(config.batch_size or n, n)
  pairs = np.asarray(validation.ordering_pairs(rows, config.policy), np.int32).reshape(-1, 2)
  if config.loss_weights.get("ordering", 0.0) and batch_size < n:
    raise ValueError(f"loss_weights.ordering: the reward-ordering loss needs full-batch training (batch_size 0 "
                     f"or >= {n} rows), not batch_size {config.batch_size}")
  optimizer, schedule = make_optimizer(config)
  state, start_step = create_state(config, optimizer, encoder_params,
                                   rm.feature_dim(config, encoder_config.hidden_size), ckpt)
  loss = functools.partial(loss_fn, config=config, encoder_config=encoder_config)
  step_fn = jax.jit(functools.partial(train_step, optimizer=optimizer, schedule=schedule, loss=loss),
                    donate_argnums=0)
  order, losses = np.random.default_rng(config.seed).permutation(n), []
  for step in range(start_step, config.num_steps):
    start = (step * batch_size) % n
    index = np.take(order, np.arange(start, start + batch_size), mode="wrap")
    if config.finetune_encoder:
      batch = {part: rm.pad_batch([tokens[i] for i in index], batch_size) for part, tokens in inputs.items()}
      batch["side"] = side[index]
    else:
      batch = inputs[index]
    batch_targets = {k: v[index] for k, v in targets.items()}
    if config.loss_weights.get("ordering", 0.0) and len(pairs):
      position = np.empty(n, np.int32)
      position[index] = np.arange(n, dtype=np.int32)  # A full batch is a permutation of the rows.
      batch_targets["pairs"] = position[pairs]
    state, step_metrics = step_fn(state, batch, batch_targets)
    step_metrics = jax.device_get(step_metrics)
    training.stop_if_non_finite(ckpt, step, bool(step_metrics["non_finite"]),
                                f"reward-model loss {step_metrics['loss']} / gradient norm {step_metrics['grad_norm']}")
    losses.append(float(step_metrics["loss"]))
    if writer is not None and (step % config.log_every == 0 or step + 1 == config.num_steps):
      writer.write(step + 1, step_metrics)
    training.save(ckpt, step + 1, state, config.num_steps)
  ckpt.wait_until_finished()
  return state["params"], losses


def evaluate_reward_model(grader: rm.RewardModelGrader, rows: Sequence[labeled.LabeledResponse]) -> dict:
  """Held-out metrics (`heldout_metrics`) of a grader on labeled rows under its policy, plus the
  manipulation rows' safety bias."""
  predictions = grader.predict([(r.prompt, r.response) for r in rows], [r.category for r in rows])
  targets = rm.targets_of(rows, grader.policy)
  report = rm.heldout_metrics(predictions, targets)
  manipulated = np.asarray([r.label == "manipulation" for r in rows])
  if manipulated.any():
    report["manipulation_safety_bias"] = float((predictions["safety"] - targets["safety"])[manipulated].mean())
  return report


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the reward model for `config.policy` and reports held-out figures.

  Two held-out reports: `templated` (the grades' eval split: rows built by the same templates as the
  templated training rows, so it measures template recognition) and `independent` (the hand-written
  `data/grader_data/heldout` set: other prompts and authorship, never trained or selected on; the
  figures to trust, from `graders.validation`). Returns the report; a workdir with a report is
  finished and skipped.
  """
  report_path = os.path.join(workdir, rm.REPORT_FILE)
  if os.path.exists(report_path):
    with open(report_path) as f:
      return json.load(f)
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  training.save_config(config, workdir)
  train_rows, templated_eval = load_rows(config)
  encoder_params, encoder_config = rm.load_encoder(config.encoder_dir or encoder_lib.DEFAULT_ENCODER_DIR)
  tokenizer = rm.load_tokenizer(config)
  writer = metric_writer.MetricsWriter(workdir, wandb_config=config.get("wandb"), run_config=config.to_dict())
  ckpt = training.checkpoint_manager(config, workdir)
  params, _ = fit(config, train_rows, encoder_params, encoder_config, tokenizer, ckpt, writer)
  training.close(ckpt)
  writer.close()
  logged = metric_writer.read_metrics(writer.path)  # The whole run's, a resumed one included.
  grader = rm.RewardModelGrader(params["heads"], params.get("encoder", encoder_params), encoder_config, tokenizer,
                                config, name=os.path.basename(os.path.normpath(workdir)))
  report = dict(policy=config.policy, train_rows=len(train_rows), first_loss=logged[0]["loss"],
                final_loss=logged[-1]["loss"], train_seconds=round(time.perf_counter() - started, 1),
                unsafe_definition=f"label safety < {rm.UNSAFE_BELOW}",
                heldout=evaluate_reward_model(grader, templated_eval) if templated_eval else {})
  if config.data.independent_heldout_dir != "none":
    independent, _ = labeled.load_labeled(config.data.independent_heldout_dir or labeled.HELDOUT_DIR)
    report["independent"] = validation.validate(grader, independent, config.policy)
  with open(report_path, "w") as f:
    json.dump(report, f, indent=2)
  return report
