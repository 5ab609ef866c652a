# python -m launch.tpu_vm up --name=my-tpu --zone=us-central2-b --accelerator_type=v4-32
# --model_dir=/mnt/shared/runs/pe --model_dir_is_shared --gin_file=experts/prompt_expert.gin
# --gin.MIXTURE_OR_TASK_NAME="'cosmos_qa_no_prompt_text'" --dry_run
"""Cloud TPU VM launcher: create a VM or slice, install the package, train on every worker.

Subcommands (each prints every gcloud command before running it; `--dry_run` only prints):

  create   gcloud compute tpus tpu-vm create (optionally a Spot VM)
  setup    ship this checkout (`git archive`) to every worker, install Python 3.11 and
           `expert_t5x[tpu]` in a venv there
  run      `python -m expert_t5x.train --gin_file=...` on every worker at once; on a multi-host
           slice each worker gets T5X's coordinator flags (`--coordinator_address` = worker 0's
           internal IP, `--process_count`, `--process_index`)
  up       create + setup + run
  delete   delete the VM

A multi-host slice needs a MODEL_DIR that every worker sees (mount a Filestore share or a bucket
through gcsfuse on the workers). A rerun of `run` with the same `--model_dir` resumes from its
latest checkpoint (the trainer does that on its own), so preempted Spot slices are resumed by
running the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # pylint: disable=g-import-not-at-top

COORDINATOR_PORT = 8476  # jax.distributed's default port
# Both relative to the worker's home directory (where `gcloud ... ssh --command` starts).
REMOTE_REPO = "expert_t5x"
REMOTE_VENV = "expert_t5x_venv"
ARCHIVE_NAME = "expert_t5x.tar.gz"

# accelerator generation -> (unit counted by the type's number, units per host, default runtime).
# v2-v5p types count TensorCores (2 per chip, 4 chips per host); v5e/v6e types count chips (a host
# of up to 8 chips is one VM; larger slices have 4 chips per VM).
_GENERATIONS = {
    "v2": ("cores", 8, "tpu-ubuntu2204-base"),
    "v3": ("cores", 8, "tpu-ubuntu2204-base"),
    "v4": ("cores", 8, "tpu-ubuntu2204-base"),
    "v5p": ("cores", 8, "v2-alpha-tpuv5"),
    "v5litepod": ("chips", 4, "v2-alpha-tpuv5-lite"),
    "v6e": ("chips", 4, "v2-alpha-tpuv6e"),
}
_TYPE_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
  """'v4-32' -> ('v4', 32); a clear error for anything else."""
  match = _TYPE_RE.match(accelerator_type)
  if not match:
    raise common.LaunchError(
        f"--accelerator_type={accelerator_type!r} is not a known Cloud TPU type; expected "
        f"<generation>-<size> with generation in {sorted(_GENERATIONS)} (e.g. v4-8, v5litepod-16, "
        f"v5p-32, v6e-8), or pass --num_workers and --runtime_version for other types.")
  return match.group(1), int(match.group(2))


def num_workers(accelerator_type: str) -> int:
  """Host VMs in a slice: v4-8 -> 1, v4-32 -> 4, v5litepod-8 -> 1, v5litepod-16 -> 4, v6e-64 ->
  16."""
  generation, size = parse_accelerator_type(accelerator_type)
  unit, per_host, _ = _GENERATIONS[generation]
  if unit == "chips" and size <= 8:
    return 1
  return max(1, size // per_host)


def default_runtime(accelerator_type: str) -> str:
  return _GENERATIONS[parse_accelerator_type(accelerator_type)[0]][2]


# ----------------------------------------------------------------------------
# gcloud commands.
# ----------------------------------------------------------------------------


def _location(args: argparse.Namespace) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def create_command(args: argparse.Namespace) -> list[str]:
  runtime = args.runtime_version or default_runtime(args.accelerator_type)
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_location(args),
         f"--accelerator-type={args.accelerator_type}", f"--version={runtime}"]
  if args.spot:
    cmd.append("--spot")
  return cmd + list(args.create_flag or [])


def ssh_command(args: argparse.Namespace, worker: int | str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
          f"--worker={worker}", f"--command={remote}"]


def install_script(python: str = "python3.11") -> str:
  """What `setup` runs on every worker: Python 3.11, a venv, the package with the `tpu` extra."""
  venv = f"$HOME/{REMOTE_VENV}"
  repo = f"$HOME/{REMOTE_REPO}"
  return " && ".join([
      "set -e",
      # TPU VM images ship an older Python; the package pins CPython 3.11.
      f"(command -v {python} >/dev/null || (sudo apt-get update -q && "
      f"sudo apt-get install -y -q {python} {python}-venv))",
      # Unpacked over the previous copy (never deleted: a run's relative outputs could live there).
      f'mkdir -p "{repo}"',
      f'tar -xzf "$HOME/{ARCHIVE_NAME}" -C "{repo}"',
      f'{python} -m venv "{venv}"',
      f'"{venv}/bin/pip" install -q --upgrade pip',
      f'"{venv}/bin/pip" install -q -e "{repo}[tpu]"',
      f'"{venv}/bin/python" -c "import jax; print(jax.process_index(), jax.device_count(), '
      f'jax.devices()[0].device_kind)"',
  ])


def train_argv(args: argparse.Namespace, gin_overrides: Sequence[str]) -> list[str]:
  """The trainer's command line as run from the checkout on a worker (no coordinator flags)."""
  # Run from inside the checkout, so the venv is one level up.
  argv = [f"../{REMOTE_VENV}/bin/python", "-m", common.TRAIN_MODULE]
  argv += [f"--gin_file={f}" for f in args.gin_file]
  argv.append(common.gin_flag("MODEL_DIR", args.model_dir))
  argv += list(gin_overrides)
  if args.gin_search_paths:
    argv.append(f"--gin_search_paths={args.gin_search_paths}")
  return argv


