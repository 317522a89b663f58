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
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mmoe_megatron.config import ExperimentConfig, save_config
from mmoe_megatron.elastic import ElasticK
from mmoe_megatron.engine import build_engine, set_lr
from mmoe_megatron.model import build_model, elastic_routers
from mmoe_megatron.training import checkpoint as ckpt
from mmoe_megatron.training.batches import BatchLayout, collate
from mmoe_megatron.training.lr import lr_at
from mmoe_megatron.training.metrics import MetricsLogger, moe_aux_losses


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
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.layout = BatchLayout(cfg.train.global_batch_size, cfg.train.micro_batch_size, self.dp_size)
        if vocab_size is None:
            from mmoe_megatron.data import resolve_vocab_size

            vocab_size = resolve_vocab_size(cfg)
        self.vocab_size = vocab_size
        self.model = build_model(cfg, vocab_size, stock_routing=stock_routing)
        self.engine, self.ds_config = build_engine(self.model, cfg, self.dp_size)
        self.device = next(self.engine.module.parameters()).device
        self.elastic = ElasticK.from_config(self.engine.module, cfg, self.dp_rank, self.dp_size)
        self.routers = elastic_routers(self.engine.module)
        self.mask = causal_mask(cfg.data.seq_length, self.device)
        self.datasets = datasets
        self.step = 0
        self.nonfinite_steps = 0
        self._stop_signal: Optional[int] = None
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

    def train_step(self, step: int, microbatches: Sequence[dict]) -> dict:
        """Forward/backward over this rank's micro-batches and one optimizer update."""
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
        for m, batch in enumerate(microbatches):
            self.elastic.set_microbatch(step, m)
            loss = token_loss(self.engine, batch, self.mask)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        if dist.is_initialized():
            dist.all_reduce(loss, group=_dp_group())
            loss /= self.dp_size
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm}

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
            "k_schedule_fingerprint": self.elastic.schedule.fingerprint(),
            "world_size": dist.get_world_size(),
            "dp_size": self.dp_size,
            "expert_parallel": self.cfg.parallel.expert,
            "name": self.cfg.name,
        }

    def save(self) -> str:
        return ckpt.save_checkpoint(self.engine, self.cfg, self.cfg.checkpoint_dir, self.step,
                                    self.trainer_state())

    def maybe_resume(self) -> bool:
        """Resume per `checkpoint.load`: auto = newest intact checkpoint in the run's directory."""
        load = self.cfg.checkpoint.load
        if load is None:
            return False
        if load == "auto":
            directory = self.cfg.checkpoint_dir
            tag = ckpt.find_resume_checkpoint(directory)
            if tag is None:
                return False
        else:
            directory, tag = os.path.split(os.path.abspath(load))
            problem = ckpt.verify(load) if self.rank == 0 else None
            problem = _broadcast_obj(problem)
            if problem:
                raise ckpt.CheckpointError(f"checkpoint.load={load!r}: {problem}")
        state = ckpt.load_checkpoint(self.engine, self.cfg, directory, tag)
        self._check_compatible(state, os.path.join(directory, tag))
        self.step = state["step"]
        self.metrics.log_text(f"resumed from {os.path.join(directory, tag)} at step {self.step}")
        return True

    def _check_compatible(self, state: dict, path: str) -> None:
        fingerprint = self.elastic.schedule.fingerprint()
        if state["k_schedule_fingerprint"] != fingerprint:
            raise ckpt.CheckpointError(
                f"{path} was trained with another k schedule (matryoshka.* or its seed changed); "
                "resuming would change the ks drawn at every step. Restore the original "
                "matryoshka settings, or start a new run directory"
            )
        if state["dp_size"] != self.dp_size or state["expert_parallel"] != self.cfg.parallel.expert:
            raise ckpt.CheckpointError(
                f"{path} was written with data-parallel size {state['dp_size']} and expert-parallel "
                f"size {state['expert_parallel']}; ZeRO shards can only be resumed with the same "
                "layout. Relaunch with the same number of ranks and parallel.expert"
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
        validation losses per k. Exits early (after a checkpoint) when a stop signal arrives."""
        cfg = self.cfg
        t = cfg.train
        self.maybe_resume()
        eval_ks = cfg.matryoshka.resolved_eval_ks()
        tokens_per_step = t.global_batch_size * cfg.data.seq_length
        last_eval: dict = {}
        self.preempted = False
        while self.step < t.train_iters:
            start = time.time()
            batches = self.microbatches(self.step)
            result = self.train_step(self.step, batches)
            self._check_finite(result)
            result["tokens_per_s"] = tokens_per_step / max(time.time() - start, 1e-9)
            result.update(moe_aux_losses())
            share = self._expert_share()
            self.step += 1
            if self.step % t.log_interval == 0 or self.step == t.train_iters:
                self.metrics.log_step(self.step, t.train_iters, result, self.elastic.ks_by_layer(), share)
            if cfg.matryoshka.sync_check_interval and self.step % cfg.matryoshka.sync_check_interval == 0:
                self.elastic.check_sync()
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_iters:
                last_eval = self.evaluate(eval_ks)
                self.metrics.log_eval(self.step, last_eval)
            save_now = cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0
            exit_now = t.exit_interval and self.step % t.exit_interval == 0 and self.step < t.train_iters
            if self._stop_requested() or exit_now:
                self.save()
                self.preempted = not exit_now
                why = "exit_interval reached" if exit_now else "stop signal received"
                self.metrics.log_text(f"{why}: checkpointed step {self.step}, exiting")
                return last_eval
            if save_now and self.step < t.train_iters:
                self.save()
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

    def _check_finite(self, result: dict) -> None:
        if math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"]):
            return
        self.nonfinite_steps += 1
        ks = self.elastic.ks_by_layer()
        message = (f"non-finite {'loss' if not math.isfinite(result['loss']) else 'gradient norm'} "
                   f"at step {self.step} (loss {result['loss']}, grad norm {result['grad_norm']}); "
                   f"ks by MoE layer: {ks}")
        self.metrics.log_text(message)
        if self.cfg.train.nonfinite_policy == "stop" and self.nonfinite_steps >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(message)


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _broadcast_obj(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
