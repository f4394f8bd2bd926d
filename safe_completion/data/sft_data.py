"""SFT examples -> deterministic, resumable batches.

The examples of step `s` are a pure function of (seed, s): a fresh permutation
per epoch, so a restarted run sees exactly the batches it would have seen.
"""

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import transformers

from safe_completion.data import chat
from safe_completion.data import reading
from safe_completion.data import records

TOKENIZER_DIR = records.DEFAULT_DATA_DIR / "tokenizer"


@dataclasses.dataclass(frozen=True)
class SftExample:
  """One training conversation: the original prompt (no spec), and the teacher's CoT and answer."""
  id: str
  messages: tuple[dict[str, str], ...]
  cot: str
  answer: str


def load_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer of the run: `config.tokenizer_dir`, else the HF checkpoint's, else the shipped tiny one."""
  directory = config.get("tokenizer_dir") or config.init.get("hf_dir") or str(TOKENIZER_DIR)
  return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


def demonstration_examples(data_dir: str, arm: str) -> list[SftExample]:
  """The shipped demonstrations of one arm, paired with their original train prompts."""
  prompts, _ = records.load_prompts(os.path.join(data_dir, "prompts"), split="train")
  demos, _ = records.load_demonstrations(os.path.join(data_dir, "demonstrations"))
  records.check_demonstrations(prompts, demos)
  by_id = {p.id: p for p in prompts}
  return [SftExample(d.prompt_id, by_id[d.prompt_id].messages, d.cot, d.answer) for d in demos if d.arm == arm]


def _text_key(text: str) -> str:
  """A prompt text as compared for leakage: whitespace runs collapsed, case folded."""
  return " ".join(text.split()).casefold()


def _record_keys(row: dict) -> dict[str, tuple]:
  """What makes two records the same: their id, or their messages, CoT and answer."""
  return {"id": ("id", row["id"]),
          "messages, cot and answer": ("content", json.dumps([row["messages"], row["cot"], row["answer"]],
                                                             sort_keys=True))}


def _record_problem(row: dict, eval_ids: set[str], eval_texts: dict[str, str],
                    first_seen: dict[tuple, str]) -> tuple[str, str] | None:
  """(reason, message) when the record leaks an eval prompt or repeats an earlier one, else None."""
  if row["id"] in eval_ids:
    return "leaked eval prompt", f"id: {row['id']!r} is an eval-split prompt (leakage)"
  users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
  text = users[-1] if users and isinstance(users[-1], str) else None
  if text is not None and _text_key(text) in eval_texts:
    return "leaked eval prompt", (f"messages: the last user message is that of eval prompt "
                                  f"{eval_texts[_text_key(text)]!r} (leakage)")
  for what, key in _record_keys(row).items():
    if key in first_seen:
      return "duplicate", f"duplicate record: the same {what} as at {first_seen[key]}"
  return None


