"""Checkpoints that are complete or ignored, and that give every expert-parallel rank its experts.

Layout of one checkpoint, `<dir>/step_00000100/`:
    (DeepSpeed)  mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt
                 the ZeRO shards hold the fp32 master weights and Adam moments of every rank
    model/rank_00000.safetensors ...   weights under global names (experts renumbered
                 globally), written by the rank that owns them: dense by data-parallel rank 0,
                 experts by expert-data-parallel rank 0. Layout-independent: evaluation and
                 export read these with any number of ranks.
    rng/rank_00000.safetensors ...     each rank's torch and megatron RNG states
    trainer_state.json                 step, consumed samples, k-schedule fingerprint, layout
    COMPLETE.json                      written last: every file with its size and sha256
and `<dir>/latest` names the newest checkpoint whose manifest was written.

Why the safetensors copy: DeepSpeed writes model states from data-parallel rank 0 only
(engine.py:5292), i.e. expert-parallel rank 0's experts. Resuming restores every rank's
weights from its own fp32 master shard (`update_lp_params`), and then checks them against the
safetensors shards bit for bit, so a rank that got another rank's experts stops the run.

Pickle: DeepSpeed's own files are read with its loader (torch.load with pickle), only from a
checkpoint directory this run family wrote and whose checksums match its manifest. Everything
else here is JSON or safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mmoe_megatron.layout import is_expert_param, local_name

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "COMPLETE.json"
STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files_under(root: str) -> list[str]:
    out = []
    for base, _, names in os.walk(root):
        for name in names:
            if name == MANIFEST or ".tmp." in name:
                continue
            out.append(os.path.relpath(os.path.join(base, name), root))
    return sorted(out)


# --- saving -------------------------------------------------------------------------------------


def owned_state(model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """This rank's share of the global weights (empty on ranks that own nothing)."""
    from megatron.core import parallel_state as ps

    from mmoe_megatron.model import named_global_parameters

    writes_dense = ps.get_data_parallel_rank() == 0
    writes_experts = ps.get_expert_data_parallel_rank() == 0
    out = {}
    for name, param in named_global_parameters(model, cfg):
        if (writes_experts if is_expert_param(name) else writes_dense):
            out[name] = param.detach().to("cpu").clone().contiguous()
    return out


def rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = value if torch.is_tensor(value) else value.get_state()
    return {k: v.cpu().contiguous() for k, v in state.items()}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


def save_checkpoint(engine, cfg, ckpt_dir: str, step: int, trainer_state: dict) -> str:
    """Collective. Writes `<ckpt_dir>/step_<step>` and then points `latest` at it.

    A failure on any rank (disk full, unwritable directory) fails every rank with the reason;
    `latest` keeps naming the previous complete checkpoint.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    rank = _rank()
    error = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            if os.path.isdir(path):  # left by an attempt that died before its manifest
                shutil.rmtree(path)
        except OSError as e:
            error = f"rank 0: {e}"
    _raise_if_any(error, f"cannot prepare checkpoint directory {path}")
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
        weights = owned_state(engine.module, cfg)
        os.makedirs(os.path.join(path, "model"), exist_ok=True)
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        if weights:
            save_file(weights, os.path.join(path, "model", f"rank_{rank:05d}.safetensors"))
        save_file(rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.safetensors"))
        if rank == 0:
            atomic_write_text(os.path.join(path, STATE), json.dumps(trainer_state, indent=2))
    except Exception as e:  # noqa: BLE001 - every failure must reach every rank, not hang them
        error = f"rank {rank}: {type(e).__name__}: {e}"
    _raise_if_any(error, f"saving checkpoint {path} failed; 'latest' still names the previous one")

    # Checksums: each rank hashes its share of the files; rank 0 writes the manifest last.
    _barrier()
    files = _files_under(path) if rank == 0 else None
    files = _broadcast(files)
    mine = {f: [os.path.getsize(os.path.join(path, f)), sha256(os.path.join(path, f))]
            for f in files[rank::_world()]}
    table = {}
    for part in _gather(mine):
        table.update(part)
    if rank == 0:
        manifest = {"tag": tag, "step": step, "files": table}
        atomic_write_text(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1))
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        prune(ckpt_dir, keep_last=cfg.checkpoint.keep_last)
    _barrier()
    return path


def _raise_if_any(error: Optional[str], what: str) -> None:
    errors = [e for e in _gather(error) if e]
    if errors:
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(errors))


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Delete complete checkpoints older than the newest `keep_last`, and stale incomplete ones."""
    tags = complete_checkpoints(ckpt_dir)
    for tag in tags[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    newest = tags[-1] if tags else None
    for name in os.listdir(ckpt_dir):
        full = os.path.join(ckpt_dir, name)
        if name.startswith("step_") and os.path.isdir(full) and name not in tags and newest and name < newest:
            shutil.rmtree(full, ignore_errors=True)


# --- finding and verifying ----------------------------------------------------------------------


def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Tags with a manifest, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        name for name in os.listdir(ckpt_dir)
        if name.startswith("step_") and os.path.isfile(os.path.join(ckpt_dir, name, MANIFEST))
    )


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None if the checkpoint at `path` is intact, else what is wrong with it."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{path} has no {MANIFEST} (the save did not finish)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest_path} is unreadable: {e}"
    for rel, (size, digest) in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        if os.path.getsize(full) != size:
            return f"{full} has {os.path.getsize(full)} bytes, expected {size} (truncated?)"
        if checksums and sha256(full) != digest:
            return f"{full} does not match its checksum (corrupted)"
    return None


