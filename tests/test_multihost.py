"""Multi-host JAX for real: 2 local processes x 4 CPU devices (gloo collectives) run SFT then RL and
end with the same params as one process with 8 devices.

Each stage runs as `python -m tests.multihost_worker` (= `safe_completion.main` plus a report of
what JAX saw), the distributed run with `--coordinator_address/--num_processes/--process_id`, both
processes writing checkpoints into one shared workdir, as on a pod with GCS.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from safe_completion import checkpoint
from safe_completion import metrics
from tests.multihost_worker import REPORT_PREFIX
from tests.test_rl import KEYWORD_FLAGS

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
STAGE_TIMEOUT_S = 600
SFT_STEPS, RL_STEPS = 4, 3
TOLERANCE = 1e-5
# The same logical mesh in both runs; fsdp and tensor axes make params span both processes.
MESH_FLAG = "--config.mesh.shape=(2,2,2)"
SFT_FLAGS = {"num_steps": SFT_STEPS, "batch_size": 8, "data.max_examples": 48, "optimizer.warmup_steps": 1,
             "checkpoint.every_steps": SFT_STEPS, "checkpoint.async_save": False, "eval_every": SFT_STEPS}
# Keyword "o" gives most groups a reward spread from the first step, so every RL update carries signal
# (updates without any are skipped: see pg.update_step) at the usual tiny learning rate of 1e-2.
RL_FLAGS = {**KEYWORD_FLAGS, "grader.keyword": "o", "num_steps": RL_STEPS, "rl.prompts_per_step": 4,
            "rl.samples_per_prompt": 2, "rl.max_new_tokens": 12, "checkpoint.every_steps": RL_STEPS}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict[str, str]:
  """This environment with `num_devices` fake CPU devices (the session's own count removed) and gloo."""
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return {**os.environ, "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={num_devices}".strip(),
          "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _stage_args(config: str, workdir: Path, flags: dict) -> list[str]:
  return [f"--config={config}", f"--workdir={workdir}", MESH_FLAG, *[f"--config.{k}={v}" for k, v in flags.items()]]


def _tail(path: Path, chars: int = 4000) -> str:
  return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _launch(args: list[str], num_processes: int, log_dir: Path) -> list[dict]:
  """Runs the worker as `num_processes` processes (one plain process when 1); returns their reports.

  A process that fails or hangs fails the test with every process's log; the others are killed
  rather than left waiting on a collective.
  """
  log_dir.mkdir(parents=True, exist_ok=True)
  env = _env(NUM_PROCESSES * LOCAL_DEVICES // num_processes)
  distributed = []
  if num_processes > 1:
    distributed = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={num_processes}"]
  logs = [log_dir / f"process_{i}.log" for i in range(num_processes)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "wb") as f:
        extra = [*distributed, f"--process_id={i}"] if distributed else []
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", *args, *extra], cwd=REPO,
                                      env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while time.monotonic() < deadline:
      running = [p for p in procs if p.poll() is None]
      if not running or any(p.returncode for p in procs if p.returncode is not None):
        break
      try:
        running[0].wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  codes = [p.returncode for p in procs]
  if any(codes):
    dump = "\n".join(f"--- process {i} (exit {code}) {log} ---\n{_tail(log)}"
                     for i, (code, log) in enumerate(zip(codes, logs)))
    raise AssertionError(f"worker processes failed or timed out ({STAGE_TIMEOUT_S}s): exit codes {codes}\n{dump}")
  reports = []
  for log in logs:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.startswith(REPORT_PREFIX)]
    assert lines, f"no report line in {log}:\n{_tail(log)}"
    reports.append(json.loads(lines[-1][len(REPORT_PREFIX):]))
  return reports


def _run_pipeline(root: Path, num_processes: int) -> tuple[list[dict], dict[str, float]]:
  """SFT then RL from its checkpoint into `root`; returns the workers' reports and each stage's seconds."""
  reports, seconds = [], {}
  for stage, config, flags in (("sft", "configs/sft.py:tiny", SFT_FLAGS),
                               ("rl", "configs/rl.py:tiny", {**RL_FLAGS, "init.sft_workdir": root / "sft"})):
    started = time.monotonic()
    reports += _launch(_stage_args(config, root / stage, flags), num_processes, root / "logs" / stage)
    seconds[stage] = time.monotonic() - started
  return reports, seconds


def _max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def test_two_processes_equal_one_process(tmp_path):
  multi, multi_seconds = _run_pipeline(tmp_path / "multi", NUM_PROCESSES)
  single, single_seconds = _run_pipeline(tmp_path / "single", 1)
  print(f"multi-process seconds {multi_seconds}, single-process seconds {single_seconds}")

  expected = {"process_count": NUM_PROCESSES, "local_devices": LOCAL_DEVICES, "devices": NUM_PROCESSES * LOCAL_DEVICES}
  for report in multi:
    assert {k: report[k] for k in expected} == expected, report
  assert [r["process_index"] for r in multi] == [0, 1, 0, 1]  # SFT then RL, in process order.
  assert all(r["process_count"] == 1 and r["devices"] == NUM_PROCESSES * LOCAL_DEVICES for r in single), single

  for stage, num_steps, key in (("sft", SFT_STEPS, "loss"), ("rl", RL_STEPS, "reward")):
    # Process 0 alone writes metrics: one row per step, not one per process.
    multi_rows = metrics.read_metrics(tmp_path / "multi" / stage / "metrics.jsonl")
    single_rows = metrics.read_metrics(tmp_path / "single" / stage / "metrics.jsonl")
    assert [r["step"] for r in multi_rows] == list(range(1, num_steps + 1))
    np.testing.assert_allclose([r[key] for r in multi_rows], [r[key] for r in single_rows], atol=1e-5)
    if stage == "rl":
      assert all(r["update_skipped"] == 0.0 for r in single_rows), "an RL step had no reward signal"

    multi_params, _, _ = checkpoint.load_model(str(tmp_path / "multi" / stage))
    single_params, _, _ = checkpoint.load_model(str(tmp_path / "single" / stage))
    diff = _max_abs_diff(multi_params, single_params)
    print(f"{stage}: max |params(2 processes) - params(1 process)| = {diff:.3g}")
    assert diff <= TOLERANCE, f"{stage} params differ by {diff}"

  sft_params, _, _ = checkpoint.load_model(str(tmp_path / "multi" / "sft"))
  rl_params, _, _ = checkpoint.load_model(str(tmp_path / "multi" / "rl"))
  assert _max_abs_diff(sft_params, rl_params) > 3 * TOLERANCE, "RL barely moved the params: the comparison is vacuous"
