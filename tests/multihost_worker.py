"""One process of the multi-host test: `safe_completion.main` with its flags, then a report line.

Runs the stage exactly as `python -m safe_completion.main` would (same flags,
same `initialize_distributed`), then prints what JAX saw, so the test can
check that the run really spanned several processes.
"""

import json

import jax
from absl import app

from safe_completion import main as main_lib

REPORT_PREFIX = "MULTIHOST_WORKER "


def run(argv: list[str]) -> None:
  main_lib.main(argv)
  print(REPORT_PREFIX + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                                    "local_devices": jax.local_device_count(), "devices": jax.device_count()}),
        flush=True)


if __name__ == "__main__":
  app.run(run)
