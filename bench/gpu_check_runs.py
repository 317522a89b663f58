"""What `bench.gpu_check` measures: the machine, layer-spec parity and short training runs.

Sizes. On CUDA: 12 layers, hidden 1024, 16 experts of FFN 1024, vocabulary 32,000, sequence
1024, 16 sequences per step: about 135 M active parameters at k = 1, 400 M at k = 8 (700 M in
all), bf16. On CPU the same code runs a 2-layer model of hidden 64 so that the check itself is
tested; its timings mean nothing.

Parity. The reference is the local layer spec in fp32 on the same device; each candidate (the
local spec in bf16, and Transformer Engine's spec, with and without grouped GEMM, when they are
installed) is built with the same weights (`model.init_weights` draws every parameter from its
name, which is the same in every spec) and scored on the same tokens at each k and with per-token
ks. The parity models are initialised with std 1/sqrt(hidden): at the usual 0.02 the experts add
a few per cent to the residual stream of a random model, and a wrong expert would hardly move the
loss. Besides the mean loss, which at random initialisation depends little on what the layers
compute, parity compares the loss of every token. The experts are slimmable (`slimmable.py`) in
every candidate: besides the ks at full width, each is scored with every expert at one narrower
width and at a mixed draw, a k and a width per token, which is what exercises the grouped-GEMM
(Transformer Engine) slimmable path against the local one. Each candidate is judged routed to the
experts the reference chose (route replay): in bf16 a near-tied ranking flips, a flip changes the
token's output and, through attention, every later token's, and the flips compound over the layers.
Measured on the H200 (12 layers) with free routing, the local spec's per-token differences were 24%
of the spread at k = 1 and 1.4% at k = 8; a 12-layer CPU model showed the same (23% and 1.5%) with
75-80% of the tokens ranked as the fp32 reference ranks them in the last layer (99.6% in the first).
The free-routing differences and the share of tokens ranked alike per layer are reported beside.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from bench.common import ROOT

# bf16 tolerances against the fp32 local spec routed as the reference (route replay), per case (k
# or per-token ks), as fractions of the spread (standard deviation) of the reference's per-token
# losses, which sets the scale of what a layer can change. Measured on CPU with route replay: the
# local spec in bf16 stays within 0.3 % (mean) and 1.1 % (per token) of the spread on the tiny
# model, and within 0.1 % and 1.6 % with 12 layers of hidden 256; routing one expert too many at
# k = 2 moves them by ~4 % and ~20 %.
MEAN_LOSS_TOL = 0.02
"""|mean loss (candidate) - mean loss (reference)| / spread."""
TOKEN_LOSS_TOL = 0.05
"""mean over tokens of |loss (candidate) - loss (reference)| / spread."""
FIRST_LOSS_TOL = 0.02
"""|first-step loss of the Matryoshka router at fixed k - that of megatron's stock router|."""

PARITY_WIDTHS = [0.25, 0.5, 0.75, 1.0]
"""Expert widths of the parity models (slimmable experts, drawn per token in the mixed case)."""
NARROW_CASE = (2, 0.5)
"""(k, width) of the parity case that runs every expert at one narrower width."""
MIXED_CASE = "per-token k and width"
"""The parity case with a k and a width level drawn for every token."""

ELASTIC_KS = [2, 4, 6]
"""Per-token ks of the elastic run; their mean (4) is a fixed k that is also measured."""
FIXED_KS = [1, 2, 4, 8]

SIZES = {
    "gpu": {
        "model.num_layers": 12, "model.hidden_size": 1024, "model.num_attention_heads": 16,
        "model.num_query_groups": 4, "model.ffn_hidden_size": 4096, "model.vocab_size": 32000,
        "model.make_vocab_size_divisible_by": 128,
        "moe.num_experts": 16, "moe.expert_ffn_hidden_size": 1024,
        "data.seq_length": 1024, "train.micro_batch_size": 16, "train.global_batch_size": 16,
    },
    "cpu": {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.num_query_groups": 2, "model.ffn_hidden_size": 256, "model.vocab_size": 256,
        "model.make_vocab_size_divisible_by": 64,
        "moe.num_experts": 8, "moe.expert_ffn_hidden_size": 64,
        "data.seq_length": 32, "train.micro_batch_size": 2, "train.global_batch_size": 4,
    },
}


