"""The MoE router (the reference's `Gate`): scores, group-limited top-k, bias correction.

Legend: T tokens, D model dim, E routed experts, G expert groups, K activated experts.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .config import LayerArgs
from .layers import KeepsDerived, linear


class Gate(KeepsDerived):
    """Picks K experts per token and their weights.

    scores = softmax or sigmoid of x W^T, computed in float32 (as transformers does; the
    reference keeps sigmoid scores in the activation dtype). The optional `bias`
    (e_score_correction_bias) shifts scores only to *select* experts, never to weight them.
    With groups, a group's score is its best expert (no bias) or its best two summed (with bias);
    only the best `n_limited_groups` groups stay eligible. Sigmoid weights are renormalised to
    sum to 1; all weights are then multiplied by `route_scale`.
    """

    def __init__(self, la: LayerArgs, dtype=None, device=None):
        super().__init__()
        self.dim = la.dim
        self.topk = la.n_activated_experts
        self.n_experts = la.n_routed_experts
        self.n_groups = la.n_expert_groups
        self.topk_groups = la.n_limited_groups
        self.score_func = la.score_func
        self.route_scale = la.route_scale
        self.weight = nn.Parameter(
            torch.empty(self.n_experts, self.dim, dtype=dtype, device=device), requires_grad=False
        )
        if la.gate_bias:
            self.bias = nn.Parameter(
                torch.empty(self.n_experts, dtype=torch.float32, device=device), requires_grad=False
            )
        else:
            self.bias = None
        # Instrumentation (dsv3.stats.record_router_scores): when on, the last forward's scores
        # (T, E) float32 stay in `last_scores`; off (the default) costs one attribute test.
        self.keep_scores = False
        self.last_scores: torch.Tensor | None = None

    def _weight32(self) -> torch.Tensor:
        """The weight in float32 (scores are float32): a bf16 weight is converted once and kept
        (`derived`), not on every call."""
        w = self.weight
        return w if w.dtype == torch.float32 else self.derived("w32", (w,), w.float)

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x (T, D) -> logits (T, E) float32: on CUDA for a few tokens `fused.gate_logits`
        where it measured faster for the shape class, else `_logits_torch`."""
        T = x_TD.shape[0]
        if 0 < T <= fused.GATE_ROWS and fused.available(x_TD.device, "gate_logits"):
            key = ("gate-logits", 1 << (T - 1).bit_length(), *self.weight.shape,
                   self.weight.dtype, x_TD.dtype)  # fmt: skip
            kernel = lambda: fused.gate_logits(x_TD, self.weight)  # noqa: E731
            twin = lambda: self._logits_torch(x_TD)  # noqa: E731
            return fused.run_measured("gate_logits", key, x_TD.device, kernel, twin)
        return self._logits_torch(x_TD)

    def _logits_torch(self, x_TD: torch.Tensor) -> torch.Tensor:
        return linear(x_TD.float(), self._weight32())

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        """arange(n) on `device`; on CPU kept (a decode step there is bound by its calls). Not
        kept on a GPU: one made while a CUDA graph is captured holds nothing until a replay."""
        if device.type != "cpu":
            return torch.arange(n, device=device)
        return self.derived("arange", (), lambda: torch.arange(n), n)

    def forward(
        self, x_TD: torch.Tensor, counts_E: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, D) -> weights (T, K) in x's dtype, expert indices (T, K) int64 (in no
        particular order within a token: everything downstream sums over them). With
        `counts_E` (E,) int64, each pick is added to it (tokens per expert).

        On CUDA everything after the matmul is one kernel (`dsv3.fused.route`) unless the
        scores are kept for the views; the torch code below is its twin (and the CPU path)."""
        logits_TE = self._logits(x_TD)
        if not self.keep_scores and fused.available(x_TD.device, "route"):
            softmax = self.score_func == "softmax"
            got = fused.attempt(
                "route", fused.route, logits_TE, self.bias, self.n_groups, self.topk_groups,
                self.topk, softmax, self.route_scale, x_TD.dtype,
                _counts(counts_E, self.n_experts, x_TD.device),
            )  # fmt: skip
            if got is not None:
                return got
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        if self.keep_scores:
            self.last_scores = scores_TE
        choice_TE = scores_TE if self.bias is None else scores_TE + self.bias
        if self.n_groups > 1:
            T, G = x_TD.shape[0], self.n_groups
            grouped_TGe = choice_TE.view(T, G, -1)  # e = E // G experts per group
            if self.bias is None:
                group_TG = grouped_TGe.amax(dim=-1)
            elif T <= FEW_TOKENS:  # a few rows: fewer calls (the values equal _top2_sum's)
                group_TG = grouped_TGe.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_TG = _top2_sum(grouped_TGe)
            keep_TG = group_TG.topk(self.topk_groups, dim=-1)[1]  # (T, kg) kept groups
            # Top-k among the kept groups' experts only: a topk over kg*e candidates instead of
            # all E with the rest masked (CPU topk costs about linearly in the row length).
            e = grouped_TGe.shape[-1]
            cand_TC = (keep_TG[..., None] * e + self._arange(e, x_TD.device)).flatten(1)  # ids
            pick_TK = choice_TE.gather(1, cand_TC).topk(self.topk, dim=-1)[1]  # (T, K)
            idx_TK = cand_TC.gather(1, pick_TK)
        else:
            idx_TK = choice_TE.topk(self.topk, dim=-1)[1]
        weights_TK = scores_TE.gather(1, idx_TK)
        if self.score_func == "sigmoid":
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * self.route_scale
        if counts_E is not None:  # scatter_add rather than bincount: bincount has no meta kernel
            flat = idx_TK.flatten()
            counts_E.scatter_add_(0, flat, torch.ones_like(flat))
        return weights_TK.to(x_TD.dtype), idx_TK


FEW_TOKENS = 64  # rows up to which the group scores take topk (fewer calls than _top2_sum)


def _counts(counts_E: torch.Tensor | None, n: int, device) -> torch.Tensor:
    return counts_E if counts_E is not None else torch.zeros(n, dtype=torch.long, device=device)


def _top2_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values along the last dim (ties count twice, as topk's do): the
    max, then the max with that one entry knocked out. Faster than topk(2) on CPU
    (CPU topk costs about linearly in row length)."""
    best, at = x.max(dim=-1, keepdim=True)
    second = x.scatter(-1, at, float("-inf")).amax(dim=-1, keepdim=True)
    return (best + second).squeeze(-1)
