"""Chat formatting: loss only on the assistant's tokens; packing keeps examples apart."""

import jax
import numpy as np
import pytest
import transformers

from safe_completion import sft
from safe_completion.data import chat
from safe_completion.data import sft_data
from safe_completion.models import transformer


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))


MESSAGES = ({"role": "user", "content": "How do I stop a runaway process?"},)


def test_loss_mask_covers_exactly_the_assistant_turn(tokenizer):
  example = chat.tokenize_sft_example(tokenizer, MESSAGES, "The request is benign.", "Use kill -TERM on its PID.")
  prompt_len = len(chat.encode_prompt(tokenizer, MESSAGES))
  assert example.loss_mask[:prompt_len].sum() == 0
  assert example.loss_mask[prompt_len:].all()
  target = tokenizer.decode(example.tokens[prompt_len:])
  assert target.startswith("<think>\nThe request is benign.\n</think>")
  assert "kill -TERM" in target and target.endswith(tokenizer.eos_token)


def test_split_reasoning_round_trips_assistant_content():
  content = chat.assistant_content(" why ", " answer ")
  assert chat.split_reasoning(content) == ("why", "answer")
  assert chat.split_reasoning("no block here") == ("", "no block here")


def _examples(tokenizer, n=5):
  rng = np.random.default_rng(0)
  return [chat.tokenize_sft_example(tokenizer, MESSAGES, "cot " * int(rng.integers(1, 6)),
                                    "answer " * int(rng.integers(1, 9))) for _ in range(n)]


def test_packing_restarts_positions_and_separates_segments(tokenizer):
  examples = _examples(tokenizer)
  packed = chat.pack_examples(examples, seq_len=256, pad_id=tokenizer.pad_token_id, num_rows=2)
  total = sum(len(e.tokens) for e in examples)
  assert (packed["segment_ids"] > 0).sum() == total
  assert packed["loss_mask"].sum() == sum(e.loss_mask.sum() for e in examples)
  row = packed["segment_ids"][0]
  starts = np.nonzero(np.diff(row, prepend=0) > 0)[0]
  assert (packed["positions"][0, starts] == 0).all() and len(starts) >= 2


def test_packing_that_does_not_fit_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="do not fit"):
    chat.pack_examples(_examples(tokenizer), seq_len=64, pad_id=0, num_rows=1)


def test_packed_loss_equals_unpacked_loss(tokenizer):
  config = transformer.ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=8, mlp_dim=64)
  params = transformer.init_params(config, jax.random.key(0))
  examples = _examples(tokenizer, n=6)
  padded = chat.pad_examples(examples, seq_len=64, pad_id=tokenizer.pad_token_id)
  packed = chat.pack_examples(examples, seq_len=192, pad_id=tokenizer.pad_token_id, num_rows=2)
  padded_loss, _ = sft.loss_fn(params, config, padded)
  packed_loss, _ = sft.loss_fn(params, config, packed)
  np.testing.assert_allclose(float(packed_loss), float(padded_loss), rtol=1e-5)


def test_split_reasoning_unclosed_block_has_no_answer():
  assert chat.split_reasoning("<think>\nstill thinking when the budget ran out") == (
      "still thinking when the budget ran out", "")
  # A template that opens the block in the prompt: the completion starts inside it.
  assert chat.split_reasoning("reasoning here</think>\n\nthe answer") == ("reasoning here", "the answer")


def test_decode_completion_keeps_reasoning_tags_and_drops_eos(tokenizer):
  text = chat.assistant_content("Spec says fine.", "Use kill -TERM.")
  ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  padded = np.asarray(ids + [tokenizer.pad_token_id] * 3)
  decoded = chat.decode_completion(tokenizer, padded, len(ids), finished=True)
  assert decoded == text
  assert chat.split_reasoning(decoded) == ("Spec says fine.", "Use kill -TERM.")
  assert chat.reached_answer(decoded, True)
  # Cut inside the reasoning block: not finished, no answer.
  cut = chat.decode_completion(tokenizer, padded, 4, finished=False)
  assert cut.startswith(chat.REASONING_OPEN) and not chat.reached_answer(cut, False)
  assert not chat.reached_answer(decoded, False)


def test_plan_rows_packs_first_fit_decreasing_and_collates_apart(tokenizer):
  examples = _examples(tokenizer, n=7)
  lengths = [len(e.tokens) for e in examples]
  seq_len = max(lengths) * 2
  rows = chat.plan_rows(lengths, seq_len)
  assert sorted(i for row in rows for i in row) == list(range(7))  # Every example exactly once.
  assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
  assert len(rows) <= -(-sum(lengths) // seq_len) + 1
  batch = chat.collate_rows([[examples[i] for i in row] for row in rows], seq_len, tokenizer.pad_token_id)
  assert batch["loss_mask"].sum() == sum(e.loss_mask.sum() for e in examples)
  for r, row in enumerate(rows):
    assert batch["segment_ids"][r].max() == len(row)
  with pytest.raises(ValueError, match="does not fit"):
    chat.plan_rows([seq_len + 1], seq_len)
