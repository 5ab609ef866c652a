"""Launchers: TPU VM, local GPU and sweep dry runs, generated scripts/YAML, and the local runner.

No cloud call is ever made: gcloud, kubectl and sbatch are only printed or written to files. The
local runner is exercised end to end with a fake trainer (a small Python script written by the
test) that checkpoints, resumes, crashes on request, and exports real Expert-format directories, so
the library side (skip, add) is the real `expert-t5x library` code.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import common  # pylint: disable=g-import-not-at-top
from launch import sweep  # pylint: disable=g-import-not-at-top
from launch import tpu_vm  # pylint: disable=g-import-not-at-top

GRID = os.path.join(REPO, "seqio_tasks", "data", "t0_train_296.json")


def _run(argv, env=None, **kw):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(argv, cwd=REPO, text=True, capture_output=True, env=full_env, timeout=120,
                        **kw)


def _bash_syntax_ok(text, tmp_path, name="script.sh"):
  path = tmp_path / name
  path.write_text(text)
  result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _heredocs(output):
  """Files a dry run would write: {path: text} from its `cat > PATH <<'EOF'` blocks."""
  return dict(re.findall(r"\+ cat > (\S+) <<'EOF'\n(.*?)EOF\n", output, flags=re.S))


# ----------------------------------------------------------------------------
# Common.
# ----------------------------------------------------------------------------


def test_launchers_import_neither_tensorflow_nor_jax():
  code = (
      "import sys; sys.path.insert(0, '.'); import launch.tpu_vm, launch.sweep, "
      "launch.sweep_targets;"
      "launch.common.task_names();"
      "print(sorted(m for m in ('tensorflow', 'jax', 'seqio', 'seqio_tasks') if m in sys.modules))")
  result = _run([sys.executable, "-c", code])
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["launch.tpu_vm", "launch.sweep"])
def test_help_exits_zero(module):
  result = _run([sys.executable, "-m", module, "--help"])
  assert result.returncode == 0, result.stderr
  assert "usage: python -m " + module in result.stdout


def test_every_launcher_file_starts_with_its_command():
  expected = {"tpu_vm.py": "# python -m launch.tpu_vm ", "sweep.py": "# python -m launch.sweep ",
              "local_gpu.sh": "# bash launch/local_gpu.sh "}
  for name, prefix in expected.items():
    with open(os.path.join(REPO, "launch", name), encoding="utf-8") as f:
      lines = f.read().splitlines()
    first = lines[1] if lines[0].startswith("#!") else lines[0]
    assert first.startswith(prefix), (name, first)


def test_gin_flags_parse_back_with_gin():
  """Compared with gin's own parser: each generated `--gin.NAME=VALUE` binds the intended value."""
  gin = pytest.importorskip("gin")
  from expert_t5x import gin_utils
  values = {"MODEL_DIR": "gs://b/runs/x y", "TASK_FEATURE_LENGTHS": {"inputs": 512, "targets": 128},
            "LEARNING_RATE": 3e-4, "NUM_EPOCHS": 10, "TASKS": ["a_b", "c.d"], "FLAG": True,
            "NONE": None}
  flags = [common.gin_flag(k, v) for k, v in values.items()]
  bindings = [a[len("--gin_bindings="):] for a in gin_utils.rewrite_gin_args(flags)]
  gin.clear_config()
  try:
    gin.parse_config(bindings)
    for name, value in values.items():
      assert gin.query_parameter(f"{name}/macro.value") == value
  finally:
    gin.clear_config()


def test_bad_gin_override_is_one_clear_error():
  with pytest.raises(common.LaunchError, match="not NAME=VALUE"):
    common.parse_gin_override("--gin.MODEL_DIR")


# ----------------------------------------------------------------------------
# Cloud TPU VM.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("accelerator,hosts", [
    ("v2-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-32", 4), ("v4-128", 16), ("v5p-16", 2),
    ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-64", 16)])
def test_tpu_worker_counts(accelerator, hosts):
  """Compared with Cloud TPU's documented VM counts per slice (v2-v5p: 4 chips = 8 TensorCores per
  VM; v5e/v6e: one VM up to 8 chips, else 4 chips per VM)."""
  assert tpu_vm.num_workers(accelerator) == hosts


