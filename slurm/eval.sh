#!/bin/bash
# Data-parallel evaluation: every rank answers its share of the split, rank 0 writes predictions + metrics.
#
#   sbatch [--nodes N] [--ntasks-per-node G] slurm/eval.sh --weights runs/x/export/trainable.safetensors \
#       [--config CONFIG] [--split test] [key=value ...]
#SBATCH --job-name=memvp-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# The rendezvous (first node of the allocation, a port derived from the job id) is set up by each rank:
# memvp_ds/distributed.py, the one place for that rule. A rank layout inherited from the submitting shell
# would make every rank rank 0.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
srun --kill-on-bad-exit=1 --label "${MEMVP_PYTHON:-python}" memvp_ds/evaluate.py "$@"
