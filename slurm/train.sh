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
# in runs/<job name>/tb. A finished run (status.json "complete") is not requeued.
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
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$("${MEMVP_PYTHON:-python}" -m memvp_ds.distributed port "$SLURM_JOB_ID")
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

OUTPUT_DIR=${MEMVP_OUTPUT_DIR:-runs/$SLURM_JOB_NAME}
PYTHON=${MEMVP_PYTHON:-python}
echo "[$(date)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s) ($SLURM_JOB_NODELIST)," \
     "${SLURM_NTASKS} ranks, rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"

forward_stop() {
    echo "[$(date)] stop signal: asking the ranks to checkpoint and exit"
    kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap forward_stop USR1 TERM

srun --kill-on-bad-exit=1 --label \
    "$PYTHON" memvp_ds/train.py --config "$CONFIG" "train.output_dir=$OUTPUT_DIR" "$@" &
SRUN_PID=$!
# A trapped signal interrupts `wait`; keep waiting until the ranks have saved and exited.
while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

STATUS=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$OUTPUT_DIR/status.json" 2>/dev/null)
echo "[$(date)] ranks exited with $RC, run status: ${STATUS:-unknown}"
if [ "$STATUS" = "preempted" ]; then
    echo "[$(date)] requeueing job $SLURM_JOB_ID to resume from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$RC"