def _tpu_dry_run(*extra):
  out = io.StringIO()
  sys_stdout, sys.stdout = sys.stdout, out
  try:
    code = tpu_vm.main(["--name=t1", "--zone=us-central2-b", "--project=p", "--dry_run", *extra])
  finally:
    sys.stdout = sys_stdout
  return code, out.getvalue()


def test_tpu_up_multi_host_dry_run(tmp_path):
  code, out = _tpu_dry_run("up", "--accelerator_type=v4-32", "--spot",
                           "--model_dir=/mnt/shared/runs/pe", "--model_dir_is_shared",
                           "--gin_file=experts/prompt_expert.gin", f"--archive_dir={tmp_path}",
                           "--gin.MIXTURE_OR_TASK_NAME=\"cosmos_qa_no_prompt_text\"")
  assert code == 0
  commands = [l[2:] for l in out.splitlines() if l.startswith("+ ")]
  assert commands[0] == ("gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --project=p "
                         "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
  assert commands[1].startswith(f"git -C {REPO} archive --format=tar.gz")
  assert any("tpu-vm ssh t1" in c and "--worker=all" in c and "[tpu]" in c for c in commands)
  workers = [c for c in commands if "tpu-vm ssh" in c and "tpu_run_t1.sh" in c]
  assert [re.search(r"--worker=(\d+)", c).group(1) for c in workers] == ["0", "1", "2", "3"]
  assert all(c.endswith(" &") for c in workers)  # all workers start together
  assert "bash tpu_run_t1.sh 3 WORKER0_IP" in workers[3]
  assert not os.listdir(tmp_path)  # a dry run writes nothing
  scripts = _heredocs(out)
  assert list(scripts) == [str(tmp_path / "tpu_run_t1.sh")]


def test_tpu_worker_script_passes_coordinator_flags(tmp_path):
  """Runs the generated worker script with a fake venv python that prints its argv."""
  _, out = _tpu_dry_run("run", "--accelerator_type=v5litepod-16", "--model_dir=/mnt/shared/m 1",
                        "--model_dir_is_shared",
                        "--gin_file=experts/prompt_expert.gin", "--gin_file=runs/extra.gin",
                        "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 128}")
  script = next(iter(_heredocs(out).values()))
  _bash_syntax_ok(script, tmp_path)
  home = tmp_path / "home"
  (home / "expert_t5x").mkdir(parents=True)
  venv_bin = home / "expert_t5x_venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(
      f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([os.getcwd()] + sys.argv[1:]))\n"
  )
  (venv_bin / "python").chmod(0o755)
  (home / "run.sh").write_text(script)
  result = subprocess.run(["bash", str(home / "run.sh"), "2", "10.1.2.3"], capture_output=True,
                          text=True, env=dict(os.environ, HOME=str(home)))
  assert result.returncode == 0, result.stderr
  cwd, *argv = json.loads(result.stdout)
  assert cwd == str(home / "expert_t5x")
  assert argv == ["-m", "expert_t5x.train", "--gin_file=experts/prompt_expert.gin",
                  "--gin_file=runs/extra.gin", '--gin.MODEL_DIR="/mnt/shared/m 1"',
                  "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 128}",
                  "--coordinator_address=10.1.2.3:8476", "--process_count=4", "--process_index=2"]


def test_tpu_single_host_has_no_coordinator():
  code, out = _tpu_dry_run("run", "--accelerator_type=v4-8", "--model_dir=/tmp/m",
                           "--gin_file=experts/prompt_expert.gin", "--detach")
  assert code == 0
  assert "describe" not in out and "coordinator_address" not in out
  ssh = [l for l in out.splitlines() if "tpu-vm ssh" in l]
  assert len(ssh) == 1 and "--worker=0" in ssh[0] and "nohup bash tpu_run_t1.sh 0" in ssh[0]


@pytest.mark.parametrize("extra,message", [
    (["run", "--accelerator_type=v4-32", "--model_dir=/tmp/m", "--gin_file=a.gin"
     ], "must be shared"),
    (["run", "--accelerator_type=v4-8", "--model_dir=gs://b/m", "--gin_file=a.gin"
     ], "object-store"),
    (["run", "--accelerator_type=v9-8", "--model_dir=/tmp/m", "--gin_file=a.gin"], "not a known"),
    (["run", "--accelerator_type=v4-8", "--model_dir=/tmp/m"], "needs --gin_file"),
    (["run", "--accelerator_type=v4-8", "--model_dir=runs/m", "--gin_file=a.gin"], "is relative"),
])
def test_tpu_bad_input(extra, message, capsys):
  code, _ = _tpu_dry_run(*extra)
  assert code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_tpu_delete_dry_run():
  code, out = _tpu_dry_run("delete")
  assert code == 0
  assert out.strip(
  ) == "+ gcloud compute tpus tpu-vm delete t1 --zone=us-central2-b --project=p --quiet"


