"""Launchers: Cloud TPU VMs, local GPUs, and expert sweeps on SLURM, Kubernetes or one machine.

Run them from the repository root as modules (`python -m launch.tpu_vm --help`,
`python -m launch.sweep --help`) or `bash launch/local_gpu.sh --help`. They import neither
TensorFlow nor JAX, so `--help` and `--dry_run` are instant.
"""
