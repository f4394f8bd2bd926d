"""Checkpoints under a relative workdir, as the README's `--workdir=workdir/experiment` gives them."""

import jax.numpy as jnp
import numpy as np

from safe_completion import checkpoint


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"params": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(4)}
  with checkpoint.manager("workdir/run/checkpoints", async_save=False) as mngr:
    checkpoint.save(mngr, 4, state, {"note": "relative"}, force=True)
    mngr.wait_until_finished()
  assert (tmp_path / "workdir" / "run" / "checkpoints" / "4").is_dir()
  with checkpoint.manager("workdir/run/checkpoints", async_save=False) as mngr:
    restored, meta = checkpoint.restore(mngr, state)
  np.testing.assert_array_equal(restored["params"], state["params"])
  assert meta == {"note": "relative"}