@dataclass
class Setup:
    """What every part of the check shares."""

    mode: str
    """gpu (CUDA) or cpu."""
    device: torch.device
    run_dir: str
    steps: int
    warmup: int
    peak_flops: Optional[float]
    """Dense bf16 peak of the device, FLOP/s (None on CPU: no MFU)."""
    fault: set = field(default_factory=set)
    """Deliberate faults, to test that the check reports them: parity, train."""

    def config(self, name: str, overrides: dict):
        from mmoe_megatron.config import load_config

        base = {
            **SIZES[self.mode], "data.mock": True, "data.tokenizer": None, "data.blend": [],
            "train.precision": "bf16", "train.train_iters": self.steps, "train.eval_interval": 0,
            "train.log_interval": 1, "optimizer.warmup_iters": 1, "optimizer.zero_stage": 1,
            "checkpoint.save_interval": 0, "checkpoint.load": None, "logging.tensorboard": False,
            "logging.dir": os.path.join(self.run_dir, name),
            "matryoshka.eval_ks": [1],
        }
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), list({**base, **overrides}.items()))


def environment() -> dict:
    """Versions, the device, and which optional GPU pieces are there."""
    from megatron.core import package_info

    from mmoe_megatron import compat, extras

    info = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "megatron_core": package_info.__shortversion__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "transformer_engine": extras.have_transformer_engine(),
        "nvidia_apex": extras.have_nvidia_apex(),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        info["deepspeed"] = f"missing ({e})"
    # megatron-core 0.19 offers grouped GEMM only through Transformer Engine (TEGroupedMLP);
    # 0.16 also through the grouped_gemm package (legacy GroupedMLP).
    legacy = compat.megatron_core_version() < (0, 17, 0)
    info["grouped_gemm"] = info["transformer_engine"] or (legacy and _importable("grouped_gemm"))
    info["grouped_gemm_note"] = (
        "through Transformer Engine" if info["transformer_engine"] else
        "through the grouped_gemm package" if info["grouped_gemm"] else
        f"not available: megatron-core {info['megatron_core']} offers it only through "
        + ("Transformer Engine or the grouped_gemm package" if legacy else "Transformer Engine")
    )
    return info


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- parity ------------------------------------------------------------------------------------


def parity_candidates(setup: Setup, env: dict) -> list[tuple[str, dict]]:
    """(name, config overrides) of every layer spec to compare with the fp32 local reference."""
    out = [("local bf16", {"model.backend": "local"})]
    if env["transformer_engine"] and setup.mode == "gpu":
        out.append(("transformer_engine bf16", {"model.backend": "transformer_engine"}))
        if env["grouped_gemm"]:
            out.append(("transformer_engine grouped_gemm bf16",
                        {"model.backend": "transformer_engine", "moe.grouped_gemm": True}))
    return out


def _parity_batch(cfg, vocab: int, device):
    gen = torch.Generator().manual_seed(7)
    seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
    tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
    return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "position_ids": torch.arange(seq).expand(mbs, seq).to(device)}


@torch.no_grad()
def per_token_losses(model, batch, mask) -> torch.Tensor:
    """[batch * seq] fp32 loss of every token."""
    return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"]).float().reshape(-1)


def parity_cases() -> list:
    """The routing settings compared: each fixed k at full width, per-token ks at full width, one
    k with every expert at a narrower width, then a k and a width per token."""
    k, width = NARROW_CASE
    return list(FIXED_KS) + ["per-token", f"{k} @ width {width:g}", MIXED_CASE]


def parity_losses(setup: Setup, overrides: dict, dtype, corrupt_cases=(), routes: Optional[dict] = None) -> dict:
    """Per-token losses of one layer spec at every parity case, on the same tokens and weights:
    {"losses": {case: [tokens]}, "routes": {case: [per MoE layer, its ranked expert ids]}}, and
    with `routes` (the reference's) also "replayed": {case: [tokens]}, the losses with every layer
    routed to the reference's experts (`MatryoshkaRouter.route_replay`).

    `corrupt_cases`: cases at which this model is deliberately wrong (the --fault parity check):
    at a fixed k it routes one k too many; in the mixed case every token runs one width narrower.
    """
    from mmoe_megatron.elastic import ElasticK
    from mmoe_megatron.model import build_model, elastic_routers, set_point, set_width, slimmable_experts
    from mmoe_megatron.training.trainer import causal_mask

    hidden = SIZES[setup.mode]["model.hidden_size"]
    cfg = setup.config("parity", {
        "matryoshka.strategy": "token", "matryoshka.ks": list(FIXED_KS),
        "matryoshka.widths": list(PARITY_WIDTHS), "train.precision":
        "bf16" if dtype == torch.bfloat16 else "fp32", "model.init_method_std": hidden ** -0.5,
        **overrides})
    vocab = cfg.model.vocab_size
    model = build_model(cfg, vocab).to(device=setup.device, dtype=dtype).eval()
    batch = _parity_batch(cfg, vocab, setup.device)
    mask = causal_mask(cfg.data.seq_length, setup.device)
    routers = elastic_routers(model)
    out = {"losses": {}, "routes": {}, **({"replayed": {}} if routes is not None else {})}
    for case in parity_cases():
        corrupt = str(case) in {str(c) for c in corrupt_cases}
        if case in ("per-token", MIXED_CASE):
            ElasticK.from_config(model, cfg).set_microbatch(step=0, microbatch=0)  # both axes per token
            if case == "per-token":
                set_width(model, 1.0)
            elif corrupt:
                for experts in slimmable_experts(model):
                    experts.set_token_levels((experts.token_levels_SB - 1).clamp(min=1))
        elif isinstance(case, int):
            set_point(model, case + 1 if corrupt else case, 1.0)
        else:
            set_point(model, *NARROW_CASE)
        for router in routers:
            router.route_log = []
        out["losses"][str(case)] = per_token_losses(model, batch, mask).cpu()
        out["routes"][str(case)] = [router.route_log.pop() for router in routers]
        if routes is not None:
            for router, logged in zip(routers, routes[str(case)]):
                router.route_log, router.route_replay = None, [logged]
            out["replayed"][str(case)] = per_token_losses(model, batch, mask).cpu()
        for router in routers:
            router.route_log = router.route_replay = None
    del model
    _free()
    return out