def sft_record_examples(path: str, eval_prompts: Sequence[records.PromptRecord] = (), *,
                        skip_invalid: bool = False) -> tuple[list[SftExample], dict[str, list[str]]]:
  """SFT records written by datagen (`records-*.jsonl` in an arm's directory, or one JSONL file).

  A record whose prompt is one of `eval_prompts` (by id, or by the text of its last user message) or that
  repeats an earlier record (its id, or its messages, CoT and answer) is a DataError naming file:line;
  with `skip_invalid` it (and a malformed line) is left out instead. Returns the examples and the
  locations skipped per reason.
  """
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.startswith("records-") and f.endswith(".jsonl"))
    if not files:
      raise FileNotFoundError(f"no records-*.jsonl in {path}: run the datagen stage first")
  else:
    files = [path]
  eval_ids = {p.id for p in eval_prompts}
  eval_texts = {_text_key(p.last_user_message): p.id for p in eval_prompts}
  examples, skipped, first_seen = [], collections.defaultdict(list), {}
  for file in files:
    with open(file, "rb") as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        location = f"{file}:{line_number}"
        try:
          row = reading.parse_json(line)
          example = SftExample(row["id"], tuple(row["messages"]), row["cot"], row["answer"])
        except (reading.FieldError, KeyError, TypeError) as e:
          problem = ("malformed", f"not an SFT record: {e!r}")
        else:
          problem = _record_problem(row, eval_ids, eval_texts, first_seen)
        if problem is not None:
          if not skip_invalid:
            raise records.DataError(f"{location}: {problem[1]}")
          skipped[problem[0]].append(location)
          continue
        first_seen.update({key: location for key in _record_keys(row).values()})
        examples.append(example)
  return examples, dict(skipped)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Item indices of `step`: consecutive slices of per-epoch permutations, a pure function of (seed, step)."""
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = positions // num_items
  order = {e: np.random.default_rng([seed, int(e)]).permutation(num_items) for e in np.unique(epochs)}
  return np.asarray([order[e][p % num_items] for e, p in zip(epochs, positions)])


def _is_eval(example_id: str, eval_fraction: float) -> bool:
  digest = int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16)
  return digest / 0xFFFFFFFF < eval_fraction


class SftDataset:
  """Tokenized train/eval examples and the batching rule of a run."""

  def __init__(self, train: Sequence[chat.TokenizedExample], eval_: Sequence[chat.TokenizedExample], *,
               batch_size: int, seq_len: int, pad_id: int, seed: int, packed_rows: int = 0,
               pack_dataset: bool = False, dropped_too_long: int = 0):
    if not train:
      raise ValueError("no SFT training examples (all filtered or none given)")
    if pack_dataset and packed_rows:
      raise ValueError("data.pack_dataset and data.packed_rows are two packing modes; set one")
    self.train, self.eval = list(train), list(eval_)
    self.batch_size, self.seq_len, self.pad_id, self.seed = batch_size, seq_len, pad_id, seed
    self.packed_rows = packed_rows
    self.dropped_too_long = dropped_too_long
    # pack_dataset: the train examples packed once into rows (in a seeded order); a batch is
    # `batch_size` of those rows, so an epoch is a pass over the rows.
    self.rows = None
    if pack_dataset:
      order = np.random.default_rng(seed).permutation(len(self.train))
      self.rows = [[self.train[order[i]] for i in row]
                   for row in chat.plan_rows([len(self.train[i].tokens) for i in order], seq_len)]

  def _collate(self, examples: Sequence[chat.TokenizedExample], rows: int) -> dict[str, np.ndarray]:
    if self.packed_rows:
      return chat.pack_examples(examples, self.seq_len, self.pad_id, rows)
    return chat.pad_examples(examples, self.seq_len, self.pad_id)

  def train_indices(self, step: int) -> np.ndarray:
    """Indices of the step's examples (of its packed rows with `pack_dataset`)."""
    return batch_indices(len(self.rows if self.rows is not None else self.train), self.batch_size, step, self.seed)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    if self.rows is not None:
      return chat.collate_rows([self.rows[i] for i in self.train_indices(step)], self.seq_len, self.pad_id)
    examples = [self.train[i] for i in self.train_indices(step)]
    return self._collate(examples, self.packed_rows or self.batch_size)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size padded batches over all eval examples (the last one filled with empty rows)."""
    for start in range(0, len(self.eval), self.batch_size):
      chunk = list(self.eval[start:start + self.batch_size])
      empty = chat.TokenizedExample(np.zeros(0, np.int32), np.zeros(0, np.int32))
      yield chat.pad_examples(chunk + [empty] * (self.batch_size - len(chunk)), self.seq_len, self.pad_id)


def build_dataset(config: ml_collections.ConfigDict, tokenizer) -> SftDataset:
  """Examples from `config.data` (shipped demonstrations or datagen records), tokenized and split."""
  data = config.data
  if data.source == "demonstrations":
    examples = demonstration_examples(data.data_dir or str(records.DEFAULT_DATA_DIR), data.arm)
  elif data.source == "records":
    eval_prompts, _ = records.load_prompts(os.path.join(data.data_dir or str(records.DEFAULT_DATA_DIR), "prompts"),
                                           split="eval")
    examples, skipped = sft_record_examples(data.records_path, eval_prompts,
                                            skip_invalid=data.get("skip_invalid_records", False))
    for reason, locations in sorted(skipped.items()):
      print(f"sft data: skipped {len(locations)} records of {data.records_path}: {reason} "
            f"(at {', '.join(locations[:5])}{', ...' if len(locations) > 5 else ''})")
  else:
    raise ValueError(f"data.source={data.source!r} is not one of ['demonstrations', 'records']")
  if data.max_examples:
    examples = examples[:data.max_examples]
  train, eval_, dropped = [], [], 0
  for example in examples:
    tokenized = chat.tokenize_sft_example(tokenizer, example.messages, example.cot, example.answer)
    if len(tokenized.tokens) > data.seq_len:
      dropped += 1
      continue
    (eval_ if _is_eval(example.id, data.eval_fraction) else train).append(tokenized)
  if dropped:
    print(f"sft data: {dropped} of {len(examples)} examples are longer than seq_len={data.seq_len} "
          "and are left out; raise config.data.seq_len to keep them")
  return SftDataset(train, eval_, batch_size=config.batch_size, seq_len=data.seq_len, pad_id=tokenizer.pad_token_id,
                    seed=config.seed, packed_rows=data.packed_rows, pack_dataset=data.get("pack_dataset", False),
                    dropped_too_long=dropped)
