r"""Entry point of every stage: `python -m safe_completion.main --config=configs/<stage>.py:<preset> --workdir=DIR`.

The config's `stage` field picks the trainer; each stage is an importable
function `(config, workdir)` that a colab can call directly.
"""

import importlib

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from safe_completion import config_checks
from safe_completion import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sft.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_JAX_CACHE_DIR = flags.DEFINE_string(
    "jax_cache_dir", None, "Persistent compilation cache (a local or bucket-mounted directory): reruns and "
    "restarts after preemption load compiled programs instead of recompiling.")
_VERBOSITY = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"], "absl log level.")

# stage name -> "module:function(config, workdir)".
STAGES = {
    "datagen": "safe_completion.datagen_stage:run",
    "reward_model": "safe_completion.reward_training:train",
    "sft": "safe_completion.sft:train",
    "rl": "safe_completion.rl.loop:train",
    "eval": "safe_completion.evaluation.evaluate:run",
    "experiment": "safe_completion.experiment:run",
    "compare": "safe_completion.evaluation.endpoint_comparison:run",
}


def main(argv):
  del argv
  logging.set_verbosity(_VERBOSITY.value)  # Orbax logs every checkpoint step at INFO.
  if _JAX_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE_DIR.value)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  if _WORKDIR.value.startswith("gs://"):
    raise app.UsageError(f"--workdir={_WORKDIR.value}: stages write with ordinary file I/O; mount the bucket "
                         "with gcsfuse (launch/tpu.py does, at /gcs/BUCKET) and pass the mounted path")
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage={config.stage!r} is not one of {sorted(STAGES)}")
  try:
    config_checks.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  module_name, function_name = STAGES[config.stage].split(":")
  getattr(importlib.import_module(module_name), function_name)(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
