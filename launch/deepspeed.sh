#!/usr/bin/env bash
# launch/deepspeed.sh <pretrain|finetune> --config <yaml> [key=value ...]
#
# Starts `mdm <command>` on every host of a DeepSpeed hostfile (one line per host: `worker-1 slots=8`)
# with the `deepspeed` launcher, which reaches the other hosts over passwordless ssh (pdsh) and sets
# RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR for each process. Set distributed.zero_stage in the
# config or on the command line; mdm reads the launcher's environment, so no --local_rank argument is
# passed (--no_local_rank).
#
#   HOSTFILE=hosts launch/deepspeed.sh pretrain --config configs/pretrain/beit3_base_mdm.yaml model.arch=beit3_large distributed.zero_stage=2
#   NUM_GPUS=4 launch/deepspeed.sh finetune --config configs/finetune/nlvr2_base.yaml   # this machine only
#
# Environment (defaults in brackets):
#   HOSTFILE [hostfile if it exists, else this machine only]  NUM_GPUS: GPUs per host to use [all]
#   MASTER_ADDR [first host]  MASTER_PORT [29500]  LAUNCHER [pdsh]: pdsh | openmpi | mvapich | slurm
#   DS_ARGS: more launcher options, e.g. "--no_ssh_check" (single host without ssh to itself), "--include
#   worker-1:0,1"  MDM [mdm]: the command to run  DEEPSPEED [deepspeed]
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

read -r -a mdm_cmd <<< "${MDM:-mdm}"
read -r -a deepspeed_cmd <<< "${DEEPSPEED:-deepspeed}"
HOSTFILE=${HOSTFILE:-hostfile}

args=(--master_port "${MASTER_PORT:-29500}" --launcher "${LAUNCHER:-pdsh}" --no_python --no_local_rank)
if [[ -f "$HOSTFILE" ]]; then
    args+=(--hostfile "$HOSTFILE")
elif [[ "$HOSTFILE" != "hostfile" ]]; then
    echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2
    exit 2
fi
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
read -r -a extra <<< "${DS_ARGS:-}"
args+=("${extra[@]}")

echo "launch/deepspeed.sh: ${mdm_cmd[*]} $*" >&2
exec "${deepspeed_cmd[@]}" "${args[@]}" "${mdm_cmd[@]}" "$@"
