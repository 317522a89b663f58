"""What the experts a larger k adds contribute to a token, per model and k.

An elastic model's loss can stop falling from some k on while a specialist's keeps falling. Either
the added experts get little weight, or they get weight and say what the experts before them
already say. For every evaluated run of a suite (with its final checkpoint on this machine), at each
of the suite's curve_ks, on the suite's evaluation samples of every domain, each MoE layer's input
and routing are observed in the evaluation's own forward, the chosen experts run again on that input
alone, and per token, with w_1 >= ... >= w_k the combine weights and f_r the output of the expert
ranked r (`h = k // 2`, the experts k adds to the routing at k // 2 are those ranked h + 1 ... k):

- effective experts: exp(entropy) of the weights (1: one expert carries the token; k: all equally);
- added weight: sum of w_r over r > h, as a share of all the weights;
- added norm: |sum_{r > h} w_r f_r| / |sum_r w_r f_r|, how much of the layer's output they make;
- alignment: cosine between the prefix's part sum_{r <= h} w_r f_r and the added part (near 1: the
  added experts push where the prefix already pushes; near 0: another direction; negative: back);
- expert similarity: mean cosine between the k chosen experts' unweighted outputs, over pairs;
- output norm: |sum_r w_r f_r|, the size of what the layer's experts add to the residual stream (at
  every k, k = 1 too: the weighted mean of many experts is smaller than one expert's output unless
  the weights sharpen or sum to more than 1);
- adapter norm (models with adapters per k, `matryoshka.k_adapter_rank`): |B_k A_k y| / |y| with
  y = sum_r w_r f_r, how large the correction of k's own map is against the output it corrects.

Means over tokens and MoE layers. k = 1 has no added experts and one expert (rows left empty but
the output norm).

    python -m bench.expert_contributions --suite bench/suites/elasticity_ladder2x_cpu.yaml [--root DIR]

--root: where the suite's runs directory is (default: this checkout). Each run's result is kept in
bench/results/expert_contributions_<suite>/ (built in parts, like the suite); the report is
assembled from every kept file.
"""

from __future__ import annotations

import statistics

import torch

from bench.common import final_model, kept_runs_parser, run_kept_benchmark

METRICS = {"effective": "effective experts", "added_weight": "added weight", "added_norm": "added norm",
           "alignment": "alignment", "similarity": "expert similarity", "output_norm": "output norm",
           "adapter_norm": "adapter norm"}


