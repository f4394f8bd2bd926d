"""A SFT run killed with SIGKILL and restarted ends with the same params as an uninterrupted run.

All runs share one persistent compilation cache (`--jax_cache_dir`), as restarts on a pod do, so the
restarted run also checks that cached executables compute the same params.
"""

import os
import subprocess
import sys

import jax
import numpy as np

from safe_completion import checkpoint
from safe_completion import sft
from tests import processes
from tests.test_sft import micro_config

NUM_STEPS = 10
FLAGS = [f"--config.num_steps={NUM_STEPS}", "--config.batch_size=8", "--config.data.max_examples=32",
         "--config.checkpoint.every_steps=2", "--config.eval_every=5"]


def _command(workdir):
  return [sys.executable, "-m", "safe_completion.main", "--config=configs/sft.py:tiny", f"--workdir={workdir}", *FLAGS,
          f"--jax_cache_dir={workdir.parent / 'jax_cache'}"]


def _run(workdir):
  subprocess.run(_command(workdir), check=True, capture_output=True, timeout=300)


def _final_params(workdir):
  config = micro_config()
  model_config = sft.model_config_from(config)
  abstract = jax.eval_shape(lambda r: sft.transformer.init_params(model_config, r), jax.random.key(0))
  return checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract, NUM_STEPS)


def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  _run(reference)
  assert any((tmp_path / "jax_cache").iterdir()), "the first run wrote nothing to the compilation cache"

  processes.kill_when(_command(resumed), resumed / "metrics.jsonl", lines=5)
  assert processes.complete_lines(resumed / "metrics.jsonl") < NUM_STEPS
  _run(resumed)

  expected, actual = _final_params(reference), _final_params(resumed)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, actual)
