"""Multi-head latent attention (MLA) and its KV cache.

Shapes: B batch, S new tokens, T cached positions (end_pos), H heads, Dn/Dr/Dv the no-rope,
rope and value head dims, Dqk = Dn + Dr, C kv_lora_rank.

Two cache layouts, one set of numbers:
- "naive" caches full per-head keys (B, T, H, Dqk) and values (B, T, H, Dv);
- "absorb" caches the normalised latent kv (B, T, C) and the shared rope key (B, T, Dr) and
  folds wkv_b into the query and the output, so a decode step never expands the cache.
With the absorb cache, multi-token inputs (prefill) still expand the latent into per-head k/v and
run `scaled_dot_product_attention`: for S ~ T that costs fewer FLOPs than the absorbed form
(Dqk + Dv per head instead of 2C + Dr). `MLA.absorbed_prefill = True` forces the absorbed math.

Caches are sized to what a forward uses (batch and end position), not max_batch_size x
max_seq_len; `reserve()` pre-sizes them when the caller knows how far decoding will go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerArgs
from .layers import Linear, RMSNorm
from .rotary import apply_rotary_emb


class KVCache:
    """Per-layer cache tensors that grow on demand. `tensors` maps name -> (B, T_cap, ...)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], max_len: int):
        self.shapes = shapes  # trailing dims per tensor, after (B, T)
        self.max_len = max_len
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def capacity(self) -> tuple[int, int]:
        if not self.tensors:
            return (0, 0)
        t = next(iter(self.tensors.values()))
        return t.shape[0], t.shape[1]

    def ensure(self, batch: int, end_pos: int, like: torch.Tensor, keep: bool) -> None:
        """Make room for `batch` x `end_pos`; keep the old contents when `keep` (decode)."""
        cap_b, cap_t = self.capacity
        t0 = next(iter(self.tensors.values())) if self.tensors else None
        same = t0 is not None and t0.device == like.device and t0.dtype == like.dtype
        if same and batch <= cap_b and end_pos <= cap_t:
            return
        # Grow geometrically while decoding so n steps cost O(n) copies, never past max_len.
        new_t = end_pos if not keep else min(self.max_len, max(end_pos, cap_t + cap_t // 2))
        new_b = max(batch, cap_b) if keep else batch
        new = {
            k: torch.zeros(new_b, new_t, *shape, dtype=like.dtype, device=like.device)
            for k, shape in self.shapes.items()
        }
        if keep and same:
            for k, old in self.tensors.items():
                new[k][: old.shape[0], : old.shape[1]] = old
        self.tensors = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def clear(self) -> None:
        self.tensors = {}


class MLA(nn.Module):
    """Multi-head latent attention of one layer, built from its resolved `LayerArgs`."""

    absorbed_prefill = False  # see the module docstring

    def __init__(self, la: LayerArgs, max_seq_len: int, dtype=None, device=None):
        super().__init__()
        self.dim = la.dim
        self.n_heads = la.n_heads
        self.q_lora_rank = la.q_lora_rank
        self.kv_lora_rank = la.kv_lora_rank
        self.qk_nope_head_dim = la.qk_nope_head_dim
        self.qk_rope_head_dim = la.qk_rope_head_dim
        self.qk_head_dim = la.qk_head_dim
        self.v_head_dim = la.v_head_dim
        self.softmax_scale = la.softmax_scale
        self.attn_impl = la.attn_impl
        kw = dict(dtype=dtype, device=device)
        norm_dtype = (
            torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
        )  # fp8 computes in bf16
        H = self.n_heads
        if self.q_lora_rank == 0:
            self.wq = Linear(self.dim, H * self.qk_head_dim, **kw)
        else:
            self.wq_a = Linear(self.dim, self.q_lora_rank, **kw)
            self.q_norm = RMSNorm(self.q_lora_rank, dtype=norm_dtype, device=device)
            self.wq_b = Linear(self.q_lora_rank, H * self.qk_head_dim, **kw)
        self.wkv_a = Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, **kw)
        self.kv_norm = RMSNorm(self.kv_lora_rank, dtype=norm_dtype, device=device)
        self.wkv_b = Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), **kw)
        self.wo = Linear(H * self.v_head_dim, self.dim, **kw)
        if self.attn_impl == "naive":
            shapes = {"k": (H, self.qk_head_dim), "v": (H, self.v_head_dim)}
        else:
            shapes = {"kv": (self.kv_lora_rank,), "pe": (self.qk_rope_head_dim,)}
        self.cache = KVCache(shapes, max_seq_len)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        B, S, _ = x.shape
        end_pos = start_pos + S
        H, Dn, Dr, Dv = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        if self.q_lora_rank == 0:
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, H, self.qk_head_dim)  # (B, S, H, Dqk)
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, Dr], dim=-1)  # (B,S,C), (B,S,Dr)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), cos, sin)  # (B, S, 1, Dr)
        kv = self.kv_norm(kv)
        self.cache.ensure(B, end_pos, x, keep=start_pos > 0)
        c = self.cache.tensors

        if self.attn_impl == "naive":
            kvb = self.wkv_b(kv).view(B, S, H, Dn + Dv)
            k_nope, v = kvb.split([Dn, Dv], dim=-1)
            c["k"][:B, start_pos:end_pos] = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], -1)
            c["v"][:B, start_pos:end_pos] = v
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = self._sdpa(q, c["k"][:B, :end_pos], c["v"][:B, :end_pos], start_pos)
            return self.wo(o.flatten(2))

        c["kv"][:B, start_pos:end_pos] = kv
        c["pe"][:B, start_pos:end_pos] = k_pe.squeeze(2)
        kv_all, pe_all = c["kv"][:B, :end_pos], c["pe"][:B, :end_pos]  # (B,T,C), (B,T,Dr)
        wkv_b = self.wkv_b.effective_weight(x.dtype).view(H, Dn + Dv, self.kv_lora_rank)
        if S > 1 and not self.absorbed_prefill:
            # Expand the cached latent into per-head keys/values: cheaper than absorbing at S ~ T.
            T = end_pos
            kvb = torch.einsum("btc,hdc->bthd", kv_all, wkv_b)  # (B, T, H, Dn+Dv)
            k_nope, v = kvb.split([Dn, Dv], dim=-1)
            k = torch.cat([k_nope, pe_all[:, :, None].expand(B, T, H, Dr)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = self._sdpa(q, k, v, start_pos)
            return self.wo(o.flatten(2))
        # Absorbed: q_nope . (W_uk kv) == (q_nope W_uk) . kv, and the output folds W_uv.
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :Dn])  # (B, S, H, C)
        T = end_pos
        scores = torch.bmm(q_abs.reshape(B, S * H, -1), kv_all.transpose(1, 2))
        scores = scores + torch.bmm(q_pe.reshape(B, S * H, Dr), pe_all.transpose(1, 2))
        scores = scores.view(B, S, H, T) * self.softmax_scale  # (B, S, H, T)
        if S > 1:
            scores = scores + _causal_bias(S, T, start_pos, x.device)[:, None]
        p = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        o = torch.bmm(p.view(B, S * H, T), kv_all).view(B, S, H, -1)  # (B, S, H, C)
        o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, Dn:])  # (B, S, H, Dv)
        return self.wo(o.flatten(2))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """q (B,S,H,Dqk), k (B,T,H,Dqk), v (B,T,H,Dv) -> (B,S,H,Dv), causal from start_pos."""
        S, T = q.shape[1], k.shape[1]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, *, D)
        if S == 1:
            o = F.scaled_dot_product_attention(qt, kt, vt, scale=self.softmax_scale)
        elif start_pos == 0:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.softmax_scale)
        else:
            # Chunked prefill: query s sits at position start_pos + s and sees keys t <= that.
            mask = _causal_bias(S, T, start_pos, q.device) == 0
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.softmax_scale)
        return o.transpose(1, 2)


def _causal_bias(S: int, T: int, start_pos: int, device) -> torch.Tensor:
    """(S, T) additive mask: 0 where key t <= start_pos + s, -inf after."""
    return torch.full((S, T), float("-inf"), device=device).triu_(start_pos + 1)
