"""fp8 matmuls on CUDA that never dequantise a whole weight per call.

An fp8 weight W (N, K) float8_e4m3fn comes with a float32 scale per 128x128 block (N/128, K/128):
the real weight is W * scale. Dequantising it to bf16 before each matmul (`dsv3.layers
.dequantize`, the CPU path) reads 1 byte, writes 2 and reads 2 again per weight: 5 bytes where
bf16 reads 2. Two paths read each fp8 byte once instead:

- `w8_matmul` (Triton): the bf16 activations times W, converting each fp8 tile to bf16 in
  registers; with 128-wide K tiles each partial product is scaled by its block's scale (exact:
  a scale is constant over its block), with longer K tiles the weight tile is scaled first (as
  dequantisation does). The same kernel runs the routed experts grouped (`experts_w8`): pairs
  sorted by expert, each expert's rows padded to whole row blocks (`moe_layout`, one small
  kernel from the counts), a row block naming its expert, so an expert that got no pairs is
  never read; the up projection reads each token's row in place and multiplies it by w1 and
  w3 in one kernel with the SwiGLU applied there (where that measures faster than two kernels
  and the product). Sync-free: it can be captured in a CUDA graph. It also takes 16-bit
  weights (no scale; `dsv3.moe.GroupedExperts._triton_pays`). Tiles are autotuned per shape
  on first use.
- `scaled_mm` (dense Linears, sm90 with cuBLASLt >= 12.9): the activations quantised to fp8 per
  1x128 block, then `torch._scaled_mm` with DeepSeek's block scaling, at the fp8 matrix rate.
  cuBLASLt wants M a multiple of 4 (rows are padded) and the weight scale's K blocks padded to
  a multiple of 4 with a column-major layout (`Linear` keeps that copy).

A single row (a batch-1 decode step) may also take `w8_row`, a float32 reduction per weight
row instead of a 16-row tensor-core tile. Which of these (and plain dequantisation) is fastest
depends on the GPU and the shape, so
`linear` measures them once per shape class on first use (`dsv3.tuning`), after checking that
each candidate's result agrees with the dequantised product; a candidate that fails or
disagrees is never chosen. Everything here needs CUDA; CPU builds keep the dequantising path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import tuning
from .config import BLOCK_SIZE
from .layers import dequantize

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)
INTERPRET_BK = int(os.environ.get("DSV3_TEST_BK", "128"))  # the interpreter's K tile (tests)
# Relative Frobenius difference a fast path may have from the dequantised product: bf16
# rounding for the weight-only kernel; the scaled_mm path also rounds the activations to fp8
# (3 mantissa bits, as the reference's act_quant does): ~2.5% measured on an H200.
AGREE = {"triton": 2e-2, "row": 2e-2, "scaled_mm": 5e-2}

try:  # Triton comes with CUDA builds of torch; CPU-only installs lack it (and need none of this)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_ok(device: torch.device) -> bool:
    """Triton's fp8 -> bf16 conversion needs sm89+ (Ada, Hopper and newer)."""
    if triton is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_ok(device: torch.device) -> bool:
    """Does this device have a fast fp8 path (else a model dequantises its weights once)?"""
    return device.type == "cuda" and triton_ok(device)


def keeps_dense_copies(device: torch.device) -> bool:
    """Does an fp8 model on `device` keep bf16 copies of its weights: a CUDA GPU without an
    fp8 path (`Transformer.dequantize_once`, `params.dense_copy_bytes`)?"""
    return device.type == "cuda" and not fp8_matmul_ok(device)


