# Sourced by every scripts/*.slurm job (not run on its own): repo root, virtual environment,
# offline Hugging Face caches, multi-node rendezvous variables and requeue-before-timeout.
#
# Submit from the repository root (SLURM copies the batch script to a spool folder, so the script cannot
# find the repo from its own path), or set REPO_DIR. Override any variable below from the environment:
#   REPO_DIR=/path/to/repo VENV=/path/to/venv HF_HOME=/shared/hf sbatch scripts/run_train.slurm

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR"
VENV=${VENV:-$REPO_DIR/.venv}
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Compute nodes usually have no internet: everything (MiniLM, Llama-3-8B, datasets) comes from the local cache.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# A cache on shared storage, filled once on a login node with `huggingface-cli download ...`.
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
export HF_HUB_CACHE=${HF_HUB_CACHE:-$HF_HOME/hub}
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$HF_HOME/datasets}
export TORCH_HOME=${TORCH_HOME:-$HOME/.cache/torch}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-$(id -u)}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# Data-loader and robosuite workers share the node's cores with the GPU processes.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# Sets MASTER_ADDR / MASTER_PORT (first node of the job), GPUS_PER_NODE and NUM_PROCESSES (all GPUs of the job).
setup_rendezvous() {
    # First host of the job. `sed -n 1p` rather than `head -n1`: head exits after one line, and under pipefail
    # the SIGPIPE this can give scontrol on a long host list would abort the job.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    if [ -z "$MASTER_ADDR" ]; then
        echo "error: scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host" >&2
        return 1
    fi
    # A port derived from the job id: two jobs sharing a head node don't collide, a requeued job reuses it.
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    NUM_PROCESSES=$((${SLURM_NNODES:-1} * GPUS_PER_NODE))
    export MASTER_ADDR MASTER_PORT GPUS_PER_NODE NUM_PROCESSES
    echo "rendezvous: ${SLURM_NNODES:-1} node(s) x $GPUS_PER_NODE GPU(s) = $NUM_PROCESSES processes, head $MASTER_ADDR:$MASTER_PORT"
}

# `#SBATCH --signal=B:USR1@300` makes SLURM send USR1 to this shell 5 minutes before the time limit.
# We requeue the job (needs `#SBATCH --requeue`); the restarted job passes --resume and continues from the
# newest checkpoint. A preempted or node-failed job is requeued by SLURM itself and resumes the same way.
requeue_before_timeout() {
    echo "$(date -Is) time limit near: requeueing job ${SLURM_JOB_ID}; the next start resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
}

# Runs "$@" in the background so the USR1 trap fires while it runs (bash defers traps during a foreground child).
run_requeueable() {
    trap 'REQUEUE_SIGNALLED=1; requeue_before_timeout' USR1
    "$@" &
    local pid=$!
    local status
    while :; do
        REQUEUE_SIGNALLED=0
        status=0
        wait "$pid" || status=$?
        # A wait cut short by USR1 returns early; wait again for the step (scontrol requeue ends it).
        [ "$REQUEUE_SIGNALLED" = 1 ] || break
    done
    trap - USR1
    return "$status"
}
