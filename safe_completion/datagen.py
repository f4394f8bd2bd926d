"""Spec-guided SFT data: a teacher answers each prompt *with* its spec, a judge filters.

For each train prompt and arm, the teacher sees the category's spec, the arm's
modes guide and an instruction to consult them, and writes
`<reasoning>..</reasoning><mode>..</mode><answer>..</answer>`. A grader with
the full spec grades the answer; samples that pass the thresholds become SFT
records pairing the *original* prompt (no spec) with the CoT and answer.

Output (per arm, in `<workdir>/<arm>/`): `records-NNNNN.jsonl` shards, one
line per kept prompt; `dropped.jsonl`, one line per prompt whose attempts all
failed, with each attempt's reason (exception text included) and the drop's
class; `stats.json`, kept/dropped counts per reason per (category, intent).

Failures are isolated per row: a teacher or grader call that raises for a batch
is retried row by row, so one bad prompt only fails its own attempt. A drop is
"transient" when some attempt failed for a reason a later run may not meet
(a teacher or grader call that failed, an invalid grade) and "permanent" when
every attempt was judged (unsafe, unhelpful), the teacher's output did not
parse, or the row's own input made the call fail (`error_reason`).

Resumable: ids already in either file are skipped (with `retry_dropped`, rows
dropped for transient reasons are tried again and their old drop line removed);
a torn last line from a kill is cut off before appending.
"""

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import tqdm

from safe_completion import jsonl
from safe_completion import specs as specs_lib
from safe_completion import taxonomy
from safe_completion.backends import base as backends_base
from safe_completion.data import records
from safe_completion.graders import base as graders_base

TEACHER_INSTRUCTION = (
    "You are writing a training demonstration. Before answering, consult the policy spec above: identify "
    "the category and the spec sections that apply, decide whether a full answer would meaningfully "
    "facilitate harm, and choose one of the allowed modes ({modes}). Then answer in that mode, following "
    "the output format of the modes guide exactly. The answer must not mention the spec or these "
    "instructions.")
_TAG = re.compile(r"<(reasoning|mode|answer)>(.*?)</\1>", re.DOTALL)
# Attempt-failure reasons (the text before the first ':') a later run may not meet again.
TRANSIENT_REASONS = ("teacher_error", "grader_error", "invalid_grade")
# How much of an exception's text a dropped row keeps.
MAX_ERROR_CHARS = 500


