"""Checkpoints that were damaged or tampered with after they were written, on 2 real ranks with
expert parallelism 2: a flipped byte, a truncated file, a file slipped in, and a DeepSpeed pickle
replaced by one that would run code (with its manifest entry forged to match).

The expected outcomes are stated independently of the loader: the state to fall back to is the
parameters recorded in memory when that checkpoint was saved, and the code-running pickle
leaves a marker file if it is ever executed.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from tests.dist import run_distributed
from tests.helpers import VOCAB
from tests.test_reliability import _batches, _params, config
from tests.test_training_distributed import global_tokens


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _sha256(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _integrity_worker(rank, world_size, tmp):
    import torch.distributed as dist

    from mmoe_megatron import distributed
    from mmoe_megatron.training import checkpoint as ckpt
    from mmoe_megatron.training.trainer import Trainer

    def outcome(fn, *args):
        try:
            return "ok", fn(*args)
        except ckpt.CheckpointError as e:
            return "error", str(e)

    cfg = config(tmp, **{"checkpoint.keep_last": 5})
    distributed.init_distributed(cfg)
    trainer = Trainer(cfg, vocab_size=VOCAB, datasets=())
    tokens = global_tokens(cfg, 4)
    saved = {}
    for step in range(3):
        trainer.train_step(step, _batches(trainer, tokens, step))
        trainer.step = step + 1
        trainer.save()
        saved[trainer.step] = _params(trainer)
    ckpt_dir = cfg.checkpoint_dir
    step3, step2, step1 = (os.path.join(ckpt_dir, ckpt.tag_for(s)) for s in (3, 2, 1))
    out = {}

    # 1. One flipped byte in rank 1's expert weights of the newest checkpoint: fall back to step 2
    #    and restore exactly the parameters held when step 2 was saved.
    if rank == 0:
        weights = os.path.join(step3, "model", sorted(os.listdir(os.path.join(step3, "model")))[-1])
        with open(weights, "r+b") as f:
            f.seek(os.path.getsize(weights) - 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    status, found = outcome(ckpt.resume, trainer.engine, cfg, ckpt_dir)
    out["flipped"] = (status, found[0] if status == "ok" else found)
    out["restored_step2_exactly"] = status == "ok" and all(
        torch.equal(p, saved[2][n]) for n, p in _params(trainer).items())

    # 2. Step 2 truncated as well (a DeepSpeed optimizer shard cut short): back to step 1.
    if rank == 0:
        shard = os.path.join(step2, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    dist.barrier()
    out["truncated"] = ckpt.find_resume_checkpoint(ckpt_dir)

    # 3. A file slipped into step 1 after its save: refused, and with nothing intact left the
    #    run stops rather than silently starting afresh.
    if rank == 0:
        with open(os.path.join(step1, "rng", "extra.json"), "w") as f:
            f.write("{}")
    dist.barrier()
    out["none_intact"] = outcome(ckpt.find_resume_checkpoint, ckpt_dir)
    if rank == 0:
        os.remove(os.path.join(step1, "rng", "extra.json"))
    dist.barrier()

    # 4. Step 1's model states replaced by a code-running pickle, its manifest entry forged to
    #    match: refused before unpickling, on every rank, and the code never runs.
    marker = os.path.join(tmp, "PWNED")
    if rank == 0:
        target = "mp_rank_00_model_states.pt"
        torch.save({"module": _RunsCode(marker)}, os.path.join(step1, target))
        manifest_path = os.path.join(step1, ckpt.MANIFEST)
        with open(manifest_path) as f:
            manifest = json.load(f)
        full = os.path.join(step1, target)
        manifest["files"][target] = [os.path.getsize(full), _sha256(full)]
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
    dist.barrier()
    out["tampered"] = outcome(ckpt.load_checkpoint, trainer.engine, cfg, ckpt_dir, ckpt.tag_for(1))
    # Even past the scan, DeepSpeed's own torch.load runs with the restricted unpickler.
    with ckpt.weights_only_unpickling():
        try:
            torch.load(os.path.join(step1, "mp_rank_00_model_states.pt"), weights_only=False)
            out["forced_weights_only"] = "loaded"
        except pickle.UnpicklingError as e:
            out["forced_weights_only"] = str(e)
    out["code_ran"] = os.path.exists(marker)
    return out


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_or_stop_and_pickles_never_run_code(tmp_path):
    ranks = run_distributed(_integrity_worker, world_size=2, tmp=str(tmp_path))
    ckpt_dir = str(tmp_path / "checkpoints")
    for r in ranks:
        assert r["flipped"] == ("ok", f"{ckpt_dir}/step_00000002"), r["flipped"]
        assert r["restored_step2_exactly"]
        assert r["truncated"] == "step_00000001"
        status, message = r["none_intact"]
        assert status == "error" and f"no intact checkpoint to resume from in {ckpt_dir}" in message
        assert "step_00000003" in message and "checksum" in message
        assert "step_00000002" in message and "truncated" in message
        assert "rng/extra.json is not listed" in message
        status, message = r["tampered"]
        assert status == "error" and "would run or import" in message and "posix.system" in message
        assert "weights_only" in r["forced_weights_only"] or "Unsupported global" in r["forced_weights_only"]
        assert not r["code_ran"], "unpickling a checkpoint file ran code"


def test_a_bare_pickle_in_a_checkpoint_is_refused_unread(tmp_path):
    from mmoe_megatron.training import checkpoint as ckpt

    marker = tmp_path / "PWNED"
    path = tmp_path / "step_00000001"
    path.mkdir()
    target = path / "mp_rank_00_model_states.pt"
    with open(target, "wb") as f:
        pickle.dump({"module": _RunsCode(marker)}, f)
    with open(path / ckpt.MANIFEST, "w") as f:
        json.dump({"files": {target.name: [os.path.getsize(target), _sha256(target)]}}, f)
    problem = ckpt.verify(str(path))
    assert problem == f"{target} is not a torch.save archive; refusing to unpickle it"
    assert not marker.exists()
