"""launch/tpu.py: the gcloud commands of every preset (dry run), and the restart loop's decisions."""

import importlib.util
import pathlib
import shlex
import subprocess

import pytest

from configs import launch as presets

_PATH = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tpu.py"
_SPEC = importlib.util.spec_from_file_location("launch_tpu", _PATH)
tpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tpu)


def dry(capsys, *argv: str) -> list[str]:
  assert tpu.main([*argv, "--dry_run"]) == 0
  return capsys.readouterr().out.splitlines()


def remote_script(line: str) -> str:
  """The bash script inside a printed `gcloud ... ssh --command=bash -c SCRIPT` line."""
  command = next(arg for arg in shlex.split(line) if arg.startswith("--command="))
  words = shlex.split(command.removeprefix("--command="))
  assert words[:2] == ["bash", "-c"] and len(words) == 3
  return words[2]


@pytest.mark.parametrize("name", sorted(presets.SLICES))
def test_slice_preset_commands(capsys, name):
  tpu_slice = presets.SLICES[name]
  create, = dry(capsys, "create", f"--preset={name}", "--name=sc")
  assert create == (f"gcloud compute tpus tpu-vm create sc --zone={tpu_slice.zone} "
                    f"--accelerator-type={tpu_slice.accelerator_type} --version={tpu_slice.runtime_version}")
  archive, scp, install = dry(capsys, "setup", f"--preset={name}", "--name=sc")
  assert archive.startswith("git -C ") and archive.endswith(" HEAD")
  assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp
  assert "--worker=all" in install and "pip install" in remote_script(install)
  assert "-e '.[tpu]'" in remote_script(install)
  run, = dry(capsys, "run", f"--preset={name}", "--name=sc", "--bucket=bkt", "--config_preset=llama3_8b")
  assert run.startswith("gcloud compute tpus tpu-vm ssh sc ") and "--worker=all" in run
  script = remote_script(run)
  mesh = ",".join(str(s) for s in tpu_slice.mesh)
  assert (f"python -m safe_completion.main --config=configs/sft.py:llama3_8b --workdir=/gcs/bkt/sc/sft "
          f"--config.mesh.shape={mesh} --jax_cache_dir=/gcs/bkt/sc/jax_cache") in script
  assert "SAFE_COMPLETION_DISTRIBUTED=1" in script and "tee -a" in script
  assert "gcloud storage cp" in script and "gs://bkt/sc/sft/logs/" in script
  assert "mountpoint -q /gcs/bkt ||" in script and "gcsfuse --implicit-dirs bkt /gcs/bkt" in script
  delete, = dry(capsys, "delete", f"--preset={name}", "--name=sc")
  assert delete == f"gcloud compute tpus tpu-vm delete sc --zone={tpu_slice.zone} --quiet"


@pytest.mark.parametrize("name", sorted(presets.MODEL_PRESETS))
def test_model_preset_picks_slice_and_mesh(capsys, name):
  model = presets.MODEL_PRESETS[name]
  tpu_slice = presets.SLICES[model.slice]
  create, = dry(capsys, "create", f"--preset={name}", "--name=sc")
  assert f"--accelerator-type={tpu_slice.accelerator_type}" in create and f"--zone={tpu_slice.zone}" in create
  run, = dry(capsys, "run", f"--preset={name}", "--name=sc", "--bucket=bkt", "--stage=rl")
  script = remote_script(run)
  assert f"--config=configs/rl.py:{model.config_preset} --workdir=/gcs/bkt/sc/rl" in script
  assert f"--config.mesh.shape={','.join(str(s) for s in model.mesh)}" in script
  assert "--config.init.sft_workdir=/gcs/bkt/sc/sft" in script


def test_queued_resource_with_spot_and_best_effort(capsys):
  create, wait = dry(capsys, "create", "--preset=v5e-16", "--name=sc", "--queued", "--spot", "--zone=us-east1-c")
  assert create == ("gcloud compute tpus queued-resources create sc --node-id=sc --zone=us-east1-c "
                    "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot")
  assert "queued-resources describe sc" in wait and "state.state" in wait
  create, _ = dry(capsys, "create", "--preset=v4-32", "--name=sc", "--queued", "--best_effort")
  assert create.endswith("--best-effort") and "--spot" not in create
  spot, = dry(capsys, "create", "--preset=v6e-8", "--name=sc", "--spot")
  assert "tpu-vm create" in spot and spot.endswith("--spot")
  delete, = dry(capsys, "delete", "--preset=v5e-16", "--name=sc", "--queued")
  assert delete.startswith("gcloud compute tpus queued-resources delete sc") and "--force" in delete
  with pytest.raises(SystemExit, match="--best_effort needs --queued"):
    tpu.main(["create", "--preset=v4-32", "--name=sc", "--best_effort", "--dry_run"])


def test_unknown_preset_is_a_clear_error():
  with pytest.raises(SystemExit, match=r"unknown preset 'v9-8'; choose one of .*'v5e-16'.*'llama3_8b'"):
    tpu.main(["create", "--preset=v9-8", "--name=sc", "--dry_run"])


