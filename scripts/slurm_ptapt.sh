#!/usr/bin/env bash
# P-TAPT on SLURM nodes with several GPUs, tracked on the team's MLflow server.
#
#   mkdir -p logs && sbatch scripts/slurm_ptapt.sh              # the defaults below
#   sbatch --export=ALL,DATA=/shared/iemocap_16k scripts/slurm_ptapt.sh
#   sbatch --ntasks-per-node=1 --export=ALL,LAUNCH=torchrun scripts/slurm_ptapt.sh
#
# How the ranks run: srun starts one task per GPU and every task runs the same entry point with
# the same arguments; ser joins the tasks into one process group before any work (ranks read
# from SLURM with Lightning's SLURMEnvironment), and only global rank 0 talks to MLflow (creates
# the runs, logs, uploads artifacts). Several nodes work the same way (--nodes=N): Lightning is
# given num_nodes from the tasks SLURM started; OUTPUT_ROOT must be on a filesystem every node
# sees. Each task uses the cores SLURM gave it (--cpus-per-task) for torch's threads.
#
# Before the first job: the team server runs (scripts/team_server.sh) and the experiment exists,
# made once, so that two jobs starting together do not race to create it:
#     MLFLOW_TRACKING_URI=http://mlflow.lab.example:5000 mlflow experiments create -n ptapt-iemocap
#
#SBATCH --job-name=ser-ptapt          # not "bash" or "interactive": Lightning ignores SLURM then
#SBATCH --nodes=1                     # or more: every node runs --ntasks-per-node ranks
#SBATCH --ntasks-per-node=4           # one task (rank) per GPU: must equal --gpus-per-node
#SBATCH --gpus-per-node=4             # every task sees the node's 4 GPUs, uses cuda:<local rank>
#SBATCH --cpus-per-task=8             # data-loading workers: ser takes half, at most 4
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out       # the folder must exist: mkdir -p logs
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}   # sbatch runs a copy of this file: not dirname $0
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-/shared/ser/iemocap}            # prepare_iemocap's output, on a shared filesystem
OUTPUT_ROOT=${OUTPUT_ROOT:-/shared/ser/outputs}  # shared: a resubmitted job resumes from here

# The team's server; clients upload artifacts through it (no shared artifact folder needed).
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://mlflow.lab.example:5000}
export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-ptapt-iemocap}
unset MLFLOW_RUN_ID                          # a fresh method run, never someone else's

# SLURM_GPUS_PER_NODE may carry a type ("a100:4"): keep the count.
GPUS=${SLURM_GPUS_PER_NODE:-1}
GPUS=${GPUS##*:}
# LAUNCH=srun: one SLURM task per GPU (Lightning reads SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS
# and insists that --ntasks-per-node equal --devices). LAUNCH=torchrun: submit with
# --ntasks-per-node=1 (same --gpus-per-node); one srun task runs torchrun, which starts a process
# per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE (Lightning prefers these to SLURM's).
LAUNCH=${LAUNCH:-srun}
ARGS=(
    --recipe paper
    --datadir "$DATA/Audio_16k" --labeldir "$DATA/labels_sess"
    --output_root "$OUTPUT_ROOT"
    --accelerator gpu --devices "$GPUS" --precision bf16-mixed
)

cd "$REPO"
# Every rank runs this same command. A job stopped at its time limit: submit it again; finished
# stages are reused and the interrupted one resumes from its last.ckpt under OUTPUT_ROOT.
case "$LAUNCH" in
    srun)
        if [ "${SLURM_NTASKS_PER_NODE:-1}" != "$GPUS" ]; then
            echo "--ntasks-per-node=${SLURM_NTASKS_PER_NODE:-1} must equal" \
                "--gpus-per-node=$GPUS (or LAUNCH=torchrun with --ntasks-per-node=1)" >&2
            exit 2
        fi
        srun "$PY" entrypoints/ptapt.py "${ARGS[@]}"
        ;;
    torchrun)
        srun --ntasks-per-node=1 "$REPO/.venv/bin/torchrun" --nnodes="${SLURM_NNODES:-1}" \
            --nproc-per-node="$GPUS" --rdzv_backend c10d \
            --rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500" \
            --rdzv_id "${SLURM_JOB_ID:-ser}" \
            entrypoints/ptapt.py "${ARGS[@]}"
        ;;
    *)
        echo "LAUNCH=$LAUNCH: give srun or torchrun" >&2
        exit 2
        ;;
esac
