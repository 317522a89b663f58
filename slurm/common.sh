# Shared by the sbatch scripts in this folder (sourced, not run): rendezvous, a start-of-job log,
# and the requeue that follows a preemption. Only process set-up lives here; training is Python.

PYTHON=${PYTHON:-python}
# mmoe_megatron.train.EXIT_PREEMPTED: the trainer got SIGUSR1/SIGTERM, wrote a checkpoint, and
# stopped before train_iters.
EXIT_PREEMPTED=75

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
  # previous run is gone). 20000-29999 stays below Linux's ephemeral range (32768-60999).
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

# Run one command (a job step). If it stopped because of a preemption signal, requeue this job:
# it starts again later under the same job id and resumes from the newest complete checkpoint.
run_step() {
  echo "+ $*"
  local code=0
  "$@" || code=$?
  if [ "$code" -eq "$EXIT_PREEMPTED" ]; then
    echo "=== preempted: checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (needs #SBATCH --requeue)"
    exit 0
  fi
  return "$code"
}

# `--dry-run` as the first argument of an sbatch script: print the steps instead of running them.
dry_run_or_run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    run_step "$@"
  fi
}
