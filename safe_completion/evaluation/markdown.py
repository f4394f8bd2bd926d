"""Formatting shared by the report's Markdown sections: tables, stats, p-values, JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

MISSING = "—"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table; '|' inside a cell is escaped so it cannot split the cell."""
  def line(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows] + [""]


def format_stat(stat: Mapping[str, Any] | None, digits: int = 2) -> str:
  """`value [low, high]`, `value` without a CI, or a dash when there is no value."""
  if not stat or stat.get("value") is None:
    return MISSING
  text = f"{stat['value']:.{digits}f}"
  if stat.get("ci") is not None:
    low, high = stat["ci"]
    text += f" [{low:.{digits}f}, {high:.{digits}f}]"
  return text


def format_p(p: float | None) -> str:
  if p is None:
    return MISSING
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def json_safe(value: Any) -> Any:
  """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf -> None, other objects -> str."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  return str(value)
