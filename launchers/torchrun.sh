#!/usr/bin/env bash
# Start N local processes with torchrun, each running the training entry point.
#
#   launchers/torchrun.sh [--dry-run] [--nproc N] --config configs/X.yaml [--section.field=value ...]
#
# N defaults to the number of GPUs (1 without GPUs). Several nodes: set NNODES, NODE_RANK,
# MASTER_ADDR and MASTER_PORT on each node. On one node the port is a free one unless
# MASTER_PORT is set. The interpreter is $PYTHON, else the active virtual environment's, else
# the project's .venv when it exists. --dry-run prints the command and runs nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry_run=0
nproc=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nproc) nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

python="$(pick_python)"
if [ -z "$nproc" ]; then
  nproc=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

nnodes="${NNODES:-1}"
port="$(pick_port "$python" "$nnodes")"
cmd=("$python" -m torch.distributed.run
     --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$nproc"
     --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$port"
     -m mmoe_megatron.train "${args[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec "${cmd[@]}"
