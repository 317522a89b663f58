"""Checkpoints that are complete or ignored, and that give every expert-parallel rank its experts.

Layout of one checkpoint, `<dir>/step_00000100/`:
    (DeepSpeed)  mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt
                 the ZeRO shards hold the fp32 master weights and Adam moments of every rank
    model/rank_00000.safetensors ...   weights under global names (experts renumbered
                 globally), written by the rank that owns them: dense by data-parallel rank 0,
                 experts by expert-data-parallel rank 0. Layout-independent: evaluation and
                 export read these with any number of ranks.
    optim/rank_00000.safetensors ...   the optimizer state (Adam moments; fp32 masters under bf16)
                 under the same global names, by the same ranks (`optimizer_state`); with
                 checkpoint.layout_free_optimizer, the default
    rng/rank_00000.safetensors ...     each rank's torch and megatron RNG states
    trainer_state.json                 step, consumed samples, k-schedule fingerprint, layout
    COMPLETE.json                      written last: every file with its size and sha256
and `<dir>/latest` names the newest checkpoint whose manifest was written.

Why the safetensors copy: DeepSpeed writes model states from data-parallel rank 0 only
(engine.py:5292), i.e. expert-parallel rank 0's experts. Resuming restores every rank's
weights from its own fp32 master shard (`update_lp_params`), and then checks them against the
safetensors shards bit for bit, so a rank that got another rank's experts stops the run.

Another layout. A resume with the layout that wrote the checkpoint loads DeepSpeed's ZeRO shards
(bitwise). With another world size, expert-parallel size or ZeRO stage, ZeRO's shards do not fit
(DeepSpeed refuses a different data-parallel size) and the run is rebuilt from the global
weights and optimizer state instead (`optimizer_state.restore_local`); RNG states are then
reseeded, not restored (each rank's streams depend on the layout anyway). Changes that cannot be
supported stop with what to do instead (`optimizer_state.layout_change_problem`).

Integrity. The manifest is written after every other file and `latest` after the manifest, so a
save that dies part-way (SIGKILL, disk full) leaves `latest` naming the previous checkpoint; the
half-written directory is ignored and removed by the next save. Before anything of a checkpoint
is read, the ranks hash its files between them against the manifest, and a file the manifest
does not list is refused as well. Resuming (`checkpoint.load: auto`) falls back from a damaged
checkpoint to the next older intact one with a warning, and stops with an error when
checkpoints exist but none is intact.

Pickle. DeepSpeed writes its model and ZeRO files with torch.save, and DeepSpeed 0.19.8 reads
them with `torch.load(..., weights_only=False)` (runtime/checkpoint_engine/
torch_checkpoint_engine.py:35), i.e. with the full unpickler, which can run arbitrary code.
It is confined three ways: (1) only files of a checkpoint this run family wrote are opened, after
their sha256 matched the manifest; (2) every rank scans the pickles of its share of the files
without executing them (`torch.serialization.get_unsafe_globals_in_checkpoint`) and any global
besides tensors and three plain DeepSpeed classes (`_deepspeed_pickle_classes`) stops the load on
all ranks, and a `.pt` file that is not a torch.save zip archive is refused unread; (3) DeepSpeed's load runs under `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`, which makes
torch.load use its restricted unpickler despite the explicit `weights_only=False`
(torch/serialization.py:1480-1494). A tampered file is therefore refused before unpickling, and
one whose manifest entry was forged too is still refused. Everything else here is JSON or
safetensors.

Disk space. `estimate_checkpoint_bytes` sizes a checkpoint from the parameter count;
`check_checkpoint_dir` runs before training (writable on every rank, room for the checkpoints
the run keeps) and each save first checks for room for one more, so that a full disk stops the
run with the directory and the remedy named instead of failing half-way through DeepSpeed's
writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import zipfile
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mmoe_megatron.distributed import pause_point
from mmoe_megatron.layout import is_expert_param, local_name
from mmoe_megatron.training import optimizer_state
from mmoe_megatron.training.checkpoint_names import LATEST, MANIFEST, STATE, complete_checkpoints, tag_for

logger = logging.getLogger(__name__)

SPACE_MARGIN = 1.1
"""Free space asked for beyond the estimated checkpoint size (estimates ignore pickle framing)."""


class CheckpointError(RuntimeError):
    pass


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


def raise_if_any(error: Optional[str], what: str, remove: Optional[str] = None) -> None:
    """Collective: raise CheckpointError on every rank if any rank reports an error, after rank 0
    has deleted the directory `remove` (a partly written checkpoint) if one is given."""
    errors = [e for e in _gather(error) if e]
    if errors:
        if remove is not None:
            if _rank() == 0:
                shutil.rmtree(remove, ignore_errors=True)
            _barrier()  # no rank goes on (or reports the directory removed) before it is gone
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(errors))


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


# --- disk space ---------------------------------------------------------------------------------


def estimate_checkpoint_bytes(cfg, vocab_size: int) -> int:
    """Size of one checkpoint on disk, from the parameter count P (all experts included).

    DeepSpeed's module states hold at most P weights, the ZeRO shards together hold the fp32
    master weights and both Adam moments (12 P bytes), and model/ holds P weights again:
    20 P bytes with fp32 weights, 16 P with bf16. The layout-free optimizer state (optim/) adds
    the two moments, and the masters under bf16: 8 P more with fp32 weights, 12 P with bf16.
    Plus 1 MiB for RNG states and JSON.
    """
    from mmoe_megatron.config.derive import param_counts

    weight_bytes = 2 if cfg.train.precision == "bf16" else 4
    per_param = 2 * weight_bytes + 12
    if cfg.checkpoint.layout_free_optimizer:
        per_param += 8 if cfg.train.precision == "fp32" else 12
    return param_counts(cfg, vocab_size).total * per_param + (1 << 20)


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def _space_problem(ckpt_dir: str, needed: int, why: str) -> Optional[str]:
    free = shutil.disk_usage(ckpt_dir).free
    if free >= needed:
        return None
    return (f"{ckpt_dir} has {_gb(free)} free but {why} needs about {_gb(needed)}. Free space "
            "there, set checkpoint.dir to a filesystem with room, or lower checkpoint.keep_last")


def check_checkpoint_dir(ckpt_dir: str, checkpoint_bytes: int, keep_last: int) -> None:
    """Collective, before training: every rank can create and write files in `ckpt_dir`, and its
    filesystem has room for the checkpoints the run will hold at once (`keep_last` plus the one
    being written, less those already there), so that neither problem surfaces hours later."""
    error = None
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        probe = os.path.join(ckpt_dir, f".write_test.tmp.{_rank()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        error = f"rank {_rank()}: {e}"
    raise_if_any(error, f"checkpoint directory {ckpt_dir} is not writable; make it writable, or "
                        "set checkpoint.dir (or logging.dir) to a directory this job can write")
    if _rank() == 0:
        existing = min(len(complete_checkpoints(ckpt_dir)), keep_last)
        count = keep_last + 1 - existing
        needed = int(count * checkpoint_bytes * SPACE_MARGIN)
        error = _space_problem(
            ckpt_dir, needed,
            f"the run (keep_last={keep_last} checkpoints plus one being written, {existing} already "
            f"there; {count} x {_gb(checkpoint_bytes)} estimated from the parameter count, "
            f"+{SPACE_MARGIN - 1:.0%})",
        )
    raise_if_any(error, "not enough disk space for checkpoints")


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


def save_checkpoint(engine, cfg, ckpt_dir: str, step: int, trainer_state: dict,
                    checkpoint_bytes: Optional[int] = None) -> str:
    """Collective. Writes `<ckpt_dir>/step_<step>` and then points `latest` at it.

    With `checkpoint_bytes` (see `estimate_checkpoint_bytes`) the save first checks there is room
    for it. A failure on any rank (disk full, unwritable directory) fails every rank with the
    reason and removes the half-written directory; `latest` keeps naming the previous checkpoint.
    """
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    rank = _rank()
    error = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            if os.path.isdir(path) and not os.path.islink(path):  # left by a save that died
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
            if checkpoint_bytes is not None:
                error = _space_problem(ckpt_dir, int(checkpoint_bytes * SPACE_MARGIN),
                                       f"checkpoint {tag}")
        except OSError as e:
            error = f"rank 0: {e}"
    raise_if_any(error, f"cannot save checkpoint {path}; 'latest' still names the previous one")
    # Collective (an all-reduce per parameter), so before the part where a rank may fail alone.
    optim = optimizer_state.gather_owned(engine, cfg) if cfg.checkpoint.layout_free_optimizer else {}
    try:
        try:
            engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
        except Exception:  # noqa: BLE001 - OSError, or torch.save's RuntimeError on a full disk
            # DeepSpeed writes its files between its tag check (all_reduce) and its closing
            # barrier (engine.py:4897-4966): join that barrier so the other ranks are not left
            # waiting in it, then report the error like any other.
            _barrier()
            raise
        weights = owned_state(engine.module, cfg)
        os.makedirs(os.path.join(path, "model"), exist_ok=True)
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        if weights:
            save_file(weights, os.path.join(path, "model", f"rank_{rank:05d}.safetensors"))
        if optim:
            os.makedirs(os.path.join(path, optimizer_state.FOLDER), exist_ok=True)
            save_file(optim, os.path.join(path, optimizer_state.FOLDER, f"rank_{rank:05d}.safetensors"))
        save_file(rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.safetensors"))
        if rank == 0:
            atomic_write_text(os.path.join(path, STATE), json.dumps(trainer_state, indent=2))
    except Exception as e:  # noqa: BLE001 - every failure must reach every rank, not hang them
        error = f"rank {rank}: {type(e).__name__}: {e}"
    raise_if_any(error, (
        f"saving checkpoint {path} failed (the partial directory was removed; 'latest' still "
        f"names the previous checkpoint). Check that {ckpt_dir} is writable and has room, or set "
        "checkpoint.dir elsewhere"
    ), remove=path)
    pause_point(f"save_{tag}")

    # Checksums: each rank hashes its share of the files; rank 0 writes the manifest last.
    _barrier()
    files = _files_under(path) if rank == 0 else None
    files = _broadcast(files)
    mine, error = {}, None
    try:
        mine = {f: [os.path.getsize(os.path.join(path, f)), sha256(os.path.join(path, f))]
                for f in files[rank::_world()]}
    except OSError as e:
        error = f"rank {rank}: {e}"
    raise_if_any(error, f"hashing checkpoint {path} failed", remove=path)
    table = {}
    for part in _gather(mine):
        table.update(part)
    error = None
    if rank == 0:
        try:
            manifest = {"tag": tag, "step": step, "files": table}
            atomic_write_text(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1))
            atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        except OSError as e:
            error = f"rank 0: {e}"
    raise_if_any(error, f"writing the manifest of {path} failed; 'latest' still names the previous "
                        f"checkpoint. Check that {ckpt_dir} has room", remove=path)
    if rank == 0:
        prune(ckpt_dir, keep_last=cfg.checkpoint.keep_last, keep_steps=cfg.checkpoint.keep_steps)
    _barrier()
    return path


def prune(ckpt_dir: str, keep_last: int, keep_steps=()) -> None:
    """Delete complete checkpoints older than the newest `keep_last` (except those of
    `keep_steps`), and stale incomplete ones."""
    tags = complete_checkpoints(ckpt_dir)
    kept = {tag_for(step) for step in keep_steps}
    for tag in tags[:-keep_last]:
        if tag not in kept:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    newest = tags[-1] if tags else None
    for name in os.listdir(ckpt_dir):
        full = os.path.join(ckpt_dir, name)
        if name.startswith("step_") and os.path.isdir(full) and name not in tags and newest and name < newest:
            shutil.rmtree(full, ignore_errors=True)


# --- finding and verifying ----------------------------------------------------------------------


def _read_manifest(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(files table, None) of an intact-looking checkpoint directory, or (None, what is wrong)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return None, f"{path} has no {MANIFEST} (the save did not finish)"
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        table = {rel: (int(size), str(digest)) for rel, (size, digest) in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{manifest_path} is unreadable: {e}"
    unlisted = sorted(set(_files_under(path)) - set(table))
    if unlisted:
        return None, (f"{os.path.join(path, unlisted[0])} is not listed in {MANIFEST} "
                      "(added after the save?); refusing to load the checkpoint")
    return table, None


def _check_files(path: str, table: dict) -> Optional[str]:
    for rel, (size, digest) in table.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        if os.path.getsize(full) != size:
            return f"{full} has {os.path.getsize(full)} bytes, expected {size} (truncated?)"
        if sha256(full) != digest:
            return f"{full} does not match its checksum in {MANIFEST} (corrupted or modified)"
        if rel.endswith(".pt"):
            if not zipfile.is_zipfile(full):  # torch.save writes zip archives; a bare pickle is foreign
                return f"{full} is not a torch.save archive; refusing to unpickle it"
            unsafe = unsafe_pickle_globals(full)
            if unsafe:
                return (f"{full} would run or import {', '.join(unsafe)} when unpickled; only "
                        "tensors and DeepSpeed's checkpoint classes are allowed")
    return None


def verify(path: str) -> Optional[str]:
    """None if the checkpoint at `path` is intact, else what is wrong with it (this process only)."""
    table, problem = _read_manifest(path)
    return problem or _check_files(path, table)


def verify_collective(path: str) -> Optional[str]:
    """`verify` with the files shared out between the ranks; every rank gets the same answer."""
    listing = _read_manifest(path) if _rank() == 0 else None
    table, problem = _broadcast(listing)
    if problem is None:
        names = sorted(table)[_rank()::_world()]
        try:
            problem = _check_files(path, {n: table[n] for n in names})
        except (OSError, ValueError, RuntimeError) as e:
            problem = f"{path}: {type(e).__name__}: {e}"
    problems = [p for p in _gather(problem) if p]
    return problems[0] if problems else None


def find_resume_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Collective. The newest intact checkpoint at or before the one `latest` names, falling back
    to older ones with a warning. None if there is no complete checkpoint; CheckpointError if
    there are some and none is intact (starting afresh would silently discard the run)."""
    candidates = None
    if _rank() == 0:
        complete = candidates = complete_checkpoints(ckpt_dir)
        latest_file = os.path.join(ckpt_dir, LATEST)
        if os.path.isfile(latest_file):
            with open(latest_file) as f:
                named = f.read().strip()
            if named in candidates:  # prefer what `latest` names, then anything older
                candidates = [c for c in candidates if c <= named]
        for name in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
            if name.startswith("step_") and name not in complete and os.path.isdir(os.path.join(ckpt_dir, name)):
                logger.warning("ignoring %s: its save did not finish (no %s)", os.path.join(ckpt_dir, name), MANIFEST)
    candidates = _broadcast(candidates)
    problems = []
    for tag in reversed(candidates):
        problem = verify_collective(os.path.join(ckpt_dir, tag))
        if problem is None:
            return tag
        problems.append(f"{tag}: {problem}")
        if _rank() == 0:
            logger.warning("checkpoint %s is damaged: %s; falling back to an older one",
                           os.path.join(ckpt_dir, tag), problem)
    if problems:
        raise CheckpointError(
            f"no intact checkpoint to resume from in {ckpt_dir}:\n  " + "\n  ".join(problems)
            + "\nRestore the damaged files, or move these checkpoints away (or set checkpoint.dir "
            "to a new directory) to start from scratch"
        )
    return None


