r"""Create, set up, run on and delete Cloud TPU VMs; every command is a `gcloud` call.

  python launch/tpu.py create --preset=llama3_8b --name=sc-llama --spot --queued
  python launch/tpu.py setup  --preset=llama3_8b --name=sc-llama
  python launch/tpu.py run    --preset=llama3_8b --name=sc-llama --stage=sft --bucket=my-bucket --max_restarts=5
  python launch/tpu.py delete --preset=llama3_8b --name=sc-llama --queued

`--dry_run` prints the commands instead of running them. A preset is a slice
(v4-32, v5e-16, v5p-8, v6e-8) or a real model (llama3_8b, qwen2_7b, gemma_2b),
which picks its slice and mesh; both live in `configs/launch.py`. Arguments
that start with `--config.` go through to `safe_completion.main` unchanged.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import launch as presets  # noqa: E402  (after the repository root is on the path)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Remote paths in $HOME (not ~), so they also expand inside double quotes.
GCS_MOUNT = "/gcs"
REMOTE_DIR = "$HOME/safe_completion"
REMOTE_VENV = "$HOME/sc_venv"
REMOTE_LOGS = "$HOME/sc_logs"
UV = "$HOME/.local/bin/uv"
WORKER_ID_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
HEALTHY = {"READY", "ACTIVE"}


class Gcloud:
  """Runs (or, dry, prints) commands; a run's output streams to stdout and to an optional log file."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, argv: Sequence[str], log_path: str | None = None) -> int:
    print(("" if self.dry_run else "+ ") + shlex.join(argv), flush=True)
    if self.dry_run:
      return 0
    if log_path is None:
      return subprocess.run(argv, check=False).returncode
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
      for line in process.stdout:
        sys.stdout.write(line)
        log.write(line)
    return process.returncode

  def output(self, argv: Sequence[str]) -> str:
    """stdout of a query command ("" on failure); dry runs print it and answer READY."""
    print(("" if self.dry_run else "+ ") + shlex.join(argv), flush=True)
    if self.dry_run:
      return "READY"
    result = subprocess.run(argv, check=False, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def resolve(args: argparse.Namespace) -> argparse.Namespace:
  """Fills slice, mesh and config preset from `--preset`; explicit flags win."""
  if args.preset in presets.MODEL_PRESETS:
    model = presets.get_model_preset(args.preset)
    tpu, mesh, config_preset = presets.get_slice(model.slice), model.mesh, model.config_preset
  elif args.preset in presets.SLICES:
    tpu, mesh, config_preset = presets.get_slice(args.preset), presets.get_slice(args.preset).mesh, None
  else:
    choices = sorted(presets.SLICES) + sorted(presets.MODEL_PRESETS)
    raise SystemExit(f"error: unknown preset {args.preset!r}; choose one of {choices}")
  args.slice = tpu
  args.zone = args.zone or tpu.zone
  args.version = args.version or tpu.runtime_version
  args.mesh = getattr(args, "mesh", None) or ",".join(str(s) for s in mesh)
  args.config_preset = getattr(args, "config_preset", None) or config_preset
  return args


def _location(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, script: str) -> list[str]:
  """A bash script on every worker of the slice (bash whatever the login shell is)."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args), "--worker=all",
          f"--command=bash -c {shlex.quote(script)}"]


def create_commands(args) -> list[list[str]]:
  if args.best_effort and not args.queued:
    raise SystemExit("error: --best_effort needs --queued (a queued resource)")
  if args.queued:
    tier = ["--spot"] if args.spot else ["--best-effort"] if args.best_effort else []
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
             *_location(args), f"--accelerator-type={args.slice.accelerator_type}",
             f"--runtime-version={args.version}", *tier]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
           f"--accelerator-type={args.slice.accelerator_type}", f"--version={args.version}",
           *(["--spot"] if args.spot else [])]]


def describe_command(args) -> list[str]:
  """The state of the slice: READY (TPU VM) or ACTIVE (queued resource) when usable."""
  if args.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_location(args),
            "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_location(args), "--format=value(state)"]


def delete_commands(args) -> list[list[str]]:
  if args.queued:  # --force deletes the TPU VM the queued resource made, too.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_location(args), "--force",
             "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args), "--quiet"]]


def setup_commands(args) -> list[list[str]]:
  """Code onto every worker (git archive of HEAD + scp, or a git clone), then an editable install."""
  commands = []
  if args.repo_url:
    fetch = (f"rm -rf {REMOTE_DIR} && git clone --depth=1 --branch={shlex.quote(args.branch)} "
             f"{shlex.quote(args.repo_url)} {REMOTE_DIR}")
  else:
    tarball = f"/tmp/safe_completion-{args.name}.tar.gz"
    commands.append(["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"])
    commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:safe_completion.tar.gz",
                     *_location(args), "--worker=all"])
    fetch = f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf $HOME/safe_completion.tar.gz -C {REMOTE_DIR}"
  # uv brings its own Python, so the image's Python version and python3-venv do not matter.
  install = (f"(test -x {UV} || curl -LsSf https://astral.sh/uv/install.sh | sh) && "
             f"{UV} venv --allow-existing --python={shlex.quote(args.python)} {REMOTE_VENV} && cd {REMOTE_DIR} && "
             f"{UV} pip install --python={REMOTE_VENV}/bin/python -e '.[tpu]'")
  commands.append(ssh(args, f"set -euo pipefail; {fetch} && {install}"))
  return commands


def run_path(args) -> str:
  """BUCKET/RUN/STAGE: where a stage's outputs live in the bucket."""
  if not args.bucket:
    raise SystemExit("error: run needs --bucket for the checkpoints and logs")
  return f"{args.bucket}/{args.run_name or args.name}/{args.stage}"


def workdir(args) -> str:
  """The stage's workdir on every worker: the bucket mounted with gcsfuse at GCS_MOUNT.

  Stages write checkpoints, metrics, tokenizers and reports with ordinary file I/O,
  so the bucket is used through a mount rather than gs:// URLs.
  """
  if args.workdir:
    return args.workdir
  return f"{GCS_MOUNT}/{run_path(args)}"


def main_command(args, passthrough: Sequence[str]) -> list[str]:
  """`python -m safe_completion.main` with the stage config, the (mounted) workdir and the overrides."""
  if not args.config_preset:
    raise SystemExit(f"error: preset {args.preset!r} is a slice; pass --config_preset (e.g. llama3_8b or tiny)")
  stage_dir = workdir(args)
  run_root = stage_dir.rsplit("/", 1)[0]
  # One compilation cache per run, shared by its stages and workers: a restart skips recompiling.
  command = ["python", "-m", "safe_completion.main", f"--config=configs/{args.stage}.py:{args.config_preset}",
             f"--workdir={stage_dir}", f"--config.mesh.shape={args.mesh}", f"--jax_cache_dir={run_root}/jax_cache"]
  if args.stage == "rl" and not any(arg.startswith("--config.init.sft_workdir=") for arg in passthrough):
    command.append(f"--config.init.sft_workdir={run_root}/sft")
  if args.judge_url:
    command += ["--config.grader.kind=llm_judge", f"--config.grader.endpoint.base_url={args.judge_url}"]
    if args.judge_model:
      command.append(f"--config.grader.endpoint.model={args.judge_model}")
  return command + list(passthrough)


def mount_command(bucket: str) -> str:
  """Mounts the bucket at GCS_MOUNT/BUCKET with gcsfuse, once per boot (installing gcsfuse if absent)."""
  mount = f"{GCS_MOUNT}/{bucket}"
  install = ("(command -v gcsfuse >/dev/null || (curl -sf https://packages.cloud.google.com/apt/doc/apt-key.gpg "
             "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo \"deb [signed-by=/usr/share/keyrings/"
             "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main\" "
             "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -qq "
             "&& sudo apt-get install -y -qq gcsfuse))")
  return (f"mountpoint -q {mount} || ({install} && sudo mkdir -p {mount} && sudo chown \"$USER\" {mount} "
          f"&& gcsfuse --implicit-dirs {shlex.quote(bucket)} {mount})")


def run_commands(args, passthrough: Sequence[str]) -> list[list[str]]:
  """The stage on all workers; each worker tees its log and copies it next to the checkpoints.

  A leftover process of an earlier attempt (its pid file) is stopped first, so it frees the TPU.
  SAFE_COMPLETION_DISTRIBUTED=1 makes main call `jax.distributed.initialize()`, which finds the
  other workers of the slice through the TPU metadata.
  """
  main = f"{REMOTE_VENV}/bin/" + shlex.join(main_command(args, passthrough))
  log = f"{REMOTE_LOGS}/{args.stage}-worker$W.log"
  pid_file = f"{REMOTE_LOGS}/{args.stage}.pid"
  script = "; ".join([
      "set -uo pipefail",
      f"mkdir -p {REMOTE_LOGS}",
      f"if [ -f {pid_file} ]; then kill \"$(cat {pid_file})\" 2>/dev/null && sleep 10; rm -f {pid_file}; fi",
      f"W=$(curl -sf -H Metadata-Flavor:Google {WORKER_ID_URL} || hostname)",
      mount_command(args.bucket),
      f"cd {REMOTE_DIR}",
      f"SAFE_COMPLETION_DISTRIBUTED=1 PYTHONUNBUFFERED=1 {main} > >(tee -a \"{log}\") 2>&1 & pid=$!",
      f"echo $pid > {pid_file}",
      "status=0",
      "wait $pid || status=$?",
      f"rm -f {pid_file}",
      f"gcloud storage cp \"{log}\" {shlex.quote(f'gs://{run_path(args)}/logs/')} || true",
      "exit $status"])
  return [ssh(args, script)]


def local_log(args) -> str:
  return os.path.join(args.log_dir, f"{args.name}-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def run_stage(args, passthrough: Sequence[str], gcloud: Gcloud) -> int:
  log_path = None if gcloud.dry_run else local_log(args)
  for command in run_commands(args, passthrough):
    status = gcloud(command, log_path=log_path)
    if status:
      return status
  return 0


def recover(args, gcloud: Gcloud) -> None:
  """Recreates and sets up the slice unless it is still usable (a dry run shows the recreate branch)."""
  state = gcloud.output(describe_command(args))
  if gcloud.dry_run:
    print(f"# if the state is not one of {sorted(HEALTHY)}: recreate the slice, then rerun", flush=True)
  elif state in HEALTHY:
    print(f"# slice {state}: rerunning on it", flush=True)
    return
  else:
    print(f"# slice {state or 'GONE'}: recreating it", flush=True)
  for command in delete_commands(args):
    gcloud(command)  # Fails harmlessly when the slice is already gone.
  create_and_wait(args, gcloud)
  for command in setup_commands(args):
    if gcloud(command):
      raise SystemExit("error: setup failed on the recreated slice")


def run_with_restarts(args, passthrough: Sequence[str], gcloud: Gcloud) -> int:
  """Runs the stage; after a failure (preemption, a lost VM) recovers the slice and reruns.

  Every stage resumes from the last checkpoint in its workdir, so a rerun continues the run.
  A dry run prints one round of the loop.
  """
  status = run_stage(args, passthrough, gcloud)
  for restart in range(args.max_restarts):
    if status == 0 and not gcloud.dry_run:
      return 0
    print(f"# restart {restart + 1} of {args.max_restarts}", flush=True)
    recover(args, gcloud)
    status = run_stage(args, passthrough, gcloud)
    if gcloud.dry_run:
      break
  return status


def create_and_wait(args, gcloud: Gcloud) -> None:
  """Creates the slice and, for a queued resource, waits until it is ACTIVE."""
  for command in create_commands(args):
    if gcloud(command):
      raise SystemExit("error: create failed")
  if not args.queued:
    return
  for _ in range(1 if gcloud.dry_run else args.wait_minutes * 2):
    if gcloud.output(describe_command(args)) == "ACTIVE" or gcloud.dry_run:
      return
    time.sleep(30)
  raise SystemExit(f"error: queued resource {args.name} not ACTIVE after {args.wait_minutes} minutes")


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--preset", required=True, help="a slice (v4-32, v5e-16, v5p-8, v6e-8) or a model preset")
  common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  common.add_argument("--zone", default=None, help="default: the preset's")
  common.add_argument("--project", default=None, help="default: gcloud's configured project")
  common.add_argument("--version", default=None, help="TPU runtime version; default: the preset's")
  common.add_argument("--queued", action="store_true", help="a queued resource instead of a plain TPU VM")
  common.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
  created = argparse.ArgumentParser(add_help=False)
  created.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  created.add_argument("--best_effort", action="store_true", help="best-effort queued resource (with --queued)")
  created.add_argument("--wait_minutes", type=int, default=120, help="how long to wait for a queued resource")
  installed = argparse.ArgumentParser(add_help=False)
  installed.add_argument("--repo_url", default="", help="git clone this instead of copying the local HEAD")
  installed.add_argument("--branch", default="main")
  installed.add_argument("--python", default="3.12", help="Python version of the workers' venv (installed by uv)")
  ran = argparse.ArgumentParser(add_help=False)
  ran.add_argument("--stage", default="sft", help="configs/<stage>.py: sft, rl, eval, ...")
  ran.add_argument("--config_preset", default=None, help="configs/<stage>.py preset; default: the model preset")
  ran.add_argument("--mesh", default=None, help="data,fsdp,tensor; default: the preset's")
  ran.add_argument("--bucket", default=None, help="GCS bucket, mounted with gcsfuse; workdir /gcs/BUCKET/RUN_NAME/STAGE")
  ran.add_argument("--run_name", default=None, help="default: --name")
  ran.add_argument("--workdir", default=None, help="overrides the /gcs/BUCKET/... workdir (a path every worker sees)")
  ran.add_argument("--judge_url", default=None, help="OpenAI-compatible judge endpoint: grader.kind=llm_judge")
  ran.add_argument("--judge_model", default=None, help="model name at the judge endpoint")
  ran.add_argument("--log_dir", default="launch_logs", help="local copy of the streamed logs")
  ran.add_argument("--max_restarts", type=int, default=0, help="recreate and rerun after preemption")
  top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = top.add_subparsers(dest="command", required=True)
  commands.add_parser("create", parents=[common, created])
  commands.add_parser("setup", parents=[common, installed])
  commands.add_parser("run", parents=[common, created, installed, ran])
  commands.add_parser("run_with_restarts", parents=[common, created, installed, ran])
  commands.add_parser("delete", parents=[common])
  return top


def main(argv: Sequence[str]) -> int:
  args, rest = parser().parse_known_args(argv)
  unknown = [arg for arg in rest if not arg.startswith("--config.")]
  if unknown or (rest and args.command not in ("run", "run_with_restarts")):
    raise SystemExit(f"error: unrecognized arguments {rest}; only run passes --config.* through")
  args = resolve(args)
  gcloud = Gcloud(args.dry_run)
  if args.command == "create":
    create_and_wait(args, gcloud)
    return 0
  if args.command in ("setup", "delete"):
    for command in (setup_commands if args.command == "setup" else delete_commands)(args):
      status = gcloud(command)
      if status:
        return status
    return 0
  if args.command == "run_with_restarts" and not args.max_restarts:
    args.max_restarts = 10
  if args.max_restarts:
    return run_with_restarts(args, rest, gcloud)
  return run_stage(args, rest, gcloud)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
