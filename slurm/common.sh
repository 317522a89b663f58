# Shared by the sbatch scripts in this folder (sourced, not run): rendezvous, a start-of-job log,
# and the training step with its requeue. Only process set-up lives here: training is Python, and
# so is the decision to requeue (mmoe_megatron.requeue).

PYTHON=${PYTHON:-python}

# srun options for a training step, so that a failure ends the step instead of leaving the
# allocation idle: --kill-on-bad-exit ends every task as soon as one exits non-zero, and --wait
# ends the step MMOE_STEP_WAIT seconds after the first task ended even when some tasks never
# report back (their node is lost: without it srun waits for Slurm to declare the node down,
# SlurmdTimeout, 300 s by default). srun then waits KillWait + 2 s more for the kills before it
# gives up on them. A healthy run's ranks all end within a second or two of each other.
SRUN_FAULT_OPTIONS=(--kill-on-bad-exit=1 "--wait=${MMOE_STEP_WAIT:-10}")

die() { echo "error: $*" >&2; exit 2; }

# MASTER_ADDR / MASTER_PORT for torch.distributed; mmoe_megatron.distributed.env_from_os takes
# ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID once MASTER_ADDR is exported.
setup_rendezvous() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job (no SLURM_JOB_ID); submit with sbatch"
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [ -n "$first" ] || die "could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
  if getent hosts "$first" > /dev/null; then
    addr=$first
  else
    # The node name does not resolve (e.g. several slurmd on one host, or names only Slurm
    # knows): use the node's NodeAddr, the address slurmctld itself reaches its slurmd at.
    addr=$(scontrol -o show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    [ -n "$addr" ] && [ "$addr" != "$first" ] ||
      die "node name '$first' does not resolve and Slurm has no NodeAddr for it; set MASTER_ADDR yourself"
  fi
  export MASTER_ADDR=$addr
  # One port per job (array tasks have their own job id; a requeued job reuses its port once the
  # previous run is gone). 20000-29999 stays below Linux's ephemeral range (32768-60999), and local
  # rendezvous ports (mmoe_megatron.ports) are never drawn from it.
  export MASTER_PORT=${MMOE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  # Compiled DeepSpeed/torch extensions persist across jobs instead of being rebuilt in /tmp.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SLURM_SUBMIT_DIR/.cache/torch_extensions}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

# What ran where: the job's Slurm and rendezvous environment, then the resolved experiment config.
log_start() {
  echo "=== $(date -u +%FT%TZ) job ${SLURM_JOB_ID} on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"
  env | grep -E '^(SLURM_|MASTER_|CUDA_VISIBLE_DEVICES|NCCL_|TORCH_|OMP_NUM_THREADS|PYTHON)' | sort
  if [ $# -gt 0 ]; then
    echo "=== resolved config"
    "$PYTHON" -m mmoe_megatron.train "$@" --print-config
  fi
}

# run_training_step RUN... -- COMMAND...: run the training step COMMAND, where RUN names what it
# trains for `python -m mmoe_megatron.requeue` (--config X [overrides], or --suite S --member I).
# If the step fails, mmoe_megatron.requeue decides (and says why) whether this job goes back to the
# queue: always after a preemption (exit 75), after other failures only within the retry limit and
# when this attempt completed a newer checkpoint; never once the run's last checkpoint is complete
# (a rank killed while shutting down after it fails the step: the step then counts as a success). A
# requeued job starts again under the same job id and resumes from the newest complete checkpoint.
run_training_step() {
  local run=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do run+=("$1"); shift; done
  [ "${1:-}" = "--" ] || die "run_training_step: no -- before the command"
  shift
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"; echo
    return 0
  fi
  "$PYTHON" -m mmoe_megatron.requeue begin "${run[@]}" ||
    echo "=== the start of this attempt was not recorded; a failure will not be retried"
  # A requeued job keeps its id and numbers its steps from 0 again, while slurmctld still holds
  # the signals it could not deliver to a lost node (retried every 60 s) for the earlier run's
  # step: when the node returns, they reach the new step with the same number and end it (seen on
  # Slurm 22.05). Restart r runs its training step as step r, clear of every earlier run's.
  local i
  for ((i = 0; i < ${SLURM_RESTART_COUNT:-0}; i++)); do
    srun --nodes=1 --ntasks=1 true || true
  done
  echo "+ $*"
  local code=0
  "$@" || code=$?
  [ "$code" -eq 0 ] && return 0
  local verdict=0
  "$PYTHON" -m mmoe_megatron.requeue decide --exit-code "$code" "${run[@]}" || verdict=$?
  case "$verdict" in
    0) scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (needs #SBATCH --requeue)"
       exit 0 ;;
    3) return 0 ;;  # finished: the run's last checkpoint is complete (decide said which exit code it ignored)
    *) exit "$code" ;;
  esac
}

# `--dry-run` as the first argument of an sbatch script: print the steps instead of running them.
dry_run_or_run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    echo "+ $*"
    "$@"
  fi
}
