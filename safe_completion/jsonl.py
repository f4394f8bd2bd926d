"""Append-only JSON lines that survive a kill: each row is written and fsynced whole, and a
torn last line (the process died mid-write) is cut off when the file is read back."""

import json
import os


def read_rows(path: str) -> list[dict]:
  """Rows of a JSONL file (none if it does not exist), repairing a torn final line in place."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  if len(complete) != len(data):
    with open(path, "r+b") as f:
      f.truncate(len(complete))
  rows = []
  for line_number, line in enumerate(complete.decode().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not JSON: {e}") from None
  return rows


def append_rows(path: str, rows: list[dict]) -> None:
  """Appends rows and fsyncs, so a completed call is on disk whole."""
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
