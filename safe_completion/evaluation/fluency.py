"""A fluency statistic a reader can check: how much of a completion is made of word pairs people wrote.

`seen_bigram_rate(texts, reference)`: over all adjacent pairs of lower-cased words in `texts`, the
fraction that also occur as adjacent words somewhere in `reference` (the SFT demonstrations and
prompts). Readable text of the demonstrations' kind scores high (most of its word pairs are common
English or the demonstrations' phrasing); token soup scores near 0 even when every word is real,
because its neighbours are random. `known_word_rate` is the unigram version (catches sub-word junk
like "harmlessacyerr"). Neither says the text is correct or on topic: read the samples.
"""

import re
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def _bigrams(tokens: Sequence[str]) -> set[tuple[str, str]]:
  return set(zip(tokens, tokens[1:]))


def reference_sets(reference: Iterable[str]) -> tuple[set[str], set[tuple[str, str]]]:
  """(known words, known word pairs) of the reference texts."""
  known_words, known_pairs = set(), set()
  for text in reference:
    tokens = words(text)
    known_words.update(tokens)
    known_pairs.update(_bigrams(tokens))
  return known_words, known_pairs


def seen_bigram_rate(texts: Iterable[str], known_pairs: set[tuple[str, str]]) -> float:
  """Fraction of the texts' adjacent word pairs found in the reference; nan when there are none."""
  total = seen = 0
  for text in texts:
    tokens = words(text)
    pairs = list(zip(tokens, tokens[1:]))
    total += len(pairs)
    seen += sum(pair in known_pairs for pair in pairs)
  return seen / total if total else float("nan")


def known_word_rate(texts: Iterable[str], known_words: set[str]) -> float:
  """Fraction of the texts' words found in the reference; nan when there are none."""
  total = seen = 0
  for text in texts:
    tokens = words(text)
    total += len(tokens)
    seen += sum(token in known_words for token in tokens)
  return seen / total if total else float("nan")
