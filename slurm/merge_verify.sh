#!/bin/bash
# After all parts of slurm/extract.sh (which submits it): one manifest.json from the parts' manifests,
# then a full re-read of every shard against it.
#
#   sbatch slurm/merge_verify.sh OUT_DIR
set -euo pipefail
OUT=$1
PYTHON=${MEMVP_PYTHON:-python}
"$PYTHON" -m data_prep merge "$OUT"
"$PYTHON" -m data_prep verify "$OUT"
