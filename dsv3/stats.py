"""Instrumentation for the app's plots: module output shapes and expert routing statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

from .moe import MoE


def trace_shapes(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0) -> list[dict]:
    """Run one forward and record every module's output shape, in execution order.

    Works on the meta device (shapes only). Returns [{"name", "type", "layer", "shape"}].
    """
    rows: list[dict] = []
    hooks = []

    def hook(name: str):
        def record(mod, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                layer = int(name.split(".")[1]) if name.startswith("layers.") else None
                rows.append(
                    {
                        "name": name,
                        "type": type(mod).__name__,
                        "layer": layer,
                        "shape": list(out.shape),
                    }
                )

        return record

    for name, mod in model.named_modules():
        if name:  # the root's output is returned to the caller anyway; recorded last below
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        out = model(tokens, start_pos=start_pos, full=True)  # every module on every position
    finally:
        for h in hooks:
            h.remove()
    rows.append(
        {"name": "output", "type": type(model).__name__, "layer": None, "shape": list(out.shape)}
    )
    return rows


def routing_stats(model: nn.Module) -> list[dict]:
    """Per MoE layer, from the last forward: tokens per expert and per group, and imbalance.
    Run that forward with `full=True`: a default one routes only the last position in the
    last layer (see `Transformer.forward`).

    max_over_mean: the busiest expert's load over the mean (1 = perfectly even);
    cv: coefficient of variation of the loads; entropy: of the load distribution in nats, and
    entropy_norm = entropy / ln(E) (1 = even). Meta models give no counts (empty list).
    """
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, MoE) or mod.last_counts is None or mod.last_counts.is_meta:
            continue
        counts = mod.last_counts.float().cpu()
        E, G = mod.n_routed_experts, mod.n_expert_groups
        n = float(counts.sum())
        mean = n / E
        p = counts / n if n else counts
        nz = p[p > 0]
        entropy = float(-(nz * nz.log()).sum()) if n else 0.0
        std = float(counts.std(unbiased=False)) if E > 1 else 0.0
        weights = mod.last_weights.float()
        out.append(
            {
                "layer": int(name.split(".")[1]),
                "n_experts": E,
                "n_groups": G,
                "topk": mod.n_activated_experts,
                "n_tokens": int(mod.last_indices.shape[0]),
                "counts": [int(c) for c in counts.tolist()],
                "group_counts": [int(c) for c in counts.view(G, -1).sum(1).tolist()],
                "max_over_mean": float(counts.max()) / mean if mean else 0.0,
                "cv": std / mean if mean else 0.0,
                "entropy": entropy,
                "entropy_norm": entropy / math.log(E) if E > 1 else 1.0,
                "weight_mean": float(weights.mean()),
                "weight_max": float(weights.max()),
            }
        )
    return out


def record_router_scores(model: nn.Module, on: bool = True) -> int:
    """Make every router of `model` keep its last forward's scores (or stop, and drop them).
    `router_stats` reads them; off by default, when routers keep nothing. Returns the number
    of routers switched."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.gate.keep_scores = on
            if not on:
                mod.gate.last_scores = None
            n += 1
    return n


def select_experts(
    scores_TE: torch.Tensor, bias_E: torch.Tensor | None, n_groups: int, topk_groups: int, k: int
) -> torch.Tensor:
    """The router's choice of experts from its scores (T, E), as `dsv3.routing.Gate` makes it:
    the bias shifts scores for selection; with groups, a group scores its best expert (no bias)
    or its best two summed (with bias) and only the best `topk_groups` groups stay eligible.
    -> (T, E) bool, True where an expert is chosen (K per token)."""
    T, E = scores_TE.shape
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if n_groups > 1:
        grouped_TGe = choice_TE.view(T, n_groups, -1)
        if bias_E is None:
            group_TG = grouped_TGe.amax(dim=-1)
        else:
            group_TG = grouped_TGe.topk(2, dim=-1)[0].sum(dim=-1)
        keep_TG = torch.zeros(T, n_groups, dtype=torch.bool, device=scores_TE.device)
        keep_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1)[1], True)
        choice_TE = choice_TE.masked_fill(~keep_TG.repeat_interleave(E // n_groups, 1), -math.inf)
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
    return chosen_TE.scatter_(1, choice_TE.topk(k, dim=-1)[1], True)


def router_stats(model: nn.Module, bins: int = 24, low: float = 1e-4) -> list[dict]:
    """Per MoE layer, from the last forward's router scores (turn them on first with
    `record_router_scores(model)`, and run that forward with `full=True`): the distribution of
    the scores and what the selection bias changes.

    Every layer uses the same `bins` log-spaced score bins from `low` to 1 (sigmoid and softmax
    scores are in (0, 1]; smaller scores count in the first bin), so layers compare directly.
    Returns [{"layer", "n_experts", "topk", "n_tokens", "score_func", "gate_bias",
    "bin_edges" (bins + 1), "hist" (all T x E scores per bin), "chosen_hist" (the T x K chosen
    ones), "mean", "max", "chosen_mean", "bias_changed" (fraction of the T x K choices that
    differ from the same selection with the bias values at zero; 0.0 without a bias),
    "bias_changed_tokens"
    (fraction of tokens with at least one different expert), "bias_min", "bias_max"}].
    Layers whose router kept no scores are left out; so is everything of a meta model.
    """
    edges = torch.logspace(math.log10(low), 0.0, bins + 1, dtype=torch.float64)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, MoE):
            continue
        gate = mod.gate
        scores = gate.last_scores
        if scores is None or scores.is_meta:
            continue
        s_TE = scores.detach().float().cpu()
        T, E = s_TE.shape
        bias = None if gate.bias is None else gate.bias.detach().float().cpu()
        with_bias = select_experts(s_TE, bias, gate.n_groups, gate.topk_groups, gate.topk)
        if bias is None:
            changed = changed_tokens = 0.0
        else:
            # The same rule with the bias at zero (groups still scored by their top two), so
            # only the bias values count, not the switch of the group rule that comes with it.
            zero = torch.zeros_like(bias)
            without = select_experts(s_TE, zero, gate.n_groups, gate.topk_groups, gate.topk)
            diff_TE = with_bias & ~without
            changed = float(diff_TE.sum()) / max(T * gate.topk, 1)
            changed_tokens = float(diff_TE.any(dim=1).float().mean()) if T else 0.0
        chosen = s_TE[with_bias]
        out.append(
            {
                "layer": int(name.split(".")[1]),
                "n_experts": E,
                "topk": gate.topk,
                "n_tokens": T,
                "score_func": gate.score_func,
                "gate_bias": bias is not None,
                "bin_edges": edges.tolist(),
                "hist": _log_hist(s_TE.flatten(), edges),
                "chosen_hist": _log_hist(chosen, edges),
                "mean": float(s_TE.mean()) if T else 0.0,
                "max": float(s_TE.max()) if T else 0.0,
                "chosen_mean": float(chosen.mean()) if chosen.numel() else 0.0,
                "bias_changed": changed,
                "bias_changed_tokens": changed_tokens,
                "bias_min": float(bias.min()) if bias is not None else 0.0,
                "bias_max": float(bias.max()) if bias is not None else 0.0,
            }
        )
    return out


def _log_hist(x: torch.Tensor, edges: torch.Tensor) -> list[int]:
    """Counts of x per bin of `edges` (ascending); below the first edge counts in bin 0."""
    at = torch.bucketize(x.double().clamp(min=float(edges[0])), edges, right=True) - 1
    at = at.clamp(0, len(edges) - 2)
    return torch.bincount(at, minlength=len(edges) - 1).tolist()
