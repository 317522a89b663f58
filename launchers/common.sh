# Shared by the local launchers (sourced, not run).

# The interpreter: $PYTHON if set; else the active virtual environment's python; else the
# project's .venv (what `make setup` creates) when it exists; else python on PATH.
pick_python() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    echo "$VIRTUAL_ENV/bin/python"
  elif [ -x "$root/.venv/bin/python" ]; then
    echo "$root/.venv/bin/python"
  else
    echo python
  fi
}

# The rendezvous port: $MASTER_PORT if set. One node: a port that is free now, so that two local
# jobs never collide, drawn outside the ephemeral range (mmoe_megatron.ports says why). Several
# nodes must agree on it without talking, so they use 29500 unless MASTER_PORT says otherwise.
pick_port() {
  local python="$1" nnodes="$2"
  if [ -n "${MASTER_PORT:-}" ]; then
    echo "$MASTER_PORT"
  elif [ "$nnodes" = 1 ]; then
    "$python" -m mmoe_megatron.ports
  else
    echo 29500
  fi
}
