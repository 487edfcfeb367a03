#!/bin/bash
# Feature extraction as a Slurm array (one part per task) plus a dependent merge + verify job.
#
#   bash slurm/extract.sh PARTS OUT_DIR [memvp-prep extract options without --out/--part]
#   e.g. bash slurm/extract.sh 8 data/sqa_shards --source scienceqa --root data/scienceqa \
#            --clip-pretrained /ckpt/vit_l14_openai.bin
#
# Every task writes its own shards and manifest.part-i-of-N.json; a failed task can simply be resubmitted
# (extraction resumes shard by shard). SBATCH_* environment variables (e.g. SBATCH_PARTITION,
# SBATCH_TIMELIMIT) and MEMVP_EXTRACT_SBATCH_ARGS (whitespace-separated sbatch options) pass further options
# to both jobs; logs go to ${MEMVP_LOG_DIR:-logs}.
#
# The options reach every array task exactly as given (spaces and quotes included): they travel as the
# batch scripts' arguments, never through a command string (no --wrap).
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash slurm/extract.sh PARTS OUT_DIR [extract options]   (PARTS: a positive integer)" >&2
    exit 2
fi
PARTS=$1
OUT=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_DIR=${MEMVP_LOG_DIR:-logs}
mkdir -p "$LOG_DIR" "$OUT"
read -r -a EXTRA <<< "${MEMVP_EXTRACT_SBATCH_ARGS:-}"

ARRAY_ID=$(sbatch --parsable "${EXTRA[@]}" --job-name=memvp-extract --array=0-$((PARTS - 1)) \
    --output="$LOG_DIR/%x-%A_%a.out" --ntasks=1 "$HERE/extract_part.sh" "$PARTS" "$OUT" "$@")
MERGE_ID=$(sbatch --parsable "${EXTRA[@]}" --job-name=memvp-merge --dependency=afterok:"$ARRAY_ID" \
    --output="$LOG_DIR/%x-%j.out" --ntasks=1 "$HERE/merge_verify.sh" "$OUT")
echo "extract array job $ARRAY_ID ($PARTS parts), merge + verify job $MERGE_ID"
echo "$ARRAY_ID $MERGE_ID"
