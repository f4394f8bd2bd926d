"""The colabs run top to bottom in a fresh kernel (nbclient) on tiny settings, and show what they promise.

Each notebook is executed in a kernel on this interpreter (a kernelspec installed into a temp dir), with
one CPU device: the 8 fake devices of conftest.py are for the pytest process, not for the kernel. After
the notebook's own cells the test appends one probe cell that prints a JSON summary of the kernel's
state, and checks that.
"""

import json
import os
import pathlib
import re
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = ("specs_and_graders.ipynb", "reward_combiner.ipynb", "tiny_end_to_end.ipynb",
             "hf_checkpoint_sampling.ipynb")
PROBE_MARK = "__probe__"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A `python3` kernelspec that runs this interpreter, and the kernel's environment (1 CPU device)."""
  from ipykernel import kernelspec
  prefix = tmp_path_factory.mktemp("jupyter")
  kernelspec.install(prefix=str(prefix), kernel_name="python3")
  scratch = tmp_path_factory.mktemp("notebook_tmp")  # The notebooks' tempfile.mkdtemp() dirs land here.
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
  with pytest.MonkeyPatch.context() as mp:  # The kernel inherits os.environ when it starts.
    mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    mp.setenv("XLA_FLAGS", xla_flags)
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("TQDM_DISABLE", "1")
    mp.setenv("TMPDIR", str(scratch))
    yield


def execute(name: str, probe: str) -> tuple[nbformat.NotebookNode, dict]:
  """Runs notebook `name` plus a probe cell that prints one JSON object; returns (notebook, that object)."""
  nb = nbformat.read(COLABS / name, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(f"# {PROBE_MARK}\nimport json as _json\nprint(_json.dumps({probe}))"))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, on the first failing cell.
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
  assert not errors, errors
  probe_out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  return nb, json.loads(probe_out.strip().splitlines()[-1])


def outputs_of(nb: nbformat.NotebookNode, kind: str) -> list:
  """Every output payload of a MIME type (e.g. "image/png", "text/markdown") or "stream" text."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if kind == "stream" and out.output_type == "stream":
        found.append(out.text)
      elif kind in out.get("data", {}):
        found.append(out.data[kind])
  return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_intro_and_colab_setup(name):
  nb = nbformat.read(COLABS / name, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
  setup = nb.cells[1]
  assert setup.cell_type == "code" and '"google.colab" in sys.modules' in setup.source
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"


def test_specs_and_graders(kernel_env):
  nb, probe = execute("specs_and_graders.ipynb", (
      "dict(grades=[dict(valid=g.valid, safety=g.safety, mode=g.mode) for g in grades],"
      " responses=list(RESPONSES), heldout=rm_report['heldout'], user=user['content'],"
      " system=system['content'], rubric=list(spec.severity))"))
  assert probe["rubric"] == ["negligible", "low", "moderate", "high"]
  assert len(probe["grades"]) == len(probe["responses"]) == 5 and all(g["valid"] for g in probe["grades"])
  assert probe["heldout"]["count"] == 32
  table = outputs_of(nb, "text/plain")
  assert any(all(r in t for r in probe["responses"]) for t in table)  # The grade table is shown.
  token = re.search(r"<<<RESPONSE-([0-9a-f]{32})>>>", probe["user"]).group(1)
  assert f"<<<END-RESPONSE-{token}>>>" in probe["user"] and "# Category spec" in probe["system"]
  assert any("rejected:" in t for t in outputs_of(nb, "stream"))


def test_reward_combiner(kernel_env):
  nb, probe = execute("reward_combiner.ipynb", (
      "dict(table=table.round(6).to_dict(), advantages={k: v.tolist() for k, v in advantages.items()})"))
  assert len(outputs_of(nb, "image/png")) == 3
  table = probe["table"]
  assert table["multiplicative"]["unsafe full compliance"] == 0.0
  assert table["additive"]["unsafe full compliance"] == 0.5  # The ablation pays unsafe helpfulness.
  assert set(table) == {"h", "s", "multiplicative", "additive"}
  adv = probe["advantages"]
  near_tie = {name: max(abs(a) for a in groups[0]) for name, groups in adv.items()}
  spread = {name: max(abs(a) for a in groups[1]) for name, groups in adv.items()}
  assert near_tie["grpo"] > 0.5 * spread["grpo"]  # Std scaling blows the near-tie up to full size...
  assert near_tie["drgrpo"] < 0.05 * spread["drgrpo"]  # ...the mean baseline alone keeps it small.


def test_tiny_end_to_end(kernel_env):
  nb, probe = execute("tiny_end_to_end.ipynb", "dict(report_dir=str(report_dir))")
  report_dir = pathlib.Path(probe["report_dir"])
  markdown = (report_dir / "report.md").read_text()
  assert "refusal" in markdown and "safe_completion" in markdown and "## Attacks" in markdown
  for png in ("safety_vs_helpfulness.png", "severity.png"):
    assert (report_dir / png).read_bytes()[:8] == PNG_MAGIC
  assert any("## Attacks" in t for t in outputs_of(nb, "text/markdown"))  # The report is displayed...
  assert len(outputs_of(nb, "image/png")) == 2  # ...and both plots.


def test_hf_checkpoint_sampling(kernel_env):
  nb, probe = execute("hf_checkpoint_sampling.ipynb", (
      "dict(prompt_tokens={k: c.prompt_tokens for k, (c,) in zip(conversations, completions)},"
      " completion_tokens=[c.completion_tokens for (c,) in completions], system=conversations['with spec'][0],"
      " python=sys.executable, devices=len(jax.devices()))"))
  assert probe["python"] == sys.executable and probe["devices"] == 1
  tokens = probe["prompt_tokens"]
  assert tokens["with spec"] > tokens["plain"] + 200  # The spec and modes guide in the system turn.
  assert probe["system"]["role"] == "system" and "Safe-completion" in probe["system"]["content"]
  assert all(1 <= n <= 24 for n in probe["completion_tokens"])
  assert any("with spec" in t and "plain" in t for t in outputs_of(nb, "text/plain"))