def worker_script_name(name: str) -> str:
  return f"tpu_run_{name}.sh"


def worker_script(args: argparse.Namespace, argv: Sequence[str], workers: int) -> str:
  """The script every worker runs as `bash tpu_run_<name>.sh PROCESS_INDEX [COORDINATOR_IP]`.

  One script for all workers keeps the trainer command readable (one level of shell quoting);
  on a multi-host slice it adds T5X's coordinator flags from its two arguments.
  """
  lines = [
      "#!/usr/bin/env bash",
      f"# bash ~/{worker_script_name(args.name)} PROCESS_INDEX COORDINATOR_IP   (on every worker "
      "of "
      f"TPU {args.name}; written by `python -m launch.tpu_vm run`)",
      "set -euo pipefail",
      f'cd "$HOME/{REMOTE_REPO}"',
      "export TF_CPP_MIN_LOG_LEVEL=2",
  ]
  tail = []
  if workers > 1:
    lines.append(f"# A {workers}-worker slice: one JAX process per worker, worker 0 coordinates.")
    tail = [f'"--coordinator_address=$2:{COORDINATOR_PORT}"', f"--process_count={workers}",
            '"--process_index=$1"']
  lines.append("exec " + common.shell_lines(argv, raw_tail=tail))
  return "\n".join(lines) + "\n"


def remote_command(args: argparse.Namespace, worker: int, coordinator_ip: str) -> str:
  """What `gcloud ... ssh --worker=N --command=...` runs: the worker script, maybe detached."""
  run = f"bash {worker_script_name(args.name)} {worker} {coordinator_ip}"
  if args.detach:
    return f"nohup {run} > train_{args.name}_worker{worker}.log 2>&1 < /dev/null &"
  return run


