r"""Trains the tiny byte-level BPE tokenizer shipped in data/tokenizer/.

  python scripts/train_tokenizer.py [--data_dir=data] [--specs_dir=specs] [--vocab_size=4096]

Trained over the shipped texts (specs/*.md, prompt messages, demonstration
CoTs and answers) in a fixed order, so the same inputs give the same
tokenizer. Load it with `transformers.AutoTokenizer.from_pretrained("data/tokenizer")`.
Its chat template renders `<|bos|>` once, then each turn as
`<|role|>content<|end|>`, with an assistant message's `reasoning` as
`<think>reasoning</think>` before its content; `add_generation_prompt`
appends `<|assistant|>`. `<|end|>` is the EOS token, so generation stops at
the end of the assistant turn.
"""

import argparse
from pathlib import Path
from typing import Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

from safe_completion.data import records

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ("user", "assistant", "system")}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, "<|eos|>", ROLE_TOKENS["user"], ROLE_TOKENS["assistant"],
                  ROLE_TOKENS["system"], END, THINK_OPEN, THINK_CLOSE]
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 4096

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning') -%}"
    "{{- '<think>' + message['reasoning'] + '</think>' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def corpus(data_dir: Path, specs_dir: Path) -> Iterator[str]:
  """The shipped texts in a fixed order: specs, prompt turns, demonstration CoTs and answers."""
  for path in sorted(specs_dir.glob("*.md")):
    yield path.read_text(encoding="utf-8")
  if (data_dir / "prompts").is_dir() and any((data_dir / "prompts").glob("*.jsonl")):
    prompts, _ = records.load_prompts(data_dir / "prompts")
    for prompt in prompts:
      for message in prompt.messages:
        yield message["content"]
  if (data_dir / "demonstrations").is_dir() and any((data_dir / "demonstrations").glob("*.jsonl")):
    demos, _ = records.load_demonstrations(data_dir / "demonstrations")
    for demo in demos:
      yield demo.cot
      yield demo.answer


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
  """Byte-level BPE over `texts`, wrapped with special tokens and the chat template."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token=BOS, eos_token=END, pad_token=PAD,
      model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
  wrapped.add_special_tokens({"additional_special_tokens": [
      t for t in SPECIAL_TOKENS if t not in (PAD, BOS, END)]})
  wrapped.chat_template = CHAT_TEMPLATE
  return wrapped


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", type=Path, default=records.DEFAULT_DATA_DIR)
  parser.add_argument("--specs_dir", type=Path, default=records.DEFAULT_DATA_DIR.parent / "specs")
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  parser.add_argument("--out_dir", type=Path, default=records.DEFAULT_DATA_DIR / "tokenizer")
  args = parser.parse_args()
  texts = list(corpus(args.data_dir, args.specs_dir))
  if not texts:
    raise SystemExit(f"no texts found under {args.specs_dir} or {args.data_dir}")
  tokenizer = train(texts, args.vocab_size)
  tokenizer.save_pretrained(str(args.out_dir))
  print(f"trained on {len(texts)} texts ({sum(map(len, texts))} chars); "
        f"vocab {len(tokenizer)}; saved to {args.out_dir}")


if __name__ == "__main__":
  main()
