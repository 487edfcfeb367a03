#!/bin/bash
# One array task of slurm/extract.sh (which submits it): part SLURM_ARRAY_TASK_ID of PARTS.
#
#   sbatch --array=0-$((PARTS - 1)) slurm/extract_part.sh PARTS OUT_DIR [memvp-prep extract options]
set -euo pipefail
PARTS=$1
OUT=$2
shift 2
exec "${MEMVP_PYTHON:-python}" -m data_prep extract --out "$OUT" --part "$SLURM_ARRAY_TASK_ID/$PARTS" "$@"
