"""The k schedule: which top-k each MoE layer uses, as a pure function of indices.

    k = schedule.k(step, microbatch, layer, token)

Every draw is a counter-based hash of (seed, step, [microbatch], [layer], [token]) mapped
through the inverse CDF of the k distribution. Nothing depends on which rank asks, on RNG
state, or on what was drawn before: every rank computes the same k with no communication,
and a resumed run draws the same ks as an uninterrupted one as long as the step is restored.

Indices:
  step        optimizer step (0-based)
  sample      index of the sample (sequence) within the global batch (0-based)
  microbatch  index of the micro-batch within the step (0-based); only `microbatch` uses it
  layer       index of the MoE layer among the model's MoE layers (0-based)
  token       index of the token within the global batch:
              sample_in_global_batch * seq_length + position. It does not depend on the
              data-parallel layout, so per-token ks are the same for any DP/micro-batch split.

Progressive shrinking (`shrink_steps`, as in Once-for-All): during the first shrink_steps steps
the ks are introduced from the largest down, in len(ks) - 1 equal stages: the first stage draws
only k_max, the next adds the second-largest k, and so on (probabilities renormalised over the
ks allowed); afterwards every k. A stage is a function of the step alone.

A late phase (`late_steps`, `late_probs`): during the last late_steps steps of the run the ks are
drawn with other probabilities, e.g. shifted towards the wide routings while the learning rate
decays. Also a function of the step alone, so resume and every rank draw the same ks.

Sample plans (`sandwich`, `coupled`): on top of the strategy, a fixed share of the samples of
every global batch is routed with one k in every MoE layer and at every token: `sandwich` splits
its share evenly between k_min and k_max, `coupled` draws one k per sample from the distribution.
Which samples they are is a hash-ordered permutation of (seed, step, sample), so the shares are
exact in every step and the samples chosen are unrelated to their place in the batch.

The hash is 32-bit arithmetic done in int64 with 16-bit partial products, so the Python
scalar path and the vectorised torch path give identical results (tested).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

Strategy = Literal["fixed", "global", "microbatch", "layerwise", "token"]
STRATEGIES: tuple[str, ...] = ("fixed", "global", "microbatch", "layerwise", "token")

_MASK32 = 0xFFFFFFFF
# Domain separators so that e.g. (step=1, layer=2) and (step=2, layer=1) hash apart.
_SALT = {"step": 0x9E3779B9, "microbatch": 0x85EBCA6B, "layer": 0xC2B2AE35, "token": 0x27D4EB2F,
         "sample": 0x165667B1, "coupled": 0xD3A2646C, "axis": 0xFD7046C5}
AXIS_K, AXIS_WIDTH = 0, 1


def _mul32(x, c: int):
    # (x * c) mod 2**32 without overflowing int64: split the constant into 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """The 'lowbias32' finaliser: a bijection on 32-bit ints with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h, value, salt: int):
    # Values may exceed 32 bits (seeds, token ids): absorb the low and high words separately.
    h = _mix32(h ^ ((value & _MASK32) ^ salt))
    return _mix32(h ^ ((value >> 32) & _MASK32))


def _stage_of(ks: tuple[int, ...], probs: tuple[float, ...]) -> tuple:
    """(ks, probs, cuts): the cumulative thresholds on the 32-bit hash, k = ks[first i with h < cut[i]]."""
    cuts, acc = [], 0.0
    for p in probs[:-1]:
        acc += p
        cuts.append(int(round(acc * 2**32)))
    return ks, tuple(probs), tuple(cuts)


def capacity_probs(ks: Sequence[int], tau: float) -> list[float]:
    """P(k) proportional to k**(1/tau): larger ks drawn more often (M-MoE, tau=2 tested)."""
    weights = [k ** (1.0 / tau) for k in ks]
    total = sum(weights)
    return [w / total for w in weights]


def equal_compute_probs(ks: Sequence[int]) -> list[float]:
    """P(k) proportional to 1/k (k**(1/tau) at tau = -1): every k gets the same share of the
    routed experts' compute."""
    return capacity_probs(ks, tau=-1.0)


def small_k_probs(ks: Sequence[int], k_max_share: float) -> list[float]:
    """P(k_max) = k_max_share and the other ks evenly, e.g. after a progressive shrinking that
    trained the wide routing first."""
    rest = (1.0 - k_max_share) / (len(ks) - 1)
    return [rest] * (len(ks) - 1) + [k_max_share]


