"""Chat formatting and tokenization for training: the model's own chat template.

An SFT target is the assistant turn `<think>\n{cot}\n</think>\n\n{answer}`: the
chain of thought sits in a reasoning block before the answer, inside the
assistant content, so every chat template (Llama, Qwen2, Gemma, ours) carries it.
Loss falls on the assistant's tokens only.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"
_PROMPT_TAIL_TOKENS = 16  # Enough for the opening tag and the whitespace after it, in any tokenizer.


def assistant_content(cot: str, answer: str) -> str:
  """The assistant turn of an SFT example: reasoning block, then the answer."""
  return f"{REASONING_OPEN}\n{cot.strip()}\n{REASONING_CLOSE}\n\n{answer.strip()}"


def split_reasoning(text: str) -> tuple[str, str]:
  """(cot, answer) of a completion; cot is empty when there is no reasoning block.

  A reasoning block that is opened and never closed (the completion ran out of
  tokens while thinking) has no answer: the answer is empty, never the CoT.
  """
  start = text.find(REASONING_OPEN)
  end = text.find(REASONING_CLOSE)
  if start == -1 and end == -1:
    return "", text.strip()
  if end == -1:
    return text[start + len(REASONING_OPEN):].strip(), ""
  if start == -1 or end < start:
    start = -len(REASONING_OPEN)  # A close without an open: everything before it is reasoning.
  return text[start + len(REASONING_OPEN):end].strip(), text[end + len(REASONING_CLOSE):].strip()


def decode_completion(tokenizer, tokens: Sequence[int], length: int, finished: bool, opened: bool = False) -> str:
  """The text of a sampled completion: the one decoding used by RL rollouts, eval and `serve`.

  `tokens[:length]` are the sampled ids; when `finished`, the last is the EOS,
  which is not text. Special tokens are dropped except the reasoning tags
  (special tokens in the shipped tokenizer), so `split_reasoning` sees the block.
  `opened`: the prompt opened the reasoning block (`prompt_opens_reasoning`); the text
  then starts with the opening tag, so it splits as a completion that opened it itself
  (one that never closes it has no answer, not its reasoning as the answer).
  """
  ids = [int(i) for i in tokens[:length - 1 if finished else length]]
  keep = set(tokenizer.convert_tokens_to_ids([REASONING_OPEN, REASONING_CLOSE])) - {tokenizer.unk_token_id}
  special = set(tokenizer.all_special_ids) - keep
  text = tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=False)
  return REASONING_OPEN + text if opened else text


def prompt_opens_reasoning(tokenizer, prompt: Sequence[int]) -> bool:
  """Whether a chat prompt ends inside an opened reasoning block: the chat templates of some reasoning
  models (DeepSeek-R1 distills, for one) end the generation prompt with `<think>`, so the completion
  starts inside the block and only closes it."""
  tail = tokenizer.decode([int(i) for i in prompt[-_PROMPT_TAIL_TOKENS:]], skip_special_tokens=False)
  return tail.rstrip().endswith(REASONING_OPEN)


def reached_answer(text: str, finished: bool) -> bool:
  """Whether a sampled completion (with the policy's reasoning block) closed its reasoning and gave a
  non-empty final answer before its token budget ran out."""
  return finished and REASONING_CLOSE in text and bool(split_reasoning(text)[1])


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
  """Token ids of the conversation followed by the generation prompt of the assistant."""
  text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  tokens: np.ndarray  # int32 [T]
  loss_mask: np.ndarray  # int32 [T]: 1 on the assistant's tokens.


def tokenize_sft_example(tokenizer, messages: Sequence[dict], cot: str, answer: str) -> TokenizedExample:
  """Prompt + assistant turn through the chat template, with the loss on the assistant's part.

  Raises when the template does not render the prompt as a prefix of the full
  conversation (the loss mask would be wrong otherwise).
  """
  prompt_ids = encode_prompt(tokenizer, messages)
  full_messages = list(messages) + [{"role": "assistant", "content": assistant_content(cot, answer)}]
  text = tokenizer.apply_chat_template(full_messages, tokenize=False)
  full_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if full_ids[:len(prompt_ids)] != prompt_ids:
    raise ValueError("the chat template does not render the prompt as a prefix of the full conversation; "
                     "cannot place the loss mask")
  loss_mask = np.zeros(len(full_ids), np.int32)
  loss_mask[len(prompt_ids):] = 1
  return TokenizedExample(np.asarray(full_ids, np.int32), loss_mask)


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Prompt ids right-aligned in [rows, width] int32 tokens and mask (rows: default one per prompt).

  Rows past the prompts hold one pad token with mask 1: a sampler needs a real
  token in every row (their outputs are discarded).
  """
  if rows is None:
    rows = len(prompts)
  tokens = np.full((rows, width), pad_id, np.int32)
  mask = np.zeros_like(tokens)
  mask[len(prompts):, -1] = 1
  for row, prompt in enumerate(prompts):
    if prompt:
      tokens[row, -len(prompt):] = prompt
      mask[row, -len(prompt):] = 1
  return tokens, mask


def pad_examples(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded to `seq_len` (longer examples must be filtered first)."""
  batch = {name: np.zeros((len(examples), seq_len), np.int32)
           for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  batch["tokens"][:] = pad_id
  for row, example in enumerate(examples):
    length = len(example.tokens)
    if length > seq_len:
      raise ValueError(f"example of {length} tokens does not fit seq_len={seq_len}")
    batch["tokens"][row, :length] = example.tokens
    batch["positions"][row, :length] = np.arange(length)
    batch["segment_ids"][row, :length] = 1
    batch["loss_mask"][row, :length] = example.loss_mask
  return batch


def plan_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """First-fit decreasing: example indices grouped into rows of at most `seq_len` tokens.

  Used to pack a whole dataset once (about 95% of positions are real tokens for the shipped data,
  against ~55% for one example per row); ties keep the given order, so a seeded order is reproducible.
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rows, fill = [], []
  for i in order:
    if lengths[i] > seq_len:
      raise ValueError(f"example {i} of {lengths[i]} tokens does not fit seq_len={seq_len}")
    row = next((r for r, used in enumerate(fill) if used + lengths[i] <= seq_len), None)
    if row is None:
      rows.append([]), fill.append(0)
      row = len(rows) - 1
    rows[row].append(i)
    fill[row] += lengths[i]
  return rows


def collate_rows(rows: Sequence[Sequence[TokenizedExample]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One batch row per group of examples (each group fits `seq_len`); segment ids keep examples apart."""
  batch = {name: np.zeros((len(rows), seq_len), np.int32)
           for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  batch["tokens"][:] = pad_id
  for r, group in enumerate(rows):
    start = 0
    for segment, example in enumerate(group, 1):
      length = len(example.tokens)
      if start + length > seq_len:
        raise ValueError(f"row {r}: {start + length} tokens do not fit seq_len={seq_len}")
      batch["tokens"][r, start:start + length] = example.tokens
      batch["positions"][r, start:start + length] = np.arange(length)
      batch["segment_ids"][r, start:start + length] = segment
      batch["loss_mask"][r, start:start + length] = example.loss_mask
      start += length
  return batch


def pack_examples(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int,
                  num_rows: int) -> dict[str, np.ndarray]:
  """Greedy first-fit packing into `num_rows` rows; segment ids keep examples apart.

  Positions restart at 0 for each example. Raises if the examples do not fit,
  so nothing is silently dropped.
  """
  batch = {name: np.zeros((num_rows, seq_len), np.int32)
           for name in ("tokens", "positions", "segment_ids", "loss_mask")}
  batch["tokens"][:] = pad_id
  fill = np.zeros(num_rows, np.int64)
  segments = np.zeros(num_rows, np.int64)
  for example in examples:
    length = len(example.tokens)
    fits = np.nonzero(fill + length <= seq_len)[0]
    if not len(fits):
      raise ValueError(f"{len(examples)} examples do not fit {num_rows} rows of {seq_len} tokens")
    row, start = fits[0], fill[fits[0]]
    segments[row] += 1
    batch["tokens"][row, start:start + length] = example.tokens
    batch["positions"][row, start:start + length] = np.arange(length)
    batch["segment_ids"][row, start:start + length] = segments[row]
    batch["loss_mask"][row, start:start + length] = example.loss_mask
    fill[row] += length
  return batch