# --- loading ------------------------------------------------------------------------------------


def _deepspeed_pickle_classes() -> list[type]:
    """The non-tensor classes in DeepSpeed 0.19.8's ZeRO-1/2 shards (plain data holders)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def unsafe_pickle_globals(path: str) -> list[str]:
    """Globals a torch.save file would import when unpickled, beyond tensors and DeepSpeed's
    checkpoint classes. Reads the pickle's opcodes without executing any."""
    with torch.serialization.safe_globals(_deepspeed_pickle_classes()):
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


@contextlib.contextmanager
def weights_only_unpickling():
    """Make every torch.load inside use torch's restricted unpickler, even DeepSpeed's explicit
    `weights_only=False` (see the module docstring), allowing DeepSpeed's checkpoint classes."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_pickle_classes()):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resume(engine, cfg, ckpt_dir: str) -> Optional[tuple[str, dict]]:
    """Collective. Restore the newest intact checkpoint in `ckpt_dir` (see
    `find_resume_checkpoint`); returns (its path, the trainer state), or None if there is none."""
    tag = find_resume_checkpoint(ckpt_dir)
    if tag is None:
        return None
    path = os.path.join(ckpt_dir, tag)
    return path, _load_verified(engine, cfg, path)


def load_checkpoint(engine, cfg, ckpt_dir: str, tag: str) -> dict:
    """Collective. Verify `<ckpt_dir>/<tag>`, then restore model, optimizer and RNG from it;
    returns the trainer state. Raises CheckpointError if the checkpoint is damaged or any rank's
    restored weights differ from the saved ones."""
    path = os.path.join(ckpt_dir, tag)
    problem = verify_collective(path)
    if problem:
        raise CheckpointError(f"refusing to load {path}: {problem}")
    return _load_verified(engine, cfg, path)


def _load_verified(engine, cfg, path: str) -> dict:
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    if not optimizer_state.same_layout(state, optimizer_state.current_layout(cfg, _world())):
        return optimizer_state.resume_in_new_layout(engine, cfg, path, state)
    ckpt_dir, tag = os.path.split(path)
    error = None
    try:
        with weights_only_unpickling():
            load_path, _ = engine.load_checkpoint(
                ckpt_dir, tag=tag, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if load_path is None:
            error = f"rank {_rank()}: DeepSpeed found nothing to load"
    except Exception as e:  # noqa: BLE001 - e.g. the restricted unpickler refusing a global
        error = f"rank {_rank()}: {type(e).__name__}: {e}"
    raise_if_any(error, f"DeepSpeed could not load {path}")
    # The module states DeepSpeed just loaded hold expert-parallel rank 0's experts on every rank;
    # the fp32 master shards hold each rank's own. Rebuild the weights from the masters.
    engine.optimizer.update_lp_params()
    saved = load_global_state_dict(path)
    if not all(p.requires_grad for p in engine.module.parameters()):
        # Frozen parameters (optimizer.train_only) have no masters: their weights come from model/.
        load_weights_into(engine.module, cfg, saved)
    mismatched = check_weights(engine.module, cfg, saved)
    raise_if_any(
        f"rank {_rank()}: {', '.join(mismatched[:5])}" if mismatched else None,
        f"weights restored from {path} differ from the saved ones",
    )
    set_rng_state(load_file(os.path.join(path, "rng", f"rank_{_rank():05d}.safetensors")))
    return state


def check_weights(model: torch.nn.Module, cfg, saved: dict[str, torch.Tensor]) -> list[str]:
    """Names of this rank's parameters that differ from a checkpoint's global weights `saved`
    (`load_global_state_dict`)."""
    from mmoe_megatron.model import named_global_parameters

    bad = []
    for name, param in named_global_parameters(model, cfg):
        ref = saved.get(name)
        if ref is None or not torch.equal(param.detach().cpu(), ref.to(param.dtype)):
            bad.append(name)
    return bad


def load_global_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All weights under global names, whatever layout wrote them, from a checkpoint directory or
    from a directory of global-named safetensors files (a checkpoint's model/ folder)."""
    folder = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} does not exist or is not a directory")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointError(
            f"{folder} holds no .safetensors files; give a checkpoint of this project or its model/ folder"
        )
    return merge_safetensors(folder, names)


