#!/usr/bin/env bash
# The GPU check on a machine that has a GPU, Python and its own CUDA torch, but no network and
# neither megatron-core nor DeepSpeed: install the wheels carried in .cache/gpu_wheels (made by
# `make gpu-wheels`) into .cache/gpu_site with --no-deps, beside the machine's torch, run
# `python -m bench.gpu_check` under a time limit, regenerate RESULTS.md, and copy the results,
# logs and a description of the machine to $OUT (or runs/gpu_check/out).
#
#   bash tools/gpu_machine_check.sh [bench.gpu_check options]     e.g. --steps 30
#
# CHECK_TIMEOUT_S (default 480) bounds the check; what finished before it is in progress.json.
# The exit status is the check's (124 when the time limit stopped it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-$PWD/runs/gpu_check/out}"
python="${PYTHON:-python3}"
mkdir -p "$out" runs/gpu_check
start=$(date +%s)

{
  echo "# machine"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$python" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'
  "$python" -m pip list 2>/dev/null
} > "$out/machine.txt" 2>&1

"$python" -m tools.gpu_wheels install --wheels .cache/gpu_wheels --target .cache/gpu_site > "$out/install.log" 2>&1
install_status=$?
tail -3 "$out/install.log"
if [ "$install_status" != 0 ]; then
  echo "installing the carried wheels failed (see $out/install.log)" >&2
  exit "$install_status"
fi
export PYTHONPATH="$PWD/.cache/gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
echo "installed in $(( $(date +%s) - start )) s; running the check"

timeout --signal=TERM --kill-after=20 "${CHECK_TIMEOUT_S:-480}" "$python" -m bench.gpu_check "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
"$python" -m bench.make_results > /dev/null 2>&1 || echo "bench.make_results failed" >&2
for f in bench/results/gpu_check.json runs/gpu_check/progress.json RESULTS.md; do
  [ -f "$f" ] && cp "$f" "$out/"
done
echo "check exited with $status after $(( $(date +%s) - start )) s; results in $out"
exit "$status"
