#!/usr/bin/env bash
# One task per node: `accelerate launch train/main.py` with this node's machine rank, forwarding
# USR1/TERM to the training processes (not to the launcher, which SIGUSR1 would kill).
# Environment (set by the sbatch scripts): NOISYMIX_REPO, ACCELERATE_CONFIG, PROCS_PER_NODE,
# HEAD_ADDR, HEAD_PORT. SLURM_NODEID / SLURM_NNODES are read here, on the node itself.
set -uo pipefail
cd "$NOISYMIX_REPO"
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
args=(--config_file "$ACCELERATE_CONFIG" --num_processes "$((nnodes * PROCS_PER_NODE))")
if [ "$nnodes" -gt 1 ]; then
    args+=(--multi_gpu --num_machines "$nnodes" --machine_rank "$node_rank"
           --main_process_ip "$HEAD_ADDR" --main_process_port "$HEAD_PORT")
fi
echo "node_task: $(hostname) node $node_rank of $nnodes: accelerate launch ${args[*]} train/main.py $*"
python -m accelerate.commands.launch "${args[@]}" train/main.py "$@" &
launcher=$!
forward() { echo "node_task: $1 -> training processes"; pkill "-$1" -P "$launcher"; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while true; do
    wait "$launcher"; rc=$?
    kill -0 "$launcher" 2>/dev/null || exit "$rc"   # wait returns early when a trap ran
done
