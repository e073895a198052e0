#!/usr/bin/env bash
# `accelerate launch` for one node of a multi-node SLURM job. Started once per node by srun
# (`srun --ntasks-per-node=1 bash scripts/slurm_accelerate.sh CONFIG SCRIPT [ARGS...]`), so SLURM_NODEID is
# this node's own rank. MASTER_ADDR, MASTER_PORT and NUM_PROCESSES come from setup_rendezvous (slurm_env.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: slurm_accelerate.sh ACCELERATE_CONFIG SCRIPT [ARGS...]" >&2
    exit 2
fi
config=$1
shift
: "${MASTER_ADDR:?run setup_rendezvous (scripts/slurm_env.sh) first}" "${MASTER_PORT:?}" "${NUM_PROCESSES:?}"
echo "node ${SLURMD_NODENAME:-$(hostname)}: machine_rank ${SLURM_NODEID} of ${SLURM_NNODES}"
# static rendezvous + same_network: every node reaches MASTER_ADDR:MASTER_PORT directly (torchrun --master-addr).
exec accelerate launch \
    --config_file "$config" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    --rdzv_backend static \
    --same_network \
    "$@"
