"""RL grades what eval and `serve` grade: one decode-and-split for the same sampled tokens."""

import numpy as np
import pytest
import transformers

from safe_completion.backends import local
from safe_completion.data import chat
from safe_completion.data import sft_data
from safe_completion.rl import loop


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(str(sft_data.TOKENIZER_DIR))


def test_rl_graded_response_equals_eval_graded_response(tokenizer):
  texts = [chat.assistant_content("The request is benign; answer directly.", "Drink water and rest."),
           chat.assistant_content("Dual-use; keep it high level.", "At a high level: [REDACTED: detail]."),
           "<think>\nran out of tokens while reasoning"]
  rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  finished = np.asarray([True, True, False])
  rows = [r + [tokenizer.eos_token_id] if done else r for r, done in zip(rows, finished)]
  width = max(map(len, rows)) + 2
  completion = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
  for i, r in enumerate(rows):
    completion[i, :len(r)] = r
  lengths = np.asarray([len(r) for r in rows])

  _, rl_answers = loop.decode_rollouts(tokenizer, completion, lengths, finished)
  # The eval and serve path: LocalBackend turns the same sampler output into a Completion.
  backend = local.LocalBackend(params={}, model_config=None, tokenizer=tokenizer, max_prompt_len=8)
  eval_answers = [backend._completion(completion[i], int(lengths[i]), bool(finished[i]), 0, (), False).text
                  for i in range(len(rows))]
  assert rl_answers == eval_answers
  assert rl_answers == ["Drink water and rest.", "At a high level: [REDACTED: detail].", ""]
