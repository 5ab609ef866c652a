# Library module of `python -m launch.sweep` (not run directly): python -m launch.sweep --help
"""The sweep's outputs: idempotent job scripts, a SLURM job array, a Kubernetes indexed Job, and
a sequential local runner.

All three targets run the same `jobs/job_NNNN.sh`; the scheduler only maps its task index
(`SLURM_ARRAY_TASK_ID`, `JOB_COMPLETION_INDEX`, the local loop) to a script.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from launch import common

LIBRARY_CLI = "-m expert_t5x.cli library"
CONFIGMAP_LIMIT = 1_000_000   # Kubernetes rejects ConfigMaps over 1 MiB
SLURM_MAX_ARRAY = 1001        # SLURM's default MaxArraySize
# Seconds between the preemption notice and the kill: enough for the trainer to save a checkpoint.
GRACE_SECONDS = 300
GPU_ENV = {
    # JAX would otherwise preallocate 75% of the GPU up front.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # If TensorFlow (the input pipeline) sees a GPU, it takes only what it uses.
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
}


def add_target_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("slurm")
  g.add_argument("--partition")
  g.add_argument("--account")
  g.add_argument("--time", default="24:00:00", help="time limit per job")
  g.add_argument("--gpus_per_job", type=int, default=1)
  g.add_argument("--cpus_per_job", type=int, default=8)
  g.add_argument("--mem", default="64G", help="memory per job")
  g.add_argument("--max_parallel",
                 type=int,
                 help="jobs running at once (array throttle / parallelism)")
  g.add_argument("--workdir",
                 help="directory the jobs start in (default: this checkout; in k8s the "
                 "image's working directory)")
  g.add_argument("--sbatch_flag", action="append", default=[], help="extra '#SBATCH' line content")
  g = parser.add_argument_group("k8s")
  g.add_argument("--image", help="container image with the package installed")
  g.add_argument("--namespace")
  g.add_argument("--accelerator", choices=("gpu", "tpu"), default="gpu")
  g.add_argument("--gpu_type",
                 default="nvidia-l4",
                 help="GKE node label cloud.google.com/gke-accelerator")
  g.add_argument("--tpu_type", default="tpu-v5-lite-podslice",
                 help="GKE node label cloud.google.com/gke-tpu-accelerator")
  g.add_argument("--tpu_topology", default="2x2", help="single-host TPU topology (chips = product)")
  g.add_argument("--pvc", help="PersistentVolumeClaim (ReadWriteMany) holding the library and runs")
  g.add_argument("--mount_path", default="/data", help="where the claim is mounted in the pod")
  g.add_argument("--backoff_limit_per_index", type=int, default=3,
                 help="retries of one index (each resumes from its checkpoint)")


def sweep_name(args: argparse.Namespace) -> str:
  """A DNS-1123 label (Kubernetes and SLURM job names): lowercase, digits, '-'."""
  if args.name:
    name = args.name
  else:
    source = args.grid or args.suite or "tasks"
    name = f"{args.expert_type}-{source}"
  label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:52]
  if args.name and label != args.name:
    raise common.LaunchError(f"--name={args.name!r} must be lowercase letters, digits and '-' "
                             f"(at most 52), e.g. --name={label or 'pe-sweep'}.")
  return label


def script_name(index: int) -> str:
  return f"job_{index:04d}.sh"


# ----------------------------------------------------------------------------
# The job script.
# ----------------------------------------------------------------------------


def job_script(job: Any, total: int, args: argparse.Namespace, gpu_env: bool) -> str:
  """An idempotent bash script for one job: skip if done, train (resuming), add to the library."""
  q = shlex.quote
  ids = " ".join(q(e.id) for e in job.experts)
  exports = " ".join(q(d) for d in job.exports)
  what = ", ".join(e.id for e in job.experts[:3]) + (" ..." if len(job.experts) > 3 else "")
  lines = [
      "#!/usr/bin/env bash",
      f"# bash {script_name(job.index)}   (job {job.index} of {total} in sweep {args.name}: "
      f"{job.expert_type} x{len(job.experts)}: {what})",
      "# Idempotent: experts already in the library are skipped; an interrupted run resumes from",
      "# MODEL_DIR's latest checkpoint; exported experts are added to the library.",
      "set -euo pipefail",
      f'PYTHON="${{PYTHON:-{args.python}}}"',
      f"LIBRARY={q(args.library)}",
      f"MODEL_DIR={q(job.model_dir)}",
      f"EXPERT_IDS=({ids})",
      f"EXPORTS=({exports})",
      f'TAG="[sweep {args.name} job {job.index}]"',
  ]
  lines += list(args.setup)
  if gpu_env:
    lines += [f"export {k}={v}" for k, v in GPU_ENV.items()]
  lines += [
      "",
      f'in_library() {{ "$PYTHON" {LIBRARY_CLI} show "$LIBRARY" "$1" >/dev/null 2>&1; }}',
      "todo=()",
      'for id in "${EXPERT_IDS[@]}"; do in_library "$id" || todo+=("$id"); done',
      'if [ "${#todo[@]}" -eq 0 ]; then',
      '  echo "$TAG all ${#EXPERT_IDS[@]} experts are already in $LIBRARY; nothing to do."',
      "  exit 0",
      "fi",
      'echo "$TAG training ${#todo[@]} of ${#EXPERT_IDS[@]} experts in $MODEL_DIR"',
      "",
      "# The trainer resumes from MODEL_DIR's latest checkpoint by itself. SIGTERM (preemption, "
      "time",
      "# limit, pod deletion) is forwarded so it saves a checkpoint before exiting.",
      _train_command(job.argv, args) + " &",
      "child=$!",
      "trap 'kill -TERM \"$child\" 2>/dev/null || true' TERM INT",
      "status=0",
      'wait "$child" || status=$?',
      # `wait` returns as soon as a trapped signal arrives; wait for the trainer to finish saving.
      'while kill -0 "$child" 2>/dev/null; do wait "$child" || status=$?; done',
      "trap - TERM INT",
      'if [ "$status" -ne 0 ]; then echo "$TAG trainer exited with $status; rerun to resume." >&2; '
      'exit "$status"; fi',
      "",
      '[ -f "$LIBRARY/library.json" ] || "$PYTHON" ' + LIBRARY_CLI + ' init "$LIBRARY" || '
      '[ -f "$LIBRARY/library.json" ]',
      'for i in "${!EXPERT_IDS[@]}"; do',
      '  id="${EXPERT_IDS[$i]}"',
      '  in_library "$id" && continue',
      '  "$PYTHON" ' + LIBRARY_CLI +
      ' add "$LIBRARY" "${EXPORTS[$i]}" --name "$id" || in_library "$id"',
      "done",
      'echo "$TAG done."',
  ]
  return "\n".join(lines) + "\n"


def _train_command(argv: Sequence[str], args: argparse.Namespace) -> str:
  # "$PYTHON" (not the literal interpreter) lets a job's environment choose the Python it runs.
  if not args.train_cmd and argv and argv[0] == args.python:
    return '"$PYTHON" ' + common.shell_lines(argv[1:])
  return common.shell_lines(argv)


# ----------------------------------------------------------------------------
# Schedulers.
# ----------------------------------------------------------------------------


def slurm_script(args: argparse.Namespace, num_jobs: int, out_dir: str, workdir: str) -> str:
  """A SLURM job array over the job scripts; index i runs jobs/job_<i>.sh."""
  if num_jobs > SLURM_MAX_ARRAY:
    raise common.LaunchError(
        f"{num_jobs} jobs exceed SLURM's default MaxArraySize {SLURM_MAX_ARRAY}; "
        f"group experts with --stack=K or split the sweep with --only.")
  array = f"0-{num_jobs - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
  sbatch = [f"--job-name={args.name}", f"--array={array}",
            f"--output={os.path.join(out_dir, 'logs', '%x_%A_%a.out')}", "--open-mode=append",
            f"--time={args.time}", f"--cpus-per-task={args.cpus_per_job}", f"--mem={args.mem}",
            # Preemption or the time limit: the job script forwards TERM; the trainer checkpoints
            # and a requeued (or rerun) task resumes.
            "--requeue", f"--signal=B:TERM@{GRACE_SECONDS}"]
  if args.gpus_per_job:
    sbatch.append(f"--gres=gpu:{args.gpus_per_job}")
  if args.partition:
    sbatch.append(f"--partition={args.partition}")
  if args.account:
    sbatch.append(f"--account={args.account}")
  sbatch += list(args.sbatch_flag)
  lines = ["#!/usr/bin/env bash", f"# sbatch {os.path.join(out_dir, 'sweep.sbatch')}"]
  lines += [f"#SBATCH {flag}" for flag in sbatch]
  lines += [
      "set -euo pipefail",
      f"cd {shlex.quote(workdir)}",
      # exec: the job script becomes the batch shell, so SLURM's TERM reaches its trap.
      f'exec bash {shlex.quote(os.path.join(out_dir, "jobs"))}/job_$(printf %04d '
      f'"$SLURM_ARRAY_TASK_ID").sh',
  ]
  return "\n".join(lines) + "\n"


class _Literal(str):
  """A multi-line string written as a YAML block (`|`), so scripts stay readable in the manifest."""


def _yaml_dump(docs: Sequence[dict[str, Any]]) -> str:
  import yaml  # pylint: disable=g-import-not-at-top

  class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # plain copies, no &anchors, in a file people read
      return True

  Dumper.add_representer(
      _Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", str(s), style="|"))
  return yaml.dump_all(list(docs), Dumper=Dumper, sort_keys=False, default_flow_style=False)


def _under(path: str, root: str) -> bool:
  return os.path.normpath(path) == os.path.normpath(root) or os.path.normpath(path).startswith(
      os.path.normpath(root) + os.sep)


def k8s_manifest(args: argparse.Namespace, scripts: dict[str, str]) -> str:
  """A ConfigMap with the job scripts and an indexed Job whose index i runs job_<i>.sh."""
  if not args.image:
    raise common.LaunchError(
        "k8s needs --image=IMAGE: a container image with this package installed "
        "(e.g. built from the repository with `pip install -e .[cuda]`).")
  if args.pvc:
    outside = [p for p in (args.library, args.model_root) if not _under(p, args.mount_path)]
    if outside:
      raise common.LaunchError(
          f"{outside} are not under --mount_path={args.mount_path}, where --pvc is "
          f"mounted, so pods cannot share them; put them under {args.mount_path}/.")
  size = sum(len(s.encode()) for s in scripts.values())
  if size > CONFIGMAP_LIMIT:
    raise common.LaunchError(
        f"The {len(scripts)} job scripts take {size} bytes, over Kubernetes' 1 MiB "
        f"ConfigMap limit; group experts with --stack=K or split with --only.")
  labels = {"app.kubernetes.io/name": "expert-t5x-sweep", "expert-t5x/sweep": args.name}
  meta = {"name": f"{args.name}-jobs", "labels": labels}
  if args.namespace:
    meta["namespace"] = args.namespace
  configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
               "data": {name: _Literal(text) for name, text in sorted(scripts.items())}}

  env = [{"name": "PYTHON", "value": args.python}]
  if args.accelerator == "gpu":
    env += [{"name": k, "value": v} for k, v in GPU_ENV.items()]
    node_selector = {"cloud.google.com/gke-accelerator": args.gpu_type}
    limits = {"nvidia.com/gpu": args.gpus_per_job or 1}
  else:
    chips = 1
    for dim in args.tpu_topology.split("x"):
      chips *= int(dim)
    node_selector = {"cloud.google.com/gke-tpu-accelerator": args.tpu_type,
                     "cloud.google.com/gke-tpu-topology": args.tpu_topology}
    limits = {"google.com/tpu": chips}
  mounts = [{"name": "jobs", "mountPath": "/sweep", "readOnly": True}]
  volumes = [{"name": "jobs", "configMap": {"name": f"{args.name}-jobs", "defaultMode": 0o555}}]
  if args.pvc:
    mounts.append({"name": "data", "mountPath": args.mount_path})
    volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": args.pvc}})
  container = {
      "name": "train", "image": args.image,
      # exec: the job script is PID 1, so the pod's SIGTERM reaches its trap.
      "command": ["bash", "-c", 'exec bash /sweep/job_$(printf %04d "$JOB_COMPLETION_INDEX").sh'],
      "env": env, "resources": {"limits": limits}, "volumeMounts": mounts,
  }
  if args.workdir:
    container["workingDir"] = args.workdir
  num = len(scripts)
  job_meta = {"name": args.name, "labels": labels}
  if args.namespace:
    job_meta["namespace"] = args.namespace
  job = {
      "apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta,
      "spec": {
          "completionMode": "Indexed", "completions": num,
          "parallelism": min(num, args.max_parallel or num),
          # Retries are per index (each resumes from its checkpoint); one failing expert never
          # stops the others.
          "backoffLimitPerIndex": args.backoff_limit_per_index, "maxFailedIndexes": num,
          "template": {
              "metadata": {"labels": labels},
              "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": GRACE_SECONDS,
                       "nodeSelector": node_selector, "containers": [container],
                       "volumes": volumes},
          },
      },
  }
  return _yaml_dump([configmap, job])


# ----------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------


def _summary(args: argparse.Namespace, jobs: Sequence[Any], num_experts: int, skipped: int) -> str:
  partial = sum(len(j.done) for j in jobs)
  text = (f"sweep {args.name}: {num_experts} {args.expert_type} experts -> {len(jobs)} jobs"
          f" (stack {args.stack}); {skipped} already in the library")
  if partial:
    text += f", {partial} more done inside partly finished groups"
  return text


def run_local(runner: common.Runner, paths: Sequence[str], out=sys.stdout) -> int:
  """Runs the job scripts one after another; a failure does not stop the others."""
  failed = []
  for i, path in enumerate(paths):
    start = time.time()
    runner.echo(f"bash {shlex.quote(path)}")
    if runner.dry_run:
      continue
    code = subprocess.run(["bash", path], check=False).returncode
    status = "ok" if code == 0 else f"FAILED (exit {code})"
    print(
        f"[{i + 1}/{len(paths)}] {os.path.basename(path)}: {status} in {time.time() - start:.1f}s",
        file=out,
        flush=True)
    if code != 0:
      failed.append(os.path.basename(path))
  if failed:
    print(
        f"{len(failed)} of {len(paths)} jobs failed: {', '.join(failed)}; rerun the same command "
        "to "
        f"resume them.",
        file=out)
    return 1
  return 0


# Short names of the per-expert gin bindings in the settings table.
_SHORT = {
    "optimizers.create_learning_rate_scheduler.base_learning_rate": "lr", "BATCH_SIZE": "batch",
    "NUM_MICROBATCHES": "microbatches", "NUM_EPOCHS": "epochs", "MAX_EXAMPLES": "max_examples"
}


def settings_lines(jobs: Sequence[Any]) -> list[str]:
  """One line per expert: its job and the settings it trains with (the recipe's defaults: '-')."""
  lines = []
  for job in jobs:
    for e in job.experts:
      parts = []
      for k, v in e.settings_dict.items():
        if k == "TASK_FEATURE_LENGTHS":
          parts.append(f"lengths={v['inputs']}/{v['targets']}")
        else:
          parts.append(f"{_SHORT.get(k, k)}={v}")
      lines.append(f"settings\tjob {job.index}\t{e.id}\t{' '.join(parts) or '-'}")
  return lines


def dispatch(args: argparse.Namespace, jobs: Sequence[Any], num_experts: int, skipped: int) -> int:
  print(_summary(args, jobs, num_experts, skipped), flush=True)
  if args.dry_run or args.target == "list":
    print("\n".join(settings_lines(jobs)), flush=True)
  if args.target == "list":
    for job in jobs:
      ids = ",".join(e.id for e in job.experts)
      print(f"{job.index}\t{job.name}\t{len(job.experts)}\t{job.model_dir}\t{ids}")
    return 0
  if not jobs:
    print("Nothing to do: every expert is in the library.")
    return 0
  out_dir = args.out_dir or os.path.join(args.model_root, "sweeps", args.name)
  if "://" in out_dir:
    raise common.LaunchError(
        f"Job scripts go to {out_dir!r}, an object-store URL, but schedulers run "
        f"them from a filesystem; pass --out_dir=DIR on a shared filesystem.")
  out_dir = os.path.abspath(out_dir)
  gpu_env = (args.gpu_env or (args.target == "slurm" and args.gpus_per_job > 0)
             or (args.target == "k8s" and args.accelerator == "gpu"))
  scripts = {script_name(j.index): job_script(j, len(jobs), args, gpu_env) for j in jobs}
  runner = common.Runner(args.dry_run)
  if args.target == "k8s":
    manifest = k8s_manifest(args, scripts)
    path = os.path.join(out_dir, "sweep.yaml")
    runner.write_file(path, manifest)
    _write_plan(runner, out_dir, jobs)
    apply = ["kubectl", "apply", "-f", path]
    return _submit(args, runner, apply)
  paths = []
  for name, text in scripts.items():
    paths.append(os.path.join(out_dir, "jobs", name))
    runner.write_file(paths[-1], text, mode=0o755)
  _write_plan(runner, out_dir, jobs)
  if args.target == "slurm":
    path = os.path.join(out_dir, "sweep.sbatch")
    runner.write_file(path, slurm_script(args, len(jobs), out_dir, args.workdir or
                                         common.REPO_ROOT))
    if not args.dry_run:
      os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    return _submit(args, runner, ["sbatch", path])
  return run_local(runner, paths)


def _write_plan(runner: common.Runner, out_dir: str, jobs: Sequence[Any]) -> None:
  import json  # pylint: disable=g-import-not-at-top
  if runner.dry_run:
    return  # the scripts printed above say everything the plan would
  runner.write_file(os.path.join(out_dir, "plan.json"),
                    json.dumps([j.to_json() for j in jobs], indent=1) + "\n")


def _submit(args: argparse.Namespace, runner: common.Runner, argv: Sequence[str]) -> int:
  if args.submit:
    runner.run(argv)
  else:
    print(f"Submit with: {common.shell_join(argv)}")
  return 0