def routes_identical(reference: list, candidate: list) -> list[float]:
    """Per MoE layer, the share of tokens whose ranked experts (ids, in order, as many as both
    ranked) match."""
    out = []
    for r, c in zip(reference, candidate):
        width = min(r.shape[1], c.shape[1])
        out.append(float((r[:, :width].to(c.device) == c[:, :width]).all(dim=1).float().mean()))
    return out


def compare_losses(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Differences of two [tokens] loss vectors, in nats and relative to the reference's spread."""
    spread = float(reference.std())
    mean_diff = abs(float(candidate.mean()) - float(reference.mean()))
    token_diff = float((candidate - reference).abs().mean())
    return {
        "reference_loss": float(reference.mean()), "candidate_loss": float(candidate.mean()),
        "mean_loss_diff": mean_diff, "token_loss_diff": token_diff, "token_loss_spread": spread,
        "mean_rel": mean_diff / spread, "token_rel": token_diff / spread,
        "passed": mean_diff <= MEAN_LOSS_TOL * spread and token_diff <= TOKEN_LOSS_TOL * spread,
    }


# --- training ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    k: float
    """The k (the mean k for per-token ks) that prices the run's FLOPs."""
    overrides: dict
    stock: bool = False


def training_variants() -> list[Variant]:
    out = []
    for k in FIXED_KS:
        # At k = 1 top-k-then-softmax gives weight 1 (megatron refuses it): softmax over all.
        norm = "softmax_topk" if k == 1 else "topk_softmax"
        fixed = {"matryoshka.strategy": "fixed", "matryoshka.ks": [k], "matryoshka.normalization": norm}
        out.append(Variant(f"matryoshka k={k}", k, fixed))
        out.append(Variant(f"stock k={k}", k, fixed, stock=True))
    # What per-token ks cost against a fixed k, all else as the fixed-k runs (full-width experts,
    # no gate temperatures), priced at the mean k; the parity cases cover the widths.
    out.append(Variant(f"elastic per-token k in {ELASTIC_KS}", sum(ELASTIC_KS) / len(ELASTIC_KS),
                       {"matryoshka.strategy": "token", "matryoshka.ks": list(ELASTIC_KS),
                        "matryoshka.widths": [1.0], "matryoshka.gate_temperature": "none"}))
    return out


def _synthetic_microbatches(cfg, vocab: int, step: int, num: int, device) -> list[dict]:
    gen = torch.Generator().manual_seed(1000 + step)
    seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
    out = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
                    "loss_mask": torch.ones(mbs, seq, device=device),
                    "position_ids": torch.arange(seq).expand(mbs, seq).to(device)})
    return out


BLOCK_STEPS = 5
"""Timed steps each trainer of a group runs before the next one takes its turn."""


def timing_groups(variants: list[Variant]) -> list[list[Variant]]:
    """The runs whose step times are compared, timed together: those priced at one k (the
    Matryoshka and the stock router at a fixed k, and at the elastic run's mean k that run too)."""
    return [[v for v in variants if v.k == k] for k in dict.fromkeys(v.k for v in variants)]


@dataclass
class _Run:
    variant: Variant
    cfg: object
    trainer: object
    build_s: float
    static_bytes: int
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    peak_delta: int = 0


