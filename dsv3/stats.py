"""Instrumentation for the app's plots: module output shapes, expert routing statistics and the
DSA indexer's kept positions."""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Indexer
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


def record_indexer(model: nn.Module, on: bool = True, drop: bool = True) -> int:
    """Make every DSA indexer of `model` keep its last forward's selection (or stop, and drop
    it unless `drop` is False: the app stops after the prefill and keeps what it recorded for
    the views). `indexer_selection` reads it; off by default. While on, a forward also keeps the
    per-head index scores (B x queries x index_n_heads x keys float32) and scores even when
    every key is kept. Returns the number of indexers switched."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Indexer):
            mod.keep_topk = on
            if not on and drop:
                mod.last_kept = mod.last_head_scores = None
            n += 1
    return n


def indexer_selection(
    model: nn.Module, layer: int, head: int | None = None, batch: int = 0
) -> dict | None:
    """Which key positions layer `layer`'s DSA indexer kept for each query of the last forward
    (turn recording on first with `record_indexer(model)`; run that forward with `full=True`,
    else the last layer sees only the last query), for sequence `batch` of the batch.

    DSA keeps one set of keys per query for all attention heads; `head` (an index head,
    0..index_n_heads-1) adds what that head alone would keep: the top-k of its own weighted
    score w_h * relu(q_h . k). Returns {"layer", "batch", "topk", "n_heads", "query_positions",
    "n_keys", "kept" (per query, the kept key positions, ascending), "matrix" (queries x keys:
    0 future, 1 dropped, 2 kept), "head", "head_kept" (per query, or None), "head_agreement"
    (fraction of the kept positions that head also ranks in its top-k, or None)}; None when the
    layer has no indexer or it recorded nothing (a meta model records nothing either).
    """
    blocks = getattr(model, "layers", None)
    if blocks is None or not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range")
    ix = getattr(blocks[layer].attn, "indexer", None)
    if ix is None or ix.last_kept is None or ix.last_kept.is_meta:
        return None
    if not 0 <= batch < ix.last_kept.shape[0]:
        raise ValueError(f"batch {batch} is out of range: 0..{ix.last_kept.shape[0] - 1}")
    if head is not None and not 0 <= head < ix.n_heads:
        raise ValueError(f"head {head} is out of range: index heads are 0..{ix.n_heads - 1}")
    kept_ST = ix.last_kept[batch].cpu()  # (Sq, T)
    Sq, T = kept_ST.shape
    q_pos = ix.last_q_pos
    visible_ST = torch.arange(T)[None, :] <= torch.arange(q_pos, q_pos + Sq)[:, None]
    matrix = visible_ST.long() + kept_ST.long()
    kept = [row.nonzero().flatten().tolist() for row in kept_ST]
    head_kept = agreement = None
    if head is not None:
        s_ST = ix.last_head_scores[batch, :, head].float().cpu()  # (Sq, T), future at -inf
        top = s_ST.topk(min(ix.topk, T), dim=-1).indices
        mine_ST = torch.zeros(Sq, T, dtype=torch.bool).scatter_(-1, top, True) & visible_ST
        head_kept = [row.nonzero().flatten().tolist() for row in mine_ST]
        agreement = float((mine_ST & kept_ST).sum()) / max(int(kept_ST.sum()), 1)
    return {
        "layer": layer,
        "batch": batch,
        "topk": ix.topk,
        "n_heads": ix.n_heads,
        "query_positions": list(range(q_pos, q_pos + Sq)),
        "n_keys": T,
        "kept": kept,
        "matrix": matrix.tolist(),
        "head": head,
        "head_kept": head_kept,
        "head_agreement": agreement,
    }
