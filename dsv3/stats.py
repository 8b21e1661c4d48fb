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
