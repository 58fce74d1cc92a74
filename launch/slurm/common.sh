# Shared by the sbatch scripts: run folder, logs, resume, preemption and requeue.
# Usage inside a batch script: source common.sh; noisymix_run <how to start the tasks...>
set -uo pipefail
export NOISYMIX_REPO=${NOISYMIX_REPO:-$SLURM_SUBMIT_DIR}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$NOISYMIX_REPO/launch/accelerate/gpu_node.yaml}
export PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RUN_DIR=$(realpath -m "${1:?usage: sbatch SCRIPT RUN_DIR [--config FILE] [--key value ...]}")
shift
TRAIN_ARGS=("$@")
mkdir -p "$RUN_DIR"
exec >>"$RUN_DIR/slurm-${SLURM_JOB_ID}.log" 2>&1
echo "=== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date)"
if [ -f "$RUN_DIR/last.pt" ] || [ -f "$RUN_DIR/config.yaml" ]; then
    echo "resuming from $RUN_DIR (its newest good checkpoint, or its cross-validation stage)"
    TRAIN_ARGS=(--resume "$RUN_DIR" "${TRAIN_ARGS[@]}")
else
    TRAIN_ARGS=(--output "$(dirname "$RUN_DIR")" --run_name "$(basename "$RUN_DIR")" "${TRAIN_ARGS[@]}")
fi
PREEMPTED=0

noisymix_run() {
    # start the tasks in the background so the USR1 trap can run while they train
    "$@" &
    local tasks=$! rc
    trap 'echo "USR1 at $(date): checkpoint and requeue"; PREEMPTED=1; kill -USR1 $tasks' USR1
    while true; do
        wait "$tasks"; rc=$?
        kill -0 "$tasks" 2>/dev/null || break
    done
    if [ "$PREEMPTED" = 1 ]; then
        echo "requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "=== finished with exit code $rc at $(date)"
    exit "$rc"
}
