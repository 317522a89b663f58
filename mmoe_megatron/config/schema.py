"""The experiment config tree: one YAML file per experiment maps onto `ExperimentConfig`.

Each section is a dataclass with a docstring under every field. Types and numeric bounds are
checked by the loader (`config.base`); relations between fields are checked by the section's
`check(path)` and, across sections, by `ExperimentConfig.check()`. A violation raises
`ConfigError` naming the dotted field and what would be accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

from mmoe_megatron.config.base import ConfigError, field


@dataclass
class ModelConfig:
    num_layers: int = field(ge=1)
    """Transformer layers (dense and MoE together)."""
    hidden_size: int = field(ge=1)
    num_attention_heads: int = field(ge=1)
    num_query_groups: Optional[int] = field(None, ge=1)
    """Key/value heads for grouped-query attention; null means one per attention head."""
    ffn_hidden_size: Optional[int] = field(None, ge=1)
    """Hidden width of the dense MLP in non-MoE layers; null means 4 * hidden_size."""
    kv_channels: Optional[int] = field(None, ge=1)
    """Per-head dimension; null means hidden_size / num_attention_heads."""
    vocab_size: Optional[int] = field(None, ge=1)
    """Vocabulary size before padding. null: read from the tokenizer named in data.tokenizer."""
    make_vocab_size_divisible_by: int = field(128, ge=1)
    """The embedding table is padded to a multiple of this times the tensor-parallel size."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = field(1e-6, gt=0)
    qk_layernorm: bool = True
    """Per-head RMSNorm on queries and keys (as in Qwen3-MoE)."""
    rotary_base: int = field(10000, ge=1)
    init_method_std: float = field(0.02, gt=0)
    init_seed: Optional[int] = field(None, ge=0)
    """Seed of the initial weights; null means train.seed. Fix it (with data.seed and
    matryoshka.seed) to vary one source of a run's randomness at a time across train.seed values."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    attention_dropout: float = field(0.0, ge=0, lt=1)
    hidden_dropout: float = field(0.0, ge=0, lt=1)
    backend: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementations: megatron-core's local modules, or Transformer Engine's (GPU).
    auto picks Transformer Engine when it is installed and CUDA is present."""

    def check(self, path: str) -> None:
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ConfigError(
                f"{path}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; change one, or set kv_channels explicitly",
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"{path}.num_query_groups",
                f"{groups} does not divide num_attention_heads={self.num_attention_heads}",
            )