# ----------------------------------------------------------------------------
# Local GPU.
# ----------------------------------------------------------------------------

LOCAL_GPU = os.path.join(REPO, "launch", "local_gpu.sh")


def test_local_gpu_syntax_and_dry_run():
  assert subprocess.run(["bash", "-n", LOCAL_GPU]).returncode == 0
  result = _run(
      ["bash", LOCAL_GPU, "--dry_run", "--gpus=0,1", "--gin_file=experts/prompt_expert.gin"],
      env={"XLA_PYTHON_CLIENT_PREALLOCATE": ""})
  assert result.returncode == 0, result.stderr
  assert "export CUDA_VISIBLE_DEVICES=0,1" in result.stdout
  assert "export XLA_PYTHON_CLIENT_PREALLOCATE=" in result.stdout
  assert "-m expert_t5x.train --gin_file=experts/prompt_expert.gin" in result.stdout
  result = _run(["bash", LOCAL_GPU, "--dry_run", "--mem_fraction=.8", "--gin_file=a.gin"])
  assert "export XLA_PYTHON_CLIENT_PREALLOCATE=true" in result.stdout
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=.8" in result.stdout


def test_local_gpu_hides_gpus_from_tensorflow_then_runs_trainer_as_main(tmp_path, monkeypatch):
  """A fake `tensorflow` records the call; a fake trainer module reports how it was run."""
  (tmp_path / "tensorflow").mkdir()
  (tmp_path / "tensorflow" / "__init__.py").write_text(
      "import os\n"
      "class config:\n"
      "  @staticmethod\n"
      "  def set_visible_devices(devices, kind):\n"
      "    open(os.environ['FAKE_TF_LOG'], 'a').write(f'{devices} {kind}\\n')\n")
  (tmp_path / "fake_trainer.py").write_text(
      "import json, os, sys\n"
      "print(json.dumps({'name': __name__, 'argv': sys.argv[1:], 'tf_loaded': 'tensorflow' in "
      "sys.modules,"
      " 'prealloc': os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'],"
      " 'tf_log': open(os.environ['FAKE_TF_LOG']).read()}))\n")
  env = {"PYTHONPATH": str(tmp_path), "FAKE_TF_LOG": str(tmp_path / "tf.log"),
         "EXPERT_T5X_TRAIN_MODULE": "fake_trainer", "PYTHON": sys.executable}
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  result = _run(["bash", LOCAL_GPU, "--gin_file=a.gin", "--gin.MODEL_DIR=\"/tmp/a b\""], env=env)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["name"] == "__main__"  # gin's `import __main__ as train_script` needs this
  assert report["argv"] == ["--gin_file=a.gin", "--gin.MODEL_DIR=\"/tmp/a b\""]
  assert report["tf_log"] == "[] GPU\n"  # hidden before the trainer started
  assert report["prealloc"] == "false"


@pytest.mark.parametrize("args", [["--mem_fraction=2", "--gin_file=a.gin"], []])
def test_local_gpu_bad_input(args):
  result = _run(["bash", LOCAL_GPU, *args])
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# Sweeps: experts and jobs.
# ----------------------------------------------------------------------------


def _tzero_name(dataset, subset, template):
  # bigscience t-zero's task naming, written out here independently of seqio_tasks.names.
  return re.sub(r"[^\w\d\._]+", "_", f"{dataset}_{subset}_{template}" if subset else
                f"{dataset}_{template}")


def test_paper_grid_prompt_experts():
  """Compared with the grid file read directly and t-zero's naming rule."""
  with open(GRID, encoding="utf-8") as f:
    grid = json.load(f)
  expected = [_tzero_name(e["dataset"], e["subset"], p) for e in grid for p in e["prompts"]]
  experts = sweep.paper_grid("prompt")
  assert len(expected) == 296 and [e.task for e in experts] == expected
  assert [e.id for e in experts] == expected
  assert len({e.id for e in experts}) == 296
  lora = sweep.paper_grid("lora")
  assert [e.id for e in lora] == [t + "@lora" for t in expected]