if triton is not None:

    @triton.jit
    def _w8_kernel(
        a_ptr,  # (rows of A, K) bf16, row stride stride_am
        w_ptr,  # (E, N, K) fp8
        s_ptr,  # (E, N/128, K/128) float32
        w3_ptr,  # SWIGLU: the second weight (E, N, K), same strides as w
        s3_ptr,  # SWIGLU: its scales
        c_ptr,  # (M, N) output, row stride stride_cm
        slot_ptr,  # grouped: (P,) int32, the output row of each padded slot (M = none)
        a_row_ptr,  # grouped: (M,) int32 or int64, the A row of each output row
        block_e_ptr,  # grouped: (P / BM,) int32, the expert of each row block (-1: none)
        M,
        N,
        K,
        stride_am,
        stride_we,
        stride_se,
        stride_cm,
        GROUPED: tl.constexpr,
        SAME_ROWS: tl.constexpr,  # grouped: output row j reads A row j (a_row_ptr unused)
        SWIGLU: tl.constexpr,  # silu(A W^T) * (A W3^T), both products in float32
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = tl.arange(0, BM)
        if GROUPED:
            e = tl.load(block_e_ptr + pid_m)
        else:
            e = pid_m * 0  # a tensor, like the grouped case's (it is cast to int64 below)
        if e >= 0:  # a row block past the last expert's segment reads nothing
            if GROUPED:
                rows = tl.load(slot_ptr + pid_m * BM + rm)
                valid = rows < M
                if SAME_ROWS:
                    a_rows = tl.where(valid, rows, 0)
                else:
                    a_rows = tl.load(a_row_ptr + rows, mask=valid, other=0)
            else:
                rows = pid_m * BM + rm
                valid = rows < M
                a_rows = rows
            rn = pid_n * BN + tl.arange(0, BN)
            rk = tl.arange(0, BK)
            n_ok = rn < N
            ks = (K + 127) // 128  # scale blocks along K: the scale's row stride
            w_off = e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * K
            s_base = e.to(tl.int64) * stride_se
            a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc3 = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + rk
                k_ok = k < K
                a = tl.load(a_base + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                if F32_DOT:  # Triton's CPU interpreter (tests): its bf16 dot is wrong
                    a = a.to(tl.float32)
                else:
                    a = a.to(tl.bfloat16)
                acc += _w8_tile(a, w_ptr, s_ptr, w_off, s_base, rn, n_ok, k, k_ok, k0, ks,
                                BK, HAS_SCALE, F32_DOT)  # fmt: skip
                if SWIGLU:  # the same A tile against the second weight
                    acc3 += _w8_tile(a, w3_ptr, s3_ptr, w_off, s_base, rn, n_ok, k, k_ok, k0,
                                     ks, BK, HAS_SCALE, F32_DOT)  # fmt: skip
            if SWIGLU:
                acc = acc / (1.0 + tl.exp(-acc)) * acc3
            c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + rn[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _w8_tile(a, w_ptr, s_ptr, w_off, s_base, rn, n_ok, k, k_ok, k0, ks, BK: tl.constexpr,
                 HAS_SCALE: tl.constexpr, F32_DOT: tl.constexpr):  # fmt: skip
        """A (BM, BK) tile times one weight's (BN, BK) tile -> (BM, BN) float32, scaled."""
        w = tl.load(w_ptr + w_off + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wdt = tl.float32 if F32_DOT else tl.bfloat16
        if not HAS_SCALE:  # bf16 weights
            return tl.dot(a, tl.trans(w.to(wdt)))
        if BK == 128:  # one scale per (128 rows of N, this K block): after the dot
            s = tl.load(s_ptr + s_base + (rn // 128) * ks + k0 // 128, mask=n_ok, other=0.0)
            return tl.dot(a, tl.trans(w.to(wdt))) * s[None, :]
        # a tile spans several scale blocks: scale the weight tile first
        s = tl.load(
            s_ptr + s_base + (rn // 128)[:, None] * ks + (k // 128)[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        return tl.dot(a, tl.trans((w.to(tl.float32) * s).to(wdt)))

    @triton.jit
    def _layout_kernel(
        counts_ptr,  # (E,) int64: pairs per expert, the pairs sorted by expert
        slot_ptr,  # out (P,) int32: the sorted pair of each padded slot, N for none
        block_e_ptr,  # out (P / BM,) int32: the expert of each row block, -1 past the last
        N,
        E,
        P,
        BM: tl.constexpr,
        EP: tl.constexpr,
        SB: tl.constexpr,
    ):
        # one program per expert writes its padded segment and its blocks; program E the tail
        e = tl.program_id(0)
        ce = tl.arange(0, EP)
        c = tl.load(counts_ptr + ce, mask=ce < E, other=0)
        padded = (c + BM - 1) // BM * BM
        before = ce < e
        first = tl.sum(tl.where(before, c, 0), axis=0)  # this expert's first sorted pair
        start = tl.sum(tl.where(before, padded, 0), axis=0)  # its first padded slot
        n = tl.sum(tl.where(ce == e, c, 0), axis=0)  # 0 for program E
        # the segment's padded length; program E: every slot after the last segment
        end = tl.where(e < E, (n + BM - 1) // BM * BM, P - start)
        blk = tl.zeros([SB], dtype=tl.int32) + tl.where(e < E, e, -1)
        for r0 in range(0, end, SB):
            r = r0 + tl.arange(0, SB)
            slot = tl.where(r < n, first + r, N).to(tl.int32)
            tl.store(slot_ptr + start + r, slot, mask=r < end)
            tl.store(block_e_ptr + (start + r) // BM, blk, mask=(r < end) & (r % BM == 0))


if triton is not None:

    @triton.jit
    def _row_kernel(
        x_ptr,  # (K,) one row of activations
        w_ptr,  # (N, K) fp8 (or 16-bit)
        s_ptr,  # (N/128, K/128) float32 block scales (HAS_SCALE)
        out_ptr,  # (N,)
        N,
        K,
        HAS_SCALE: tl.constexpr,
        BN: tl.constexpr,  # divides 128: a tile's rows share one row of scales
        BK: tl.constexpr,
    ):
        # one row times W^T without the tensor cores' 16-row minimum: each program reduces BN
        # weight rows against the row in float32, the block scale folded into the row's values
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        n_ok = rn < N
        sb = s_ptr + (tl.program_id(0) * BN) // 128 * ((K + 127) // 128)  # the tile's scale row
        acc = _row_tile(x_ptr, w_ptr, K, sb, rn, n_ok, K, HAS_SCALE, BN, BK)
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _row_tile(
        x_row, wb, w_row, sb, rn, n_ok, K, HAS_SCALE: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr
    ):  # fmt: skip
        """One row x (K,) times the rows rn of a weight at wb (row stride w_row) -> (BN,)
        float32, x scaled per 128 block by the tile's scale row sb for fp8 (BN divides 128).
        Also the few-token MoE's down projection (`dsv3.fused`)."""
        part = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                xv = xv * tl.load(sb + k // 128, mask=k_ok, other=0.0)
            wv = tl.load(
                wb + rn[:, None].to(tl.int64) * w_row + k[None, :],
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            part += tl.sum(wv * xv[None, :], axis=1)
        return part


# (BN, BK, warps, stages) of `_row_kernel` tried per shape on first use: one row's product is
# bound by how many weight bytes are in flight.
ROW_TILES = [(16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (32, 512, 8, 2), (64, 128, 4, 2),
             (8, 512, 4, 2), (16, 256, 4, 3), (32, 128, 4, 4)]  # fmt: skip

# (BN, BK, warps, stages) tried per row block. Narrow N tiles give few-row inputs more
# programs reading the weight at once, and long K tiles fewer loop trips (a few-row product is
# bound by the loop's latency, not by bandwidth); wide N tiles give many-row inputs fewer
# re-reads of the activations.
TILES = {
    16: [(32, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (32, 512, 4, 2), (16, 512, 4, 3)],
    32: [(32, 128, 4, 4), (64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4)],
    64: [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 256, 4, 3), (128, 64, 8, 4)],
}


# The SwiGLU form holds two accumulators and two weight tiles per stage: fewer, smaller tiles
# (each config compiles on first use: seconds apiece).
SWIGLU_TILES = {
    16: [(32, 128, 4, 4), (64, 256, 4, 3)],
    32: [(64, 128, 4, 3), (128, 64, 4, 4)],
    64: [(64, 128, 4, 3), (128, 64, 8, 4)],
}


def _prune(configs, named_args, **kwargs):
    """The configs of this call's row block (TILES, or SWIGLU_TILES for the SwiGLU form)."""
    want = set((SWIGLU_TILES if kwargs["SWIGLU"] else TILES)[kwargs["BM"]])
    return [
        c for c in configs if (c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) in want
    ]


if triton is not None and not INTERPRET:
    # The tile measured per (N, K, row block) on first use (Triton's autotuner; a forward's
    # first call, before any CUDA graph captures it).
    _w8_tuned = triton.autotune(
        configs=[
            triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in sorted(
                {t for d in (TILES, SWIGLU_TILES) for ts in d.values() for t in ts}
            )
        ],
        key=["N", "K", "BM", "GROUPED", "HAS_SCALE", "SWIGLU"],
        prune_configs_by={"early_config_prune": _prune},
    )(_w8_kernel)
else:
    _w8_tuned = None


if triton is not None and not INTERPRET:
    _row_tuned = triton.autotune(
        configs=[
            triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ROW_TILES
        ],
        key=["N", "K", "HAS_SCALE"],
    )(_row_kernel)
else:
    _row_tuned = None


def w8_row(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`w8_matmul` for an x (..., K) that holds a single row: a float32 reduction per weight
    row instead of a 16-row tensor-core tile (a measured candidate of `linear_impl`)."""
    K = x.shape[-1]
    N = weight.shape[0]
    x1 = x.reshape(K)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    args = (x1, weight, scale if scale is not None else out, out, N, K)
    if _row_tuned is None:  # Triton's CPU interpreter: one fixed tile
        _row_kernel[(triton.cdiv(N, 32),)](*args, HAS_SCALE=scale is not None, BN=32, BK=128)
    else:
        _row_tuned[lambda m: (triton.cdiv(N, m["BN"]),)](*args, HAS_SCALE=scale is not None)
    return out.view(*x.shape[:-1], N)


def _launch(grid_m: int, N: int, BM: int, *args, **kw) -> None:
    """Run the kernel on (grid_m, N tiles) programs: autotuned on a GPU, one fixed tile in
    Triton's CPU interpreter (tests)."""
    if _w8_tuned is None:
        bn = 2 * BM
        _w8_kernel[(grid_m, triton.cdiv(N, bn))](*args, BM=BM, BN=bn, BK=INTERPRET_BK, **kw)
    else:
        _w8_tuned[lambda meta: (grid_m, triton.cdiv(N, meta["BN"]))](*args, BM=BM, **kw)


def _block_rows(rows_per_group: float) -> int:
    """Row block of the kernel: 16 (the least tl.dot takes) for decode-sized inputs, up to 64."""
    if rows_per_group <= 16:
        return 16
    return 32 if rows_per_group <= 32 else 64


def w8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    weight3: torch.Tensor | None = None,
    scale3: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) bf16 times an fp8 weight (N, K) with block scales (N/128, K/128) (or a 16-bit
    weight, scale None) -> (..., N) in x's dtype, through the Triton kernel (needs `triton_ok`).
    With weight3 (and scale3): silu(x W^T) * (x W3^T), a SwiGLU up projection in one kernel."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM = _block_rows(M)
    dummy = out  # the grouped pointers are unused here
    sc = scale if scale is not None else dummy
    w3 = weight if weight3 is None else weight3
    s3 = sc if scale3 is None else scale3
    _launch(
        triton.cdiv(M, BM), N, BM, x2, weight, sc, w3, s3, out, dummy, dummy, dummy, M, N, K,
        x2.stride(0), 0, 0, out.stride(0), GROUPED=False, SAME_ROWS=False,
        SWIGLU=weight3 is not None, HAS_SCALE=scale is not None, F32_DOT=INTERPRET,
    )  # fmt: skip
    return out.view(*x.shape[:-1], N)


def moe_layout(counts_E: torch.Tensor, N: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks for the grouped kernel, on the device, with no host sync.

    counts_E (E,) pairs per expert, for N pairs sorted by expert. Each expert's pairs get a
    segment padded to a multiple of BM; the padded slots hold N (no pair). -> slot_P (P,) int32,
    the sorted pair in each slot (P = N + E*(BM-1) rounded up to BM, the largest padded size any
    routing can need, so shapes never depend on the routing), block_e (P/BM,) int32 the expert of
    each row block, -1 past the last segment. One kernel (`_layout_kernel`) where Triton runs;
    else, or if it fails, its twin `moe_layout_torch` (~20 small kernels)."""
    from . import fused

    if fused.available(counts_E.device, "moe_layout"):
        got = fused.attempt("moe_layout", _layout, counts_E, N, BM)
        if got is not None:
            return got
    return moe_layout_torch(counts_E, N, BM)


def _padded_size(N: int, E: int, BM: int) -> int:
    return -(-(N + E * (BM - 1)) // BM) * BM


LAYOUT_SB = 256  # slots a program of `_layout_kernel` writes at a time


def _layout(counts_E: torch.Tensor, N: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_layout` in one kernel: a program per expert writes its segment, one more the tail."""
    E = counts_E.numel()
    P = _padded_size(N, E, BM)
    slot_P = torch.empty(P, dtype=torch.int32, device=counts_E.device)
    block_e = torch.empty(P // BM, dtype=torch.int32, device=counts_E.device)
    _layout_kernel[(E + 1,)](
        counts_E, slot_P, block_e, N, E, P, BM=BM, EP=max(16, 1 << (E - 1).bit_length()),
        SB=LAYOUT_SB, num_warps=4,
    )  # fmt: skip
    return slot_P, block_e


def moe_layout_torch(counts_E: torch.Tensor, N: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_layout` in torch (the layout kernel's twin)."""
    E, dev = counts_E.numel(), counts_E.device
    P = _padded_size(N, E, BM)
    padded_E = (counts_E + BM - 1) // BM * BM
    seg_end_E = padded_E.cumsum(0)
    # each pair's slot: its place in the sorted order plus the padding of the experts before it
    shift_E = seg_end_E - padded_E - (counts_E.cumsum(0) - counts_E)
    j = torch.arange(N, device=dev)
    slot_N = j + torch.repeat_interleave(shift_E, counts_E, output_size=N)
    slot_P = torch.full((P,), N, dtype=torch.int32, device=dev)
    slot_P.index_copy_(0, slot_N, j.to(torch.int32))
    starts = torch.arange(0, P, BM, device=dev)
    block_e = torch.searchsorted(seg_end_E, starts, right=True).to(torch.int32)
    block_e = torch.where(block_e < E, block_e, -1).to(torch.int32)
    return slot_P, block_e


def w8_grouped(
    x: torch.Tensor,
    a_row_N: torch.Tensor | None,
    slot_P: torch.Tensor,
    block_e: torch.Tensor,
    BM: int,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    weight3: torch.Tensor | None = None,
    scale3: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row j of the result (N, Nout) = x[a_row_N[j]] (x[j] with a_row_N None) times expert
    e(j)'s weight, for the N expert-sorted pairs laid out by `moe_layout`. weight (E, Nout, K)
    fp8 with scale (E, Nout/128, K/128), or 16-bit with scale None. With weight3 (and scale3)
    the row is silu(x W^T) * (x W3^T), both products in float32: a SwiGLU up projection in one
    kernel, each activation tile read once for both weights."""
    M = x.shape[0] if a_row_N is None else a_row_N.numel()
    Nout, K = weight.shape[1:]
    out = torch.empty(M, Nout, dtype=x.dtype, device=x.device)
    sc, sc_stride = (scale, scale.stride(0)) if scale is not None else (out, 0)
    w3 = weight if weight3 is None else weight3
    s3 = sc if scale3 is None else scale3
    _launch(
        block_e.numel(), Nout, BM, x, weight, sc, w3, s3, out, slot_P,
        slot_P if a_row_N is None else a_row_N, block_e, M, Nout, K, x.stride(0),
        weight.stride(0), sc_stride, out.stride(0), GROUPED=True, SAME_ROWS=a_row_N is None,
        SWIGLU=weight3 is not None, HAS_SCALE=scale is not None, F32_DOT=INTERPRET,
    )  # fmt: skip
    return out


# How `experts_w8` runs the up projection: None measures both forms per shape class on first
# use (`fused.prefer`); "fused" (w1 and w3 in one kernel, `w8_grouped` with weight3) or
# "separate" (two kernels, then silu and the product) forces one (gpu_check runs both).
SWIGLU_FORM: str | None = None


def experts_w8(
    x_TD: torch.Tensor,
    token_N: torch.Tensor,
    counts_E: torch.Tensor,
    w: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:
    """The routed SwiGLU experts on N pairs sorted by expert, pair j reading row token_N[j] of
    x_TD, counts_E (E,) pairs per expert, with fp8 weights w = {"w1": (weight, scale), "w2":
    ..., "w3": ...} (or 16-bit weights, scale None) -> (N, D), same order. Only experts that
    received pairs are read; nothing waits for the host. About three kernels: the row-block
    layout, the up projection (both weights and the SwiGLU in one, where it measured faster
    than two and the product), the down projection."""
    from . import fused

    N, E = token_N.numel(), counts_E.numel()
    BM = _block_rows(N / E)
    slot_P, block_e = moe_layout(counts_E, N, BM)

    def fused_up() -> torch.Tensor:
        return w8_grouped(x_TD, token_N, slot_P, block_e, BM, *w["w1"], *w["w3"])

    def separate_up() -> torch.Tensor:
        h1 = w8_grouped(x_TD, token_N, slot_P, block_e, BM, *w["w1"])  # (N, I)
        h3 = w8_grouped(x_TD, token_N, slot_P, block_e, BM, *w["w3"])
        return F.silu(h1, inplace=True).mul_(h3)

    form = SWIGLU_FORM
    if form is None and fused.available(x_TD.device, "w8_swiglu"):
        w1 = w["w1"][0]
        key = ("w8-swiglu", 1 << max(N - 1, 0).bit_length(), E, *w1.shape[1:], w1.dtype)
        fuse = fused.prefer("w8_swiglu", key, x_TD.device, fused_up, separate_up)
        form = "fused" if fuse else "separate"
    h = fused.attempt("w8_swiglu", fused_up) if form == "fused" else None
    if h is None:
        h = separate_up()
    return w8_grouped(h, None, slot_P, block_e, BM, *w["w2"])  # (N, D)


# ---------------------------------------------------------------- torch._scaled_mm (sm90)
def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, K) -> fp8 (M, K) and float32 scales per 1x128 block (M, K/128), the
    scales column-major as cuBLASLt wants them."""
    M, K = x2.shape
    blocks = x2.float().view(M, K // BLOCK_SIZE, BLOCK_SIZE)
    s = blocks.abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # (M, K/128)
    q = (blocks / s[..., None]).to(FP8).view(M, K)
    return q, s.t().contiguous().t()  # (M, K/128) with strides (1, M)


def scaled_mm_scale(scale: torch.Tensor) -> torch.Tensor:
    """A weight's block scale (N/128, K/128) as `torch._scaled_mm` takes it for W^T: shape
    (L4, N/128) with strides (1, L4), L4 = K/128 rounded up to 4 (the padding is never read)."""
    nb, kb = scale.shape
    l4 = -(-kb // 4) * 4
    buf = torch.ones(nb, l4, dtype=torch.float32, device=scale.device)
    buf[:, :kb] = scale
    return buf.t()  # (L4, N/128), strides (1, L4)


def scaled_mm_shape_ok(weight: torch.Tensor) -> bool:
    N, K = weight.shape
    return N % BLOCK_SIZE == 0 and K % BLOCK_SIZE == 0


@functools.cache
def _scaled_mm_device_ok(index: int) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(index) != (9, 0):  # DeepSeek scaling: sm90 in torch
        return False
    return True


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, mm_scale: torch.Tensor):
    """x (..., K) bf16 times fp8 W (N, K) through blockwise `torch._scaled_mm` -> (..., N)."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    pad = (-M) % 4
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    q, s = quantize_rows(x2)
    y = torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=mm_scale, out_dtype=x.dtype)
    return y[:M].view(*x.shape[:-1], N)


# ---------------------------------------------------------------- the measured choice
def _agrees(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    got, ref = got.float(), ref.float()
    if not bool(torch.isfinite(got).all()):
        return False
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() <= tol


def linear_class(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    rows = x.numel() // x.shape[-1]
    return ("fp8_linear", 1 << max(rows - 1, 0).bit_length(), *weight.shape, x.dtype,
            str(x.device))  # fmt: skip


def linear_impl(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, mm_scale: torch.Tensor | None
) -> str:
    """ "triton", "row" (a single row: `w8_row`), "scaled_mm" or "dequant" for this shape class:
    the candidates that agree with the dequantised product on random rows, timed by GPU time,
    the fastest kept."""
    key = linear_class(x, weight)
    got = tuning.cached(key)
    if got is not None:
        return got
    rows = x.numel() // x.shape[-1]
    g = torch.Generator(device=x.device).manual_seed(0)
    xr = torch.randn(rows, x.shape[-1], generator=g, device=x.device).to(x.dtype)
    ref = F.linear(xr, dequantize(weight, scale, x.dtype))
    cands: dict[str, Callable[[], object]] = {
        "dequant": lambda: F.linear(xr, dequantize(weight, scale, x.dtype))
    }
    tries: dict[str, Callable[[], torch.Tensor]] = {}
    if triton_ok(x.device):
        tries["triton"] = lambda: w8_matmul(xr, weight, scale)
        if rows == 1:
            tries["row"] = lambda: w8_row(xr, weight, scale)
    if mm_scale is not None and _scaled_mm_device_ok(x.device.index or 0):
        tries["scaled_mm"] = lambda: scaled_mm_linear(xr, weight, mm_scale)
    for name, fn in tries.items():
        try:
            if _agrees(fn(), ref, AGREE[name]):
                cands[name] = fn
            else:
                REJECTED[name] = "disagrees with the dequantised product"
        except Exception as e:  # noqa: BLE001 - an unsupported path is simply not a candidate
            REJECTED[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return tuning.choose(key, cands, tuning.gpu_measure)


REJECTED: dict[str, str] = {}  # fast paths that failed their check, and why (benchmarks print it)


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, mm_scale: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) times the fp8 weight (N, K) with block scales on CUDA, by the measured path
    (`linear_impl`)."""
    impl = linear_impl(x, weight, scale, mm_scale)
    if impl == "triton":
        return w8_matmul(x, weight, scale)
    if impl == "row":
        return w8_row(x, weight, scale)
    if impl == "scaled_mm":
        return scaled_mm_linear(x, weight, mm_scale)
    return F.linear(x, dequantize(weight, scale, x.dtype))
