"""Faults during training, with real processes: a rank SIGKILLed mid-step and mid-save under
torchrun, non-finite losses and gradients under ZeRO-1/2, ks that drift apart across ranks, and
checkpoint directories that cannot take a checkpoint.

The torchrun test places its SIGKILLs with `mmoe_megatron.distributed.pause_point`: the chosen
rank pauses at a named point and writes its pid, and the test kills it there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.dist import free_port, run_distributed
from tests.helpers import ROOT, TINY, VOCAB, logged_steps, tiny_config
from tests.slurm_cluster import STEPS
from tests.slurm_cluster import TRAIN_ARGS as SLURM_TRAIN_ARGS
from tests.test_training_distributed import SEQ, global_tokens, make_batch

# --- a rank killed under torchrun ----------------------------------------------------------------

# The Slurm tests' training, whose uninterrupted run under torchrun is the session's
# `slurm_reference`; checkpoints and ks checks do not change its losses.
TRAIN_ARGS = ["--config", TINY, *SLURM_TRAIN_ARGS, "--checkpoint.save_interval=4",
              "--matryoshka.sync_check_interval=5"]


def _torchrun(run_dir, log_path, pause=None, pause_rank=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("MMOE_PAUSE_AT", "MMOE_PAUSE_RANK", "MMOE_PAUSE_FILE"):
        env.pop(key, None)
    if pause:
        env.update(MMOE_PAUSE_AT=pause, MMOE_PAUSE_RANK=str(pause_rank),
                   MMOE_PAUSE_FILE=f"{log_path}.pid")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "mmoe_megatron.train", *TRAIN_ARGS,
           f"--logging.dir={run_dir}"]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, log_path, timeout=300) -> str:
    proc.wait(timeout=timeout)
    with open(log_path) as f:
        return f.read()


def _kill_when_paused(proc, log_path) -> tuple[int, float, str]:
    """SIGKILL the paused rank; (torchrun's exit code, seconds from the kill to its exit, log)."""
    pid_file = f"{log_path}.pid"
    deadline = time.monotonic() + 240
    while not os.path.exists(pid_file):
        assert proc.poll() is None, _finish(proc, log_path)[-3000:]
        assert time.monotonic() < deadline, "the run never reached its pause point"
        time.sleep(0.1)
    with open(pid_file) as f:
        victim = int(f.read())
    os.remove(pid_file)
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job was still running 60 s after one of its ranks was SIGKILLed")
    return proc.returncode, time.monotonic() - start, _finish(proc, log_path)


def _latest(run_dir) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


@pytest.mark.slow
def test_sigkilled_rank_stops_the_job_and_relaunches_resume_exactly(tmp_path, slurm_reference):
    run = str(tmp_path / "run")
    # 1. Rank 1 dies at the start of step 7 (checkpoints are written every 4 steps).
    proc = _torchrun(run, str(tmp_path / "1.log"), pause="step_7", pause_rank=1)
    code, latency, log = _kill_when_paused(proc, str(tmp_path / "1.log"))
    print(f"\nrank 1 SIGKILLed mid-run: torchrun exited {code} after {latency:.2f} s")
    assert code != 0 and latency < 60
    root_cause = log[log.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause) and "SIGKILL" in root_cause
    assert _latest(run) == "step_00000004"

    # 2. The relaunch resumes at step 4; rank 0 dies writing checkpoint 8 (files written, no manifest).
    proc = _torchrun(run, str(tmp_path / "2.log"), pause="save_step_00000008", pause_rank=0)
    code, latency, log = _kill_when_paused(proc, str(tmp_path / "2.log"))
    print(f"rank 0 SIGKILLed mid-save: torchrun exited {code} after {latency:.2f} s")
    assert code != 0 and latency < 60
    assert f"resumed from {run}/checkpoints/step_00000004 at step 4" in log
    half_written = os.path.join(run, "checkpoints", "step_00000008")
    assert os.path.isfile(os.path.join(half_written, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert not os.path.exists(os.path.join(half_written, "COMPLETE.json"))
    assert _latest(run) == "step_00000004"

    # 3. The next relaunch ignores the half-written checkpoint, resumes at 4 and finishes.
    proc = _torchrun(run, str(tmp_path / "3.log"))
    log = _finish(proc, str(tmp_path / "3.log"))
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from {run}/checkpoints/step_00000004 at step 4" in log
    assert "step_00000008: its save did not finish" in log
    assert _latest(run) == f"step_{STEPS:08d}"
    # Every step, including those run twice, matches the uninterrupted run bit for bit.
    assert logged_steps(run) == slurm_reference
    assert sorted(logged_steps(run)) == list(range(1, STEPS + 1))


# --- in-process multi-rank tests (world 2, expert parallel 2) ------------------------------------

MBS, GBS = 2, 8  # 2 ranks x 2 micro-batches of 2


def config(tmp, **overrides):
    return tiny_config(**{
        "parallel.expert": 2, "data.seq_length": SEQ, "train.micro_batch_size": MBS,
        "train.global_batch_size": GBS, "train.train_iters": 20, "train.precision": "fp32",
        "optimizer.lr": 1e-3, "optimizer.warmup_iters": 1, "optimizer.clip_grad": 1.0,
        "logging.dir": str(tmp), "logging.tensorboard": False, **overrides,
    })


def _batches(trainer, tokens, step):
    return [make_batch(tokens, trainer.layout.sample_indices(step, m, trainer.dp_rank))
            for m in range(trainer.layout.num_microbatches)]


def _params(trainer):
    from mmoe_megatron.model import named_global_parameters

    return {n: p.detach().clone() for n, p in named_global_parameters(trainer.engine.module, trainer.cfg)}


def _optimizer_state(trainer):
    """ZeRO's fp32 master partitions and the Adam state (moments, step) of this rank."""
    zero = trainer.engine.optimizer
    masters = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]
    adam = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for s in zero.optimizer.state.values()]
    return masters, adam


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def _nonfinite_worker(rank, world_size, tmp, zero_stage):
    from mmoe_megatron import distributed
    from mmoe_megatron.training.trainer import NonFiniteLossError, Trainer

    class InjectingTrainer(Trainer):
        """Adds +inf to rank 0's loss at `inf_step`: an infinite loss whose gradient is finite."""
        inf_step = None

        def train_step(self, step, microbatches):
            self._step_now = step
            return super().train_step(step, microbatches)

        def loss(self, batch, step=0, microbatch=0):
            loss, ce = super().loss(batch, step, microbatch)
            if self._step_now == self.inf_step and self.rank == 0:
                return loss + float("inf"), ce + float("inf")
            return loss, ce

    cfg = config(tmp, **{"optimizer.zero_stage": zero_stage, "train.nonfinite_policy": "skip",
                         "train.max_nonfinite_steps": 2})
    distributed.init_distributed(cfg)
    tokens = global_tokens(cfg, 8)
    out = {}

    distributed.seed_everything(cfg.train.seed)
    trainer = InjectingTrainer(cfg, vocab_size=VOCAB, datasets=())
    trainer.train_step(0, _batches(trainer, tokens, 0))

    # Step 1: rank 1's loss is NaN (a poisoned loss mask). Nothing may change on any rank.
    before = (_params(trainer), _optimizer_state(trainer))
    bad = _batches(trainer, tokens, 1)
    if rank == 1:
        bad[0]["loss_mask"][0, 5] = float("nan")
    result = trainer.train_step(1, bad)
    out["nan_step"] = {"result": result, "unchanged": _same(before, (_params(trainer), _optimizer_state(trainer))),
                       "skipped_steps": trainer.engine.skipped_steps, "global_steps": trainer.engine.global_steps,
                       "streak": trainer.nonfinite_streak}
    trainer.train_step(2, _batches(trainer, tokens, 2))
    out["streak_after_good_step"] = trainer.nonfinite_streak
    after_two = _params(trainer)

    # Step 3: an infinite loss with finite gradients must be skipped as well.
    trainer.inf_step = 3
    before = (_params(trainer), _optimizer_state(trainer))
    result = trainer.train_step(3, _batches(trainer, tokens, 3))
    out["inf_step"] = {"result": result, "unchanged": _same(before, (_params(trainer), _optimizer_state(trainer)))}

    # Step 4: NaN weights in MoE layer 2's experts on rank 1 -> the second non-finite step in a row.
    with torch.no_grad():
        if rank == 1:
            for name, p in trainer.engine.module.named_parameters():
                if name.startswith("decoder.layers.2.mlp.experts.") and "linear_fc1" in name:
                    p.fill_(float("nan"))
    try:
        trainer.train_step(4, _batches(trainer, tokens, 4))
        out["streak_error"] = None
    except NonFiniteLossError as e:
        out["streak_error"] = str(e)
    # Policy stop counts every non-finite step of the run: this is the fourth.
    cfg.train.nonfinite_policy, cfg.train.max_nonfinite_steps = "stop", 4
    try:
        trainer.train_step(5, _batches(trainer, tokens, 5))
        out["stop_error"] = None
    except NonFiniteLossError as e:
        out["stop_error"] = str(e)

    # The reference never saw step 1: same start, steps 0 and 2 only.
    distributed.seed_everything(cfg.train.seed)
    reference = Trainer(config(f"{tmp}/ref", **{"optimizer.zero_stage": zero_stage}), vocab_size=VOCAB, datasets=())
    reference.train_step(0, _batches(reference, tokens, 0))
    reference.train_step(2, _batches(reference, tokens, 2))
    out["skip_equals_never_seen"] = _same(after_two, _params(reference))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_nonfinite_steps_are_skipped_on_every_rank_and_the_policy_stops(tmp_path, zero_stage):
    ranks = run_distributed(_nonfinite_worker, world_size=2, tmp=str(tmp_path), zero_stage=zero_stage)
    for r in ranks:
        nan = r["nan_step"]
        assert nan["result"]["loss"] != nan["result"]["loss"] and nan["result"]["skipped"] == 1.0
        assert nan["unchanged"], "a skipped step changed parameters or optimizer state"
        # DeepSpeed counts the step as taken and skipped; Adam's own step count did not move.
        assert nan["skipped_steps"] == 1 and nan["global_steps"] == 2 and nan["streak"] == 1
        assert r["streak_after_good_step"] == 0
        assert r["skip_equals_never_seen"]
        assert r["inf_step"]["result"]["loss"] == float("inf") and r["inf_step"]["unchanged"]
        message = r["streak_error"]
        assert message is not None and "at step 5" in message and "2 consecutive" in message
        assert "decoder layer 2 (MoE layer 2)" in message and "ks by MoE layer" in message
        assert "decoder.layers.2.mlp.experts.local_experts.4.linear_fc1.weight" in message
        assert r["stop_error"] is not None and "after 4 non-finite step(s)" in r["stop_error"]


def _desync_worker(rank, world_size, tmp, strategy):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from mmoe_megatron import distributed
    from mmoe_megatron.elastic import ElasticK, KDesyncError
    from mmoe_megatron.training.trainer import Trainer

    class SkewedK(ElasticK):
        """Rank 1 routes MoE layer 2 with other ks than the schedule's: another k for the layer,
        or, with per-token ks, another k for the first token."""

        def set_microbatch(self, step, microbatch=0):
            super().set_microbatch(step, microbatch)
            router = self.routers[2]
            if self.schedule.per_token:
                ks_SB = router._token_ks_SB.clone()
                ks_SB[0, 0] = 1 if ks_SB[0, 0] != 1 else 2
                router.set_token_ks(ks_SB, width=self.schedule.k_max)
            else:
                router.set_k(1 if self.layer_ks[2] != 1 else 2)

    cfg = config(tmp, **{"matryoshka.sync_check_interval": 1, "parallel.distributed_timeout_minutes": 3,
                         "matryoshka.strategy": strategy})
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg, vocab_size=VOCAB, datasets=())
    # Every process group, megatron's and those handed to DeepSpeed, fails a stuck collective
    # after the configured timeout instead of hanging.
    timeouts = {pg.group_desc: pg._get_backend(torch.device("cpu")).options._timeout
                for pg in c10d._world.pg_map}
    tokens = global_tokens(cfg, 3)
    trainer.train_step(0, _batches(trainer, tokens, 0))
    before = (_params(trainer), _optimizer_state(trainer))
    if rank == 1:
        trainer.elastic = SkewedK.from_config(trainer.engine.module, cfg, trainer.dp_rank, trainer.dp_size)
    try:
        trainer.train_step(1, _batches(trainer, tokens, 1))
        error = None
    except KDesyncError as e:
        error = str(e)
    dist.barrier()
    return {"error": error, "unchanged": _same(before, (_params(trainer), _optimizer_state(trainer))),
            "timeouts": {k: v.total_seconds() for k, v in timeouts.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("strategy, names_rank_1", [
    ("layerwise", "rank 1 used k="), ("token", "per-token ks differ from the schedule on rank 1 (1 tokens)")])
def test_desynchronised_ks_stop_the_step_before_its_update(tmp_path, strategy, names_rank_1):
    ranks = run_distributed(_desync_worker, world_size=2, tmp=str(tmp_path), strategy=strategy)
    for r in ranks:
        assert r["error"] is not None and "MoE layer 2" in r["error"] and names_rank_1 in r["error"], r["error"]
        assert r["unchanged"], "the optimizer update ran with desynchronised ks"
        assert len(r["timeouts"]) > 10 and set(r["timeouts"].values()) == {180.0}, r["timeouts"]


def _disk_worker(rank, world_size, tmp):
    import collections
    import shutil as real_shutil

    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.training import checkpoint as ckpt
    from mmoe_megatron.training.trainer import Trainer

    def error_of(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except ckpt.CheckpointError as e:
            return str(e)
        return None

    out = {}
    cfg = config(tmp)
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg, vocab_size=VOCAB, datasets=())
    tokens = global_tokens(cfg, 3)
    trainer.train_step(0, _batches(trainer, tokens, 0))
    trainer.step = 1
    size = trainer.checkpoint_bytes
    out["estimate"] = size

    # A file where the checkpoint directory should be: refused before training, naming it.
    blocked = os.path.join(tmp, "blocked")
    if rank == 0:
        open(blocked, "w").close()
    dist.barrier()
    out["unwritable"] = error_of(ckpt.check_checkpoint_dir, os.path.join(blocked, "checkpoints"), size, 2)

    # Room for one checkpoint but not for keep_last + 1: refused before training.
    ckpt_dir = cfg.checkpoint_dir
    Usage = collections.namedtuple("Usage", "total used free")
    ckpt.shutil.disk_usage = lambda path: Usage(10 * size, 9 * size, int(1.5 * size))
    out["preflight"] = error_of(ckpt.check_checkpoint_dir, ckpt_dir, size, 2)
    ckpt.shutil.disk_usage = real_shutil.disk_usage
    trainer.save()
    # A nearly full disk: the save stops before writing anything; 'latest' is untouched.
    ckpt.shutil.disk_usage = lambda path: Usage(10 * size, 9 * size, size // 2)
    trainer.step = 2
    out["save_when_full"] = error_of(trainer.save)
    ckpt.shutil.disk_usage = real_shutil.disk_usage
    out["after_refused_save"] = sorted(os.listdir(ckpt_dir))

    # A disk that really fills up half-way through a save (a small tmpfs; needs mount rights).
    small = os.path.join(tmp, "small")
    mounted = False
    if rank == 0:
        os.makedirs(small)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.4 * size)}", "tmpfs", small],
                                 capture_output=True).returncode == 0
    mounted = ckpt._broadcast(mounted)
    out["mounted"] = mounted
    if mounted:
        try:
            ckpt.save_checkpoint(trainer.engine, cfg, small, 1, trainer.trainer_state())
            out["full_disk"] = error_of(ckpt.save_checkpoint, trainer.engine, cfg, small, 2,
                                        trainer.trainer_state())
            out["full_disk_left"] = sorted(os.listdir(small))
            with open(os.path.join(small, "latest")) as f:
                out["full_disk_latest"] = f.read()
        finally:
            dist.barrier()
            if rank == 0:
                subprocess.run(["umount", small])
    return out