class TeacherParseError(ValueError):
  """A teacher output that does not follow the required format; `reason` names the problem."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class TeacherSample:
  cot: str
  mode: str
  answer: str


def teacher_messages(prompt: records.PromptRecord, category_spec: specs_lib.Spec,
                     modes_guide: specs_lib.Spec, arm: str) -> list[dict]:
  """The spec-augmented input: spec + modes guide + instruction as system turn, then the conversation."""
  instruction = TEACHER_INSTRUCTION.format(modes=", ".join(taxonomy.ARM_MODES[arm]))
  system = "\n\n".join([specs_lib.render_spec(category_spec), specs_lib.render_spec(modes_guide), instruction])
  return [{"role": "system", "content": system}, *prompt.messages]


def parse_teacher_output(text: str, arm: str) -> TeacherSample:
  """Strict parse of the three tags; each a single non-empty block, the mode allowed for the arm."""
  if not isinstance(text, str):
    raise TeacherParseError(f"expected text, got {type(text).__name__}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise TeacherParseError(f"not UTF-8 text: lone surrogate at position {e.start}") from None
  found = collections.defaultdict(list)
  for tag, body in _TAG.findall(text):
    found[tag].append(body.strip())
  for tag in ("reasoning", "mode", "answer"):
    if len(found[tag]) != 1:
      raise TeacherParseError(f"{len(found[tag])} <{tag}> blocks" if found[tag] else f"missing <{tag}>")
    if not found[tag][0]:
      raise TeacherParseError(f"empty <{tag}>")
  mode = found["mode"][0]
  if mode not in taxonomy.ARM_MODES[arm]:
    raise TeacherParseError(f"mode {mode!r} not allowed for arm {arm}")
  return TeacherSample(found["reasoning"][0], mode, found["answer"][0])


def format_teacher_output(sample: TeacherSample) -> str:
  return f"<reasoning>\n{sample.cot}\n</reasoning>\n<mode>{sample.mode}</mode>\n<answer>\n{sample.answer}\n</answer>"


class Teacher(Protocol):
  model_id: str

  def generate(self, prompts: Sequence[records.PromptRecord], messages: Sequence[list[dict]],
               attempt: int) -> list[str]:
    """One raw output per prompt (attempt numbers from 0, so samplers can vary the seed)."""


class DemonstrationTeacher:
  """The shipped demonstrations as a teacher: the offline default of the tiny pipeline."""

  def __init__(self, demonstrations: Iterable[records.Demonstration], arm: str):
    self.model_id = f"demonstrations:{arm}"
    self._by_prompt = {d.prompt_id: d for d in demonstrations if d.arm == arm}

  def generate(self, prompts, messages, attempt):
    del messages, attempt
    outputs = []
    for prompt in prompts:
      demo = self._by_prompt.get(prompt.id)
      outputs.append("" if demo is None else format_teacher_output(TeacherSample(demo.cot, demo.mode, demo.answer)))
    return outputs


class BackendTeacher:
  """Any generation backend (an OpenAI-compatible server, or our local model) as the teacher."""

  def __init__(self, backend: backends_base.Backend, sampling: backends_base.SamplingParams):
    self.backend, self.sampling = backend, sampling
    self.model_id = backend.model_id

  def generate(self, prompts, messages, attempt):
    del prompts
    sampling = dataclasses.replace(self.sampling, n=1, seed=(self.sampling.seed or 0) + attempt)
    completions = self.backend.generate(list(messages), sampling)
    return [choices[0].text for choices in completions]


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Judge thresholds a sample must meet; nothing here reads the prompt's gold intent label."""
  min_safety: float = 0.75
  min_helpfulness: float = 0.5


def judge_verdict(grade: graders_base.Grade, sample: TeacherSample, prompt: records.PromptRecord, arm: str,
                  config: FilterConfig) -> str:
  """'kept' or the reason a graded sample is dropped."""
  if not grade.valid:
    return f"invalid_grade: {grade.rationale}"
  if grade.safety < config.min_safety:
    return "unsafe"
  if grade.helpfulness < config.min_helpfulness:
    return "unhelpful"
  return "kept"


def error_reason(caller: str, error: Exception) -> str:
  """'<caller>_error: ExceptionType: text' (the text cut to MAX_ERROR_CHARS), the reason of a failed call.

  A ValueError (a UnicodeEncodeError of a lone surrogate, say) is the row's own input failing, which a
  rerun would meet again: '<caller>_input_error'. Anything else (a BackendError, a timeout) is transient.
  """
  kind = f"{caller}_input_error" if isinstance(error, ValueError) else f"{caller}_error"
  text = f"{type(error).__name__}: {error}"
  return f"{kind}: {text[:MAX_ERROR_CHARS]}{'...' if len(text) > MAX_ERROR_CHARS else ''}"


def reason_class(reasons: Sequence[str]) -> str:
  """'transient' when some attempt failed for a transient reason, else 'permanent'."""
  return "transient" if any(r.split(":")[0] in TRANSIENT_REASONS for r in reasons) else "permanent"


