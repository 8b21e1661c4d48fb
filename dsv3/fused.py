"""Fused Triton kernels for decoding on CUDA, where a step is bound by the number of kernels
rather than by bytes (benchmarks/gpu_profile.py, seed demo at batch 1 on an H200: ~65 kernels
per layer of ~2.4 us each against ~45 us of weight reads; with these, ~25).

- `gate_logits`: the router's float32 matmul (x.float() @ W.float()^T) in one kernel, reading
  a bf16 weight as it is (it upcasts exactly), where the twin casts x and then runs cuBLAS's
  float32 product; measured against the twin per shape class (`prefer`).
- `rms_norm`: an RMSNorm of a few rows in one kernel, and with a residual the block's residual
  add and the norm after it in one (the twin: the add, then F.rms_norm).
- `sort_pairs` and `combine_pairs`: a prefill's (token, expert) pairs sorted by expert from
  the router's counts (a counting sort; the twin: a radix argsort, a division and a gather) and
  each token's weighted sum of its experts' outputs (the twin: a multiply, a scatter back to
  pair order, a float32 sum, a cast), around the grouped expert matmuls on CUDA.
- `route`: the whole router after its matmul in one kernel per token (softmax or sigmoid,
  bias, group scores and the kept groups, top-k, weights, renormalisation, route_scale, and the
  per-expert counts), where `dsv3.routing.Gate` runs ~20 small kernels.
- `moe_small`: the routed experts and the shared experts of a few tokens in two kernels. The
  shared experts (width S*I) are S more "experts" of width I with weight 1: SwiGLU is
  elementwise along its hidden dim, so splitting that dim into S chunks changes nothing but
  the order of the final sum. `_up` computes silu(x W1^T) * (x W3^T) for every (token, expert)
  pair, reading only the weights of the experts each token picked; `_down` multiplies by W2,
  weights each pair and sums a token's pairs, all in float32 with one rounding at the end
  (whole: one program per (token, row tile) over all its pairs; split: one per (pair, row
  tile), then a small kernel for the weighted sum; measured per shape class, since one
  token's programs of the whole form are too few to keep the GPU's loads in flight).
  Weights may be fp8 with 128x128 block scales (each fp8 byte is read once and scaled in
  registers) or in the activations' dtype. The grouped path (sort, layout, grouped matmuls,
  combine: ~25 kernels) stays for prefill.
- `mla_step`: the latent and rotary work of new positions in one kernel: the kv latent's
  RMSNorm, the rotation of the shared rope key and of every head's rope query, and the write of
  the new latents into the cache at the device position (`attention.StaticStep`); a decode
  step's one position per row, or a prefill's S (where the twin runs ~9 kernels).
- `mla_attend`: a decode step's absorbed attention core (scores against the latent cache,
  scale, mask, softmax, the weighted sum of latents) as a flash-decoding kernel split over the
  keys (one wave of 16-key splits, 16-bit products on the tensor cores) plus a combine, where
  the twin runs five kernels: 8.1-10.0 against 18.1-20.0 us on an H200 at the seed demo's
  decode shapes, batch 1 included (chosen for all 12 shape classes there). It runs where it
  measures faster for the shape class (`prefer`).

Every kernel here runs only for the shape classes where it measured faster than its twin by GPU
time (`prefer`, on first use), except `route`, `moe_small` and `mla_step`, which always run.
Two more choices are measured the same way: the form of `moe_small`'s down projection, and
whether a 16-bit Linear's few rows take `dsv3.fp8`'s Triton kernel instead of cuBLAS
(`layers.Linear._cuda`).

Each has a torch twin with the same contract (the modules' own code) and gpu_check compares
them; in Triton's CPU interpreter (TRITON_INTERPRET=1) they run on CPU tensors (the dry run).
"""

from __future__ import annotations

import os

import torch

from . import tuning
from .fp8 import INTERPRET, triton

if triton is not None:
    import triton.language as tl

    from .fp8 import _row_tile  # one row against a tile of weight rows, float32

FP8 = torch.float8_e4m3fn
SMALL_PAIRS = 64  # routed (token, expert) pairs up to which the MoE takes `moe_small`
# DSV3_FUSED=0 keeps the torch twins everywhere (gpu_check compares the two).
ENABLED = os.environ.get("DSV3_FUSED", "1") != "0"


# Kernels that failed on this machine (kind -> why): their torch twins run instead.
FAILED: dict[str, str] = {}


def available(device: torch.device, kind: str | None = None) -> bool:
    """CUDA with Triton (or Triton's CPU interpreter on CPU tensors, for the dry run), and
    kernel `kind` has not failed here."""
    if triton is None or not ENABLED or kind in FAILED:
        return False
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def prefer(kind: str, key: tuple, device: torch.device, kernel, twin) -> bool:
    """Whether `kernel` should run instead of `twin` (its torch twin, or another form) for this
    shape class (`key`): on CUDA the faster by GPU time, measured once (`tuning.gpu_measure`)
    and cached; while a CUDA graph is being captured only a choice already made counts (else
    the twin). In Triton's interpreter always the kernel (the dry run checks it against the
    twin). A kernel that fails while measured is recorded as failed, as in `attempt`."""
    if device.type != "cuda":
        return True
    got = tuning.cached(key)
    if got is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            got = tuning.choose(key, {"kernel": kernel, "torch": twin}, timer=tuning.gpu_measure)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run: the twin
            FAILED[kind] = f"{type(e).__name__}: {e}"[:300]
            return False
    return got == "kernel"


