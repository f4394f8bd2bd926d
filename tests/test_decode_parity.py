"""RL grades what eval and `serve` grade: one decode-and-split for the same sampled tokens."""

import numpy as np
import pytest
import transformers

from safe_completion.backends import local
from safe_completion.data import chat
from safe_completion.data import sft_data
from safe_completion.rl import loop
from tests.scripted_server import opening_tokenizer

MESSAGES = [{"role": "user", "content": "How do I keep basil alive indoors?"}]


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))


def sampled(tokenizer, texts, finished):
  """Sampler-shaped (completion [N, W] padded, lengths [N]) for completion texts; a finished one ends in EOS."""
  rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  rows = [r + [tokenizer.eos_token_id] if done else r for r, done in zip(rows, finished)]
  completion = np.full((len(rows), max(map(len, rows)) + 2), tokenizer.pad_token_id, np.int32)
  for i, r in enumerate(rows):
    completion[i, :len(r)] = r
  return completion, np.asarray([len(r) for r in rows])


def rl_and_eval_answers(tokenizer, texts, finished):
  """The answers RL grades (prompt tokens as the loop encodes them) and those LocalBackend returns for eval."""
  completion, lengths = sampled(tokenizer, texts, finished)
  prompt = chat.encode_prompt(tokenizer, MESSAGES)
  prompt_tokens, _ = chat.left_pad([prompt] * len(texts), 48, tokenizer.pad_token_id)
  _, rl_answers = loop.decode_rollouts(tokenizer, prompt_tokens, completion, lengths, finished)
  backend = local.LocalBackend(params={}, model_config=None, tokenizer=tokenizer, max_prompt_len=8)
  opened = chat.prompt_opens_reasoning(tokenizer, prompt)
  eval_answers = [backend._completion(completion[i], int(lengths[i]), bool(finished[i]), 0, (), opened).text
                  for i in range(len(texts))]
  return rl_answers, eval_answers


def test_rl_graded_response_equals_eval_graded_response(tokenizer):
  texts = [chat.assistant_content("The request is benign; answer directly.", "Drink water and rest."),
           chat.assistant_content("Dual-use; keep it high level.", "At a high level: [REDACTED: detail]."),
           "<think>\nran out of tokens while reasoning"]
  rl_answers, eval_answers = rl_and_eval_answers(tokenizer, texts, np.asarray([True, True, False]))
  assert rl_answers == eval_answers
  assert rl_answers == ["Drink water and rest.", "At a high level: [REDACTED: detail].", ""]


def test_a_template_that_opens_the_reasoning_block_decodes_rollouts_inside_it(tokenizer):
  # The completion only closes the block the generation prompt opened (DeepSeek-R1 distills).
  opening = opening_tokenizer()
  texts = ["The request is benign.\n</think>\n\nWater it when the soil is dry.",
           "still reasoning when the budget ran out"]
  rl_answers, eval_answers = rl_and_eval_answers(opening, texts, np.asarray([True, False]))
  assert rl_answers == eval_answers == ["Water it when the soil is dry.", ""]
  # Decoded as if the template had not opened it, the cut-off reasoning would be graded as the answer.
  rl_plain, _ = rl_and_eval_answers(tokenizer, texts, np.asarray([True, False]))
  assert rl_plain[1] == "still reasoning when the budget ran out"
