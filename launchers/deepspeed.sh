#!/usr/bin/env bash
# Start N local processes with the DeepSpeed launcher, each running the training entry point.
#
#   launchers/deepspeed.sh [--dry-run] [--nproc N] --config configs/X.yaml [--section.field=value ...]
#
# N defaults to the number of GPUs (1 without GPUs). Several nodes: pass a DeepSpeed hostfile
# with HOSTFILE=path (and the same MASTER_PORT everywhere). On one node the port is a free one
# unless MASTER_PORT is set. The interpreter is chosen as in torchrun.sh. --dry-run prints the
# command and runs nothing.
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

port="$(pick_port "$python" "$([ -n "${HOSTFILE:-}" ] && echo many || echo 1)")"
cmd=("$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port")
if [ -n "${HOSTFILE:-}" ]; then
  cmd+=(--hostfile "$HOSTFILE")
fi
cmd+=(--module mmoe_megatron.train "${args[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec "${cmd[@]}"