@dataclass
class MoEConfig:
    num_experts: int = field(ge=2)
    expert_ffn_hidden_size: int = field(ge=1)
    """Hidden width of each routed expert (SwiGLU)."""
    shared_expert_ffn_hidden_size: Optional[int] = field(None, ge=1)
    """Hidden width of an always-on shared expert (SwiGLU) in every MoE layer, added to the routed
    experts' output at every k (DeepSeek-MoE, Qwen2-MoE; megatron-core's SharedExpertMLP), so the
    routed experts need not each carry what every token needs; null = none. Dense weights (not
    expert-parallel), full width at every expert width. Not exportable to Qwen3-MoE."""
    layer_freq: Union[int, list[int]] = 1
    """1 = every layer is MoE; N = every N-th layer; or a 0/1 list with one entry per layer."""
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """Token dispatcher; both are dropless unless capacity_factor is set."""
    aux_loss_coeff: float = field(1e-2, ge=0)
    """Switch load-balancing loss weight (0 disables it)."""
    z_loss_coeff: Optional[float] = field(None, ge=0)
    capacity_factor: Optional[float] = field(None, gt=0)
    """null = dropless. Otherwise each expert takes at most ceil(T * mean_k * cf / E) tokens."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    router_dtype: Literal["fp32", "fp64", "model"] = "fp32"
    """Precision of the router logits; fp32 keeps top-k choices stable under bf16."""
    grouped_gemm: bool = False
    """Run local experts as one grouped GEMM (GPU with Transformer Engine)."""
    permute_fusion: bool = False
    """Fused token permutation (GPU with Transformer Engine)."""

    def check(self, path: str, num_layers: int) -> None:
        if isinstance(self.layer_freq, list):
            if len(self.layer_freq) != num_layers or set(self.layer_freq) - {0, 1}:
                raise ConfigError(
                    f"{path}.layer_freq",
                    f"a list must hold one 0 or 1 per layer ({num_layers} entries); "
                    f"got {self.layer_freq}",
                )
            if 1 not in self.layer_freq:
                raise ConfigError(f"{path}.layer_freq", "no layer is an MoE layer")
        elif not 1 <= self.layer_freq <= num_layers:
            raise ConfigError(
                f"{path}.layer_freq", f"got {self.layer_freq}; must be in 1..{num_layers}"
            )

    def moe_layer_pattern(self, num_layers: int) -> list[int]:
        if isinstance(self.layer_freq, list):
            return list(self.layer_freq)
        return [1 if i % self.layer_freq == 0 else 0 for i in range(num_layers)]


AUTO_WIDTHS = (0.25, 0.5, 0.75, 1.0)
"""The expert widths `matryoshka.widths: auto` trains an elastic model at."""


@dataclass
class MatryoshkaConfig:
    method: Literal["matryoshka", "top_p", "emoe"] = "matryoshka"
    """Routing method trained. matryoshka: the k from `strategy` (fixed = specialist or standard
    top-k). Baselines, compared on equal terms: top_p (each token takes the fewest experts whose
    probability reaches `top_p`, at most k_max; Huang et al. 2024) and emoe (stochastic
    co-activation sampling with a sharpening loss; EMoE, arXiv 2509.21892). Baselines need
    strategy fixed; every method is evaluated at forced ks."""
    strategy: Literal["fixed", "global", "microbatch", "layerwise", "token"] = "token"
    """How often k is drawn: fixed (specialist baseline), one k per global batch, per micro-batch,
    per MoE layer per global batch (M-MoE's best), or per token per layer (the default: the lowest
    loss over k at equal training compute in this project's ablations, two seeds; RESULTS.md)."""
    ks: list[int] = field([1, 2, 3, 4], ge=1)
    """The allowed ks (training range). Its maximum is k_max, the router's build-time top-k.
    With strategy fixed it must hold exactly one k."""
    distribution: Literal["uniform", "capacity", "explicit", "small_k", "equal_compute"] = "uniform"
    """uniform over ks; capacity: P(k) proportional to k**(1/tau); explicit: `probs`; small_k:
    k_max drawn with probability `k_max_share`, the other ks evenly (for a run whose progressive
    shrinking trains the wide routing first); equal_compute: P(k) proportional to 1/k, so every
    k gets the same share of the routed experts' compute."""
    tau: float = field(2.0, gt=0)
    probs: Optional[list[float]] = field(None, ge=0)
    """With distribution explicit: one probability per entry of ks, summing to 1."""
    k_max_share: Optional[float] = field(None, gt=0, lt=1)
    """With distribution small_k: the probability of k_max, e.g. 0.05."""
    seed: Optional[int] = field(None, ge=0)
    """Seed of the k draws; null means train.seed."""
    normalization: Literal["topk_softmax", "softmax_topk", "nested"] = "topk_softmax"
    """topk_softmax: softmax over the k selected logits (weights sum to 1, as in Qwen3-MoE with
    norm_topk_prob). softmax_topk: softmax over all experts, keep the top k (sum < 1). nested:
    the weights topk_softmax gives at k_max, kept for a token's first k experts, each scaled by
    a gate per doubling block of ranks (1 | 2 | 3-4 | 5-8 | ...) that every MoE layer learns (1
    at the start): a token's weights do not depend on its k, so doubling k adds the next block to
    the output without reweighting the experts it had, and the gates decide how much each block
    adds. Needs method matryoshka and no temperature per k; not exportable to Qwen3-MoE."""
    k1_router_grad: Literal["straight_through", "none"] = "straight_through"
    """With topk_softmax, a token routed to one expert has weight 1 and its router gets no LM-loss
    gradient. straight_through keeps the weight at 1 but passes the gradient of the expert's
    softmax probability (weight 1 + (p - stop_grad(p))); none leaves only the aux losses. Under
    normalization nested a k = 1 weight depends on the router already, and this does nothing."""
    gate_temperature: Literal["auto", "none", "learned"] = "auto"
    """learned: every MoE layer learns one temperature per trained k that divides the selected
    logits before the softmax over them (the combine weights; which experts are chosen is
    unchanged), so the weighting of k = 8 experts can differ from that of k = 2. ks between trained
    ks interpolate the log-temperature in log k; ks outside the range take the nearest end's.
    Needs topk_softmax and more than one k. The export folds the temperature of its k into the
    gate weights and records the others (`load_hf_model` and the vLLM plugin rescale for any k).
    auto (the default): learned for an elastic model (method matryoshka, more than one k,
    strategy not fixed) with topk_softmax, none otherwise: learned together with elastic
    widths, it lowered the elastic model's validation loss on each of 3 seeds (RESULTS.md, the
    elasticity ladder)."""
    sync_check_interval: int = field(0, ge=0)
    """Every N steps gather the ks each rank used and fail on any mismatch (0 = off)."""
    eval_ks: list[int] = field([], ge=1)
    """ks at which validation loss is reported during training; empty means min, mid and max."""
    top_p: float = field(0.5, gt=0, le=1)
    """method top_p: probability mass each token's experts must reach."""
    emoe_pool_k: Optional[int] = field(None, ge=1)
    """method emoe: largest pool size; each token draws a pool of top-ranked experts of size
    uniform in [k, emoe_pool_k] and uses k of them chosen at random (compute stays at k)."""
    emoe_sharpen_coeff: float = field(1e-3, ge=0)
    """method emoe: weight of the router sharpening loss -KL(q || uniform)."""
    sandwich: float = field(0.0, ge=0, le=1)
    """Share of the samples of every global batch routed at the smallest k (half of the share) and
    at the largest k (the other half) in every MoE layer, as the sandwich rule of slimmable
    networks trains the smallest and widest network every step; the rest are drawn by `strategy`.
    Exact in every step: share x global_batch_size / 2 must be a whole number of samples."""
    coupled: float = field(0.0, ge=0, le=1)
    """Share of the samples of every global batch routed at one k, drawn per sample from the
    distribution, in every MoE layer and at every token: the configurations served at a uniform
    k, which independent per-layer draws almost never produce. share x global_batch_size must be
    a whole number of samples."""
    shrink_fraction: float = field(0.0, ge=0, lt=1)
    """Progressive shrinking (Once-for-All): during this fraction of training the ks are
    introduced from the largest down in len(ks) - 1 equal stages (first only k_max, then also the
    next smaller k, ...), every k afterwards; the widest routing is learned before narrower ones
    share it. 0 = every k from the start."""
    late_fraction: float = field(0.0, ge=0, lt=1)
    """A late phase: during this last fraction of training the ks are drawn with `late_probs`
    instead of the distribution (the sample plan unchanged), e.g. towards the wide routings while
    the learning rate decays, after the narrow ones have shaped the experts. 0 = none."""
    late_probs: Optional[list[float]] = field(None, ge=0)
    """With late_fraction: one probability per entry of ks, summing to 1."""
    gate_gain: Literal["none", "learned", "channels"] = "none"
    """learned: every MoE layer learns one gain per trained k (1 at the start) that multiplies the
    combine weights, so at k they sum to the gain instead of 1. Without it the only way to keep a
    layer's output as large at k = 8 as at k = 1 (the weighted mean of 8 experts is smaller than
    one expert's output) is to sharpen the combine onto a few experts, which is what learned
    temperatures do; the gain keeps the size and leaves the weights free. ks between trained ks
    interpolate the log-gain in log k. Needs topk_softmax and an elastic model. The export folds the
    gain of its k into the experts' down projections and records the others (`load_hf_model` and
    the vLLM plugin rescale for any k).
    channels: a gain per trained k and per hidden channel (a vector of hidden_size, 1 at the start)
    on the routed experts' combined output instead, so each k's output can be rescaled channel by
    channel to what the layers after it expect: a private, per-k part of the model at H x len(ks)
    parameters per MoE layer, the weights every k shares left alone. Same requirements;
    experimental, not exportable yet."""
    k_adapter_rank: int = field(0, ge=0)
    """Every MoE layer learns, per trained k, a low-rank linear map of this rank (2 x rank x
    hidden_size parameters per k) whose output is added to the routed experts' combined output of
    the tokens at that k (ks between trained ks mix their neighbours' maps in log k). It starts at
    zero, so the model starts as the one without. A private, per-k part of the model: the layers
    after an MoE layer see each k's output corrected by that k's own map, and need not bend the
    weights every k shares towards the small ks. Needs an elastic model; experimental, not
    exportable yet. 0 = off."""
    rank_gate: Literal["none", "learned"] = "none"
    """learned: every MoE layer learns a gate per doubling block of ranks past the first (2 | 3-4 |
    5-8 | ..., 1 at the start) that multiplies the combine weight of the experts at those ranks
    before the weights are normalised (a log-gate added to their selected logits): the experts a
    larger k adds can be weighted apart from those a smaller k already had, which one temperature
    per k cannot do. The block 5-8 is only routed at k >= 5, so its gate is learned from those
    draws alone. Needs topk_softmax and an elastic model; experimental, not exportable yet."""
    gate_temperature_floor: float = field(0.0, ge=0, lt=1)
    """With learned gate temperatures: the lowest temperature a layer may apply at any k (the
    learned log-temperature is clamped from below, in training, evaluation and export), so the
    combine weights of the wide routings cannot sharpen onto a few experts. 0 = no floor."""
    distill_coeff: float = field(0.0, ge=0, lt=1)
    """Self-distillation from the widest routing: a teacher forward of the same weights at k_max
    in every MoE layer (no gradient, eval mode) precedes each micro-batch, and the training loss
    becomes (1 - c) * cross-entropy + c * T^2 * KL(teacher || student) per token. Costs one extra
    forward per micro-batch (counted in the training compute). 0 = off."""
    distill_temperature: float = field(1.0, gt=0)
    """Softmax temperature T of the distillation targets and student."""
    expert_grad: Literal["all", "added"] = "all"
    """all: a token's loss trains every expert it is routed to. added: a token routed at k trains
    only its experts ranked k // 2 + 1 ... k, those its k adds to the routing at k // 2 (its other
    experts still give their outputs, and the router its full gradient); each expert then learns
    what the prefix served at the smaller k misses, as a boosting stage does, and the experts
    ranked within k // 2 learn from the tokens drawn at the smaller ks. Every rank up to k_max must
    be trained by some k (each k trains ranks k // 2 + 1 ... k: ks 1, 2, 4, 8 cover 1 ... 8). Same
    compute. Needs method matryoshka and the local or grouped experts."""
    expert_grad_ks: Optional[list[int]] = field(None, ge=1)
    """With expert_grad added, the ks it applies to (a subset of ks); tokens drawn at the other ks
    train every expert they use. null: every k. E.g. [k_max]: only the widest routing's added
    experts fit the residual of its first half, which the smaller ks keep training in full."""
    # --- the width axis: slimmable experts (MoSE, arXiv 2602.06154) ----------------------------
    widths: Union[Literal["auto"], list[float]] = field("auto", gt=0, le=1)
    """Fractions of its FFN at which an expert can run: at width w an expert uses the first
    w x moe.expert_ffn_hidden_size columns of its gate and up projections and the same rows of its
    down projection (a nested prefix, so the experts at width w are part of those at any wider w).
    Strictly increasing, must contain 1.0, and each w x expert_ffn_hidden_size must be a whole number
    of columns. [1.0]: every expert at full width, as without this axis.
    auto (the default): AUTO_WIDTHS for an elastic model (method matryoshka, more than one k,
    strategy not fixed) whose expert FFN they cut in whole columns, without tensor parallelism or progressive
    shrinking, which refuse elastic widths; [1.0] otherwise (a fixed-k specialist, a baseline)."""
    width_strategy: Optional[Literal["global", "microbatch", "layerwise", "token"]] = None
    """How often a width is drawn, with the same meanings as `strategy`. null: as `strategy`, or
    token when `strategy` is fixed (a fixed-k model with elastic width, as in MoSE)."""
    width_probs: Optional[list[float]] = field(None, ge=0)
    """P(width) for each entry of `widths`, summing to 1; null: uniform."""
    width_pairing: Literal["independent", "joint"] = "independent"
    """independent: the width is drawn independently of k. joint: one draw sets both, the q-th
    quantile of the k distribution with the q-th quantile of the width distribution (few experts
    run narrow, many run wide); needs the width drawn as often as k (width_strategy null)."""

    resolved_auto: tuple = dataclasses.field(default=(), init=False, compare=False, repr=False)
    """The fields that were `auto` before `resolve_auto` (a saved config writes them as auto)."""

    def check(self, path: str) -> None:
        if not self.ks:
            raise ConfigError(f"{path}.ks", "must list at least one k")
        if sorted(set(self.ks)) != self.ks:
            raise ConfigError(f"{path}.ks", f"must be strictly increasing, got {self.ks}")
        if self.strategy == "fixed" and len(self.ks) != 1:
            raise ConfigError(
                f"{path}.ks", f"strategy fixed trains at one k; give exactly one, got {self.ks}"
            )
        if self.distribution == "explicit":
            if self.probs is None or len(self.probs) != len(self.ks):
                raise ConfigError(
                    f"{path}.probs", f"distribution explicit needs one probability per k in {self.ks}"
                )
            if abs(sum(self.probs) - 1.0) > 1e-6:
                raise ConfigError(f"{path}.probs", f"must sum to 1, got {sum(self.probs)}")
        elif self.probs is not None:
            raise ConfigError(f"{path}.probs", "only used with distribution: explicit; remove it")
        if self.distribution == "small_k":
            if self.k_max_share is None:
                raise ConfigError(f"{path}.k_max_share",
                                  "distribution small_k needs the probability of k_max, e.g. 0.05")
            if len(self.ks) < 2:
                raise ConfigError(f"{path}.distribution",
                                  f"small_k shares the draws between k_max and the smaller ks; "
                                  f"ks {self.ks} has one k: use distribution uniform")
        elif self.k_max_share is not None:
            raise ConfigError(f"{path}.k_max_share", "only used with distribution: small_k; remove it")
        if self.method != "matryoshka" and self.strategy != "fixed":
            raise ConfigError(
                f"{path}.strategy",
                f"method {self.method} trains at one k (its cap or k_train); set strategy: fixed",
            )
        if self.method == "emoe" and (self.emoe_pool_k is None or self.emoe_pool_k <= self.k_max):
            raise ConfigError(
                f"{path}.emoe_pool_k",
                f"method emoe needs a pool larger than k={self.k_max}, e.g. {2 * self.k_max}",
            )
        if self.sandwich + self.coupled > 1:
            raise ConfigError(
                f"{path}.coupled", f"sandwich ({self.sandwich}) + coupled ({self.coupled}) exceed 1"
            )
        for name in ("sandwich", "coupled", "distill_coeff", "shrink_fraction", "late_fraction"):
            if getattr(self, name) > 0 and not self.elastic:
                raise ConfigError(
                    f"{path}.{name}",
                    "only for an elastic model (method matryoshka, more than one k, strategy not "
                    "fixed); set it to 0",
                )
        if self.late_fraction > 0:
            if self.late_probs is None or len(self.late_probs) != len(self.ks) or abs(sum(self.late_probs) - 1.0) > 1e-6:
                raise ConfigError(f"{path}.late_probs",
                                  f"late_fraction needs one probability per k in {self.ks}, summing to 1; "
                                  f"got {self.late_probs}")
            if self.shrink_fraction + self.late_fraction > 1:
                raise ConfigError(f"{path}.late_fraction",
                                  f"shrink_fraction ({self.shrink_fraction}) and late_fraction "
                                  f"({self.late_fraction}) together exceed the run")
        elif self.late_probs is not None:
            raise ConfigError(f"{path}.late_probs", "only used with late_fraction > 0; remove it")
        if self.expert_grad_ks is not None:
            if self.expert_grad != "added":
                raise ConfigError(f"{path}.expert_grad_ks", "only used with expert_grad: added; remove it")
            if not self.expert_grad_ks or not set(self.expert_grad_ks) <= set(self.ks):
                raise ConfigError(f"{path}.expert_grad_ks",
                                  f"must list some of the trained ks {self.ks}, got {self.expert_grad_ks}")
        if self.expert_grad == "added":
            if not self.elastic:
                raise ConfigError(f"{path}.expert_grad", "added splits the experts' training among the "
                                  "ks; it needs an elastic model (method matryoshka, more than one k, strategy "
                                  "not fixed): set it to all")
            added = self.added_grad_ks
            untrained = [r for r in range(1, self.k_max + 1)
                         if not any(r <= k and (k not in added or r > k // 2) for k in self.ks)]
            if untrained:
                raise ConfigError(f"{path}.expert_grad",
                                  f"with ks {self.ks} no k trains the experts ranked {untrained} (a k that it "
                                  f"applies to trains ranks k // 2 + 1 ... k, another k ranks 1 ... k); add "
                                  f"ks, e.g. doubling ones, narrow expert_grad_ks, or set it to all")
        if self.gate_temperature == "learned" and (not self.elastic or self.normalization != "topk_softmax"):
            raise ConfigError(
                f"{path}.gate_temperature",
                "a temperature per k needs an elastic model (method matryoshka, more than one k, "
                "strategy not fixed) with normalization topk_softmax; set it to none",
            )
        if self.gate_gain != "none" and (not self.elastic or self.normalization != "topk_softmax"):
            raise ConfigError(
                f"{path}.gate_gain",
                "a gain per k needs an elastic model (method matryoshka, more than one k, strategy not "
                "fixed) with normalization topk_softmax; set it to none",
            )
        if self.rank_gate != "none" and (not self.elastic or self.normalization != "topk_softmax"):
            raise ConfigError(
                f"{path}.rank_gate",
                "a gate per block of ranks needs an elastic model (method matryoshka, more than one k, "
                "strategy not fixed) with normalization topk_softmax (nested learns its own); set it to none",
            )
        if self.k_adapter_rank and not self.elastic:
            raise ConfigError(
                f"{path}.k_adapter_rank",
                "an adapter per k needs an elastic model (method matryoshka, more than one k, strategy "
                "not fixed); set it to 0",
            )
        if self.gate_temperature_floor > 0 and self.gate_temperature == "none":
            raise ConfigError(f"{path}.gate_temperature_floor",
                              "a floor bounds learned gate temperatures; set gate_temperature: learned "
                              "(or auto, for an elastic model) or remove the floor")
        if self.normalization == "nested" and self.method != "matryoshka":
            raise ConfigError(
                f"{path}.normalization",
                f"nested weights blocks of a ranking's leading experts; method {self.method} does not "
                "use a leading prefix of the ranking; use topk_softmax or softmax_topk",
            )
        if self.k_max == 1 and self.normalization != "softmax_topk":
            # megatron-core refuses this at build time (transformer_config.py:1633-1641).
            raise ConfigError(
                f"{path}.normalization",
                f"with k_max = 1, {self.normalization} gives every token a weight that does not depend "
                "on the router; use softmax_topk for a k = 1 model",
            )

    def check_widths(self, path: str) -> None:
        """The width axis on its own (whole columns are checked with the MoE section)."""
        w = self.widths
        if not w or sorted(set(w)) != w:
            raise ConfigError(f"{path}.widths", f"must be strictly increasing fractions, got {w}")
        if w[-1] != 1.0:
            raise ConfigError(
                f"{path}.widths",
                f"must contain 1.0 (the full expert, which every narrower width is a prefix of and "
                f"which export and the widest routing use); got {w}, e.g. {w + [1.0]}",
            )
        if self.width_probs is not None:
            if len(self.width_probs) != len(w) or abs(sum(self.width_probs) - 1.0) > 1e-6:
                raise ConfigError(f"{path}.width_probs",
                                  f"needs one probability per width in {w}, summing to 1; got {self.width_probs}")
        if not self.elastic_width:
            for name in ("width_strategy", "width_probs"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{path}.{name}", "only used with more than one width; remove it")
            if self.width_pairing != "independent":
                raise ConfigError(f"{path}.width_pairing", "only used with more than one width")
            return
        if self.method != "matryoshka":
            raise ConfigError(f"{path}.widths",
                              f"elastic widths are trained with method matryoshka, not {self.method}")
        if self.shrink_fraction > 0:
            raise ConfigError(f"{path}.shrink_fraction",
                              "progressive shrinking stages the ks only, not the widths; set it to 0 "
                              "with more than one width")
        if self.width_pairing == "joint" and self.late_fraction > 0:
            raise ConfigError(f"{path}.late_fraction",
                              "joint pairing sets the width from the k draw's quantile, which a late "
                              "phase changes; use width_pairing: independent with a late phase")
        if self.width_pairing == "joint" and (self.width_strategy is not None or self.strategy == "fixed"):
            raise ConfigError(
                f"{path}.width_pairing",
                "joint draws one quantile for k and width, so both must be drawn as often: leave "
                "width_strategy null and use an elastic k strategy (or choose independent)",
            )

    @property
    def added_grad_ks(self) -> tuple[int, ...]:
        """The ks at which a token trains only the experts its k adds (`expert_grad`); () for none."""
        if self.expert_grad != "added":
            return ()
        return tuple(self.expert_grad_ks if self.expert_grad_ks is not None else self.ks)

    @property
    def elastic(self) -> bool:
        """Trains at more than one k: the model the elastic-only settings apply to."""
        return self.method == "matryoshka" and self.strategy != "fixed" and len(self.ks) > 1

    def resolve_auto(self, expert_ffn_hidden_size: int, tensor_parallel: int) -> None:
        """Replace each `auto` setting by the value it stands for (`ExperimentConfig.check` calls
        this first, so a loaded config holds the values trained; a saved one writes them as auto
        again, `config.as_written`)."""
        auto = tuple(name for name in ("gate_temperature", "widths") if getattr(self, name) == "auto")
        if "gate_temperature" in auto:
            learned = self.elastic and self.normalization == "topk_softmax"
            self.gate_temperature = "learned" if learned else "none"
        if "widths" in auto:
            whole_columns = all(float(w * expert_ffn_hidden_size).is_integer() for w in AUTO_WIDTHS)
            slimmable = self.elastic and tensor_parallel == 1 and self.shrink_fraction == 0 and whole_columns
            self.widths = list(AUTO_WIDTHS) if slimmable else [1.0]
        self.resolved_auto += auto

    @property
    def elastic_width(self) -> bool:
        if self.widths == "auto":
            raise ValueError("matryoshka.widths is still auto: ExperimentConfig.check() resolves it")
        return len(self.widths) > 1

    @property
    def resolved_width_strategy(self) -> str:
        if self.width_strategy is not None:
            return self.width_strategy
        return "token" if self.strategy == "fixed" else self.strategy

    @property
    def k_max(self) -> int:
        return max(self.ks)

    def resolved_eval_ks(self) -> list[int]:
        if self.eval_ks:
            return list(self.eval_ks)
        mid = self.ks[len(self.ks) // 2] if len(self.ks) > 2 else None
        return sorted({self.ks[0], self.ks[-1]} | ({mid} if mid else set()))


@dataclass
class ParallelConfig:
    tensor: int = field(1, ge=1)
    """Tensor parallel size (GPU with Transformer Engine; MoE then needs sequence parallel)."""
    pipeline: int = field(1, ge=1)
    """Pipeline parallel size. Only 1 is supported under the DeepSpeed engine."""
    expert: int = field(1, ge=1)
    """Expert parallel size; experts are split evenly over this many ranks."""
    distributed_timeout_minutes: int = field(10, ge=1)
    """Collectives that wait longer than this fail the job instead of hanging."""

    def check(self, path: str) -> None:
        if self.pipeline != 1:
            raise ConfigError(
                f"{path}.pipeline",
                "pipeline parallelism is not supported: the DeepSpeed engine drives one model "
                "chunk per rank; use data and expert parallelism (and tensor on GPU)",
            )


@dataclass
class BlendEntry:
    prefix: str
    """Path prefix of a megatron-core indexed dataset (`<prefix>.bin` and `<prefix>.idx`)."""
    weight: float = field(1.0, gt=0)


@dataclass
class DataConfig:
    seq_length: int = field(ge=2)
    """Tokens per training sample."""
    tokenizer: Optional[str] = None
    """SentencePiece model file. Required unless data.mock is true."""
    blend: list[BlendEntry] = field([])
    """Training datasets and their sampling weights."""
    split: str = "98,2,0"
    """train,validation,test ratios applied to every dataset in the blend (by document)."""
    valid_blend: Optional[list[BlendEntry]] = None
    """Separate validation datasets; when given, `split` is ignored for validation."""
    train_fraction: float = field(1.0, gt=0, le=1)
    """Train on the first this fraction of the train split's documents only; the validation and
    test splits keep theirs. At a fixed number of training tokens, fewer documents mean more
    epochs over them: this separates the effect of repeating data from that of training longer."""
    mock: bool = False
    """Use megatron-core's synthetic dataset (smoke tests only)."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches sample indices; null means <run dir>/data_cache."""
    eod_mask_loss: bool = False
    seed: Optional[int] = field(None, ge=0)
    """Seed of megatron-core's document and sample shuffling (the training order and which
    validation samples are drawn); null means train.seed. Fix it to compare models trained with
    different train.seed values on the same tokens, or to evaluate them on the same samples."""

    def check(self, path: str) -> None:
        if not self.mock:
            if self.tokenizer is None:
                raise ConfigError(f"{path}.tokenizer", "required unless data.mock is true")
            if not self.blend:
                raise ConfigError(f"{path}.blend", "list at least one dataset (prefix, weight)")
        if self.mock and self.train_fraction < 1:
            raise ConfigError(f"{path}.train_fraction", "selects documents of data.blend, which "
                              "data.mock has none of; use 1 with mock data")
        parts = self.split.split(",")
        try:
            ratios = [float(p) for p in parts]
        except ValueError:
            ratios = []
        if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
            raise ConfigError(
                f"{path}.split", f"got {self.split!r}; expected three non-negative numbers 'a,b,c'"
            )


@dataclass
class TrainConfig:
    micro_batch_size: int = field(ge=1)
    """Samples per rank per forward pass."""
    global_batch_size: int = field(ge=1)
    """Samples per optimizer step over all data-parallel ranks (micro-batches accumulate)."""
    train_iters: int = field(ge=1)
    seed: int = field(1234, ge=0)
    precision: Literal["fp32", "bf16"] = "bf16"
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: selective recomputes the MoE layer; full recomputes whole layers."""
    eval_interval: int = field(0, ge=0)
    """Validate every N steps at matryoshka.eval_ks (0 = only at the end)."""
    eval_iters: int = field(10, ge=1)
    log_interval: int = field(1, ge=1)
    exit_interval: Optional[int] = field(None, ge=1)
    """Checkpoint and exit when the step is a multiple of this (to split a run across jobs)."""
    nonfinite_policy: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient is not finite is never applied (every rank skips its update
    and the optimizer state stays as it was). stop: fail once the run has had
    max_nonfinite_steps such steps in all; skip: carry on, failing only after
    max_nonfinite_steps consecutive ones."""
    max_nonfinite_steps: int = field(1, ge=1)
    """See nonfinite_policy: total (stop) or consecutive (skip) non-finite steps that end the run."""


@dataclass
class OptimizerConfig:
    lr: float = field(3e-4, gt=0)
    min_lr: float = field(3e-5, ge=0)
    weight_decay: float = field(0.1, ge=0)
    beta1: float = field(0.9, ge=0, lt=1)
    beta2: float = field(0.95, ge=0, lt=1)
    eps: float = field(1e-8, gt=0)
    clip_grad: float = field(1.0, ge=0)
    """Global gradient-norm clipping (0 disables). Always set explicitly: DeepSpeed defaults to 1."""
    grad_norm: Literal["exact", "deepspeed"] = "exact"
    """How the clipped gradient norm is summed over data-parallel ranks. exact: in float64 until
    every rank's part is in, so a run clips by the same factor, and trains the same weights, on any
    number of ranks. deepspeed: DeepSpeed's own sum, which rounds each rank's part to float32 first
    (runs on 1 and 2 ranks then part at the first step where that rounding changes the factor)."""
    warmup_iters: int = field(0, ge=0)
    decay_style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    wsd_decay_fraction: float = field(0.2, gt=0, le=1)
    """With decay_style wsd: the final fraction of training spent decaying to min_lr."""
    zero_stage: Literal[1, 2] = 1
    """DeepSpeed ZeRO stage sharding optimizer states (1) and gradients (2)."""
    train_only: Optional[list[str]] = None
    """null trains every parameter. A list of shell-style patterns of global parameter names
    (fnmatch; experts numbered globally, as in checkpoints) trains only the parameters matching
    one of them; the others keep the values they start with (checkpoint.init_weights or a resume)
    and get no gradient, optimizer state or weight decay. E.g. ['*.mlp.router.*'] fine-tunes
    the routers and their temperatures over frozen experts. A pattern that matches no parameter
    is an error."""

    def check(self, path: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr", f"{self.min_lr} exceeds lr={self.lr}")
        if self.train_only is not None and not self.train_only:
            raise ConfigError(f"{path}.train_only", "is empty, which would train nothing: "
                                                    "give at least one pattern, or null to train everything")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Where checkpoints go; null means <logging.dir>/checkpoints."""
    save_interval: int = field(0, ge=0)
    """Save every N steps (0 = only at the end)."""
    keep_last: int = field(2, ge=1)
    keep_steps: list[int] = field([], ge=1)
    """Steps whose checkpoints are also saved (whatever save_interval says) and never pruned,
    e.g. to evaluate one run at several points of training."""
    load: Optional[str] = "auto"
    """auto: resume from the latest complete checkpoint in `dir` if there is one;
    a path: start from that checkpoint; null: always start fresh."""
    init_weights: Optional[str] = None
    """Weights to start from when no checkpoint is resumed (continued pretraining from imported
    weights): a directory of global-named safetensors files, i.e. a checkpoint of this project or
    its model/ folder. The optimizer state starts fresh; a resumed run ignores this."""
    layout_free_optimizer: bool = True
    """Also store the optimizer state (Adam moments; fp32 masters under bf16) under global
    parameter names, so that the checkpoint resumes on another world size, expert-parallel size or
    ZeRO stage. Costs 8 (fp32) or 12 (bf16) bytes per parameter on disk and an all-reduce of that
    state per save; without it a checkpoint resumes only on the layout that wrote it."""


@dataclass
class LoggingConfig:
    dir: Optional[str] = None
    """Run directory (resolved config, TensorBoard, metrics); null means runs/<name>."""
    tensorboard: bool = True


@dataclass
class ExperimentConfig:
    name: str
    model: ModelConfig
    moe: MoEConfig
    data: DataConfig
    train: TrainConfig
    matryoshka: MatryoshkaConfig = field(MatryoshkaConfig())
    parallel: ParallelConfig = field(ParallelConfig())
    optimizer: OptimizerConfig = field(OptimizerConfig())
    checkpoint: CheckpointConfig = field(CheckpointConfig())
    logging: LoggingConfig = field(LoggingConfig())

    def check(self) -> "ExperimentConfig":
        """Cross-field validation; returns self so loading can chain it."""
        self.model.check("model")
        self.moe.check("moe", self.model.num_layers)
        self.matryoshka.resolve_auto(self.moe.expert_ffn_hidden_size, self.parallel.tensor)
        self.matryoshka.check("matryoshka")
        self.matryoshka.check_widths("matryoshka")
        self.parallel.check("parallel")
        self.data.check("data")
        self.optimizer.check("optimizer")
        experts = self.moe.num_experts
        if self.matryoshka.k_max > experts:
            raise ConfigError(
                "matryoshka.ks", f"k_max={self.matryoshka.k_max} exceeds moe.num_experts={experts}"
            )
        if (self.matryoshka.emoe_pool_k or 0) > experts:
            raise ConfigError(
                "matryoshka.emoe_pool_k", f"{self.matryoshka.emoe_pool_k} exceeds moe.num_experts={experts}"
            )
        if self.matryoshka.k_adapter_rank > self.model.hidden_size:
            raise ConfigError(
                "matryoshka.k_adapter_rank",
                f"{self.matryoshka.k_adapter_rank} exceeds model.hidden_size={self.model.hidden_size} (a map "
                "of rank hidden_size is already a full one); choose a rank up to it",
            )
        bad_eval = [k for k in self.matryoshka.eval_ks if k > experts]
        if bad_eval:
            raise ConfigError("matryoshka.eval_ks", f"{bad_eval} exceed moe.num_experts={experts}")
        if experts % self.parallel.expert:
            raise ConfigError(
                "parallel.expert",
                f"{self.parallel.expert} does not divide moe.num_experts={experts}",
            )
        if self.moe.permute_fusion or self.moe.grouped_gemm:
            if self.model.backend == "local":
                raise ConfigError(
                    "moe.permute_fusion" if self.moe.permute_fusion else "moe.grouped_gemm",
                    "needs Transformer Engine; set model.backend to auto or transformer_engine",
                )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.train.micro_batch_size}",
            )
        mat = self.matryoshka
        for name, share in (("sandwich", mat.sandwich / 2), ("coupled", mat.coupled)):
            samples = share * self.train.global_batch_size
            if abs(samples - round(samples)) > 1e-6:
                raise ConfigError(
                    f"matryoshka.{name}",
                    f"{share:g} of train.global_batch_size={self.train.global_batch_size} is "
                    f"{samples:g} samples{' per side' if name == 'sandwich' else ''}; choose a share "
                    "that gives whole samples",
                )
        if mat.distill_coeff > 0 and self.parallel.tensor > 1:
            raise ConfigError(
                "matryoshka.distill_coeff",
                "self-distillation computes the KL over the full vocabulary on each rank; with "
                "tensor parallelism the logits are split over ranks. Use parallel.tensor: 1",
            )
        self._check_width_columns()
        if self.optimizer.warmup_iters > self.train.train_iters:
            raise ConfigError(
                "optimizer.warmup_iters",
                f"{self.optimizer.warmup_iters} exceeds train.train_iters={self.train.train_iters}",
            )
        return self

    def _check_width_columns(self) -> None:
        """Slimmable experts cut whole columns of each expert's FFN, on one tensor-parallel rank."""
        ffn = self.moe.expert_ffn_hidden_size
        for i, w in enumerate(self.matryoshka.widths):
            if abs(w * ffn - round(w * ffn)) > 1e-6 or round(w * ffn) < 1:
                whole = sorted({c / ffn for c in range(1, ffn + 1) if abs(c / ffn - w) <= 1 / ffn})
                raise ConfigError(
                    f"matryoshka.widths[{i}]",
                    f"{w:g} x moe.expert_ffn_hidden_size={ffn} = {w * ffn:g} columns; a width must give "
                    f"whole columns (multiples of 1/{ffn}), e.g. {', '.join(f'{x:g}' for x in whole)}",
                )
        if self.matryoshka.elastic_width and self.parallel.tensor > 1:
            raise ConfigError(
                "matryoshka.widths",
                "slimmable experts take a prefix of each expert's columns, which tensor parallelism "
                "splits over ranks; use parallel.tensor: 1 (expert and data parallelism are supported)",
            )

    # --- derived quantities -----------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return self.logging.dir or f"runs/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"

    @property
    def k_seed(self) -> int:
        return self.train.seed if self.matryoshka.seed is None else self.matryoshka.seed

    @property
    def init_seed(self) -> int:
        return self.train.seed if self.model.init_seed is None else self.model.init_seed

    @property
    def data_seed(self) -> int:
        return self.train.seed if self.data.seed is None else self.data.seed

    def moe_layer_pattern(self) -> list[int]:
        return self.moe.moe_layer_pattern(self.model.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_pattern())
