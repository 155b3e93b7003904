#!/usr/bin/env bash
# launch/torchrun.sh <pretrain|finetune> --config <yaml> [key=value ...]
#
# Starts `mdm <command>` under torchrun, one process per GPU. The same script serves one machine and
# many: run it once on every node with the same NNODES / MASTER_ADDR / MASTER_PORT and that node's
# NODE_RANK. The config decides DDP or DeepSpeed ZeRO (distributed.zero_stage); torchrun only starts
# the processes and sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
#
#   NPROC_PER_NODE=8 launch/torchrun.sh pretrain --config configs/pretrain/beit3_base_mdm.yaml
#   # two nodes (run on each, NODE_RANK=0 on the node whose address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       launch/torchrun.sh finetune --config configs/finetune/vqav2_base.yaml data.root=/data/vqav2
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  NPROC_PER_NODE [number of GPUs, or 1]  MASTER_ADDR [127.0.0.1]
#   MASTER_PORT [29500]  RDZV_ENDPOINT: host:port of a c10d rendezvous instead of the static master
#   (elastic; then NODE_RANK is assigned by torchrun)  RDZV_ID [mdm]: job id shared by all nodes
#   MDM [mdm]: the command to run (tests substitute a script)  TORCHRUN [torchrun]
#   OMP_NUM_THREADS [1 per process if unset, as torchrun does]
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ "$n" -gt 0 ]]; then echo "$n"; return; fi
    fi
    echo 1
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a mdm_cmd <<< "${MDM:-mdm}"
read -r -a torchrun_cmd <<< "${TORCHRUN:-torchrun}"

args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    args+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-mdm}")
else
    args+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

echo "launch/torchrun.sh: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} process(es): ${mdm_cmd[*]} $*" >&2
exec "${torchrun_cmd[@]}" "${args[@]}" --no-python "${mdm_cmd[@]}" "$@"
