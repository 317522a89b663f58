"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd daemons
(`slurmd -N node1`, `-N node2`, which Debian's build allows with MULTIPLE_SLURMD) started from a
throw-away folder on free ports, and stopped by their pid files afterwards.

    with SlurmCluster(tmp_dir) as cluster:
        proc = cluster.run(["sbatch", "--wait", ...])   # SLURM_CONF points at this cluster

The packages come from Debian (`slurmctld slurmd slurm-client munge`); `ensure_installed()`
installs them with apt-get when they are missing and says why when it cannot.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from mmoe_megatron.ports import free_ports

# What the tests train on the cluster: CPU ranks with gloo, expert parallelism 2 across the two
# emulated nodes, enough steps (about 0.25 s each) that a run is still going when a test
# interferes with it.
STEPS = 20
TRAIN_ARGS = [
    "--data.mock=true", "--model.vocab_size=256", "--data.seq_length=32",
    "--train.micro_batch_size=2", "--train.global_batch_size=8", f"--train.train_iters={STEPS}",
    "--train.eval_interval=0", "--train.eval_iters=1", "--train.log_interval=1",
    "--optimizer.warmup_iters=1", "--checkpoint.save_interval=0", "--logging.tensorboard=false",
    "--parallel.expert=2",
]
# The ranks' environment: one thread each (two ranks share this machine's cores).
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable}

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel"]
NODES = ["node1", "node2"]
CPUS_PER_NODE = 2


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def ensure_installed() -> str | None:
    """None when the daemons and clients are present (installing them if needed), else why not."""
    if not _missing():
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and there is no apt-get"
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}"
    return None if not _missing() else f"installed {PACKAGES} but still missing {_missing()}"