def train_group(setup: Setup, variants: list[Variant], backend: dict) -> dict:
    """`setup.steps` bf16 training steps of each variant (the first `setup.warmup` untimed), with
    every trainer of the group built first and the timed steps taken in turns of BLOCK_STEPS, the
    order rotating each round, so that a slow spell of the machine (the step of a model this size
    is bound by kernel launches, i.e. by the host) falls on every variant alike. Returns {name: row}
    or {name: the exception} for a variant that failed; the others are still measured."""
    out: dict = {}
    built: list[_Run] = []
    try:
        for variant in variants:
            try:
                built.append(_build(setup, variant, backend))
            except Exception as e:  # noqa: BLE001 - the group's other variants are still measured
                out[variant.name] = e
        for run in built:  # warm-up, untimed; the first step also allocates the optimizer's state
            _steps(setup, run, range(setup.warmup), timed=False)
        timed = list(range(setup.warmup, setup.steps))
        blocks = [timed[i:i + BLOCK_STEPS] for i in range(0, len(timed), BLOCK_STEPS)]
        for r, block in enumerate(blocks):
            for i in range(len(built)):
                run = built[(i + r) % len(built)]
                if run.variant.name not in out:
                    try:
                        _steps(setup, run, block, timed=True)
                    except Exception as e:  # noqa: BLE001
                        out[run.variant.name] = e
        for run in built:
            if run.variant.name not in out:
                out[run.variant.name] = _row(setup, run)
    finally:
        for run in built:
            run.trainer = None
        built.clear()
        _free()
    return {v.name: out[v.name] for v in variants}


def _build(setup: Setup, variant: Variant, backend: dict) -> _Run:
    from mmoe_megatron.training.trainer import Trainer

    if "train" in setup.fault and variant.name == "stock k=2":
        raise RuntimeError("deliberate fault (--fault train): this variant fails on purpose")
    cfg = setup.config(variant.name.replace(" ", "_").replace("=", ""), {**variant.overrides, **backend})
    before = _allocated(setup)
    start = time.perf_counter()
    os.makedirs(cfg.run_dir, exist_ok=True)
    # DeepSpeed prints memory tables while it builds the optimizer: keep them beside the run.
    with open(os.path.join(cfg.run_dir, "build.log"), "w") as log, contextlib.redirect_stdout(log):
        trainer = Trainer(cfg, vocab_size=cfg.model.vocab_size, datasets=(), stock_routing=variant.stock)
    return _Run(variant, cfg, trainer, time.perf_counter() - start, _allocated(setup) - before)


def _allocated(setup: Setup) -> int:
    return torch.cuda.memory_allocated() if setup.mode == "gpu" else 0


def _steps(setup: Setup, run: _Run, steps, timed: bool) -> None:
    if setup.mode == "gpu":
        torch.cuda.reset_peak_memory_stats()
    base = _allocated(setup)
    for step in steps:
        batches = _synthetic_microbatches(run.cfg, run.cfg.model.vocab_size, step,
                                          run.trainer.layout.num_microbatches, setup.device)
        _sync(setup)
        start = time.perf_counter()
        run.losses.append(run.trainer.train_step(step, batches)["loss"])
        _sync(setup)
        if timed:
            run.times.append(time.perf_counter() - start)
    if setup.mode == "gpu":
        run.peak_delta = max(run.peak_delta, torch.cuda.max_memory_allocated() - base)


def _row(setup: Setup, run: _Run) -> dict:
    from mmoe_megatron.config.derive import flops_per_token

    cfg, variant = run.cfg, run.variant
    step_s = statistics.median(run.times)
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    k = variant.k if float(variant.k).is_integer() else [variant.k] * cfg.num_moe_layers
    train_flops = 3 * flops_per_token(cfg, cfg.model.vocab_size, int(k) if not isinstance(k, list) else k)
    tokens_per_s = tokens / step_s
    return {
        "variant": variant.name, "k": variant.k, "stock_router": variant.stock,
        "step_s_median": step_s, "step_s_p10_p90": _p10_p90(run.times), "step_s": run.times,
        "tokens_per_step": tokens, "tokens_per_s": tokens_per_s, "train_flops_per_token": train_flops,
        "mfu": tokens_per_s * train_flops / setup.peak_flops if setup.peak_flops else None,
        # As if alone on the device: its weights and optimizer state, plus the most its steps
        # allocated above what the group held when they started.
        "peak_memory_gib": (run.static_bytes + run.peak_delta) / 2**30 if setup.mode == "gpu" else None,
        "first_loss": run.losses[0], "last_loss": run.losses[-1], "build_s": run.build_s,
        "finite": all(math.isfinite(x) for x in run.losses),
    }


def _p10_p90(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=10)
    return [q[0], q[-1]]


def _sync(setup: Setup) -> None:
    if setup.mode == "gpu":
        torch.cuda.synchronize()


def _free() -> None:
    # DeepSpeed binds methods of its optimizer to every parameter (a reference cycle through the
    # parameter itself): the first collection breaks the engine, the second frees the weights.
    gc.collect()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
