"""The elastic pretraining loop: megatron-core model, DeepSpeed ZeRO, ks from the schedule.

One optimizer step, for G = global batch, M = micro-batches per rank, D = data-parallel ranks:

    for m in range(M):                         G = M * D * micro_batch_size samples
        elastic.set_microbatch(step, m)        ks of (step, m); the same for all m except
                                               with the micro-batch / per-token strategies
        loss = mean token loss of micro-batch m on this rank
        engine.backward(loss)                  DeepSpeed scales by 1/M; ZeRO averages over D
        engine.step()                          updates only after the M-th micro-batch

The step index alone determines the learning rate, the ks and the samples read, so resuming
from a checkpoint at step N continues exactly as the uninterrupted run would have.

Non-finite steps are never applied. Before the last backward of a step the trainer multiplies
that micro-batch's loss by a guard, 1.0 if every rank's losses are finite and NaN otherwise, so a
non-finite loss on any rank makes the gradient non-finite even where the loss was infinite but
its gradient finite. DeepSpeed's ZeRO-1/2 step then finds an invalid global gradient norm (one
value on all ranks, stage_1_and_2.py:3028-3070) and skips the update everywhere: parameters,
fp32 master weights and Adam moments and step count stay as they were, DeepSpeed counts the
step in `skipped_steps` (engine.py:3534-3541), and the lr, set from the step index, is
unaffected. `train.nonfinite_policy` only decides when to give up: `stop` once the run has seen
`max_nonfinite_steps` non-finite steps in all (default 1: the first), `skip` once it sees that
many in a row (a finite step resets the count). Each one is logged with the step, its ks, and
the first layer whose output was non-finite and any non-finite parameters, found by one extra
forward of the offending micro-batch on that step only.

With `matryoshka.sync_check_interval` N the ks of every rank are compared on the first step of
a launch and every N-th step, after the last forward and before the update, so that ranks
routing with different ks stop the run before their gradients are combined.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mmoe_megatron.config import ExperimentConfig, save_config
from mmoe_megatron.distributed import pause_point
from mmoe_megatron.elastic import ElasticK
from mmoe_megatron.engine import build_engine, freeze_untrained, set_lr
from mmoe_megatron.failures import describe_collective_failure, gather_ranks, is_collective_failure, this_rank
from mmoe_megatron.model import build_model, elastic_routers, moe_layer_numbers, named_global_parameters
from mmoe_megatron.training import checkpoint as ckpt
from mmoe_megatron.training.batches import BatchLayout, collate
from mmoe_megatron.training.lr import lr_at
from mmoe_megatron.training.metrics import MetricsLogger, moe_aux_losses
from mmoe_megatron.training.optimizer_state import adam_steps


class NonFiniteLossError(RuntimeError):
    pass


def causal_mask(seq_length: int, device) -> Optional[torch.Tensor]:
    """megatron's local attention builds its default causal mask on "cuda"
    (transformer/utils.py:35); on CPU pass it explicitly. On GPU let the kernel apply causality."""
    if torch.cuda.is_available():
        return None
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def token_loss(model, batch: dict, mask) -> torch.Tensor:
    """Mean loss over the micro-batch's unmasked tokens."""
    per_token = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, vocab_size: Optional[int] = None, datasets=None,
                 stock_routing: bool = False):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.rank = dist.get_rank()
        # Every rank's node, device and pid, for the resume records and to name a failed rank.
        self.ranks = gather_ranks(this_rank(self.rank, int(os.environ.get("LOCAL_RANK", 0))))
        self._doing = "start-up"  # what the loop is doing, for the report of a failed collective
        self.preempted = False  # stopping on a signal (SIGUSR1/SIGTERM) after a checkpoint
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.layout = BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dp_size)
        if vocab_size is None:
            from mmoe_megatron.data import resolve_vocab_size

            vocab_size = resolve_vocab_size(cfg)
        self.vocab_size = vocab_size
        self.model = build_model(cfg, vocab_size, stock_routing=stock_routing)
        freeze_untrained(self.model, cfg)
        self.engine, self.ds_config = build_engine(self.model, cfg, self.dp_size)
        self.device = next(self.engine.module.parameters()).device
        self.elastic = ElasticK.from_config(self.engine.module, cfg, self.dp_rank, self.dp_size)
        self.routers = elastic_routers(self.engine.module)
        self.moe_layers = moe_layer_numbers(cfg)
        self.mask = causal_mask(cfg.data.seq_length, self.device)
        self.datasets = datasets
        self.step = 0
        self.nonfinite_total = 0  # non-finite steps of the run (resumes included)
        self.nonfinite_streak = 0  # consecutive non-finite steps up to the last step
        self._first_step: Optional[int] = None  # the step this launch started (or resumed) at
        self._stop_signal: Optional[int] = None
        self._distill_kl: list[torch.Tensor] = []  # this step's per-micro-batch KL to the teacher
        self.checkpoint_bytes = ckpt.estimate_checkpoint_bytes(cfg, vocab_size)
        self.metrics = MetricsLogger(cfg.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard)
        if self.rank == 0:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            import json

            with open(os.path.join(cfg.run_dir, "deepspeed.json"), "w") as f:
                json.dump(self.ds_config, f, indent=2)

    # --- data -------------------------------------------------------------------------------

    def _ensure_datasets(self):
        if self.datasets is None:
            from mmoe_megatron.data import build_datasets

            t = self.cfg.train
            self.datasets = build_datasets(
                self.cfg, train_samples=t.train_iters * t.global_batch_size,
                valid_samples=t.eval_iters * t.global_batch_size, test_samples=0,
            )
        return self.datasets

    def microbatches(self, step: int) -> list[dict]:
        train = self._ensure_datasets()[0]
        return [
            self._to_device(collate(train, self.layout.sample_indices(step, m, self.dp_rank)))
            for m in range(self.layout.num_microbatches)
        ]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # --- one step ---------------------------------------------------------------------------

    def loss(self, batch: dict, step: int = 0, microbatch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward of one micro-batch at the ks already set for it: (objective to
        backpropagate, mean token cross-entropy). They differ only with self-distillation, whose
        teacher forward runs first (training/distill.py)."""
        mat = self.cfg.matryoshka
        if not mat.distill_coeff:
            loss = token_loss(self.engine, batch, self.mask)
            return loss, loss
        from mmoe_megatron.training.distill import distillation_loss, teacher_log_probs

        teacher_logp = teacher_log_probs(self.engine.module, batch, self.mask, self.elastic.schedule.k_max,
                                         mat.distill_temperature)
        self.elastic.set_microbatch(step, microbatch)  # the teacher left the routers at k_max
        logits = self.engine(batch["tokens"], batch["position_ids"], self.mask)
        objective, ce, kl = distillation_loss(logits, batch["labels"], batch["loss_mask"], teacher_logp,
                                              mat.distill_coeff, mat.distill_temperature)
        self._distill_kl.append(kl.detach())
        return objective, ce

    def _sync_check_due(self, step: int) -> bool:
        interval = self.cfg.matryoshka.sync_check_interval
        return bool(interval) and (step == self._first_step or (step + 1) % interval == 0)

    def train_step(self, step: int, microbatches: Sequence[dict]) -> dict:
        """Forward/backward over this rank's micro-batches and one optimizer update, which every
        rank skips if any loss or the gradient is not finite (see the module docstring)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        assert len(microbatches) == self.layout.num_microbatches
        self.engine.train()
        lr = lr_at(step, self.cfg.optimizer, self.cfg.train.train_iters)
        set_lr(self.engine, lr)
        # Aux-loss gradients bypass the loss; scale them as DeepSpeed scales the loss (1/M).
        MoEAuxLossAutoScaler.set_loss_scale(
            torch.tensor(1.0 / len(microbatches), device=self.device)
        )
        losses = []
        last = len(microbatches) - 1
        for m, batch in enumerate(microbatches):
            self.elastic.set_microbatch(step, m)
            loss, ce = self.loss(batch, step, m)
            losses.append(ce.detach())
            if m == last:
                mean_loss = torch.stack(losses).mean()
                if dist.is_initialized():
                    dist.all_reduce(mean_loss, group=_dp_group())
                    mean_loss /= self.dp_size
                guard = torch.where(torch.isfinite(mean_loss), 1.0, float("nan"))
                loss = loss * guard.to(loss.dtype)
                if self._sync_check_due(step):
                    self.elastic.check_sync()
            self.engine.backward(loss)
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        result = {"loss": float(mean_loss), "lr": lr, "grad_norm": grad_norm}
        if self._distill_kl:
            result["distill_kl"] = float(torch.stack(self._distill_kl).mean())
            self._distill_kl.clear()
        applied = self.engine.was_step_applied()
        finite = math.isfinite(result["loss"]) and (norm is None or math.isfinite(grad_norm))
        if not finite and applied:
            raise RuntimeError(
                f"DeepSpeed applied the update of step {step + 1} although its loss or gradient norm "
                f"is not finite ({result}); its invalid-gradient check must be on (bf16."
                "check_grad_overflow, zero_optimization.compute_grad_norm)"
            )
        result["skipped"] = float(not applied)
        if finite and applied:
            self.nonfinite_streak = 0
        else:
            self._on_nonfinite(step, microbatches, losses, result)
        return result

    def _on_nonfinite(self, step: int, microbatches: Sequence[dict], losses: list, result: dict) -> None:
        """Count a skipped step, say where it went wrong, and stop as train.nonfinite_policy says."""
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        where = self._locate_nonfinite(step, microbatches, losses)
        what = "loss" if not math.isfinite(result["loss"]) else "gradient"
        message = (f"non-finite {what} at step {step + 1} (loss {result['loss']}, grad norm "
                   f"{result['grad_norm']}); its update was skipped on every rank. {where}. "
                   f"ks by MoE layer: {self.elastic.ks_by_layer()}")
        t = self.cfg.train
        if t.nonfinite_policy == "stop" and self.nonfinite_total >= t.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{message}\nStopping after {self.nonfinite_total} non-finite step(s) "
                f"(train.nonfinite_policy=stop, max_nonfinite_steps={t.max_nonfinite_steps}). Resume "
                "from the last checkpoint with a lower optimizer.lr, or allow isolated bad steps "
                "with train.nonfinite_policy=skip"
            )
        if t.nonfinite_policy == "skip" and self.nonfinite_streak >= t.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{message}\nStopping after {self.nonfinite_streak} consecutive non-finite steps "
                f"(train.nonfinite_policy=skip, max_nonfinite_steps={t.max_nonfinite_steps}): the run "
                "is not recovering. Resume from the last checkpoint with a lower optimizer.lr"
            )
        self.metrics.log_text(message)

    @torch.no_grad()
    def _locate_nonfinite(self, step: int, microbatches: Sequence[dict], losses: list) -> str:
        """Collective, on non-finite steps only: run the forward of the first micro-batch whose loss
        was non-finite on some rank (else the first) again, and report the first layer whose output
        is non-finite and this run's non-finite parameters."""
        bad_M = (~torch.isfinite(torch.stack(losses))).float()
        if dist.is_initialized():
            dist.all_reduce(bad_M, op=dist.ReduceOp.MAX, group=_dp_group())
        m = int(bad_M.argmax()) if bool(bad_M.any()) else 0
        module = self.engine.module
        watched = [("the embedding", getattr(module, "embedding", None))]
        pattern = self.cfg.moe_layer_pattern()
        for layer in module.decoder.layers:
            index = layer.layer_number - 1
            kind = f"MoE layer {sum(pattern[:index])}" if pattern[index] else "dense"
            watched.append((f"decoder layer {index} ({kind})", layer))
        first: list[int] = []

        def hook(position):
            def record(mod, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if not first and not bool(torch.isfinite(hidden).all()):
                    first.append(position)
            return record

        handles = [mod.register_forward_hook(hook(i)) for i, (_, mod) in enumerate(watched) if mod is not None]
        try:
            self.elastic.set_microbatch(step, m)
            token_loss(module, microbatches[m], self.mask)
        finally:
            for handle in handles:
                handle.remove()
        bad_params = [name for name, p in named_global_parameters(module, self.cfg)
                      if not bool(torch.isfinite(p).all())]
        mine = (first[0] if first else None, bad_params)
        found = [mine]
        if dist.is_initialized():
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, mine)
        positions = [p for p, _ in found if p is not None]
        parts = [f"first non-finite output in micro-batch {m}: {watched[min(positions)][0]}" if positions
                 else f"the forward of micro-batch {m} is finite when run again (the backward overflowed)"]
        params = sorted({name for _, names in found for name in names})
        if params:
            parts.append(f"non-finite parameters ({len(params)}): {', '.join(params[:4])}")
        return "; ".join(parts)

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(self, ks: Sequence, split_index: int = 1) -> dict[str, float]:
        """Validation loss at each k (an int, or a per-layer list), on the same samples each time."""
        from mmoe_megatron.evaluation.core import eval_indices, losses_at, spec_label

        dataset = self._ensure_datasets()[split_index]
        if dataset is None:
            return {}
        n = min(len(dataset), self.cfg.train.eval_iters * self.cfg.train.global_batch_size)
        results = losses_at(
            self.engine.module, dataset, ks, eval_indices(n, self.dp_rank, self.dp_size),
            self.cfg.train.micro_batch_size, self.mask, self.device, group=_dp_group(),
        )
        return {spec_label(k): loss for k, (loss, _) in zip(ks, results)}

    # --- checkpoints ------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "k_schedule_fingerprint": self.elastic.fingerprint(),  # both axes (k, width)
            "world_size": dist.get_world_size(),
            "dp_size": self.dp_size,
            "expert_parallel": self.cfg.parallel.expert,
            "tensor_parallel": self.cfg.parallel.tensor,
            "zero_stage": self.cfg.optimizer.zero_stage,
            "layout_free_optimizer": self.cfg.checkpoint.layout_free_optimizer,
            "optimizer_steps": adam_steps(self.engine),
            "skipped_steps": self.engine.skipped_steps,
            "name": self.cfg.name,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
            # Read by the Slurm retry decision (mmoe_megatron.requeue): the step may end with
            # another rank's exit code, since srun kills the others once the first exits 75.
            "stopped_on_signal": self.preempted,
        }

    def save(self) -> str:
        return ckpt.save_checkpoint(self.engine, self.cfg, self.cfg.checkpoint_dir, self.step,
                                    self.trainer_state(), checkpoint_bytes=self.checkpoint_bytes)

    def restore(self) -> bool:
        """Resume per `checkpoint.load`; when nothing is resumed, start from the weights in
        `checkpoint.init_weights` if it is set. Returns whether a checkpoint was resumed."""
        if self.maybe_resume():
            return True
        if self.cfg.checkpoint.init_weights:
            self.load_init_weights(self.cfg.checkpoint.init_weights)
        return False

    def maybe_resume(self) -> bool:
        """Resume per `checkpoint.load`: auto = newest intact checkpoint in the run's directory."""
        load = self.cfg.checkpoint.load
        if load is None:
            return False
        if load == "auto":
            found = ckpt.resume(self.engine, self.cfg, self.cfg.checkpoint_dir)
            if found is None:
                return False
            path, state = found
        else:
            path = os.path.abspath(load)
            try:
                state = ckpt.load_checkpoint(self.engine, self.cfg, *os.path.split(path))
            except ckpt.CheckpointError as e:
                raise ckpt.CheckpointError(f"checkpoint.load={load!r}: {e}") from None
        self._check_compatible(state, path)
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        change = state.get("layout_change")
        self.metrics.log_text(f"resumed from {path} at step {self.step}" + (
            f" in another layout ({change[1]}; it was written with {change[0]}), the optimizer state "
            "from its layout-free copy" if change else ""))
        slurm = {"slurm_job_id": os.environ["SLURM_JOB_ID"],
                 "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))} \
            if "SLURM_JOB_ID" in os.environ else {}
        self.metrics.log_resume(self.step, path, [r.node for r in self.ranks],
                                world_size=len(self.ranks), layout_change=change, **slurm)
        return True

    def load_init_weights(self, path: str) -> None:
        """Collective. Copy global-named safetensors weights (a checkpoint, or its model/ folder)
        into the model; the optimizer state starts fresh."""
        error = None
        try:
            ckpt.load_weights_into(self.engine.module, self.cfg, ckpt.load_global_state_dict(path))
        except Exception as e:  # noqa: BLE001 - every rank must learn of any rank's failure
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        ckpt.raise_if_any(error, f"checkpoint.init_weights={path!r} could not be loaded")
        # ZeRO took its fp32 master weights from the random initialisation when the engine was
        # built; without this the first update would start from those again.
        self.engine.optimizer.refresh_fp32_params()
        self.metrics.log_text(f"initialised the weights from {path}")

    def _check_compatible(self, state: dict, path: str) -> None:
        fingerprint = self.elastic.fingerprint()
        if state["k_schedule_fingerprint"] != fingerprint:
            raise ckpt.CheckpointError(
                f"{path} was trained with another k or width schedule (matryoshka.* or its seed "
                "changed); resuming would change the ks and widths drawn at every step. Restore the original "
                "matryoshka settings, or start a new run directory"
            )

    # --- the loop ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm's pre-limit warning): checkpoint at the next step and exit."""
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> dict:
        """Train to `train.train_iters`, evaluating and checkpointing on the way. Returns the last
        validation losses per k. Exits early (after a checkpoint) when a stop signal arrives. A
        failed collective is reported with the ranks and nodes involved before it is raised."""
        try:
            return self._fit()
        except Exception as e:
            if len(self.ranks) > 1 and is_collective_failure(e):
                print(describe_collective_failure(e, self._doing, self.ranks), file=sys.stderr, flush=True)
            raise

    def _fit(self) -> dict:
        cfg = self.cfg
        t = cfg.train
        ckpt.check_checkpoint_dir(cfg.checkpoint_dir, self.checkpoint_bytes,
                                  cfg.checkpoint.keep_last + len(cfg.checkpoint.keep_steps))
        self._doing = "the resume from a checkpoint"
        self.restore()
        self._first_step = self.step
        eval_ks = cfg.matryoshka.resolved_eval_ks()
        tokens_per_step = t.global_batch_size * cfg.data.seq_length
        last_eval: dict = {}
        self.preempted = False
        while self.step < t.train_iters:
            pause_point(f"step_{self.step + 1}")
            self._doing = f"training step {self.step + 1}"
            start = time.time()
            batches = self.microbatches(self.step)
            result = self.train_step(self.step, batches)
            result["tokens_per_s"] = tokens_per_step / max(time.time() - start, 1e-9)
            result.update(moe_aux_losses(self.layout.num_microbatches, self.moe_layers, _dp_group()))
            share = self._expert_share()
            self.step += 1
            if self.step % t.log_interval == 0 or self.step == t.train_iters:
                self.metrics.log_step(self.step, t.train_iters, result, self.elastic.ks_by_layer(), share)
            self._doing = f"the evaluation, checkpoint or stop check after step {self.step}"
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_iters:
                last_eval = self.evaluate(eval_ks)
                self.metrics.log_eval(self.step, last_eval)
            save_now = (cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0) \
                or self.step in cfg.checkpoint.keep_steps
            exit_now = t.exit_interval and self.step % t.exit_interval == 0 and self.step < t.train_iters
            if self._stop_requested() or exit_now:
                self.preempted = not exit_now
                self.save()
                why = "exit_interval reached" if exit_now else "stop signal received"
                self.metrics.log_text(f"{why}: checkpointed step {self.step}, exiting")
                return last_eval
            if save_now and self.step < t.train_iters:
                self.save()
        self._doing = f"the final evaluation and checkpoint at step {self.step}"
        last_eval = self.evaluate(eval_ks)
        self.metrics.log_eval(self.step, last_eval)
        if not ckpt.complete_checkpoints(cfg.checkpoint_dir) or \
                ckpt.complete_checkpoints(cfg.checkpoint_dir)[-1] != ckpt.tag_for(self.step):
            self.save()
        return last_eval

    def _expert_share(self) -> Optional[torch.Tensor]:
        """[moe layers, experts] fraction of routed tokens per expert since the last call."""
        if not self.routers:
            return None
        counts = torch.stack([r.token_counts_E for r in self.routers]).double()
        for r in self.routers:
            r.token_counts_E.zero_()
        return (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).cpu()


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()
