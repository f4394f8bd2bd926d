"""The shipped tiny tokenizer: offline loading, round trips, special tokens, chat template."""

import importlib.util

import pytest
import transformers

from safe_completion.data import records

TOKENIZER_DIR = records.DEFAULT_DATA_DIR / "tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>",
                  "<|end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_loads_offline_with_vocab_4096_and_pad_bos_eos(tokenizer):
  assert len(tokenizer) == 4096
  assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
      "<|pad|>", "<|bos|>", "<|end|>")
  assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")


@pytest.mark.parametrize("text", [
    "How long should I boil stream water?",
    "  leading spaces,\ttabs and\nnew lines  ",
    "Unicode: café, naïve, 日本語, emoji ✓🙂",
    "",
])
def test_text_round_trips_without_added_tokens(tokenizer, text):
  ids = tokenizer(text)["input_ids"]
  assert tokenizer.decode(ids) == text
  assert tokenizer.bos_token_id not in ids


def test_special_tokens_are_single_distinct_ids(tokenizer):
  ids = [tokenizer(token, add_special_tokens=False)["input_ids"] for token in SPECIAL_TOKENS]
  assert all(len(i) == 1 for i in ids), dict(zip(SPECIAL_TOKENS, ids))
  assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
  inside_text = tokenizer("a<|user|>b<|end|>", add_special_tokens=False)["input_ids"]
  assert tokenizer.convert_tokens_to_ids("<|user|>") in inside_text
  assert tokenizer.convert_tokens_to_ids("<|end|>") == inside_text[-1]


def test_chat_template_renders_turns_reasoning_and_bos_once(tokenizer):
  messages = [{"role": "system", "content": "Follow the spec."},
              {"role": "user", "content": "Is bleach safe to mix?"},
              {"role": "assistant", "content": "No.", "reasoning": "Benign safety question."},
              {"role": "user", "content": "Why?"}]
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  assert text == ("<|bos|><|system|>Follow the spec.<|end|><|user|>Is bleach safe to mix?<|end|>"
                  "<|assistant|><think>Benign safety question.</think>No.<|end|>"
                  "<|user|>Why?<|end|>")


def test_generation_prompt_opens_an_assistant_turn(tokenizer):
  messages = [{"role": "user", "content": "Hi"}]
  assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
      "<|bos|><|user|>Hi<|end|><|assistant|>")
  ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
  assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
  assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_unknown_role_is_an_error(tokenizer):
  with pytest.raises(Exception, match="unknown role: tool"):
    tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_training_is_deterministic():
  path = records.DEFAULT_DATA_DIR.parent / "scripts" / "train_tokenizer.py"
  spec = importlib.util.spec_from_file_location("train_tokenizer", path)
  train_tokenizer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train_tokenizer)
  texts = [f"prompt {i}: how do vaccines train the immune system? answer {i * 7}"
           for i in range(50)]
  first, second = (train_tokenizer.train(texts, vocab_size=300) for _ in range(2))
  assert first.get_vocab() == second.get_vocab() and len(first) == 300
  assert first("vaccines answer")["input_ids"] == second("vaccines answer")["input_ids"]