def test_paper_grid_dataset_experts():
  with open(GRID, encoding="utf-8") as f:
    grid = json.load(f)
  experts = sweep.paper_grid("dataset")
  prefixes = [re.sub(r"[^\w\d\._]+", "_", f"{e['dataset']}_{e['subset']}" if e["subset"] else
                     e["dataset"]) for e in grid]
  assert len(experts) == 36
  assert [e.task for e in experts] == [p + "_random_prompt" for p in prefixes]
  assert [e.task for e in sweep.paper_grid("dataset_adapter")
         ] == [p + "_all_prompts" for p in prefixes]


def _args(tmp_path, target="list", *extra):
  argv = [target, f"--library={tmp_path / 'lib'}", f"--model_root={tmp_path / 'runs'}", *extra]
  gin = [a for a in argv if a.startswith("--gin.")]
  return sweep._parser().parse_args([a for a in argv if not a.startswith("--gin.")]), gin


def test_stacked_groups_share_settings_and_cover_every_expert(tmp_path):
  args, gin = _args(tmp_path, "list", "--grid=paper", "--stack=8")
  experts = sweep.select_experts(args)
  jobs, skipped = sweep.build_jobs(experts, args, gin)
  assert skipped == 0
  seen = [e.id for j in jobs for e in j.experts]
  assert sorted(seen) == sorted(e.id for e in experts) and len(seen) == len(set(seen))
  for job in jobs:
    assert 1 <= len(job.experts) <= 8
    assert len({e.settings for e in job.experts}) == 1
    assert len(job.exports) == len(job.experts)
  # A bucket of experts with equal settings fills groups of 8 before opening another.
  buckets = {}
  for e in experts:
    buckets[e.settings] = buckets.get(e.settings, 0) + 1
  assert len(jobs) == sum(-(-n // 8) for n in buckets.values())
  names = [j.name for j in jobs]
  assert len(set(names)) == len(names)
  # Stable: the same selection gives the same job names (so the same MODEL_DIRs) again.
  assert [j.name for j in sweep.build_jobs(experts, args, gin)[0]] == names


def test_stacked_job_command(tmp_path):
  args, gin = _args(tmp_path, "list", "--tasks=a_x,b_y,c_z", "--stack=2",
                    "--gin_file=models/t5_1_1_lm_adapt_xl.gin", "--gin.BATCH_SIZE=4")
  jobs, _ = sweep.build_jobs(sweep.select_experts(args), args, gin)
  assert [len(j.experts) for j in jobs] == [2, 1]
  argv = jobs[0].argv
  assert argv[:3] == ["python", "-m", "expert_t5x.train"]
  assert argv[3:5] == ["--gin_file=experts/prompt_expert.gin",
                       "--gin_file=models/t5_1_1_lm_adapt_xl.gin"]
  assert f'--gin.{sweep.STACKED_TASKS_MACRO}=["a_x", "b_y"]' in argv
  assert argv[-1] == "--gin.BATCH_SIZE=4"  # user overrides come last, so they win
  assert f'--gin.MODEL_DIR="{jobs[0].model_dir}"' in argv
  single = jobs[1].argv
  assert '--gin.MIXTURE_OR_TASK_NAME="c_z"' in single
  assert jobs[1].model_dir == str(tmp_path / "runs" / "prompt" / "c_z")


@pytest.mark.parametrize("extra,message", [
    (["--grid=paper", "--expert_type=dataset", "--stack=4"], "never stacked"),
    (["--tasks=a,b", "--expert_type=dataset"], "one expert per dataset"),
    (["--grid=paper", "--tasks=a"], "exactly one of"),
    (["--grid=other"], "only grid"),
    (["--tasks=a b"], "not SeqIO task names"),
    (["--grid=paper", "--only=nomatch"], "No experts selected"),
])
def test_sweep_bad_input(tmp_path, extra, message):
  args, gin = _args(tmp_path, "list", *extra)
  with pytest.raises(common.LaunchError, match=message):
    sweep.build_jobs(sweep.select_experts(args), args, gin)


def test_sweep_refuses_object_store_paths(tmp_path, capsys):
  code = sweep.main(["list", "--grid=paper", "--library=gs://b/lib", f"--model_root={tmp_path}"])
  assert code == 2 and "POSIX" in capsys.readouterr().err
  code = sweep.main(["list", "--grid=paper", f"--library={tmp_path}", "--model_root=gs://b/runs"])
  assert code == 2 and "through the filesystem" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Sweeps: SLURM and Kubernetes.
# ----------------------------------------------------------------------------


def _sweep_main(argv, capsys):
  code = sweep.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_slurm_array_written_and_valid(tmp_path, capsys):
  out_dir = tmp_path / "sweep"
  code, out, err = _sweep_main(
      ["slurm", "--grid=paper", "--only=^(cosmos_qa|trec)", f"--library={tmp_path / 'lib'}",
       f"--model_root={tmp_path / 'runs'}", f"--out_dir={out_dir}", "--max_parallel=5",
       "--partition=gpu", "--gpus_per_job=2", "--setup=source /shared/venv/bin/activate",
       "--gin.INITIAL_CHECKPOINT_PATH=\"/ckpt\""], capsys)
  assert code == 0, err
  jobs = sorted(os.listdir(out_dir / "jobs"))
  assert len(jobs) == 13 + 18  # cosmos_qa and trec prompts in the grid
  sbatch = (out_dir / "sweep.sbatch").read_text()
  assert sbatch.splitlines()[1] == f"# sbatch {out_dir / 'sweep.sbatch'}"
  assert f"#SBATCH --array=0-{len(jobs) - 1}%5" in sbatch
  for line in ("#SBATCH --gres=gpu:2", "#SBATCH --partition=gpu", "#SBATCH --requeue",
               "#SBATCH --signal=B:TERM@300", "#SBATCH --job-name=prompt-paper"):
    assert line in sbatch
  assert 'job_$(printf %04d "$SLURM_ARRAY_TASK_ID").sh' in sbatch
  _bash_syntax_ok(sbatch, tmp_path, "sweep.sbatch")
  for name in jobs:
    assert subprocess.run(["bash", "-n", str(out_dir / "jobs" / name)]).returncode == 0
  job0 = (out_dir / "jobs" / jobs[0]).read_text()
  assert job0.splitlines()[1].startswith("# bash job_0000.sh")
  assert "source /shared/venv/bin/activate" in job0
  assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in job0
  assert "'--gin.INITIAL_CHECKPOINT_PATH=\"/ckpt\"'" in job0
  plan = json.loads((out_dir / "plan.json").read_text())
  assert [p["index"] for p in plan] == list(range(len(jobs)))
  assert f"Submit with: sbatch {out_dir / 'sweep.sbatch'}" in out


def test_slurm_dry_run_writes_nothing(tmp_path, capsys):
  code, out, _ = _sweep_main(["slurm", "--tasks=a,b,c", f"--library={tmp_path / 'lib'}",
                              f"--model_root={tmp_path / 'runs'}", "--dry_run"], capsys)
  assert code == 0
  assert not (tmp_path / "runs").exists()
  files = _heredocs(out)
  assert sorted(os.path.basename(p) for p in files) == [
      "job_0000.sh", "job_0001.sh", "job_0002.sh", "sweep.sbatch"]
  assert "#SBATCH --array=0-2\n" in files[str(tmp_path / "runs" / "sweeps" / "prompt-tasks" /
                                              "sweep.sbatch")]


def test_k8s_indexed_job_manifest(tmp_path, capsys):
  out_dir = tmp_path / "k8s"
  code, _, err = _sweep_main(
      ["k8s", "--grid=paper", "--expert_type=dataset_adapter", "--stack=4", "--library=/data/lib",
       "--model_root=/data/runs", f"--out_dir={out_dir}", "--image=us-docker.pkg.dev/p/r/expert:1",
       "--accelerator=tpu", "--tpu_topology=2x4", "--pvc=shared", "--max_parallel=3",
       "--namespace=ml", "--name=de-adapters"], capsys)
  assert code == 0, err
  docs = list(yaml.safe_load_all((out_dir / "sweep.yaml").read_text()))
  assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
  configmap, job = docs
  plan = json.loads((out_dir / "plan.json").read_text())
  n = len(plan)
  assert n == len(sweep.group_experts(sweep.paper_grid("dataset_adapter"), 4, "dataset_adapter"))
  assert job["apiVersion"] == "batch/v1" and job["metadata"]["namespace"] == "ml"
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed"
  assert spec["completions"] == n and spec["parallelism"] == 3
  assert spec["backoffLimitPerIndex"] == 3
  pod = spec["template"]["spec"]
  assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "2x4"}
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": 8}
  assert "JOB_COMPLETION_INDEX" in container["command"][-1]
  assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
  assert sorted(configmap["data"]) == [f"job_{i:04d}.sh" for i in range(n)]
  for name, text in configmap["data"].items():
    _bash_syntax_ok(text, tmp_path, name)
  assert "--gin.MIXTURE_OR_TASK_NAME=[" in configmap["data"]["job_0000.sh"]


@pytest.mark.parametrize("extra,message", [
    (["--library=/data/lib", "--model_root=/data/runs"], "needs --image"),
    (["--library=/elsewhere/lib", "--model_root=/data/runs", "--image=i", "--pvc=c"],
     "not under --mount_path"),
])
def test_k8s_bad_input(tmp_path, extra, message, capsys):
  code, _, err = _sweep_main(["k8s", "--tasks=a", f"--out_dir={tmp_path}", *extra], capsys)
  assert code == 2 and message in err


# ----------------------------------------------------------------------------
# Sweeps: the local runner with a fake trainer (real job scripts, real library).
# ----------------------------------------------------------------------------

FAKE_TRAINER = r'''
"""Fake trainer: T5X-style flags, a step counter checkpoint in MODEL_DIR, Expert-format exports."""
import ast, hashlib, json, os, signal, sys, time
import numpy as np
from expert_t5x import expert_format

flags = dict(a[len("--gin."):].split("=", 1) for a in sys.argv[1:] if a.startswith("--gin."))
model_dir = ast.literal_eval(flags["MODEL_DIR"])
name = ast.literal_eval(flags["MIXTURE_OR_TASK_NAME"])
stacked = isinstance(name, list)  # a list of tasks trains stacked experts
tasks = name if stacked else [name]
os.makedirs(model_dir, exist_ok=True)
ckpt = os.path.join(model_dir, "ckpt.json")
step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({"model_dir": model_dir, "tasks": tasks, "start_step": step}) + "\n")

def save():
  json.dump({"step": step}, open(ckpt + ".tmp", "w")); os.replace(ckpt + ".tmp", ckpt)

def on_term(*_):
  save(); open(os.path.join(model_dir, "terminated"), "w").write(str(step)); sys.exit(143)
signal.signal(signal.SIGTERM, on_term)

fail = os.environ.get("FAKE_FAIL_TASK") in tasks
while step < 5:
  step += 1
  save()
  if fail and step == 2:
    sys.exit(3)  # a crash after a checkpoint
  if os.environ.get("FAKE_BLOCK"):
    open(os.path.join(model_dir, "started"), "w").close()
    while True:
      time.sleep(0.05)

for task in tasks:
  seed = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)
  adapter = np.random.default_rng(seed).normal(size=(2, 3)).astype("float32")
  params = {"encoder": {"adapter": adapter}}
  meta = expert_format.build_metadata(
      "adapter", {"kind": "adapter"}, base_fingerprint="f" * 64, base_config_name="tiny",
      provenance=[{"task": task, "dataset": task, "subset": None, "prompt": None, "role": "train"}])
  out = os.path.join(model_dir, "experts", task) if stacked else os.path.join(model_dir, "expert")
  expert_format.save_expert(out, params, meta, overwrite=True)
'''


def _fake_env(tmp_path, **extra):
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(FAKE_TRAINER)
  env = {"FAKE_LOG": str(tmp_path / "train.log"), "PYTHONPATH": REPO}
  env.update(extra)
  return trainer, env


def _local_sweep(tmp_path, trainer, env, *extra):
  argv = [sys.executable, "-m", "launch.sweep", "local", f"--library={tmp_path / 'lib'}",
          f"--model_root={tmp_path / 'runs'}", f"--python={sys.executable}",
          f"--train_cmd={sys.executable} {trainer}", *extra]
  return _run(argv, env=env)


def _log(tmp_path):
  path = tmp_path / "train.log"
  runs = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  path.unlink(missing_ok=True)
  return runs


def _library_ids(tmp_path):
  from expert_t5x import library
  return library.Library(str(tmp_path / "lib")).ids()


def test_local_runner_skips_done_and_resumes_interrupted(tmp_path):
  trainer, env = _fake_env(tmp_path)
  tasks = "--tasks=t_a,t_b,t_c"
  result = _local_sweep(tmp_path, trainer, dict(env, FAKE_FAIL_TASK="t_b"), tasks)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "1 of 3 jobs failed: job_0001.sh" in result.stdout
  assert [(r["tasks"], r["start_step"]) for r in _log(tmp_path)] == [
      (["t_a"], 0), (["t_b"], 0), (["t_c"], 0)]
  assert _library_ids(tmp_path) == ["t_a", "t_c"]

  # Rerun: the done experts are not even scheduled; the crashed one resumes from its checkpoint.
  result = _local_sweep(tmp_path, trainer, env, tasks)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "3 prompt experts -> 1 jobs (stack 1); 2 already in the library" in result.stdout
  assert [(r["tasks"], r["start_step"]) for r in _log(tmp_path)] == [(["t_b"], 2)]
  assert _library_ids(tmp_path) == ["t_a", "t_b", "t_c"]

  result = _local_sweep(tmp_path, trainer, env, tasks)
  assert result.returncode == 0 and "Nothing to do" in result.stdout
  assert _log(tmp_path) == []


def test_job_script_skips_experts_added_after_generation(tmp_path):
  """The runtime check: a job generated before its expert reached the library does not train."""
  trainer, env = _fake_env(tmp_path)
  out_dir = tmp_path / "gen"
  base = [f"--library={tmp_path / 'lib'}", f"--model_root={tmp_path / 'runs'}",
          f"--python={sys.executable}", f"--train_cmd={sys.executable} {trainer}", "--tasks=t_a"]
  assert sweep.main(["slurm", *base, f"--out_dir={out_dir}"]) == 0
  assert _local_sweep(tmp_path, trainer, env, "--tasks=t_a").returncode == 0
  assert len(_log(tmp_path)) == 1
  result = subprocess.run(["bash", str(out_dir / "jobs" / "job_0000.sh")], capture_output=True,
                          text=True, env=dict(os.environ, **env))
  assert result.returncode == 0, result.stderr
  assert "already in" in result.stdout and _log(tmp_path) == []


def test_local_runner_stacked_group_partly_done(tmp_path):
  trainer, env = _fake_env(tmp_path)
  args = ("--tasks=s_a,s_b,s_c", "--stack=3")
  assert _local_sweep(tmp_path, trainer, env, *args).returncode == 0
  first = _log(tmp_path)
  assert [r["tasks"] for r in first] == [["s_a", "s_b", "s_c"]]
  assert _library_ids(tmp_path) == ["s_a", "s_b", "s_c"]
  # Remove one expert: the group keeps its members (same MODEL_DIR, so it resumes, here from its
  # final checkpoint) and only the missing expert is added again.
  subprocess.run(
      [sys.executable, "-m", "expert_t5x.cli", "library", "remove",
       str(tmp_path / "lib"), "s_b"],
      check=True,
      capture_output=True,
      cwd=REPO)
  result = _local_sweep(tmp_path, trainer, env, *args)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "1 more done inside partly finished groups" not in result.stdout
  assert "2 more done inside partly finished groups" in result.stdout
  again = _log(tmp_path)
  assert [(r["tasks"], r["model_dir"], r["start_step"]) for r in again] == [
      (["s_a", "s_b", "s_c"], first[0]["model_dir"], 5)]
  assert _library_ids(tmp_path) == ["s_a", "s_b", "s_c"]


def test_job_script_forwards_sigterm_and_adds_nothing(tmp_path):
  """Preemption: TERM to the job script reaches the trainer, which checkpoints; the job fails so the
  scheduler retries it, and the library stays without the unfinished expert."""
  trainer, env = _fake_env(tmp_path, FAKE_BLOCK="1")
  out_dir = tmp_path / "gen"
  assert sweep.main(["slurm", "--tasks=t_a", f"--library={tmp_path / 'lib'}",
                     f"--model_root={tmp_path / 'runs'}", f"--out_dir={out_dir}",
                     f"--python={sys.executable}", f"--train_cmd={sys.executable} {trainer}"]) == 0
  proc = subprocess.Popen(["bash", str(out_dir / "jobs" / "job_0000.sh")],
                          env=dict(os.environ, **env),
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          text=True)
  started = tmp_path / "runs" / "prompt" / "t_a" / "started"
  deadline = time.time() + 60
  while not started.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  assert started.exists(), proc.communicate()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert (tmp_path / "runs" / "prompt" / "t_a" / "terminated").read_text() == "1"
  assert "rerun to resume" in err
  assert not (tmp_path / "lib" / "library.json").exists()


@pytest.mark.tf
def test_suite_experts_follow_the_suite(tmp_path):
  """Compared with the suite's own task list and the tasks' registered provenance."""
  import seqio_tasks
  args, gin = _args(tmp_path, "list", "--suite=demo_train", "--stack=4")
  experts = sweep.select_experts(args)
  assert [e.task for e in experts] == seqio_tasks.suite("demo_train")
  assert all(e.dataset == seqio_tasks.get_info(e.task).dataset for e in experts)
  jobs, _ = sweep.build_jobs(experts, args, gin)
  assert [len(j.experts) for j in jobs] == [4] * (len(experts) // 4) + (
      [len(experts) % 4] if len(experts) % 4 else [])
  args, gin = _args(tmp_path, "list", "--suite=demo_train", "--expert_type=dataset_adapter")
  with pytest.raises(common.LaunchError, match="unknown task"):
    sweep.select_experts(args)


# ----------------------------------------------------------------------------
# Sweeps: the grid's per-expert settings.
# ----------------------------------------------------------------------------


def test_grid_settings_reach_commands_and_split_groups(tmp_path, monkeypatch):
  path = tmp_path / "grid.json"
  path.write_text(
      json.dumps({
          "experts": [
              {
                  "recipe": "prompt_expert", "dataset": "trec", "subset": None, "prompt": None,
                  "settings": {"num_epochs": 10}
              },
              {
                  "recipe": "prompt_expert", "dataset": "app_reviews", "subset": None,
                  "prompt": "convert_to_rating", "settings": {"learning_rate": 3e-4}
              },
              {
                  "dataset": "xsum", "subset": None, "gin": {
                      "TASK_FEATURE_LENGTHS": {"inputs": 512, "targets": 128}, "MAX_EXAMPLES": 10000
                  }
              },
              {
                  "recipe": "dataset_expert", "dataset": "trec", "subset": None,
                  "settings": {"batch_size": 64}
              },
          ]
      }))
  monkeypatch.setattr(sweep, "GRID_SETTINGS_PATH", str(path))
  experts = {e.id: e.settings_dict for e in sweep.paper_grid("prompt")}
  assert sum(s == {"NUM_EPOCHS": 10} for s in experts.values()) == 18
  assert experts["app_reviews_convert_to_rating"] == {
      "optimizers.create_learning_rate_scheduler.base_learning_rate": 3e-4}
  assert experts["app_reviews_convert_to_star_rating"] == {}
  xsum = [s for i, s in experts.items() if i.startswith("xsum_")]
  assert len(xsum) == 10 and all(s["MAX_EXAMPLES"] == 10000 for s in xsum)
  assert sum(bool(s) for s in experts.values()) == 18 + 1 + 10

  args, gin = _args(tmp_path, "list", "--grid=paper", "--stack=8", "--only=^(trec|app_reviews)")
  jobs, _ = sweep.build_jobs(sweep.select_experts(args), args, gin)
  assert sorted(len(j.experts) for j in jobs) == [1, 2, 3, 8, 8]  # 18 trec, 3 + 1 app_reviews
  trec_job = next(j for j in jobs if j.experts[0].id.startswith("trec"))
  assert "--gin.NUM_EPOCHS=10" in trec_job.argv
  lr_job = next(j for j in jobs if j.experts[0].id == "app_reviews_convert_to_rating")
  assert "--gin.optimizers.create_learning_rate_scheduler.base_learning_rate=0.0003" in lr_job.argv

  dataset = {e.id: e.settings_dict for e in sweep.paper_grid("dataset")}
  assert dataset["trec"] == {"BATCH_SIZE": 64}  # the PE-only epochs do not apply to the DE
  assert dataset["xsum"]["TASK_FEATURE_LENGTHS"] == {"inputs": 512, "targets": 128}


def test_bad_grid_settings_file(tmp_path, monkeypatch):
  path = tmp_path / "grid.json"
  path.write_text(json.dumps([{"dataset": "trec", "settings": {"epochs": 10}}]))
  monkeypatch.setattr(sweep, "GRID_SETTINGS_PATH", str(path))
  with pytest.raises(common.LaunchError, match="unknown settings"):
    sweep.paper_grid("prompt")