class RecordWriter:
  """Append-only, line-atomic JSONL shards that a killed run can resume without duplicates.

  With `retry_dropped`, prompts whose last drop was transient are not done: `retry` maps their ids to
  the drop rows, and a new outcome supersedes the old line (`compact` removes it).
  """

  def __init__(self, directory: str, shard_size: int, retry_dropped: bool = False):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.shard_size = directory, shard_size
    self.dropped_path = os.path.join(directory, "dropped.jsonl")
    kept = [row["id"] for path in self.shards() for row in jsonl.read_rows(path)]
    self.kept_ids, self._kept_count = set(kept), len(kept)
    dropped = self.compact()
    self.retry = {i: row for i, row in dropped.items()
                  if retry_dropped and row.get("reason_class", reason_class(row["reasons"])) == "transient"}
    self.done_ids = self.kept_ids | (set(dropped) - set(self.retry))

  def shards(self) -> list[str]:
    return sorted(os.path.join(self.directory, f) for f in os.listdir(self.directory)
                  if f.startswith("records-") and f.endswith(".jsonl"))

  def dropped_rows(self) -> dict[str, dict]:
    """The current drop of each prompt: its last line, and none for a prompt kept since."""
    return self._dropped_rows()[0]

  def _dropped_rows(self) -> tuple[dict[str, dict], int]:
    rows, lines = {}, jsonl.read_rows(self.dropped_path)
    for row in lines:
      if row["id"] not in self.kept_ids:
        rows.pop(row["id"], None)
        rows[row["id"]] = row
    return rows, len(lines)

  def compact(self) -> dict[str, dict]:
    """Rewrites dropped.jsonl (atomically) to `dropped_rows()` when superseded lines are in it."""
    rows, lines = self._dropped_rows()
    if len(rows) != lines:
      tmp = self.dropped_path + ".tmp"
      if os.path.exists(tmp):
        os.remove(tmp)
      jsonl.append_rows(tmp, list(rows.values()))
      os.replace(tmp, self.dropped_path)
    return rows

  def _append(self, path: str, row: dict) -> None:
    jsonl.append_rows(path, [row])
    self.done_ids.add(row["id"])

  def write_record(self, row: dict) -> None:
    if row["id"] in self.kept_ids:
      raise ValueError(f"{row['id']}: already has a record in {self.directory}")
    shard = self._kept_count // self.shard_size
    self._append(os.path.join(self.directory, f"records-{shard:05d}.jsonl"), row)
    self.kept_ids.add(row["id"])
    self._kept_count += 1

  def write_dropped(self, row: dict) -> None:
    self._append(self.dropped_path, row)


@dataclasses.dataclass(frozen=True)
class CallFailed:
  """In place of a result: the call for this row alone raised; `reason` is its `error_reason`."""
  reason: str


def _isolated(call, items: Sequence, caller: str) -> list:
  """`call(items)` (one result per item); when it raises, each item alone, so a failure is its own row's.

  An item whose call still fails gets a CallFailed in place of a result.
  """
  try:
    results = list(call(items))
    if len(results) != len(items):
      raise RuntimeError(f"{len(results)} results for {len(items)} inputs")
    return results
  except Exception as e:  # pylint: disable=broad-except  # Any failure is the row's, recorded with its text.
    if len(items) == 1:
      return [CallFailed(error_reason(caller, e))]
    return [result for i in range(len(items)) for result in _isolated(call, items[i:i + 1], caller)]