@pytest.mark.slow
def test_unwritable_or_full_checkpoint_directory_fails_clearly(tmp_path):
    ranks = run_distributed(_disk_worker, world_size=2, tmp=str(tmp_path))
    blocked = str(tmp_path / "blocked" / "checkpoints")
    ckpt_dir = str(tmp_path / "checkpoints")
    for r in ranks:
        assert r["estimate"] > 8_000_000  # tiny EP-2 model: 8.9 MB measured on disk
        assert f"checkpoint directory {blocked} is not writable" in r["unwritable"]
        assert "set checkpoint.dir" in r["unwritable"]
        assert "not enough disk space" in r["preflight"] and ckpt_dir in r["preflight"]
        assert "keep_last=2" in r["preflight"] and "lower checkpoint.keep_last" in r["preflight"]
        assert f"cannot save checkpoint {ckpt_dir}/step_00000002" in r["save_when_full"]
        assert "'latest' still names the previous one" in r["save_when_full"]
        assert "step_00000002" not in r["after_refused_save"] and "step_00000001" in r["after_refused_save"]
        if r["mounted"]:
            assert "saving checkpoint" in r["full_disk"] and "partial directory was removed" in r["full_disk"]
            assert "step_00000002" not in r["full_disk_left"] and r["full_disk_latest"] == "step_00000001"
    if not ranks[0]["mounted"]:
        pytest.skip("could not mount a small tmpfs to fill up; the disk-full-mid-save part did not run")