class SlurmCluster:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"
        # Settings a job inherits from the tests' own environment would confuse it.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_")) and key != "SLURM_CONF":
                del self.env[key]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)
        self._pid_files: list[str] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # --- bring-up ------------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for d in ("munge", "state", "log", *(os.path.join("spool", n) for n in NODES)):
            os.makedirs(self.path(d), exist_ok=True)
        # munged refuses a socket folder others can write to or list, and a readable key.
        os.chmod(self.root, 0o755)
        os.chmod(self.path("munge"), 0o711)
        key = self.path("munge", "munge.key")
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env=self.env)
        os.chmod(key, 0o600)
        socket_path = self.path("munge", "munge.socket")
        self._daemon(["munged", f"--socket={socket_path}", f"--key-file={key}",
                      f"--pid-file={self.path('munge', 'munged.pid')}",
                      f"--log-file={self.path('log', 'munged.log')}",
                      f"--seed-file={self.path('munge', 'munged.seed')}", "--force"],
                     self.path("munge", "munged.pid"))
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        self._write_conf(socket_path, ctld_port, node_ports)
        self._daemon(["slurmctld", "-f", self.conf], self.path("slurmctld.pid"))
        for node in NODES:
            self._daemon(["slurmd", "-f", self.conf, "-N", node], self.path(f"slurmd.{node}.pid"))
        self._wait_until_idle()

    def _write_conf(self, socket_path: str, ctld_port: int, node_ports: list[int]) -> None:
        nodes = f"node[1-{len(NODES)}]"
        lines = [
            "ClusterName=mmoetest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays a requeued job's restart (default 120 s).
            f"AuthInfo=socket={socket_path},cred_expire=5",
            f"StateSaveLocation={self.path('state')}",
            f"SlurmdSpoolDir={self.path('spool', '%n')}",
            f"SlurmctldPidFile={self.path('slurmctld.pid')}",
            f"SlurmdPidFile={self.path('slurmd.%n.pid')}",
            f"SlurmctldLogFile={self.path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self.path('log', 'slurmd.%n.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            # Emulated nodes claim CPUs the host may not have.
            "SlurmdParameters=config_overrides",
            # Start batch jobs at once (default: 3 s delay) and let `sbatch --wait` poll every 2 s.
            "SchedulerParameters=batch_sched_delay=0",
            "MinJobAge=4",
            "KillWait=10",
            # Requeue only jobs that ask for it (#SBATCH --requeue), as the scripts in slurm/ do.
            "JobRequeue=0",
            # Job ids (and with them the jobs' MASTER_PORT) differ between clusters started at once.
            f"FirstJobId={random.randrange(1, 9000)}",
            f"NodeName={nodes} NodeHostname={self.host} NodeAddr=127.0.0.1 "
            f"Port={node_ports[0]}-{node_ports[-1]} CPUs={CPUS_PER_NODE} State=UNKNOWN",
            f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _daemon(self, cmd: list[str], pid_file: str) -> None:
        self._pid_files.append(pid_file)
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        deadline = time.monotonic() + 30
        while not os.path.exists(pid_file):
            if time.monotonic() > deadline:
                raise RuntimeError(f"`{cmd[0]}` wrote no pid file {pid_file}\n{self.logs()}")
            time.sleep(0.1)

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if [states.get(n) for n in NODES] == ["idle"] * len(NODES):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout} s: {states} {proc.stderr}\n{self.logs()}")
            time.sleep(0.5)

    # --- use -----------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.path("log"))) if os.path.isdir(self.path("log")) else []:
            with open(self.path("log", name), errors="replace") as f:
                out.append(f"--- {name}\n" + f.read()[-2000:])
        return "\n".join(out)

    # --- faults --------------------------------------------------------------------------------

    def job_processes(self, job: str, node: str) -> list[int]:
        """Tasks of `job` on `node` of this cluster (found by their Slurm environment)."""
        wanted = {f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode(),
                  f"SLURM_CONF={self.conf}".encode()}
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
            except OSError:
                continue
            if wanted <= env and int(pid) != os.getpid():
                found.append(int(pid))
        return found

    def lose_node(self, node: str, job: str) -> list[int]:
        """What a node failure looks like to the rest of the cluster: SIGKILL the node's slurmd, the
        slurmstepd of each of `job`'s steps there and their tasks. Returns the killed pids."""
        tasks = self.job_processes(job, node)
        stepds = {_parent(pid) for pid in tasks}
        stepds = {pid for pid in stepds if pid and _cmdline(pid).startswith("slurmstepd")}
        with open(self.path(f"slurmd.{node}.pid")) as f:
            slurmd = int(f.read().strip())
        killed = []
        for pid in [slurmd, *stepds, *tasks]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                continue
        return killed

    def hostnames(self, nodelist: str) -> list[str]:
        """`node[1-2]` -> ["node1", "node2"]."""
        if not nodelist:
            return []
        return self.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()

    def node_state(self, node: str) -> str:
        proc = self.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], check=False)
        return proc.stdout.strip()

    def restart_node(self, node: str, timeout: float = 120) -> None:
        """Start `node`'s slurmd again (after `lose_node`) and wait until slurmctld has it back."""
        pid_file = self.path(f"slurmd.{node}.pid")
        with open(pid_file) as f:
            old = f.read().strip()
        if _alive(int(old)):
            return
        proc = subprocess.run(["slurmd", "-f", self.conf, "-N", node], env=self.env, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"restarting slurmd {node} failed: {proc.stderr}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while True:
            with open(pid_file) as f:
                if f.read().strip() != old and "*" not in self.node_state(node):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurmd {node} not back after {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    # --- tear-down -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the daemons by their pid files: the Slurm daemons together, then munged."""
        slurm = [p for p in self._pid_files if "munge" not in p]
        munge = [p for p in self._pid_files if "munge" in p]
        for group in (slurm, munge):
            pids = []
            for pid_file in group:
                try:
                    with open(pid_file) as f:
                        pid = int(f.read().strip())
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except (OSError, ValueError):
                    continue
            deadline = time.monotonic() + 15
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _alive(pid)]
                time.sleep(0.1)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()


def submit_waiting(cluster: SlurmCluster, *args: str, env=None) -> tuple[subprocess.Popen, str]:
    """`python -m mmoe_megatron.slurm submit ARGS --wait` in the background on `cluster`; returns the
    process and the job id, read from the line the helper prints as soon as the job is queued."""
    from tests.helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "mmoe_megatron.slurm", "submit", *args, "--wait"], cwd=ROOT,
                            env={**cluster.env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = re.match(r"job (\d+) queued", line)
        if found:
            return proc, found.group(1)
    proc.wait()
    raise AssertionError("the submit helper printed no job id:\n" + "".join(seen))


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