def merge_safetensors(folder: str, names: list[str], error: type = CheckpointError) -> dict[str, torch.Tensor]:
    """The tensors of several safetensors files in `folder` as one dict; a key in two files is
    an `error` (the files are shards of one state dict)."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        for key, value in load_file(os.path.join(folder, name)).items():
            if key in out:
                raise error(f"{key} appears in two weight files of {folder}")
            out[key] = value
    return out


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, cfg, global_sd: dict[str, torch.Tensor]) -> None:
    """Copy global weights into a model of any expert-parallel layout (this rank's share). Every
    parameter must be present with its shape, and nothing this rank would own may be left over."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    num_local = cfg.moe.num_experts // ps.get_expert_model_parallel_world_size()
    wanted = {}
    for name in global_sd:
        local = local_name(name, ep_rank, num_local)
        if local is not None:
            wanted[local] = name
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in wanted]
    unused = [wanted[name] for name in wanted if name not in params]
    shapes = [f"{wanted[name]} {tuple(global_sd[wanted[name]].shape)} != {tuple(p.shape)}"
              for name, p in params.items() if name in wanted and global_sd[wanted[name]].shape != p.shape]
    for what, names in (("weights missing for", missing), ("no parameter for weights", unused),
                        ("wrong shapes for", shapes)):
        if names:
            raise CheckpointError(f"{what} {len(names)} parameters, e.g. {names[:3]}; the weights "
                                  "are from a model with another architecture (model.* / moe.*)")
    for name, param in params.items():
        param.copy_(global_sd[wanted[name]].to(param.dtype))