def attempt(kind: str, fn, *args):
    """fn(*args), or None after recording why it failed (a kernel that does not compile on
    this GPU or Triton): the caller then runs the torch twin, and never tries `kind` again."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure means: use the twin
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        FAILED[kind] = f"{type(e).__name__}: {e}"[:300]
        return None


def run_measured(kind: str, key: tuple, device: torch.device, kernel, twin):
    """kernel() where `prefer` picks it for this shape class and it runs (a failure is
    recorded by `attempt`), else twin(). The caller checks `available(device, kind)` first."""
    if prefer(kind, key, device, kernel, twin):
        got = attempt(kind, kernel)
        if got is not None:
            return got
    return twin()


if triton is not None:

    @triton.jit
    def _gate_logits_kernel(
        x_ptr,  # (T, D) activations
        w_ptr,  # (E, D) the router's weight, any float dtype (exact in float32)
        out_ptr,  # (T, E) float32 logits
        E,
        D,
        stride_x,
        BE: tl.constexpr,
        BK: tl.constexpr,
    ):
        # the router's float32 matmul, x.float() @ W.float()^T, reading W in its own dtype (a
        # bf16 weight upcasts exactly): one program per (token, BE experts)
        t = tl.program_id(0)
        re = tl.program_id(1) * BE + tl.arange(0, BE)
        e_ok = re < E
        acc = tl.zeros([BE], dtype=tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < D
            xv = tl.load(x_ptr + t.to(tl.int64) * stride_x + k, mask=k_ok, other=0.0)
            w = tl.load(
                w_ptr + re[:, None].to(tl.int64) * D + k[None, :],
                mask=e_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + t.to(tl.int64) * E + re, acc, mask=e_ok)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,  # (T, D)
        r_ptr,  # (T, D) the residual added first (HAS_RES)
        w_ptr,  # (D,) the norm's weight
        y_ptr,  # (T, D) out: the normed rows
        s_ptr,  # (T, D) out: x + residual, rounded to x's dtype (HAS_RES)
        D,
        stride_x,
        stride_r,
        eps,
        HAS_RES: tl.constexpr,
        BD: tl.constexpr,
    ):
        # one program per row: (residual + x) rounded as torch rounds it, then the float32
        # RMSNorm of that sum (as F.rms_norm computes it for 16-bit inputs)
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BD)
        ok = d < D
        x = tl.load(x_ptr + t * stride_x + d, mask=ok, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + t * stride_r + d, mask=ok, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + t * D + d, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * D + d, ((xf * rstd) * w).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _sort_pairs_kernel(
        idx_ptr,  # (N,) int64: the expert of each (token, k) pair, N = T * K
        w_ptr,  # (N,) the pairs' routing weights
        counts_ptr,  # (E,) int64: pairs per expert
        order_ptr,  # out (N,) int64: the pairs sorted by expert, stable
        inv_ptr,  # out (N,) int64: each pair's place in that order
        token_ptr,  # out (N,) int64: the token of each sorted pair
        wout_ptr,  # out (N,) the weight of each sorted pair
        N,
        E,
        K,
        BLOCK: tl.constexpr,
        EP: tl.constexpr,
    ):
        # a counting sort: one program per expert places that expert's pairs, in pair order,
        # after the pairs of the experts before it
        e = tl.program_id(0)
        ce = tl.arange(0, EP)
        base = tl.sum(tl.load(counts_ptr + ce, mask=ce < e, other=0), axis=0)
        for n0 in range(0, N, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            ok = n < N
            hit = (tl.load(idx_ptr + n, mask=ok, other=-1) == e) & ok
            h = hit.to(tl.int64)
            pos = base + tl.cumsum(h, axis=0) - h  # exclusive: this pair's place
            tl.store(order_ptr + pos, n.to(tl.int64), mask=hit)
            tl.store(inv_ptr + n, pos, mask=hit)
            tl.store(token_ptr + pos, (n // K).to(tl.int64), mask=hit)
            tl.store(wout_ptr + pos, tl.load(w_ptr + n, mask=hit, other=0.0), mask=hit)
            base += tl.sum(h, axis=0)

    @triton.jit
    def _combine_pairs_kernel(
        y_ptr,  # (N, D) the expert outputs of the sorted pairs
        inv_ptr,  # (N,) int64: each (token, k) pair's row in y
        w_ptr,  # (N,) the (token, k) pairs' routing weights, y's dtype
        out_ptr,  # (T, D)
        D,
        K,
        BD: tl.constexpr,
    ):
        # each token's sum of its K weighted outputs: the product rounded to y's dtype (as the
        # twin's in-place multiply), the sum in float32 in k order, one rounding at the end
        t = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        d_ok = d < D
        acc = tl.zeros([BD], dtype=tl.float32)
        for k in range(0, K):
            p = tl.load(inv_ptr + t * K + k)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            y = tl.load(y_ptr + p * D + d, mask=d_ok, other=0.0)
            acc += (y.to(tl.float32) * w).to(y.dtype).to(tl.float32)
        tl.store(out_ptr + t * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _route_kernel(
        logits_ptr,  # (T, E) float32
        bias_ptr,  # (E,) float32 (unused without HAS_BIAS)
        w_out_ptr,  # (T, K) weights, the activations' dtype
        i_out_ptr,  # (T, K) int64 expert ids
        counts_ptr,  # (E,) int64, added to
        E,
        EG,  # experts per group (E when there are no groups)
        G,
        route_scale,
        KG: tl.constexpr,  # groups kept
        K: tl.constexpr,
        SOFTMAX: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        GROUPED: tl.constexpr,  # G > 1
        EP: tl.constexpr,  # E padded to a power of two
        GP: tl.constexpr,  # G padded
        KP: tl.constexpr,  # K padded
    ):
        t = tl.program_id(0)
        e = tl.arange(0, EP)
        ok = e < E
        s = tl.load(logits_ptr + t.to(tl.int64) * E + e, mask=ok, other=float("-inf"))
        if SOFTMAX:
            p = tl.where(ok, tl.exp(s - tl.max(s, axis=0)), 0.0)
            score = p / tl.sum(p, axis=0)
        else:
            score = 1.0 / (1.0 + tl.exp(-s))
        choice = score
        if HAS_BIAS:
            choice = score + tl.load(bias_ptr + e, mask=ok, other=0.0)
        choice = tl.where(ok, choice, float("-inf"))
        if GROUPED:
            # (GP, EP) membership: row g marks group g's experts
            g = tl.arange(0, GP)
            member = (e[None, :] // EG == g[:, None]) & ok[None, :]
            in_g = tl.where(member, choice[None, :], float("-inf"))
            best = tl.max(in_g, axis=1)  # (GP,)
            if HAS_BIAS:  # a group's score: its best two (ties count twice, as topk's)
                at = tl.argmax(in_g, axis=1)
                best += tl.max(tl.where(e[None, :] == at[:, None], float("-inf"), in_g), axis=1)
            best = tl.where(g < G, best, float("-inf"))
            keep = g < 0
            for _ in tl.static_range(KG):
                gi = tl.argmax(best, axis=0)
                keep = keep | (g == gi)
                best = tl.where(g == gi, float("-inf"), best)
            kept = tl.max(tl.where(member & keep[:, None], 1, 0), axis=0) > 0  # (EP,)
            choice = tl.where(kept, choice, float("-inf"))
        kk = tl.arange(0, KP)
        w = tl.zeros([KP], dtype=tl.float32)
        ids = tl.zeros([KP], dtype=tl.int64)
        for k in tl.static_range(K):  # unrolled: K is small
            at = tl.argmax(choice, axis=0)
            hit = e == at
            w_k = tl.sum(tl.where(hit, score, 0.0), axis=0)
            w = tl.where(kk == k, w_k, w)
            ids = tl.where(kk == k, at.to(tl.int64), ids)
            choice = tl.where(hit, float("-inf"), choice)
        if not SOFTMAX:
            w = w / tl.sum(w, axis=0)
        w = w * route_scale
        k_ok = kk < K
        tl.store(w_out_ptr + t * K + kk, w.to(w_out_ptr.dtype.element_ty), mask=k_ok)
        tl.store(i_out_ptr + t * K + kk, ids, mask=k_ok)
        tl.atomic_add(counts_ptr + ids, tl.full([KP], 1, tl.int64), mask=k_ok)

    @triton.jit
    def _up_kernel(
        x_ptr,  # (T, D) activations
        idx_ptr,  # (T, K) int64
        w1_ptr,  # (E, I, D) routed
        w3_ptr,
        s1_ptr,  # (E, I/128, D/128) float32 scales (fp8) or any tensor
        s3_ptr,
        sw1_ptr,  # (S*I, D) shared experts
        sw3_ptr,
        ss1_ptr,  # (S*I/128, D/128)
        ss3_ptr,
        h_ptr,  # (T*K + T*S, I) out: pairs first, then each token's S shared chunks
        T,
        K,
        S,
        I,
        D,
        stride_x,
        HAS_SCALE: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        r = tl.program_id(0)
        pid_n = tl.program_id(1)
        NK = T * K
        IB = (I + 127) // 128  # scale rows per expert
        KS = (D + 127) // 128  # scale columns
        if r < NK:
            t = r // K
            e = tl.load(idx_ptr + r)
            p1 = w1_ptr + e * I * D
            p3 = w3_ptr + e * I * D
            q1 = s1_ptr + e * IB * KS
            q3 = s3_ptr + e * IB * KS
        else:
            c = (r - NK) % S
            t = (r - NK) // S
            c64 = c.to(tl.int64)
            p1 = sw1_ptr + c64 * I * D
            p3 = sw3_ptr + c64 * I * D
            q1 = ss1_ptr + c64 * IB * KS
            q3 = ss3_ptr + c64 * IB * KS
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < I
        nb = (pid_n * BN) // 128  # BN divides 128: the tile's rows share one scale row
        x_row = x_ptr + t.to(tl.int64) * stride_x
        acc1 = tl.zeros([BN], dtype=tl.float32)
        acc3 = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < D
            xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            x1 = xv
            x3 = xv
            if HAS_SCALE:
                x1 = xv * tl.load(q1 + nb * KS + k // 128, mask=k_ok, other=0.0)
                x3 = xv * tl.load(q3 + nb * KS + k // 128, mask=k_ok, other=0.0)
            m = n_ok[:, None] & k_ok[None, :]
            off = rn[:, None] * D + k[None, :]
            a = tl.load(p1 + off, mask=m, other=0.0).to(tl.float32)
            acc1 += tl.sum(a * x1[None, :], axis=1)
            b = tl.load(p3 + off, mask=m, other=0.0).to(tl.float32)
            acc3 += tl.sum(b * x3[None, :], axis=1)
        h = acc1 / (1.0 + tl.exp(-acc1)) * acc3
        tl.store(h_ptr + r.to(tl.int64) * I + rn, h.to(h_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _down_kernel(
        h_ptr,  # (T*K + T*S, I) from _up_kernel
        idx_ptr,  # (T, K) int64
        wt_ptr,  # (T, K) routing weights
        w2_ptr,  # (E, D, I)
        s2_ptr,  # (E, D/128, I/128)
        sw2_ptr,  # (D, S*I) shared
        ss2_ptr,  # (D/128, S*I/128)
        y_ptr,  # (T, D) out
        T,
        K,
        S,
        I,
        D,
        HAS_SCALE: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < D
        nb = (pid_n * BN) // 128
        KI = (I + 127) // 128  # scale columns of one expert
        DB = (D + 127) // 128
        acc = tl.zeros([BN], dtype=tl.float32)
        for jj in range(0, K + S):
            routed = jj < K
            gw = tl.load(wt_ptr + t * K + jj, mask=routed, other=1.0).to(tl.float32)
            if routed:
                e = tl.load(idx_ptr + t * K + jj)
                wb = w2_ptr + e * D * I
                w_row = I
                sb = s2_ptr + e * DB * KI + nb * KI
                h_row = h_ptr + (t * K + jj).to(tl.int64) * I
            else:
                c = (jj - K).to(tl.int64)
                wb = sw2_ptr + c * I
                w_row = S * I
                sb = ss2_ptr + nb * (S * KI) + c * KI
                h_row = h_ptr + (T * K + t * S + jj - K).to(tl.int64) * I
            acc += gw * _row_tile(h_row, wb, w_row, sb, rn, n_ok, I, HAS_SCALE, BN, BK)
        tl.store(y_ptr + t.to(tl.int64) * D + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _down_part_kernel(
        h_ptr,  # (T*K + T*S, I) from _up_kernel
        idx_ptr,  # (T, K) int64
        w2_ptr,  # (E, D, I)
        s2_ptr,  # (E, D/128, I/128)
        sw2_ptr,  # (D, S*I) shared
        ss2_ptr,  # (D/128, S*I/128)
        part_ptr,  # (T*K + T*S, D) float32 out: each pair's W2 product, unweighted
        T,
        K,
        S,
        I,
        D,
        HAS_SCALE: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        # `_down_kernel` split by pair: one program per (pair, row tile) as in `_up_kernel`,
        # so that a single token's few pairs still spread over the SMs; `_down_sum_kernel`
        # then weights and sums each token's pairs
        r = tl.program_id(0)
        pid_n = tl.program_id(1)
        NK = T * K
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < D
        nb = (pid_n * BN) // 128
        KI = (I + 127) // 128
        DB = (D + 127) // 128
        if r < NK:
            e = tl.load(idx_ptr + r)
            wb = w2_ptr + e * D * I
            w_row = I
            sb = s2_ptr + e * DB * KI + nb * KI
        else:
            c = ((r - NK) % S).to(tl.int64)
            wb = sw2_ptr + c * I
            w_row = S * I
            sb = ss2_ptr + nb * (S * KI) + c * KI
        h_row = h_ptr + r.to(tl.int64) * I
        acc = _row_tile(h_row, wb, w_row, sb, rn, n_ok, I, HAS_SCALE, BN, BK)
        tl.store(part_ptr + r.to(tl.int64) * D + rn, acc, mask=n_ok)

    @triton.jit
    def _down_sum_kernel(part_ptr, wt_ptr, y_ptr, T, K, S, D, BN: tl.constexpr):
        # y[t] = sum_j weight[t, j] part[t*K + j] + sum_c part[T*K + t*S + c], in float32, in
        # the order `_down_kernel` sums them
        t = tl.program_id(0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < D
        acc = tl.zeros([BN], dtype=tl.float32)
        for j in range(0, K):
            gw = tl.load(wt_ptr + t * K + j).to(tl.float32)
            pr = tl.load(part_ptr + (t * K + j).to(tl.int64) * D + rn, mask=n_ok, other=0.0)
            acc += gw * pr
        for c in range(0, S):
            row = (T * K + t * S + c).to(tl.int64)
            acc += tl.load(part_ptr + row * D + rn, mask=n_ok, other=0.0)
        tl.store(y_ptr + t.to(tl.int64) * D + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _mla_step_kernel(
        kv_ptr,  # (B, S, C + R) the wkv_a output of the S new positions
        q_ptr,  # (B, S, H, Dq) queries, the last R of each head rotated in place
        norm_ptr,  # (C,) kv_norm weight
        fr_ptr,  # (S, R/2, 2) float32 cos, sin of each position
        pos_ptr,  # (1,) int64 the first position
        cache_ptr,  # (B, T_cap, C + R) packed latent cache
        stride_kvb,
        stride_kvs,
        stride_qb,
        stride_qs,
        stride_qh,
        stride_cb,
        stride_ct,
        H,
        C,
        eps,
        DN: tl.constexpr,  # q's non-rotated dims per head
        R: tl.constexpr,
        CP: tl.constexpr,  # C padded
        HP: tl.constexpr,  # H padded
    ):
        s = tl.program_id(0)  # positions on the grid's first axis: up to 2^31 - 1 of them
        b = tl.program_id(1).to(tl.int64)
        row = cache_ptr + b * stride_cb + (tl.load(pos_ptr) + s) * stride_ct
        kv_row = kv_ptr + b * stride_kvb + s * stride_kvs
        # the kv latent's RMSNorm (float32, as F.rms_norm computes it)
        c = tl.arange(0, CP)
        c_ok = c < C
        x = tl.load(kv_row + c, mask=c_ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        w = tl.load(norm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(row + c, (x * rstd * w).to(cache_ptr.dtype.element_ty), mask=c_ok)
        # rotate interleaved pairs (x0, x1) by (cos, sin): the key's and every head's query's
        i = tl.arange(0, R // 2)
        cos = tl.load(fr_ptr + s * R + 2 * i)
        sin = tl.load(fr_ptr + s * R + 2 * i + 1)
        k_at = kv_row + C + 2 * i
        k0 = tl.load(k_at).to(tl.float32)
        k1 = tl.load(k_at + 1).to(tl.float32)
        tl.store(row + C + 2 * i, (k0 * cos - k1 * sin).to(cache_ptr.dtype.element_ty))
        tl.store(row + C + 2 * i + 1, (k0 * sin + k1 * cos).to(cache_ptr.dtype.element_ty))
        h = tl.arange(0, HP)
        h_ok = h < H
        q_at = q_ptr + b * stride_qb + s * stride_qs + h[:, None] * stride_qh + DN + 2 * i[None, :]
        q0 = tl.load(q_at, mask=h_ok[:, None], other=0.0).to(tl.float32)
        q1 = tl.load(q_at + 1, mask=h_ok[:, None], other=0.0).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        tl.store(q_at, (q0 * cos[None, :] - q1 * sin[None, :]).to(dt), mask=h_ok[:, None])
        tl.store(q_at + 1, (q0 * sin[None, :] + q1 * cos[None, :]).to(dt), mask=h_ok[:, None])


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def route(
    logits_TE: torch.Tensor,
    bias: torch.Tensor | None,
    n_groups: int,
    topk_groups: int,
    topk: int,
    softmax: bool,
    route_scale: float,
    dtype: torch.dtype,
    counts_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its matmul (`Gate.forward`'s contract) in one kernel: logits (T, E)
    float32 -> weights (T, K) in `dtype`, expert ids (T, K) int64; adds each pick to counts_E
    (E,) int64."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.contiguous()
    w = torch.empty(T, topk, dtype=dtype, device=logits_TE.device)
    idx = torch.empty(T, topk, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return w, idx
    eg = E // n_groups
    _route_kernel[(T,)](
        logits_TE, bias if bias is not None else logits_TE, w, idx, counts_E, E, eg, n_groups,
        float(route_scale), KG=topk_groups, K=topk, SOFTMAX=softmax, HAS_BIAS=bias is not None,
        GROUPED=n_groups > 1, EP=_pow2(E), GP=_pow2(n_groups), KP=_pow2(topk),
        num_warps=1 if E <= 64 else 4,
    )  # fmt: skip
    return w, idx


# (BN, BK, warps) tried per shape on first use. A few tokens' products are bound by how many
# weight bytes are in flight: narrow row tiles give more programs, long K tiles longer loads.
GATE_ROWS = 1024  # tokens up to which the router's matmul may take `gate_logits` (measured)
# (experts per program, K tile, warps) tried per shape on first use: a few tokens' logits are
# bound by how many programs read the weight at once
_GATE = [(2, 512, 4), (4, 512, 4), (8, 256, 4), (4, 256, 2), (2, 1024, 8)]

if triton is not None and not INTERPRET:
    _gate_tuned = triton.autotune(
        [triton.Config({"BE": be, "BK": bk}, num_warps=w) for be, bk, w in _GATE],
        key=["E", "D"],
    )(_gate_logits_kernel)
else:
    _gate_tuned = None


def gate_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """The router's logits x.float() @ weight.float()^T -> (T, E) float32 in one kernel, where
    its twin (`Gate._logits_torch`) casts x, then runs cuBLAS's float32 matrix-vector product
    (two kernels)."""
    T, D = x_TD.shape
    E = weight_ED.shape[0]
    if x_TD.stride(-1) != 1:
        x_TD = x_TD.contiguous()
    w = weight_ED.contiguous()
    out = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    args = (x_TD, w, out, E, D, x_TD.stride(0))
    if _gate_tuned is None:  # Triton's CPU interpreter: one fixed tile
        _gate_logits_kernel[(T, triton.cdiv(E, 4))](*args, BE=4, BK=128)
    else:
        _gate_tuned[lambda m: (T, triton.cdiv(E, m["BE"]))](*args)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x's rows in one kernel -> (normed, None); with `residual`, of residual + x
    (the block's residual add and the norm after it, two kernels in the twin) -> (normed,
    residual + x). Rows of x and residual must have unit stride along the last dim."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (T, D): a view for the blocks' contiguous activations
    T = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    r2 = residual.reshape(-1, D) if residual is not None else x2
    BD = _pow2(D)
    _rms_norm_kernel[(T,)](
        x2, r2, weight, y, s if s is not None else y, D, x2.stride(0), r2.stride(0), eps,
        HAS_RES=residual is not None, BD=BD, num_warps=max(1, min(16, BD // 256)),
    )  # fmt: skip
    return y, s


SORT_BLOCK = 1024  # pairs a program of `sort_pairs` reads at a time


def sort_pairs(
    idx_TK: torch.Tensor, weights_TK: torch.Tensor, counts_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) pairs sorted by expert (stable) in one kernel, from the router's counts
    (no sort): -> (order_N, inv_N, token_N, weight_N), int64 but weight_N (weights' dtype);
    inv_N[n] is pair n's place in the order. counts_E must be the bincount of idx_TK (the
    router's, as `MoE.forward` makes them): the places are computed from it. The twin
    (`moe.sort_pairs_torch`): a stable argsort, a division, a gather and a scatter."""
    N = idx_TK.numel()
    E = counts_E.numel()
    dev = idx_TK.device
    order, inv, token = (torch.empty(N, dtype=torch.long, device=dev) for _ in range(3))
    weight = torch.empty(N, dtype=weights_TK.dtype, device=dev)
    _sort_pairs_kernel[(E,)](
        idx_TK.reshape(-1), weights_TK.reshape(-1), counts_E, order, inv, token, weight, N, E,
        idx_TK.shape[-1], BLOCK=SORT_BLOCK, EP=_pow2(E), num_warps=4,
    )  # fmt: skip
    return order, inv, token, weight


