"""On-disk cache of completions (sqlite3 in WAL mode), so reruns of a pipeline cost nothing.

The key is a hash of what decides the output (model, messages, sampling
params, n), not of where it was served from, so the same request to a
relocated server still hits. Only completions are stored: never the base URL's
credentials or the API key.
"""

import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence

from safe_completion.backends import base


def request_key(model: str, messages: Sequence[Mapping[str, str]], params: base.SamplingParams) -> str:
  """sha256 of the canonical JSON of (model, messages, sampling params incl. n)."""
  payload = {"model": model, "messages": [dict(m) for m in messages],
             "params": dataclasses.asdict(params)}
  canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CompletionCache:
  """key -> list of Completion; safe to share between threads of one process."""

  def __init__(self, path: str):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self.path = path
    self._lock = threading.Lock()
    self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

  def get(self, key: str) -> list[base.Completion] | None:
    with self._lock:
      row = self._db.execute("SELECT value FROM completions WHERE key = ?", (key,)).fetchone()
    if row is None:
      return None
    return [base.Completion(**c) for c in json.loads(row[0])]

  def put(self, key: str, completions: Sequence[base.Completion]) -> None:
    value = json.dumps([dataclasses.asdict(c) for c in completions], ensure_ascii=False)
    with self._lock:
      self._db.execute("INSERT OR REPLACE INTO completions (key, value) VALUES (?, ?)", (key, value))

  def __len__(self) -> int:
    with self._lock:
      return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

  def close(self) -> None:
    with self._lock:
      self._db.close()