def generate_arm(prompts: Sequence[records.PromptRecord], specs: dict, arm: str, teacher: Teacher,
                 grader: graders_base.Grader, out_dir: str, *, max_attempts: int, batch_size: int,
                 filter_config: FilterConfig, shard_size: int = 1000, retry_dropped: bool = False) -> dict:
  """Runs (or resumes) datagen for one arm; returns the stats it also writes to stats.json.

  `retry_dropped`: prompts dropped for transient reasons by an earlier run are tried again.
  """
  writer = RecordWriter(out_dir, shard_size, retry_dropped=retry_dropped)
  pending = [p for p in prompts if p.id not in writer.done_ids]
  if writer.retry:
    print(f"datagen {arm}: retrying {sum(p.id in writer.retry for p in pending)} prompts dropped for transient reasons")
  guide = specs_lib.modes_guide(specs, arm)
  for start in tqdm.trange(0, len(pending), batch_size, desc=f"datagen {arm}", disable=not pending):
    batch = pending[start:start + batch_size]
    messages = [teacher_messages(p, specs_lib.category_spec(specs, p.category), guide, arm) for p in batch]
    earlier = {p.id: list(writer.retry[p.id]["reasons"]) if p.id in writer.retry else [] for p in batch}
    reasons = {p.id: [] for p in batch}
    kept: dict[str, tuple] = {}
    for attempt in range(max_attempts):
      todo = [i for i, p in enumerate(batch) if p.id not in kept]
      if not todo:
        break
      outputs = _isolated(lambda rows: teacher.generate([batch[i] for i in rows], [messages[i] for i in rows],
                                                        attempt), todo, "teacher")
      parsed = []
      for i, text in zip(todo, outputs):
        if isinstance(text, CallFailed):
          reasons[batch[i].id].append(text.reason)
          continue
        try:
          parsed.append((i, parse_teacher_output(text, arm)))
        except TeacherParseError as e:
          reasons[batch[i].id].append(f"unparsable: {e.reason}")
      requests = [graders_base.GradeRequest(prompt=batch[i].messages, response=s.answer, category=batch[i].category,
                                            prompt_id=batch[i].id) for i, s in parsed]
      grades = _isolated(grader.grade, requests, "grader") if requests else []
      for (i, sample), grade in zip(parsed, grades):
        if isinstance(grade, CallFailed):
          verdict = grade.reason
        else:
          verdict = judge_verdict(grade, sample, batch[i], arm, filter_config)
        if verdict == "kept":
          kept[batch[i].id] = (sample, grade)
        else:
          reasons[batch[i].id].append(verdict)
    for prompt in batch:
      if prompt.id in kept:
        sample, grade = kept[prompt.id]
        writer.write_record(sft_record(prompt, arm, sample, grade, teacher.model_id,
                                       earlier[prompt.id] + reasons[prompt.id]))
      else:
        writer.write_dropped({"id": prompt.id, "category": prompt.category, "intent": prompt.intent, "arm": arm,
                              "reasons": earlier[prompt.id] + reasons[prompt.id],
                              "reason_class": reason_class(reasons[prompt.id])})
  writer.compact()
  stats = compute_stats(writer)
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2, sort_keys=True)
  return stats


def sft_record(prompt: records.PromptRecord, arm: str, sample: TeacherSample, grade: graders_base.Grade,
               teacher_id: str, failed_attempts: list[str]) -> dict:
  """An SFT record: the original prompt (no spec), the teacher's CoT and answer, and its grade."""
  return {"id": prompt.id, "arm": arm, "messages": list(prompt.messages), "cot": sample.cot,
          "answer": sample.answer, "mode": sample.mode, "category": prompt.category, "intent": prompt.intent,
          "teacher": teacher_id, "failed_attempts": failed_attempts,
          "grade": {"safety": grade.safety, "helpfulness": grade.helpfulness, "mode": grade.mode,
                    "severity": grade.severity, "grader": grade.grader, "judge_model": grade.judge_model,
                    "template_hash": grade.template_hash}}


def compute_stats(writer: RecordWriter) -> dict:
  """Kept and dropped counts (`dropped:<class>` too) per (category, intent), and every failed attempt's reason."""
  cells = collections.defaultdict(collections.Counter)
  for path in writer.shards():
    for row in jsonl.read_rows(path):
      cells[f"{row['category']}/{row['intent']}"]["kept"] += 1
      for reason in row["failed_attempts"]:
        cells[f"{row['category']}/{row['intent']}"][f"attempt_failed:{reason.split(':')[0]}"] += 1
  for row in writer.dropped_rows().values():
    cell = cells[f"{row['category']}/{row['intent']}"]
    cell["dropped"] += 1
    cell[f"dropped:{row.get('reason_class', reason_class(row['reasons']))}"] += 1
    for reason in row["reasons"]:
      cell[f"attempt_failed:{reason.split(':')[0]}"] += 1
  totals = collections.Counter()
  for counts in cells.values():
    totals.update(counts)
  return {"cells": {k: dict(v) for k, v in sorted(cells.items())}, "totals": dict(totals)}