def combine_pairs(
    y_ND: torch.Tensor, inv_N: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """Each token's weighted sum of its K expert outputs (y_ND: the sorted pairs' outputs,
    unweighted; inv_N: each (token, k) pair's row of y) -> (T, D) in y's dtype, in one kernel.
    The twin (`moe.combine_pairs_torch`): the weights multiplied in place, the rows put back in
    pair order, a float32 sum over k, a cast."""
    T, K = weights_TK.shape
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=y_ND.dtype, device=y_ND.device)
    BD = min(1024, _pow2(D))
    _combine_pairs_kernel[(T, triton.cdiv(D, BD))](
        y_ND.contiguous(), inv_N, weights_TK.contiguous(), out, D, K, BD=BD, num_warps=4
    )
    return out


# (BN, BK, warps, stages) tried per shape on first use. A few tokens' products are bound by how
# many weight bytes are in flight: narrow row tiles give more programs, long K tiles and more
# stages longer loads in flight.
_UP = [
    (16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (32, 512, 8, 2), (64, 128, 4, 2),
    (8, 512, 4, 2), (16, 256, 4, 3), (32, 128, 4, 4), (16, 128, 4, 4), (32, 256, 8, 3),
]  # fmt: skip
_DOWN = [(8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (32, 512, 8, 2),
         (64, 128, 4, 2)]  # fmt: skip
_DOWN_PART = [
    (16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (64, 128, 4, 2), (8, 512, 4, 2),
    (16, 256, 4, 3), (32, 128, 4, 4), (16, 128, 4, 4),
]  # fmt: skip
DOWN_SUM_BN = 256
# Which `_down` form a few tokens take: None measures both per shape class on first use
# (`prefer`); "split" or "whole" forces one (gpu_check runs both against the twin).
DOWN_FORM: str | None = None

if triton is not None and not INTERPRET:

    def _configs(tiles):
        return [
            triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in tiles
        ]

    _KEY = ["T", "K", "S", "I", "D", "HAS_SCALE"]
    _up_tuned = triton.autotune(_configs(_UP), key=_KEY)(_up_kernel)
    _down_tuned = triton.autotune(_configs(_DOWN), key=_KEY)(_down_kernel)
    _down_part_tuned = triton.autotune(_configs(_DOWN_PART), key=_KEY)(_down_part_kernel)
else:
    _up_tuned = _down_tuned = _down_part_tuned = None


def moe_small_ok(experts, shared, x: torch.Tensor, n_pairs: int) -> bool:
    """Can `moe_small` run these experts (weights in x's dtype or fp8, a shared width that
    splits into whole experts, fp8 blocks that do not straddle experts), and is it few pairs?
    The caller checks that every expert is on this rank."""
    if n_pairs > SMALL_PAIRS or not available(x.device, "moe_small"):
        return False
    I, D = experts.inter_dim, experts.dim  # noqa: E741 - the legend's I
    fp8 = experts.w1.dtype == FP8
    if not fp8 and experts.w1.dtype != x.dtype:
        return False
    if not all(getattr(experts, n).is_contiguous() for n in ("w1", "w2", "w3")):
        return False  # the kernels index row-major stacks (moe.expert_layout)
    if shared is not None:
        if shared.w1.weight.shape[0] % I or shared.w1.weight.dtype != experts.w1.dtype:
            return False
    return not fp8 or (I % 128 == 0 and D % 128 == 0)


def moe_small(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor, experts, shared
) -> torch.Tensor:
    """Routed experts (`GroupedExperts`) plus shared experts (an `MLP`, or None) of a few tokens
    -> (T, D) in x's dtype: `MoE.forward`'s result, in two kernels."""
    T, D = x_TD.shape
    K = idx_TK.shape[1]
    I = experts.inter_dim  # noqa: E741
    x_TD = x_TD.contiguous()
    idx_TK = idx_TK.contiguous()
    w1, w2, w3 = experts.w1, experts.w2, experts.w3
    fp8 = w1.dtype == FP8
    if fp8:
        s1, s2, s3 = experts.w1_scale, experts.w2_scale, experts.w3_scale
    else:
        s1 = s2 = s3 = x_TD
    if shared is not None:
        S = shared.w1.weight.shape[0] // I
        sw1, sw2, sw3 = shared.w1.weight, shared.w2.weight, shared.w3.weight
        ss1, ss2, ss3 = (
            (shared.w1.scale, shared.w2.scale, shared.w3.scale) if fp8 else (x_TD, x_TD, x_TD)
        )
    else:
        S = 0
        sw1, sw2, sw3, ss1, ss2, ss3 = w1, w2, w3, s1, s2, s3
    R = T * (K + S)
    h = torch.empty(R, I, dtype=x_TD.dtype, device=x_TD.device)
    up = (x_TD, idx_TK, w1, w3, s1, s3, sw1, sw3, ss1, ss3, h, T, K, S, I, D, x_TD.stride(0))
    if _up_tuned is None:  # Triton's CPU interpreter: one fixed tile
        _up_kernel[(R, triton.cdiv(I, 64))](*up, HAS_SCALE=fp8, BN=64, BK=128)
    else:
        _up_tuned[lambda m: (R, triton.cdiv(I, m["BN"]))](*up, HAS_SCALE=fp8)
    weights_TK = weights_TK.contiguous()

    def whole() -> torch.Tensor:
        y = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
        down = (h, idx_TK, weights_TK, w2, s2, sw2, ss2, y, T, K, S, I, D)
        if _down_tuned is None:
            _down_kernel[(T, triton.cdiv(D, 64))](*down, HAS_SCALE=fp8, BN=64, BK=128)
        else:
            _down_tuned[lambda m: (T, triton.cdiv(D, m["BN"]))](*down, HAS_SCALE=fp8)
        return y

    def split() -> torch.Tensor:
        part = torch.empty(R, D, dtype=torch.float32, device=x_TD.device)
        y = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
        down = (h, idx_TK, w2, s2, sw2, ss2, part, T, K, S, I, D)
        if _down_part_tuned is None:
            _down_part_kernel[(R, triton.cdiv(D, 64))](*down, HAS_SCALE=fp8, BN=64, BK=128)
        else:
            _down_part_tuned[lambda m: (R, triton.cdiv(D, m["BN"]))](*down, HAS_SCALE=fp8)
        _down_sum_kernel[(T, triton.cdiv(D, DOWN_SUM_BN))](
            part, weights_TK, y, T, K, S, D, BN=DOWN_SUM_BN, num_warps=4
        )
        return y

    if "moe_down_split" in FAILED or DOWN_FORM == "whole":
        return whole()
    if DOWN_FORM == "split":
        y = attempt("moe_down_split", split)
        return y if y is not None else whole()
    # measured once per shape class (a split form that fails: the whole)
    key = ("moe-down", T, K, S, I, D, fp8, x_TD.dtype)
    return run_measured("moe_down_split", key, x_TD.device, split, whole)


def mla_step(
    kv: torch.Tensor,
    q: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    freqs: torch.Tensor,
    pos: torch.Tensor,
    cache: torch.Tensor,
    n_nope: int,
) -> torch.Tensor:
    """kv (B, S, C + R) the wkv_a output of S new positions per row, q (B, S, H, Dn + R): writes
    RMSNorm(kv[:C]) and the rotated kv[C:] into cache (B, T_cap, C + R) at positions pos..
    pos + S - 1 (pos (1,) on the device) and rotates q's last R dims of every head in place
    (and returns it). freqs (S, R/2) complex: the positions' rotations. A program per (row,
    position): a decode step (S = 1) or a prefill."""
    B, S, CR = kv.shape
    H = q.shape[2]
    R = q.shape[3] - n_nope
    C = CR - R
    fr = torch.view_as_real(freqs.reshape(S, -1)).contiguous()  # (S, R/2, 2): cos, sin
    _mla_step_kernel[(S, B)](
        kv, q, norm_weight, fr, pos, cache, kv.stride(0), kv.stride(1), q.stride(0),
        q.stride(1), q.stride(2), cache.stride(0), cache.stride(1), H, C, float(eps),
        DN=n_nope, R=R, CP=_pow2(C), HP=_pow2(H), num_warps=4,
    )  # fmt: skip
    return q


if triton is not None:

    @triton.jit
    def _attend_split_kernel(
        qa_ptr,  # (B, H, C) q_nope absorbed into the latent space
        qp_ptr,  # (B, H, R) rotated rope query
        lat_ptr,  # (B, T_cap, C + R) the latent cache: kv | pe
        bias_ptr,  # (T,) additive score bias (unused without HAS_BIAS)
        acc_ptr,  # (B, NS, H, C) float32: each split's unnormalised output
        ml_ptr,  # (B, NS, H, 2) float32: each split's running max and sum
        H,
        T,
        C,
        R,
        TS,  # keys per split
        sqa_b,
        sqa_h,
        sqp_b,
        sqp_h,
        sl_b,
        sl_t,
        scale,
        HAS_BIAS: tl.constexpr,
        DOT16: tl.constexpr,  # a 16-bit cache: tensor-core products
        BH: tl.constexpr,
        BT: tl.constexpr,
        CP: tl.constexpr,
        RP: tl.constexpr,
    ):
        b, hb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        NS = tl.num_programs(2)
        offs_h = hb * BH + tl.arange(0, BH)
        offs_c = tl.arange(0, CP)
        offs_r = tl.arange(0, RP)
        mh, mc, mr = offs_h < H, offs_c < C, offs_r < R
        qa = tl.load(
            qa_ptr + b * sqa_b + offs_h[:, None] * sqa_h + offs_c[None, :],
            mask=mh[:, None] & mc[None, :],
            other=0.0,
        )
        qp = tl.load(
            qp_ptr + b * sqp_b + offs_h[:, None] * sqp_h + offs_r[None, :],
            mask=mh[:, None] & mr[None, :],
            other=0.0,
        )
        if not DOT16:
            qa, qp = qa.to(tl.float32), qp.to(tl.float32)
        m_i = tl.full([BH], float("-inf"), tl.float32)
        l_i = tl.zeros([BH], tl.float32)
        acc = tl.zeros([BH, CP], tl.float32)
        start = s * TS
        end = tl.minimum(start + TS, T)
        for t0 in range(start, end, BT):
            offs_t = t0 + tl.arange(0, BT)
            mt = offs_t < end
            row = lat_ptr + b * sl_b + offs_t[:, None] * sl_t
            kv = tl.load(row + offs_c[None, :], mask=mt[:, None] & mc[None, :], other=0.0)
            pe = tl.load(row + C + offs_r[None, :], mask=mt[:, None] & mr[None, :], other=0.0)
            if DOT16:
                # a 16-bit cache: its products on the tensor cores, summed in float32 (the
                # twin's bmm rounds its scores to 16 bits; this keeps them in float32)
                sc = tl.dot(qa, tl.trans(kv))
                sc += tl.dot(qp, tl.trans(pe))
            else:
                # float32 products (not TF32), as the twin's float32 bmm
                kv, pe = kv.to(tl.float32), pe.to(tl.float32)
                sc = tl.dot(qa, tl.trans(kv), input_precision="ieee")
                sc += tl.dot(qp, tl.trans(pe), input_precision="ieee")
            sc = sc * scale
            if HAS_BIAS:
                sc += tl.load(bias_ptr + offs_t, mask=mt, other=0.0).to(tl.float32)[None, :]
            sc = tl.where(mt[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked
            p = tl.exp(sc - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT16:
                pv = tl.dot(p.to(kv.dtype), kv)  # as the twin's bmm of 16-bit probabilities
            else:
                pv = tl.dot(p, kv, input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        part = (b * NS + s) * H + offs_h
        tl.store(acc_ptr + part[:, None] * C + offs_c[None, :], acc, mask=mh[:, None] & mc[None, :])
        tl.store(ml_ptr + part * 2, m_i, mask=mh)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=mh)

    @triton.jit
    def _attend_combine_kernel(
        acc_ptr,
        ml_ptr,
        out_ptr,
        H,
        C,
        NS,
        so_b,
        so_h,
        NSP: tl.constexpr,
        SB: tl.constexpr,
        CP: tl.constexpr,
    ):
        b, h = tl.program_id(0), tl.program_id(1)
        offs_c = tl.arange(0, CP)
        mc = offs_c < C
        # the largest split max first (all NS of them fit: one float each), then the splits
        # SB at a time, so that a long cache's many splits need no more registers
        offs_s = tl.arange(0, NSP)
        m_all = tl.load(
            ml_ptr + ((b * NS + offs_s) * H + h) * 2, mask=offs_s < NS, other=float("-inf")
        )
        top = tl.max(m_all, 0)
        total = tl.zeros([SB], tl.float32)
        o = tl.zeros([CP], tl.float32)
        for s0 in range(0, NS, SB):
            sb = s0 + tl.arange(0, SB)
            ms = sb < NS
            part = (b * NS + sb) * H + h
            m = tl.load(ml_ptr + part * 2, mask=ms, other=float("-inf"))
            lsum = tl.load(ml_ptr + part * 2 + 1, mask=ms, other=0.0)
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # splits with no key: 0
            total += lsum * w
            a = tl.load(
                acc_ptr + part[:, None] * C + offs_c[None, :],
                mask=ms[:, None] & mc[None, :],
                other=0.0,
            )
            o += tl.sum(a * w[:, None], 0)
        o = o / tl.sum(total, 0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_c, o.to(out_ptr.dtype.element_ty), mask=mc)


ATTEND_BH = 16  # heads per program of `mla_attend`
ATTEND_TS = 16  # keys per split: a multiple of this
ATTEND_SB = 16  # splits the combine reads at a time
# (keys per tile, warps) tried per shape on first use: a (tile, C) block of the cache and the
# (heads, C) accumulator share the registers. A tile longer than a split is masked at its end.
_ATTEND = [(16, 4), (32, 4), (16, 8), (32, 8)]

if triton is not None and not INTERPRET:
    _attend_tuned = triton.autotune(
        [triton.Config({"BT": bt}, num_warps=w, num_stages=2) for bt, w in _ATTEND],
        key=["H", "C", "R", "HAS_BIAS", "DOT16"],  # not T: a decode's key count grows every step
    )(_attend_split_kernel)
else:
    _attend_tuned = None


def mla_attend(
    q_abs: torch.Tensor,
    q_pe: torch.Tensor,
    lat: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA attention of one new query per row (decoding): q_abs (B, H, C) (q_nope
    times W_uk), q_pe (B, H, R), over the latent cache lat (B, T, C + R) -> (B, H, C) in
    q_abs's dtype: softmax(scale * (q_abs kv^T + q_pe pe^T) + bias) kv, with `bias` (T,)
    additive (the static step's mask) or None. The keys are split so that the GPU's SMs share
    even one row's work (flash decoding); each split keeps a running max and sum, and a second
    kernel combines them in float32. `MLA._attend_torch` is its twin (cat, two bmm, scale,
    softmax: five kernels and the scores in memory)."""
    B, H, C = q_abs.shape
    R, T = q_pe.shape[-1], lat.shape[1]
    BH, TS = ATTEND_BH, ATTEND_TS
    hblocks = triton.cdiv(H, BH)
    if q_abs.is_cuda:
        sms = torch.cuda.get_device_properties(q_abs.device).multi_processor_count
    else:  # the interpreter: enough splits that the combine reads them in two chunks
        sms = 32
    # one wave of programs: a few rows of a short cache still spread over the SMs
    ns = max(1, min(triton.cdiv(T, TS), sms // (B * hblocks)))
    ts = triton.cdiv(triton.cdiv(T, ns), TS) * TS  # keys per split, whole tiles
    ns = triton.cdiv(T, ts)
    acc = torch.empty(B, ns, H, C, dtype=torch.float32, device=q_abs.device)
    ml = torch.empty(B, ns, H, 2, dtype=torch.float32, device=q_abs.device)
    out = torch.empty(B, H, C, dtype=q_abs.dtype, device=q_abs.device)
    args = (
        q_abs, q_pe, lat, bias if bias is not None else lat, acc, ml, H, T, C, R, ts,
        q_abs.stride(0), q_abs.stride(1), q_pe.stride(0), q_pe.stride(1), lat.stride(0),
        lat.stride(1), float(scale),
    )  # fmt: skip
    # 16-bit products on the tensor cores; float32 ones in Triton's interpreter, whose 16-bit
    # dot is wrong (3.6), and for a float32 cache
    dot16 = (
        lat.dtype in (torch.bfloat16, torch.float16)
        and q_abs.dtype == q_pe.dtype == lat.dtype
        and not INTERPRET
    )
    kw = dict(
        HAS_BIAS=bias is not None, DOT16=dot16, BH=BH, CP=max(16, _pow2(C)), RP=max(16, _pow2(R))
    )
    if _attend_tuned is None:  # Triton's CPU interpreter: one fixed tile
        _attend_split_kernel[(B, hblocks, ns)](*args, **kw, BT=16, num_warps=4)
    else:
        _attend_tuned[(B, hblocks, ns)](*args, **kw)
    _attend_combine_kernel[(B, H)](
        acc, ml, out, H, C, ns, out.stride(0), out.stride(1), NSP=max(2, _pow2(ns)),
        SB=ATTEND_SB, CP=_pow2(C), num_warps=4,
    )  # fmt: skip
    return out