def token_stats(w_TK: torch.Tensor, f_TKH: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token, the metrics of the module docstring from the weights of its k chosen experts in
    rank order (largest first) and their unweighted outputs in the same order."""
    w_TK, f_TKH = w_TK.double(), f_TKH.double()
    k = w_TK.shape[1]
    p_TK = w_TK / w_TK.sum(dim=1, keepdim=True)
    entropy_T = -(p_TK * p_TK.clamp(min=1e-300).log()).sum(dim=1)
    part_TKH = w_TK.unsqueeze(-1) * f_TKH
    out = {"effective": entropy_T.exp(), "output_norm": part_TKH.sum(dim=1).norm(dim=1)}
    if k == 1:
        return out
    half = k // 2
    prefix_TH, added_TH = part_TKH[:, :half].sum(dim=1), part_TKH[:, half:].sum(dim=1)
    out["added_weight"] = p_TK[:, half:].sum(dim=1)
    out["added_norm"] = added_TH.norm(dim=1) / (prefix_TH + added_TH).norm(dim=1).clamp(min=1e-300)
    out["alignment"] = torch.nn.functional.cosine_similarity(prefix_TH, added_TH, dim=1, eps=1e-300)
    unit_TKH = f_TKH / f_TKH.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    gram_TKK = unit_TKH @ unit_TKH.transpose(1, 2)
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    out["similarity"] = gram_TKK[:, off_diagonal].mean(dim=1)
    return out


class ContributionProbe:
    """Observes every MoE layer of `model` in its forwards (a context manager) and sums the
    `token_stats` of its tokens per layer; `begin(label)` starts a new group of sums.
    With `keep_last`, each layer's sum_r w_r f_r of its last forward is kept in `last_output`
    (what the layer's experts return, recomputed here)."""

    def __init__(self, model: torch.nn.Module, keep_last: bool = False):
        from mmoe_megatron.model import moe_layers

        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("no Matryoshka MoE layer in the model")
        for layer in self.layers:
            experts = layer.experts
            if not hasattr(experts, "local_experts") or experts.num_local_experts != layer.router.num_experts:
                raise ValueError("the expert contributions need every expert of a layer in this process as local "
                                 "experts (one process, the local expert path); load the model with parallel.expert 1 "
                                 "and moe.grouped_gemm false")
        self.keep_last = keep_last
        self.last_output: dict[int, torch.Tensor] = {}
        self.sums: dict[str, list[dict[str, float]]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.label = None
        self._handles = []
        self._inputs: dict[int, torch.Tensor] = {}

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._keep_input(i), with_kwargs=True))
            self._handles.append(layer.router.register_forward_hook(self._observe(i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin(self, label: str) -> None:
        self.label = label
        self.sums[label] = [{} for _ in self.layers]
        self.tokens[label] = [0] * len(self.layers)

    def _keep_input(self, i: int):
        def hook(_layer, args, kwargs):
            self._inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _observe(self, i: int):
        def hook(_router, _inputs, output):
            probs_TE, routing_map_TE = output
            with torch.no_grad():
                self._layer_stats(i, probs_TE.detach(), routing_map_TE)
        return hook

    def _layer_stats(self, i: int, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor) -> None:
        from mmoe_megatron.slimmable import sliced_swiglu

        counts_T = routing_map_TE.sum(dim=1)
        k = int(counts_T[0])
        if not bool((counts_T == k).all()):
            raise ValueError("the expert contributions need one k for every token; evaluate at a uniform k")
        layer = self.layers[i]
        experts = layer.experts
        if getattr(experts, "carries_levels", False) or getattr(experts, "columns", None) not in (
                None, getattr(experts, "ffn_hidden_size", None)):
            raise ValueError("the expert contributions run the experts at full width; evaluate at width 1")
        if self.label is None and not self.keep_last:
            return  # nothing asked of this forward
        x_TH = self._inputs[i].reshape(-1, self._inputs[i].shape[-1]).detach()
        w_TK, ids_TK = probs_TE.masked_fill(~routing_map_TE, float("-inf")).topk(k, dim=1, sorted=True)
        f_TKH = torch.zeros(*ids_TK.shape, x_TH.shape[-1], dtype=x_TH.dtype, device=x_TH.device)
        for e in torch.unique(ids_TK).tolist():
            expert = experts.local_experts[e]
            rows_T, slots_T = (ids_TK == e).nonzero(as_tuple=True)
            ones_N = torch.ones(rows_T.shape[0], dtype=x_TH.dtype, device=x_TH.device)
            f_TKH[rows_T, slots_T] = sliced_swiglu(
                x_TH[rows_T], expert.linear_fc1.weight, expert.linear_fc2.weight, ones_N,
                expert.linear_fc2.weight.shape[1], experts.config.activation_func)
        y_TH = (w_TK.unsqueeze(-1).to(f_TKH.dtype) * f_TKH).sum(dim=1)  # what the experts return
        if self.keep_last:
            self.last_output[i] = y_TH
        if self.label is None:
            return
        sums = self.sums[self.label][i]
        stats = token_stats(w_TK, f_TKH)
        if getattr(layer.router, "adapter_ks", None) is not None:
            correction_TH = layer.router.adapt_output(y_TH, k) - y_TH
            stats["adapter_norm"] = correction_TH.double().norm(dim=1) / y_TH.double().norm(dim=1).clamp(min=1e-300)
        for name, values_T in stats.items():
            sums[name] = sums.get(name, 0.0) + float(values_T.sum())
        self.tokens[self.label][i] += int(x_TH.shape[0])

    def means(self, label: str) -> dict:
        """{"layers": [per MoE layer {metric: mean over its tokens}], metric: mean over layers}."""
        layers = [{name: total / n for name, total in sums.items()}
                  for sums, n in zip(self.sums[label], self.tokens[label])]
        out = {"layers": layers}
        for name in layers[0]:
            out[name] = statistics.fmean(layer[name] for layer in layers)
        return out


def measure_run(spec, run) -> dict:
    from mmoe_megatron.data import build_datasets
    from mmoe_megatron.evaluation.core import eval_indices, losses_at
    from mmoe_megatron.evaluation.run import causal_mask, run_config as saved_config
    from mmoe_megatron.evaluation.suite import domains, specialist_k

    out, cfg, checkpoint, model = final_model(spec, run)
    mask = causal_mask(cfg.data.seq_length, "cpu")
    n = spec.eval.num_samples
    by_domain = {}
    with ContributionProbe(model) as probe:
        for domain, overrides in domains(spec):
            dataset = build_datasets(saved_config(out, overrides), train_samples=1, valid_samples=n, test_samples=0)[1]
            by_k = {}
            for k in spec.eval.curve_ks:
                probe.begin(f"{domain} {k}")
                (loss, _), = losses_at(model, dataset, [k], eval_indices(min(n, len(dataset)), 0, 1),
                                       cfg.train.micro_batch_size, mask, "cpu")
                by_k[str(k)] = {"loss": loss, **probe.means(f"{domain} {k}")}
                print(f"{run.label} {domain} k={k}: loss {loss:.4f} " + " ".join(
                    f"{name} {by_k[str(k)][name]:.3f}" for name in METRICS if name in by_k[str(k)]), flush=True)
            by_domain[domain] = by_k
    return {"member": run.member.name, "role": run.member.role, "seed": run.seed,
            "trained_k": specialist_k(run.member), "checkpoint": checkpoint, "num_samples": n, "by_domain": by_domain}


def _cell(values) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def report(spec, records: list[dict]) -> tuple[str, dict]:
    from mmoe_megatron.evaluation.suite import domains

    ks = [str(k) for k in spec.eval.curve_ks]
    order = [m.name for m in spec.members]
    records = sorted(records, key=lambda r: (order.index(r["member"]), r["seed"] or 0))
    members = [m for m in order if any(r["member"] == m for r in records)]
    lines = [f"Per token, with the combine weights in rank order: effective experts exp(entropy); the share of "
             "the weight, and of the layer's output norm, of the experts ranked k // 2 + 1 ... k (those k adds "
             "to k // 2); the cosine between their part of the output and the prefix's (alignment); the mean "
             "cosine between the chosen experts' unweighted outputs (expert similarity); the norm of the "
             "layer's weighted expert output (output norm). Means over the "
             f"suite's {records[0]['num_samples']} evaluation samples per domain and over MoE layers; cells "
             "mean ± std over seeds."]
    summary = {}
    for domain, _ in domains(spec):
        lines += ["", f"{domain}:", "", "| model | seeds | metric | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---:|---|" + "---:|" * len(ks)]
        for m in members:
            rs = [r for r in records if r["member"] == m and domain in r["by_domain"]]
            for name, title in METRICS.items():
                values = {k: [r["by_domain"][domain][k][name] for r in rs if name in r["by_domain"][domain][k]]
                          for k in ks}
                summary.setdefault(m, {}).setdefault(domain, {})[name] = values
                lines.append(f"| {m} | {len(rs)} | {title} | " + " | ".join(_cell(values[k]) for k in ks) + " |")
    return "\n".join(lines), {"metrics": summary}


def main(argv=None) -> int:
    args = kept_runs_parser(__doc__).parse_args(argv)
    return run_kept_benchmark(args, "expert_contributions", "What the experts a larger k adds contribute",
                              measure_run, report)


if __name__ == "__main__":
    raise SystemExit(main())
