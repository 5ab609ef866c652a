#!/usr/bin/env bash
# bash launch/local_gpu.sh --gin_file=experts/prompt_expert.gin --gin.MODEL_DIR='"/tmp/pe"' --gin.MIXTURE_OR_TASK_NAME='"cosmos_qa_no_prompt_text"'
#
# Trains on this machine's GPUs through jax[cuda] (install with `pip install -e ".[cuda]"`): sets
# JAX's GPU memory behaviour, keeps TensorFlow (seqio's tf.data input pipeline) off the GPUs, then
# runs `python -m expert_t5x.train` with every other argument unchanged. Rerunning the same command
# resumes from MODEL_DIR's latest checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash launch/local_gpu.sh [launcher options] --gin_file=... [--gin.NAME=VALUE ...] [trainer flags]

launcher options (everything else goes to `python -m expert_t5x.train`):
  --gpus=0,1          GPUs to use (sets CUDA_VISIBLE_DEVICES; default: all visible)
  --mem_fraction=F    preallocate fraction F of each GPU up front (fastest allocator, least
                      fragmentation; e.g. 0.9). Default: no preallocation, allocate on demand.
  --dry_run           print the environment and the command, run nothing
  -h, --help          this help

environment: PYTHON (default python), XLA_PYTHON_CLIENT_PREALLOCATE / XLA_PYTHON_CLIENT_MEM_FRACTION
(respected when set), EXPERT_T5X_TRAIN_MODULE (default expert_t5x.train).
EOF
}

dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1 ;;
    --gpus=*) export CUDA_VISIBLE_DEVICES="${arg#--gpus=}" ;;
    --mem_fraction=*)
      fraction="${arg#--mem_fraction=}"
      if ! [[ "$fraction" =~ ^(0?\.[0-9]+|1(\.0+)?)$ ]]; then
        echo "local_gpu.sh: --mem_fraction=$fraction is not a fraction in (0, 1]; e.g. --mem_fraction=0.9." >&2
        exit 2
      fi
      export XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction" ;;
    *) args+=("$arg") ;;
  esac
done
if [ "${#args[@]}" -eq 0 ]; then
  echo "local_gpu.sh: no trainer arguments; pass at least --gin_file=... (see --help)." >&2
  exit 2
fi

# JAX preallocates 75% of every GPU by default: that starves anything else on the card and turns
# fragmentation into confusing OOMs. Allocate on demand unless the user asked otherwise.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
# If TensorFlow ever sees a GPU, let it take only what it uses (the hiding below is the real fix).
export TF_FORCE_GPU_ALLOW_GROWTH=true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHON="${PYTHON:-python}"
MODULE="${EXPERT_T5X_TRAIN_MODULE:-expert_t5x.train}"

if [ "$dry_run" = 1 ]; then
  for name in CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_PREALLOCATE XLA_PYTHON_CLIENT_MEM_FRACTION \
              TF_FORCE_GPU_ALLOW_GROWTH TF_CPP_MIN_LOG_LEVEL; do
    if [ -n "${!name+x}" ]; then echo "export $name=${!name}"; fi
  done
  printf '%q -m %q' "$PYTHON" "$MODULE"
  printf ' %q' "${args[@]}"
  printf '   # TensorFlow GPUs hidden first\n'
  exit 0
fi

# T5X's own fix, applied before the trainer imports anything: hide the GPUs from TensorFlow (the
# input pipeline needs none), then run the trainer as `python -m` would, so gin files that
# `import __main__ as train_script` resolve.
exec "$PYTHON" - "$MODULE" "${args[@]}" <<'PY'
import runpy
import sys

module = sys.argv[1]
try:
  import tensorflow as tf
except ImportError:
  tf = None
if tf is not None:
  tf.config.set_visible_devices([], "GPU")
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
PY