def find_resume_checkpoint(ckpt_dir: str) -> Optional[str]:
    """The newest intact checkpoint, starting from `latest` and falling back to older ones with a
    warning. Collective: rank 0 decides, every rank gets the same answer."""
    choice = None
    if _rank() == 0:
        candidates = complete_checkpoints(ckpt_dir)
        latest_file = os.path.join(ckpt_dir, LATEST)
        if os.path.isfile(latest_file):
            with open(latest_file) as f:
                named = f.read().strip()
            if named in candidates:  # prefer what `latest` names, then anything older
                candidates = [c for c in candidates if c <= named]
        for tag in reversed(candidates):
            problem = verify(os.path.join(ckpt_dir, tag))
            if problem is None:
                choice = tag
                break
            logger.warning("skipping checkpoint %s: %s; trying an older one", tag, problem)
    return _broadcast(choice)


# --- loading ------------------------------------------------------------------------------------


def load_checkpoint(engine, cfg, ckpt_dir: str, tag: str) -> dict:
    """Collective. Restore model, optimizer and RNG from `<ckpt_dir>/<tag>`; returns the trainer
    state. Raises CheckpointError if any rank's weights differ from the saved ones."""
    path = os.path.join(ckpt_dir, tag)
    load_path, _ = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    # The module states DeepSpeed just loaded hold expert-parallel rank 0's experts on every rank;
    # the fp32 master shards hold each rank's own. Rebuild the weights from the masters.
    engine.optimizer.update_lp_params()
    mismatched = check_weights(engine.module, cfg, path)
    _raise_if_any(
        f"rank {_rank()}: {', '.join(mismatched[:5])}" if mismatched else None,
        f"weights restored from {path} differ from the saved ones",
    )
    set_rng_state(load_file(os.path.join(path, "rng", f"rank_{_rank():05d}.safetensors")))
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def check_weights(model: torch.nn.Module, cfg, path: str) -> list[str]:
    """Names of this rank's parameters that differ from the checkpoint's safetensors weights."""
    from mmoe_megatron.model import named_global_parameters

    saved = load_global_state_dict(path)
    bad = []
    for name, param in named_global_parameters(model, cfg):
        ref = saved.get(name)
        if ref is None or not torch.equal(param.detach().cpu(), ref.to(param.dtype)):
            bad.append(name)
    return bad


def load_global_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint under global names, whatever layout wrote it."""
    folder = os.path.join(path, "model")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} has no model/ folder; is it a checkpoint of this project?")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            for key, value in load_file(os.path.join(folder, name)).items():
                if key in out:
                    raise CheckpointError(f"{key} appears twice in {folder}")
                out[key] = value
    return out


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, cfg, global_sd: dict[str, torch.Tensor]) -> None:
    """Copy global weights into a model of any expert-parallel layout (this rank's share)."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    num_local = cfg.moe.num_experts // ps.get_expert_model_parallel_world_size()
    wanted = {}
    for name in global_sd:
        local = local_name(name, ep_rank, num_local)
        if local is not None:
            wanted[local] = name
    missing = []
    for name, param in model.named_parameters():
        source = wanted.get(name)
        if source is None:
            missing.append(name)
            continue
        param.copy_(global_sd[source].to(param.dtype))
    if missing:
        raise CheckpointError(f"weights missing for {len(missing)} parameters, e.g. {missing[:3]}")
