#!/bin/bash
# Multi-node MemVP training on Slurm that survives preemption and time limits.
#
#   sbatch [--nodes N] [--ntasks-per-node G] [--gpus-per-node G] [--time T] slurm/train.sh CONFIG [key=value ...]
#   (CONFIG: a YAML file or a shipped recipe name, e.g. memvp_llama13b_sqa)
#
# One srun task per rank (G per node, one per GPU): srun starts every rank itself, so no passwordless ssh
# between nodes is needed, and Slurm's signals reach the ranks directly with no launcher in between.
# Rank 0's node (first in the allocation) hosts the rendezvous on a port derived from the job id.
# Without GPUs the ranks run on CPU (DeepSpeed's CPU accelerator, gloo); that is how the tests run it.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 5 minutes before the kill (--signal), the
# script forwards it to the ranks, training saves a checkpoint at the next step boundary and exits, and the
# script requeues the job (it does not rely on --requeue as well). The requeued job has the same name,
# so it finds runs/<job name>/checkpoints and resumes from the newest complete one; TensorBoard continues
# in runs/<job name>/tb. The job requeues only when THIS attempt was signalled and the ranks then wrote
# status.json "preempted"; anything else (a crash, a finished run, a status left by an earlier attempt)
# ends the job with the ranks' exit code, so a crash fails the job instead of requeueing forever.
#
# Arguments reach every rank exactly as given (spaces and quotes included): they are passed on as an
# array, never rebuilt into a command string.
#
# Defaults below are overridden by the same options on the sbatch command line.
#SBATCH --job-name=memvp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/train.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

# --- network: the one place for interconnect settings ------------------------------------------------
export NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_SOCKET_IFNAME=ib0          # pick the interface that connects the nodes
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters, if any
# The rendezvous (first node of the allocation, a port derived from the job id) is set up by each rank:
# memvp_ds/distributed.py, the one place for that rule.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

OUTPUT_DIR=${MEMVP_OUTPUT_DIR:-runs/$SLURM_JOB_NAME}
STATUS_FILE=$OUTPUT_DIR/status.json
PYTHON=${MEMVP_PYTHON:-python}
echo "[$(date)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s) ($SLURM_JOB_NODELIST)," \
     "${SLURM_NTASKS} ranks, output $OUTPUT_DIR"

# status.json's identity (inode and modification time), or "absent". The trainer replaces the file
# atomically (new inode), so a different identity after the ranks exit means this attempt wrote it; an
# unchanged one is an earlier attempt's, which must not decide what this attempt does.
status_identity() {
    stat -c '%i %y' "$STATUS_FILE" 2>/dev/null || echo absent
}

run_status() {
    sed -n 's/.*"status": *"\([a-z_]*\)".*/\1/p' "$STATUS_FILE" 2>/dev/null
}

STOP_SIGNAL=""  # set when this attempt is asked to stop; only then may it requeue
SRUN_PID=""
forward_stop() {
    STOP_SIGNAL=$1
    echo "[$(date)] $1: asking the ranks to checkpoint and exit"
    [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

# Every rank takes its place from Slurm (memvp_ds/distributed.py): a rank layout inherited from the submitting
# shell (sbatch exports it; e.g. from a torchrun or a single-process run there) would make every rank rank 0.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
STATUS_BEFORE=$(status_identity)
srun --kill-on-bad-exit=1 --label \
    "$PYTHON" memvp_ds/train.py --config "$CONFIG" "train.output_dir=$OUTPUT_DIR" "$@" &
SRUN_PID=$!
# A trapped signal interrupts `wait`; keep waiting while the ranks save, then collect their exit code
# (bash keeps it for a finished background job).
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
done
wait "$SRUN_PID"
RC=$?

STATUS=$(run_status)
if [ "$(status_identity)" = "$STATUS_BEFORE" ]; then
    STATUS=""  # an earlier attempt's status says nothing about this one
fi
echo "[$(date)] ranks exited with $RC, stop signal: ${STOP_SIGNAL:-none}," \
     "run status: ${STATUS:-none written by this attempt}"
if [ -n "$STOP_SIGNAL" ] && [ "$STATUS" = "preempted" ]; then
    echo "[$(date)] requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[$(date)] requeue failed; resubmit with the same job name to resume" >&2
    exit 1
fi
exit "$RC"
