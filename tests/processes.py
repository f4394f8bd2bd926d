"""Killing a stage mid-run, for the resume tests."""

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def complete_lines(path: Path) -> int:
  """Newline-terminated lines in `path` (0 when it does not exist yet)."""
  return path.read_text().count("\n") if path.exists() else 0


def kill_when(command: Sequence[str], path: Path, lines: int, timeout_s: float = 300) -> None:
  """Starts `command` and SIGKILLs it once `path` holds `lines` complete lines.

  Fails when the process ends by itself first: the run must be long enough to be interrupted.
  """
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout_s
  while complete_lines(path) < lines and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, f"{command[:4]} finished before it could be killed; make it longer"
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