@dataclass(frozen=True)
class KSchedule:
    strategy: Strategy
    ks: tuple[int, ...]
    probs: tuple[float, ...]
    seed: int
    sandwich: float = 0.0
    """Share of each global batch's samples routed at k_min (half) and k_max (half) everywhere."""
    coupled: float = 0.0
    """Share of each global batch's samples routed everywhere at one k drawn per sample."""
    global_batch_size: int = 0
    """Samples per step; needed to place the sample plan (sandwich, coupled)."""
    shrink_steps: int = 0
    """Steps of progressive shrinking before every k is drawn (0: none)."""
    train_iters: int = 0
    """Steps of the whole run; with shrink_steps, weighs the stages in `marginal_probs`; with
    late_steps, places the late phase at its end."""
    late_steps: int = 0
    """Steps at the end of the run whose ks are drawn with `late_probs` (0: none)."""
    late_probs: tuple[float, ...] = ()
    """P(k) during the late phase, one per entry of ks."""
    axis: int = AXIS_K
    """Which quantity is drawn: AXIS_K, or AXIS_WIDTH for the width levels of slimmable experts
    (`WidthSchedule`). Draws of different axes are independent; the samples of the sample plan
    are the same on both axes, so a sandwich sample is at the smallest k and the narrowest width."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown k strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if not self.ks or list(self.ks) != sorted(set(self.ks)) or self.ks[0] < 1:
            raise ValueError(f"ks must be strictly increasing positive ints, got {self.ks}")
        if len(self.probs) != len(self.ks) or abs(sum(self.probs) - 1) > 1e-6:
            raise ValueError(f"probs must give one probability per k and sum to 1: {self.probs}")
        if self.strategy == "fixed" and len(self.ks) != 1:
            raise ValueError(f"the fixed strategy needs exactly one k, got {self.ks}")
        if self.has_sample_plan:
            if self.strategy == "fixed":
                raise ValueError("sandwich and coupled samples need more than one k")
            if self.sandwich < 0 or self.coupled < 0 or self.sandwich + self.coupled > 1:
                raise ValueError(f"sandwich + coupled must be a share in [0, 1], got "
                                 f"{self.sandwich} + {self.coupled}")
            _ = self.plan_counts()  # whole numbers of samples, or a ValueError
        if self.shrink_steps < 0 or (self.shrink_steps and self.strategy == "fixed"):
            raise ValueError("progressive shrinking needs more than one k and shrink_steps >= 0")
        if self.late_steps:
            if self.strategy == "fixed" or self.late_steps < 0:
                raise ValueError("a late phase needs more than one k and late_steps >= 0")
            if len(self.late_probs) != len(self.ks) or abs(sum(self.late_probs) - 1) > 1e-6:
                raise ValueError(f"late_probs must give one probability per k and sum to 1: {self.late_probs}")
            if self.shrink_steps + self.late_steps > self.train_iters:
                raise ValueError(f"the shrinking ({self.shrink_steps} steps) and the late phase "
                                 f"({self.late_steps}) do not fit in {self.train_iters} steps")
        # Per stage of progressive shrinking (the last is every k): the ks allowed, their
        # probabilities, and the cumulative thresholds on the 32-bit hash, k = ks[first i with
        # h < cut[i]].
        stages = []
        for first in range(len(self.ks) - 1, -1, -1) if self.shrink_steps else [0]:
            ks, probs = self.ks[first:], self.probs[first:]
            if first:  # the full stage keeps the given probabilities exactly (same draws as ever)
                total = sum(probs)
                probs = tuple(p / total for p in probs)
            stages.append(_stage_of(ks, probs))
        object.__setattr__(self, "_stages", tuple(stages))
        object.__setattr__(self, "_cuts", stages[-1][2])
        object.__setattr__(self, "_late", _stage_of(self.ks, self.late_probs) if self.late_steps else None)

    def _stage(self, step: int) -> tuple:
        """(ks, probs, cuts) in force at `step`."""
        if self.late_steps and step >= self.train_iters - self.late_steps:
            return self._late
        if step >= self.shrink_steps:
            return self._stages[-1]
        return self._stages[step * (len(self._stages) - 1) // self.shrink_steps]

    def stage_shares(self) -> list[tuple[float, tuple]]:
        """(share of the run's steps, (ks, probs, cuts)) of every stage: the shrinking stages, the
        full one, the late phase."""
        total = max(self.train_iters, self.shrink_steps + self.late_steps, 1)
        counts = [0] * len(self._stages)
        for step in range(self.shrink_steps):
            counts[step * (len(self._stages) - 1) // self.shrink_steps] += 1
        counts[-1] += total - self.shrink_steps - self.late_steps
        out = [(n / total, stage) for n, stage in zip(counts, self._stages)]
        if self.late_steps:
            out.append((self.late_steps / total, self._late))
        return out

    @classmethod
    def from_config(cls, mat, seed: int, global_batch_size: int = 0, train_iters: int = 0) -> "KSchedule":
        """From a `MatryoshkaConfig` (its strategy, ks, distribution, sample plan, shrinking), the
        resolved seed, the global batch size (samples per step, for the sample plan) and the run's
        steps (for progressive shrinking)."""
        ks = tuple(mat.ks)
        if mat.distribution == "uniform":
            probs = tuple(1.0 / len(ks) for _ in ks)
        elif mat.distribution == "capacity":
            probs = tuple(capacity_probs(ks, mat.tau))
        elif mat.distribution == "small_k":
            probs = tuple(small_k_probs(ks, mat.k_max_share))
        elif mat.distribution == "equal_compute":
            probs = tuple(equal_compute_probs(ks))
        else:
            probs = tuple(mat.probs)
        late = tuple(mat.late_probs) if mat.late_fraction > 0 else ()
        return cls(strategy=mat.strategy, ks=ks, probs=probs, seed=seed, sandwich=mat.sandwich,
                   coupled=mat.coupled, global_batch_size=global_batch_size,
                   shrink_steps=int(round(mat.shrink_fraction * train_iters)), train_iters=train_iters,
                   late_steps=int(round(mat.late_fraction * train_iters)) if late else 0, late_probs=late)

    @property
    def k_max(self) -> int:
        return self.ks[-1]

    @property
    def k_min(self) -> int:
        return self.ks[0]

    @property
    def per_token(self) -> bool:
        """Whether ks can differ between the tokens of one micro-batch (set per token)."""
        return self.strategy == "token" or self.has_sample_plan

    @property
    def has_sample_plan(self) -> bool:
        return self.sandwich > 0 or self.coupled > 0

    def plan_counts(self) -> tuple[int, int, int]:
        """Samples per global batch at k_min, at k_max (sandwich) and coupled; whole numbers."""
        counts = []
        for share in (self.sandwich / 2, self.sandwich / 2, self.coupled):
            n = share * self.global_batch_size
            if abs(n - round(n)) > 1e-6:
                raise ValueError(
                    f"a share of {share:g} of a global batch of {self.global_batch_size} samples "
                    f"is {n:g} samples; choose shares that give whole samples"
                )
            counts.append(int(round(n)))
        return tuple(counts)

    def marginal_probs(self) -> tuple[float, ...]:
        """P(k) of one token in one MoE layer over the run, sample plan and shrinking stages
        included (what training compute sees)."""
        def stage_marginal(ks, probs):
            out = {k: (1.0 - self.sandwich) * p for k, p in zip(ks, probs)}
            out[ks[0]] += self.sandwich / 2
            out[ks[-1]] += self.sandwich / 2
            return [out.get(k, 0.0) for k in self.ks]

        if not self.shrink_steps and not self.late_steps:
            return tuple(stage_marginal(self.ks, self.probs))
        parts = [(share, stage_marginal(ks, probs)) for share, (ks, probs, _) in self.stage_shares()]
        return tuple(sum(share * part[i] for share, part in parts) for i in range(len(self.ks)))

    def fingerprint(self) -> int:
        """A 32-bit digest of everything that determines the draws (compared across ranks)."""
        h = _absorb(0, self.seed, 0)
        h = _absorb(h, STRATEGIES.index(self.strategy), 1)
        for k, cut in itertools.zip_longest(self.ks, self._cuts, fillvalue=0):
            h = _absorb(_absorb(h, k, 2), cut, 3)
        if self.shrink_steps:
            h = _absorb(h, self.shrink_steps, 8)
        if self.late_steps:
            h = _absorb(_absorb(h, self.late_steps, 12), self.train_iters, 13)
            for cut in self._late[2]:
                h = _absorb(h, cut, 14)
        if self.has_sample_plan:  # without a plan the digest is what it always was
            for i, n in enumerate(self.plan_counts()):
                h = _absorb(h, n, 4 + i)
            h = _absorb(h, self.global_batch_size, 7)
        if self.axis != AXIS_K:
            h = _absorb(h, self.axis, 11)
        return h

    def _step_key(self, step: int) -> int:
        h = _absorb(_absorb(0, self.seed, 0x5BD1E995), step, _SALT["step"])
        # The k axis hashes as it always did; another axis draws independently of it.
        return h if self.axis == AXIS_K else _absorb(h, self.axis, _SALT["axis"])

    # --- draws -------------------------------------------------------------------------------

    def _key(self, step: int, microbatch: int, layer: int) -> int:
        """The hash state before the token index; which indices enter depends on the strategy."""
        h = self._step_key(step)
        if self.strategy == "microbatch":
            h = _absorb(h, microbatch, _SALT["microbatch"])
        if self.strategy in ("layerwise", "token"):
            h = _absorb(h, layer, _SALT["layer"])
        return h

    def _k_of_hash(self, h: int, step: int) -> int:
        ks, _, cuts = self._stage(step)
        return ks[bisect.bisect_right(cuts, h)]

    def k(self, step: int, microbatch: int = 0, layer: int = 0, token: Optional[int] = None) -> int:
        """The k for one (step, micro-batch, MoE layer[, token])."""
        if self.strategy == "fixed":
            return self.ks[0]
        if self.strategy == "token":
            if token is None:
                raise ValueError("the token strategy draws a k per token: pass token=")
            return self._k_of_hash(_absorb(self._key(step, microbatch, layer), token, _SALT["token"]), step)
        return self._k_of_hash(self._key(step, microbatch, layer), step)

    def layer_ks(self, step: int, microbatch: int, num_layers: int) -> list[int]:
        """ks of all MoE layers for one micro-batch (not for the token strategy)."""
        if self.strategy == "token":
            raise ValueError("the token strategy has no per-layer k; use token_ks()")
        return [self.k(step, microbatch, layer) for layer in range(num_layers)]

    def token_ks(self, step: int, layer: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Vectorised `k(step, 0, layer, token)` over an int64 tensor of global token ids."""
        if self.strategy != "token":
            raise ValueError(f"token_ks() is for the token strategy, not {self.strategy!r}")
        if token_ids.dtype != torch.int64:
            raise TypeError("token_ids must be int64")
        h = _absorb(torch.full_like(token_ids, self._key(step, 0, layer)), token_ids, _SALT["token"])
        stage_ks, _, stage_cuts = self._stage(step)
        cuts = torch.tensor(stage_cuts, dtype=torch.int64, device=token_ids.device)
        ks = torch.tensor(stage_ks, dtype=torch.int64, device=token_ids.device)
        return ks[torch.bucketize(h, cuts, right=True)]

    def layer_token_ks(self, step: int, microbatch: int, layer: int, token_ids: torch.Tensor,
                       seq_length: int) -> torch.Tensor:
        """The k of every token of a micro-batch in one MoE layer: the strategy's draw (per token,
        or the layer's k) with the sample plan on top. `token_ids` are global token ids
        (`global_token_ids`), so the sample of a token is token_id // seq_length."""
        if self.strategy == "token":
            ks = self.token_ks(step, layer, token_ids)
        else:
            ks = torch.full_like(token_ids, self.k(step, microbatch, layer))
        if self.has_sample_plan:
            plan = self.sample_ks(step).to(token_ids.device)[token_ids // seq_length]
            ks = torch.where(plan > 0, plan, ks)
        return ks

    def sample_ks(self, step: int) -> torch.Tensor:
        """[global_batch_size] int64: the k every token of sample i uses in every MoE layer at
        `step`, or 0 where the strategy decides (all zeros without a sample plan)."""
        G = self.global_batch_size
        out = torch.zeros(G, dtype=torch.int64)
        if not self.has_sample_plan:
            return out
        n_min, n_max, n_coupled = self.plan_counts()
        stage_ks, _, stage_cuts = self._stage(step)
        samples = torch.arange(G, dtype=torch.int64)
        # The order of the samples does not depend on the axis: both axes plan the same samples.
        key = _absorb(_absorb(0, self.seed, 0x5BD1E995), step, _SALT["step"])
        order_hash = _absorb(torch.full_like(samples, key), samples, _SALT["sample"])
        # A stable sort of distinct-enough hashes: a permutation of the samples that is the same
        # on every rank; the first n_min take k_min, the next n_max k_max, the next n_coupled a draw.
        order = torch.sort(order_hash, stable=True).indices
        out[order[:n_min]] = stage_ks[0]  # k_min (of the ks allowed so far, while shrinking)
        out[order[n_min:n_min + n_max]] = self.k_max
        coupled = order[n_min + n_max:n_min + n_max + n_coupled]
        if n_coupled:
            h = _absorb(torch.full_like(coupled, self._step_key(step)), coupled, _SALT["coupled"])
            cuts = torch.tensor(stage_cuts, dtype=torch.int64)
            out[coupled] = torch.tensor(stage_ks, dtype=torch.int64)[torch.bucketize(h, cuts, right=True)]
        return out


@dataclass(frozen=True)
class WidthSchedule:
    """The width axis of slimmable experts: a `KSchedule` over width levels 1..n, level i meaning
    `widths[i - 1]` (level n is full width), with the k schedule's seed, sample plan and batch.

    Independent pairing draws levels on their own axis; joint pairing draws them from the k axis's
    own hash values, so one uniform draw sets both (the q-th quantile of each distribution)."""

    widths: tuple[float, ...]
    levels: KSchedule

    @classmethod
    def from_config(cls, mat, seed: int, global_batch_size: int = 0) -> Optional["WidthSchedule"]:
        """From a `MatryoshkaConfig`; None when every expert runs at full width."""
        if not mat.elastic_width:
            return None
        n = len(mat.widths)
        probs = tuple(mat.width_probs) if mat.width_probs is not None else tuple(1.0 / n for _ in range(n))
        levels = KSchedule(
            strategy=mat.resolved_width_strategy, ks=tuple(range(1, n + 1)), probs=probs, seed=seed,
            sandwich=mat.sandwich, coupled=mat.coupled, global_batch_size=global_batch_size,
            axis=AXIS_K if mat.width_pairing == "joint" else AXIS_WIDTH,
        )
        return cls(widths=tuple(mat.widths), levels=levels)

    @property
    def joint(self) -> bool:
        return self.levels.axis == AXIS_K

    def width(self, level: int) -> float:
        return self.widths[level - 1]

    def fingerprint(self) -> int:
        h = self.levels.fingerprint()
        for w in self.widths:
            h = _absorb(h, int(round(w * 2**24)), 9)
        return h


def grid_fingerprint(k: KSchedule, width: Optional[WidthSchedule]) -> int:
    """The digest of both axes; without a width axis, the k schedule's own (as before widths)."""
    return k.fingerprint() if width is None else _absorb(k.fingerprint(), width.fingerprint(), 10)


def grid_probs(k: KSchedule, width: Optional[WidthSchedule]) -> dict[tuple[int, float], float]:
    """P((k, w)) of one token in one MoE layer, sample plan included (what training compute sees)."""
    if width is None:
        return {(kk, 1.0): p for kk, p in zip(k.ks, k.marginal_probs())}
    w = width.levels
    if width.joint:
        # One hash value h sets both: the pair is constant between consecutive cut points.
        edges = sorted({0, 2**32, *k._cuts, *w._cuts})
        base: dict = {}
        for a, b in zip(edges, edges[1:]):
            pair = (k._k_of_hash(a, k.shrink_steps), w._k_of_hash(a, w.shrink_steps))  # every k allowed
            base[pair] = base.get(pair, 0.0) + (b - a) / 2**32
    else:
        # The ks drawn over the run (every stage), the sample plan added below.
        drawn = [sum(share * dict(zip(ks, probs)).get(kk, 0.0) for share, (ks, probs, _) in k.stage_shares())
                 for kk in k.ks]
        base = {(kk, lv): pk * pw for kk, pk in zip(k.ks, drawn) for lv, pw in zip(w.ks, w.probs)}
    share = k.sandwich
    out = {(kk, width.width(lv)): (1.0 - share) * p for (kk, lv), p in base.items()}
    for pair in ((k.k_min, width.widths[0]), (k.k_max, width.widths[-1])):
        out[pair] = out.get(pair, 0.0) + share / 2
    return out


def global_token_ids(
    sample_offset: int, num_samples: int, seq_length: int, device=None
) -> torch.Tensor:
    """Global token ids [seq_length, num_samples] (megatron's s-major layout) of a micro-batch
    whose first sample is sample `sample_offset` of the global batch."""
    samples = torch.arange(sample_offset, sample_offset + num_samples, device=device)
    positions = torch.arange(seq_length, device=device)
    return positions[:, None] + samples[None, :] * seq_length