def test_slice_preset_needs_a_config_preset_and_run_a_bucket():
  with pytest.raises(SystemExit, match="pass --config_preset"):
    tpu.main(["run", "--preset=v5p-8", "--name=sc", "--bucket=bkt", "--dry_run"])
  with pytest.raises(SystemExit, match="run needs --bucket"):
    tpu.main(["run", "--preset=llama3_8b", "--name=sc", "--dry_run"])


def test_judge_endpoint_and_overrides_pass_through(capsys):
  run, = dry(capsys, "run", "--preset=llama3_8b", "--name=sc", "--bucket=bkt", "--stage=rl",
             "--judge_url=http://10.0.0.5:8000/v1", "--judge_model=judge", "--config.rl.max_new_tokens=512",
             "--config.init.sft_workdir=gs://other/sft", "--mesh=1,-1,2")
  script = remote_script(run)
  assert ("--config.grader.kind=llm_judge --config.grader.endpoint.base_url=http://10.0.0.5:8000/v1 "
          "--config.grader.endpoint.model=judge") in script
  assert "--config.rl.max_new_tokens=512" in script and "--config.mesh.shape=1,-1,2" in script
  assert script.count("--config.init.sft_workdir=") == 1 and "gs://other/sft" in script
  with pytest.raises(SystemExit, match="unrecognized arguments"):
    tpu.main(["run", "--preset=llama3_8b", "--name=sc", "--bucket=bkt", "--num_steps=3", "--dry_run"])


def test_remote_scripts_are_valid_bash(capsys):
  lines = dry(capsys, "setup", "--preset=v4-32", "--name=sc")
  lines += dry(capsys, "setup", "--preset=v4-32", "--name=sc", "--repo_url=https://example.com/sc.git")
  lines += dry(capsys, "run", "--preset=qwen2_7b", "--name=sc", "--bucket=bkt", "--judge_url=http://h:1/v1?a=b c")
  scripts = [remote_script(line) for line in lines if "--command=" in line]
  assert len(scripts) == 3 and "git clone --depth=1 --branch=main https://example.com/sc.git" in scripts[1]
  for script in scripts:
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_restart_loop_dry_run_prints_one_round(capsys):
  lines = dry(capsys, "run_with_restarts", "--preset=v5e-16", "--name=sc", "--bucket=bkt",
              "--config_preset=llama3_8b", "--queued", "--spot")
  commands = [line for line in lines if not line.startswith("#")]
  kinds = [("ssh" if " ssh " in c else "scp" if " scp " in c else "archive" if c.startswith("git") else
            shlex.split(c)[4]) for c in commands]
  assert kinds == ["ssh", "describe", "delete", "create", "describe", "archive", "scp", "ssh", "ssh"]
  assert "safe_completion.main" in commands[0] and "safe_completion.main" in commands[-1]
  assert "queued-resources create sc" in commands[3] and commands[3].endswith("--spot")
  assert "# restart 1 of 10" in lines


class FakeGcloud:
  """Records commands; runs of the stage fail `failures` times; the slice state is scripted."""

  dry_run = False

  def __init__(self, failures: int, states: list[str]):
    self.failures, self.states, self.log = failures, list(states), []

  def __call__(self, argv, log_path=None):
    kind = "run" if any("safe_completion.main" in a for a in argv) else argv[4] if argv[0] == "gcloud" else argv[0]
    self.log.append(kind)
    if kind == "run" and self.failures:
      self.failures -= 1
      return 255
    return 0

  def output(self, argv):
    self.log.append("describe")
    return self.states.pop(0)


def _args(tmp_path, max_restarts: int):
  args, _ = tpu.parser().parse_known_args(["run", "--preset=v4-32", "--name=sc", "--bucket=bkt",
                                           "--config_preset=tiny", f"--max_restarts={max_restarts}",
                                           f"--log_dir={tmp_path}"])
  return tpu.resolve(args)


def test_restart_recreates_a_gone_slice_then_resumes(tmp_path):
  gcloud = FakeGcloud(failures=1, states=[""])
  assert tpu.run_with_restarts(_args(tmp_path, 3), [], gcloud) == 0
  assert gcloud.log == ["run", "describe", "delete", "create", "git", "scp", "ssh", "run"]


def test_restart_on_a_healthy_slice_reruns_without_recreating(tmp_path):
  gcloud = FakeGcloud(failures=2, states=["READY", "READY"])
  assert tpu.run_with_restarts(_args(tmp_path, 3), [], gcloud) == 0
  assert gcloud.log == ["run", "describe", "run", "describe", "run"]


def test_restarts_give_up_after_max_restarts(tmp_path):
  gcloud = FakeGcloud(failures=5, states=["READY"] * 5)
  assert tpu.run_with_restarts(_args(tmp_path, 2), [], gcloud) == 255
  assert gcloud.log.count("run") == 3