def describe_endpoints(args: argparse.Namespace, runner: common.Runner, expected: int) -> list[str]:
  """Internal IPs of the slice's workers in worker order (placeholders in a dry run)."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_location(args),
         "--format=json(networkEndpoints)"]
  dry = json.dumps({"networkEndpoints": [{"ipAddress": f"WORKER{i}_IP"} for i in range(expected)]})
  info = json.loads(runner.run(cmd, capture=True, dry_value=dry) or "{}")
  ips = [e.get("ipAddress") for e in info.get("networkEndpoints", [])]
  if len(ips) != expected or not all(ips):
    raise common.LaunchError(
        f"TPU {args.name!r} reports {len(ips)} workers but "
        f"--accelerator_type={args.accelerator_type} "
        f"implies {expected}; pass --num_workers={len(ips)} if the slice is right.")
  return ips


# ----------------------------------------------------------------------------
# Subcommands.
# ----------------------------------------------------------------------------


def do_create(args: argparse.Namespace, runner: common.Runner) -> None:
  runner.run(create_command(args))


def do_setup(args: argparse.Namespace, runner: common.Runner) -> None:
  archive = os.path.join(args.archive_dir, ARCHIVE_NAME)
  # Committed files only: what is shipped is exactly a revision anyone can check out again.
  runner.run(
      ["git", "-C", args.source, "archive", "--format=tar.gz", f"--output={archive}", args.ref])
  runner.run([
      "gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:~/{ARCHIVE_NAME}",
      *_location(args), "--worker=all"
  ])
  runner.run(ssh_command(args, "all", install_script(args.python)))


def do_run(args: argparse.Namespace, runner: common.Runner, gin_overrides: Sequence[str]) -> None:
  workers = args.num_workers or num_workers(args.accelerator_type)
  if "://" in args.model_dir:
    raise common.LaunchError(
        f"--model_dir={args.model_dir!r} is an object-store URL, but the trainer writes MODEL_DIR "
        f"through the filesystem; mount the bucket (gcsfuse) or a Filestore share on every worker "
        "and "
        f"pass its path, e.g. --model_dir=/mnt/shared/runs/x --model_dir_is_shared.")
  if not os.path.isabs(args.model_dir):
    raise common.LaunchError(
        f"--model_dir={args.model_dir!r} is relative; on the workers it would land "
        f"inside the shipped checkout. Use an absolute path.")
  if workers > 1 and not args.model_dir_is_shared:
    raise common.LaunchError(
        f"--model_dir={args.model_dir!r} must be shared by all {workers} workers, which write one "
        f"checkpoint together; mount a shared filesystem (Filestore, gcsfuse) on every worker and "
        "pass "
        f"--model_dir_is_shared.")
  script = worker_script(args, train_argv(args, gin_overrides), workers)
  local = os.path.join(args.archive_dir, worker_script_name(args.name))
  runner.write_file(local, script)
  runner.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", local,
              f"{args.name}:~/{worker_script_name(args.name)}", *_location(args), "--worker=all"])
  if workers == 1:
    runner.run(ssh_command(args, 0, remote_command(args, 0, "localhost")))
    return
  coordinator = args.coordinator_ip or describe_endpoints(args, runner, workers)[0]
  runner.run_parallel([ssh_command(args, i, remote_command(args, i, coordinator))
                       for i in range(workers)])


def do_delete(args: argparse.Namespace, runner: common.Runner) -> None:
  runner.run(
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_location(args), "--quiet"])


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0],
      epilog="Unknown --gin.NAME=VALUE flags are passed to the trainer unchanged.")
  parser.add_argument("command", choices=("create", "setup", "run", "up", "delete"))
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
  parser.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  parser.add_argument("--accelerator_type",
                      default="v4-8",
                      help="e.g. v4-8, v4-32, v5litepod-16, v6e-8")
  parser.add_argument("--num_workers", type=int, help="override the host count implied by the type")
  parser.add_argument("--runtime_version", help="TPU software version (default per generation)")
  parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) VM")
  parser.add_argument("--create_flag", action="append", help="extra flag for `tpu-vm create`")
  parser.add_argument("--source", default=common.REPO_ROOT, help="checkout to ship (git archive)")
  parser.add_argument("--ref", default="HEAD", help="git revision to ship")
  parser.add_argument("--archive_dir", default="/tmp", help="where the local archive is written")
  parser.add_argument("--python", default="python3.11", help="Python interpreter to install/use")
  parser.add_argument("--gin_file",
                      action="append",
                      default=[],
                      help="trainer gin file (repeatable)")
  parser.add_argument("--gin_search_paths", help="comma-separated gin search paths for the trainer")
  parser.add_argument("--model_dir", help="MODEL_DIR: an absolute path (shared by all workers of a "
                      "multi-host slice: a Filestore or gcsfuse mount)")
  parser.add_argument("--model_dir_is_shared", action="store_true",
                      help="the model_dir is a filesystem shared by all workers")
  parser.add_argument("--coordinator_ip", help="override worker 0's internal IP")
  parser.add_argument(
      "--detach",
      action="store_true",
      help="run in the background on the workers (logs in ~/train_<name>_worker<i>.log)")
  parser.add_argument("--dry_run", action="store_true", help="print every command, run nothing")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  gin_overrides = [a for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  runner = common.Runner(args.dry_run)
  try:
    for override in gin_overrides:
      common.parse_gin_override(override)
    if args.num_workers is None:
      parse_accelerator_type(args.accelerator_type)
    if args.command in ("run", "up"):
      if not args.gin_file or not args.model_dir:
        raise common.LaunchError(
            f"`{args.command}` needs --gin_file=... and --model_dir=...; e.g. "
            f"--gin_file=experts/prompt_expert.gin --model_dir=/mnt/shared/runs/x.")
    if args.command in ("create", "up"):
      do_create(args, runner)
    if args.command in ("setup", "up"):
      do_setup(args, runner)
    if args.command in ("run", "up"):
      do_run(args, runner, gin_overrides)
    if args.command == "delete":
      do_delete(args, runner)
  except common.LaunchError as e:
    print(f"launch.tpu_vm: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
