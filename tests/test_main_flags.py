"""main's default XLA:CPU flag: set for the jaxlib releases it was measured with, known to the installed XLA
(which aborts on an unknown flag), and never over a user's own setting."""

import importlib.metadata
import subprocess
import sys

from safe_completion import main
from tests import scripted_server

# Importing main sets the flag before jax starts its backend; a matmul makes XLA parse it.
PROBE = ("import os; from safe_completion import main; import jax; x = jax.numpy.ones((4, 4)); "
         "(x @ x).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))")


def _probe(env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", PROBE], cwd=scripted_server.REPO_ROOT, capture_output=True,
                        text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", **env})


def test_the_default_flag_is_set_and_known_to_the_installed_xla():
  result = _probe({})
  assert result.returncode == 0, result.stderr[-2000:]
  measured = importlib.metadata.version("jaxlib").startswith(main.CPU_XLA_FLAGS_JAXLIB)
  assert (main.CPU_XLA_FLAGS in result.stdout.split()) == measured


def test_a_users_own_setting_of_the_flag_wins():
  result = _probe({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]
