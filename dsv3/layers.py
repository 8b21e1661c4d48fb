"""Building blocks shared by attention and feed-forward: Linear (with fp8 block scales),
RMSNorm, LayerNorm (the DSA indexer's key norm), the SwiGLU MLP, the embedding, and fp8 block
(de)quantisation."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import tuning
from .config import BLOCK_SIZE, COMPUTE_DTYPE, scale_shape

FP8 = torch.float8_e4m3fn
_R = TypeVar("_R")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8}  # build dtypes by name
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def compute_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a layer with weights of `dtype` computes in, and the dtype of what is never
    fp8 (embedding, norms, router, head): `config.COMPUTE_DTYPE` (fp8 -> bfloat16)."""
    names = {v: k for k, v in DTYPES.items()}
    return DTYPES[COMPUTE_DTYPE[names[dtype]]] if dtype in names else dtype


def _expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(..., ceil(rows/128), ceil(cols/128)) -> (..., rows, cols), one value per element."""
    s = scale.repeat_interleave(BLOCK_SIZE, dim=-2)[..., :rows, :]
    return s.repeat_interleave(BLOCK_SIZE, dim=-1)[..., :cols]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight (..., out, in) times its block scale -> `dtype`. Pure torch, runs on CPU.
    Working memory: the float32 copy and the result (4 + 2 bytes per element for bf16, what
    `params.estimate` counts as `dequant_bytes`): the scales multiply in place, broadcast over
    whole 128x128 blocks rather than expanded to the weight's shape."""
    rows, cols = weight.shape[-2:]
    w = weight.to(torch.float32, copy=True)  # scaled in place below: never the caller's
    if rows % BLOCK_SIZE == 0 and cols % BLOCK_SIZE == 0:
        blocks = w.view(*w.shape[:-2], rows // BLOCK_SIZE, BLOCK_SIZE, cols // BLOCK_SIZE, -1)
        blocks.mul_(scale[..., :, None, :, None])  # blocks (..., R/128, 128, C/128, 128)
    else:
        w.mul_(_expand_scale(scale, rows, cols))
    return w.to(dtype)


def quantize_fp8(
    weight: torch.Tensor, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 quantisation: each 128x128 block gets scale = amax / 448, so the block's
    largest magnitude maps to fp8's largest finite value. Returns (fp8 weight, float32 scale).

    scale_fmt "ue8m0" (DeepSeek-V3.1's checkpoints, `ModelArgs.scale_fmt`) rounds each scale up
    to a power of two, 2**ceil(log2(amax / 448)), as the reference's `act_quant` does: the scale
    is then an 8-bit exponent alone and the block still fits fp8's range."""
    rows, cols = weight.shape[-2:]
    w = weight.to(torch.float32)
    pr, pc = (-rows) % BLOCK_SIZE, (-cols) % BLOCK_SIZE
    padded = F.pad(w, (0, pc, 0, pr))
    lead = padded.shape[:-2]
    blocks = padded.unflatten(-2, (-1, BLOCK_SIZE)).unflatten(-1, (-1, BLOCK_SIZE))
    # blocks: (..., rows/128, 128, cols/128, 128)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., rows/128, cols/128)
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (w / _expand_scale(scale, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert scale.shape == (*lead, *scale_shape(rows, cols))
    return q, scale


GEMV_ROWS = 8  # CUDA inputs of up to this many rows may take the Triton kernel (`Linear._cuda`)
SKINNY_ROWS = 32  # CPU inputs with 2..SKINNY_ROWS rows may take the (W x^T)^T form
HALF = (torch.bfloat16, torch.float16)


def _skinny(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight @ x2.t()).t().contiguous()


_ONEDNN_LOCK = threading.Lock()
_onednn_off = [0, True]  # [calls inside without_onednn, the switch before the first of them]


def without_onednn(fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """fn(*args, **kwargs) with torch's oneDNN (mkldnn) products turned off, so that 16-bit
    CPU matmuls run torch's own kernels. oneDNN spends ~30 us on every bf16 product whatever
    its size (Intel Xeon, torch 2.13: a (2, 256) x (256, 128) product 37 us, 10-18 us without
    it; matrix-vector products likewise), while torch's kernels are several times slower on
    large ones: callers measure both forms per shape class (`linear`,
    `GroupedExperts._few_or_sorted`). The switch is process-wide: a product running on another
    thread meanwhile takes torch's kernels too (slower, same numbers up to rounding; the app
    runs one forward at a time). Overlapping calls on several threads share one count: the
    first saves the switch and the last puts it back."""
    with _ONEDNN_LOCK:
        if _onednn_off[0] == 0:
            _onednn_off[1] = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _onednn_off[0] += 1
    try:
        return fn(*args, **kwargs)
    finally:
        with _ONEDNN_LOCK:
            _onednn_off[0] -= 1
            if _onednn_off[0] == 0:
                torch._C._set_mkldnn_enabled(_onednn_off[1])


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` through oneDNN's matmul rather than torch's BLAS (MKL), same float32 math up
    to summation order. MKL picks its fastest code for Intel CPUs only: on an AMD EPYC
    (torch 2.13) oneDNN ran prefill-sized float32 products 1.24-1.32x as fast (215-224 GFLOP/s
    on 2 cores against MKL's 165-175), and the head of a 2-row decode step 1.65x; it costs more
    per call on small ones. `linear` measures it against `F.linear` per shape class."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_works() -> bool:
    """Does this torch run oneDNN's float32 linear (a private op, meant for inductor's prepacked
    weights) on plain and transposed weights, giving F.linear's numbers? Checked once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.randn(3, 8), torch.randn(8, 5)
        for weight in (w.t().contiguous(), w.t()):
            if not torch.allclose(onednn_linear(x, weight), F.linear(x, weight), atol=1e-5):
                return False
    except Exception:  # noqa: BLE001 - missing op, refused layout: keep torch's BLAS
        return False
    return True


ONEDNN_FP32 = _onednn_works()


_onednn_on = torch._C._get_mkldnn_enabled


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`F.linear(x, weight, bias)` in the fastest of equivalent forms, measured once per shape
    class on CPU (`dsv3.tuning`): which wins depends on the CPU, not the shapes alone.
    - float32, 2 rows or more: also through oneDNN (`onednn_linear`; MKL, behind F.linear,
      runs its best code on Intel CPUs only).
    - 2..SKINNY_ROWS rows (decoding): also as (W x^T)^T, where BLAS may stream the weight once
      instead of packing it (on an AMD EPYC 1.2-2x faster, on an Intel Xeon 2-5x slower).
    - 16-bit weights, 1..SKINNY_ROWS rows: also `F.linear` without oneDNN (`without_onednn`).
    One float32 row runs as a matrix-vector product as it is. With DSV3_DISPATCH=rule: (W x^T)^T
    for 2..SKINNY_ROWS rows, F.linear otherwise."""
    # This wrapper runs ~60 times per decode step: its own cost matters on a slow core (the
    # cached choice is looked up before anything else is asked of the environment).
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or x.device.type != "cpu" or weight.dim() != 2:
        return F.linear(x, weight, bias)
    half = weight.dtype in HALF
    # oneDNN's op ignores torch's oneDNN switch: honoured here (`without_onednn` relies on it)
    dnn = ONEDNN_FP32 and weight.dtype == torch.float32 == x.dtype and _onednn_on()
    if (rows > SKINNY_ROWS and not dnn) or (rows == 1 and not half):
        return F.linear(x, weight, bias)
    key = ("linear", 1 << (rows - 1).bit_length(), *weight.shape, weight.stride(-1) == 1,
           weight.dtype, torch.get_num_threads())  # fmt: skip
    form = tuning.cached(key)
    if form is None:
        if not tuning.measured():
            form = "skinny" if 1 < rows <= SKINNY_ROWS else "linear"
        else:
            x2 = x.reshape(rows, x.shape[-1])  # (rows, in)
            forms = {"linear": lambda: F.linear(x2, weight)}
            if 1 < rows <= SKINNY_ROWS:
                forms["skinny"] = lambda: _skinny(x2, weight)
            if half:
                forms["linear, no oneDNN"] = lambda: without_onednn(F.linear, x2, weight)
            if dnn:
                forms["oneDNN"] = lambda: onednn_linear(x2, weight)
            form = tuning.choose(key, forms)
    if form == "linear":
        return F.linear(x, weight, bias)
    if form == "oneDNN":
        if not dnn or _needs_grad(x, weight, bias):  # switched off; the op has no backward
            return F.linear(x, weight, bias)
        return onednn_linear(x, weight, bias)
    if form == "linear, no oneDNN":
        return without_onednn(F.linear, x, weight, bias)
    y = _skinny(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


class KeepsDerived(nn.Module):
    """A module that keeps forms derived from its tensors (a dequantised or float32 copy of a
    weight, a re-laid-out scale) instead of deriving them on every call. A kept form is made
    again when its sources change: new storage (a load, `to_empty`), an in-place write (the
    version counter; inference tensors have none), and every `load_state_dict`."""

    def derived(self, slot: str, sources: tuple[torch.Tensor, ...], make, *extra) -> torch.Tensor:
        """The form `slot` of `sources` (with `extra` in its key), made by `make()` when missing
        or stale."""
        key = (*extra, *((t.data_ptr(), None if t.is_inference() else t._version) for t in sources))
        kept = self.__dict__.setdefault("_derived", {})
        got = kept.get(slot)
        if got is None or got[0] != key:
            got = kept[slot] = (key, make())
        return got[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_derived", None)  # what was derived from the old tensors is stale
        super()._load_from_state_dict(*args, **kwargs)


class Linear(KeepsDerived):
    """y = x W^T (+ b). With an fp8 weight, a float32 `scale` buffer holds one factor per
    128x128 block (the reference's layout and name) and the weight is dequantised on the fly to
    the input's dtype. The scale is a buffer, not a parameter: it is not counted or trained."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        if self.weight.dtype == FP8:
            shape = scale_shape(out_features, in_features)
            self.register_buffer("scale", torch.empty(shape, dtype=torch.float32, device=device))
        else:
            self.scale = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.bias = None

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.weight
        return dequantize(self.weight, self.scale, dtype)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` for code that needs it whole (absorbed attention's wkv_b, and
        GPUs without an fp8 path): an fp8 weight is dequantised once and kept (`derived`), not
        on every call."""
        if self.scale is None:
            return self.weight
        sources = (self.weight, self.scale)
        return self.derived("dense", sources, lambda: self.effective_weight(dtype), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return self._fp8_cuda(x) if self.scale is not None else self._cuda(x)
        return linear(x, self.effective_weight(x.dtype), self.bias)

    def _cuda(self, x: torch.Tensor) -> torch.Tensor:
        """A 16-bit weight on CUDA: a decode step's few rows (up to GEMV_ROWS) through the
        Triton kernel of `dsv3.fp8` (unscaled), where it measured faster by GPU time than
        cuBLAS for this shape class (`fused.prefer`): there a matrix-vector product is bound
        by how many of the weight's bytes are in flight, and the kernel's narrow tiles give
        more programs reading at once; else `F.linear`."""
        w = self.weight
        rows = x.numel() // max(x.shape[-1], 1)
        # bf16 only: the kernel multiplies in bf16 (an fp16 input would lose mantissa bits)
        if 0 < rows <= GEMV_ROWS and self.bias is None and x.dtype == w.dtype == torch.bfloat16:
            from . import fp8, fused

            if fused.available(x.device, "gemv") and fp8.triton_ok(x.device):
                key = ("gemv", 1 << (rows - 1).bit_length(), *w.shape, w.dtype)
                kernel = lambda: fp8.w8_matmul(x, w, None)  # noqa: E731
                return fused.run_measured("gemv", key, x.device, kernel, lambda: F.linear(x, w))
        return F.linear(x, w, self.bias)

    def _fp8_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 on CUDA: the measured fast path of `dsv3.fp8`, or, on GPUs without one, the
        weight dequantised once (`dense_weight`)."""
        from . import fp8

        if not fp8.fp8_matmul_ok(x.device):
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        mm_scale = None
        if fp8.scaled_mm_shape_ok(self.weight):
            mm_scale = self.derived(
                "mm_scale", (self.scale,), lambda: fp8.scaled_mm_scale(self.scale)
            )
        y = fp8.linear(x, self.weight, self.scale, mm_scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, dtype={self.weight.dtype}"


# rows up to which a CUDA RMSNorm may take the fused kernel (a decode step or a prefill chunk;
# whether it does is measured per row bucket)
NORM_ROWS = 8192
# Triton's interpreter runs the fused kernels on CPU tensors (tests); `dsv3.fp8.INTERPRET`
_KERNELS_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def _same_layout_rows(residual: torch.Tensor, x: torch.Tensor) -> bool:
    """The fused add reads residual row for row like x (no broadcast, no type promotion)."""
    return residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1


class RMSNorm(nn.Module):
    """Root-mean-square norm, eps 1e-6 as the reference."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(
            torch.empty(dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x -> its norm; with `residual` (a block's residual stream, x its branch's output)
        -> (norm of residual + x, residual + x)."""
        # a CPU (no interpreter) first and straight to the twin: its decode step is call-bound
        y, s = self._kernel(x, residual) if _KERNELS_ON_CPU or not x.is_cpu else (None, None)
        if y is None:
            y, s = self._twin(x, residual)
        return y if residual is None else (y, s)

    def _kernel(self, x: torch.Tensor, residual: torch.Tensor | None):
        """`fused.rms_norm` for a few rows where it measured faster (CUDA, or Triton's
        interpreter), else (None, None)."""
        rows = x.numel() // self.dim
        if (
            0 < rows <= NORM_ROWS
            and x.device.type != "meta"
            and x.dtype == self.weight.dtype
            and x.stride(-1) == 1
            and (residual is None or _same_layout_rows(residual, x))
        ):
            from . import fused

            if fused.available(x.device, "rms_norm"):
                key = ("rms-norm", 1 << (rows - 1).bit_length(), self.dim, x.dtype,
                       residual is not None)  # fmt: skip
                kernel = lambda: fused.rms_norm(x, self.weight, self.eps, residual)  # noqa: E731
                twin = lambda: self._twin(x, residual)  # noqa: E731
                return fused.run_measured("rms_norm", key, x.device, kernel, twin)
        return None, None

    def _twin(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = None if residual is None else residual + x
        if s is not None:
            x = s
        if x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype:
            # The same float32 operations as F.rms_norm (bit-equal results), ~5x faster on a
            # (4, 512, 512) CPU input: torch's CPU rms_norm squares through a slow pow().
            r = x.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return (x * r).mul_(self.weight), s
        return F.rms_norm(x, (self.dim,), self.weight, self.eps), s


class LayerNorm(nn.Module):
    """Layer norm with weight and bias, eps 1e-6, computed in float32 (the reference's
    `LayerNorm`, used by the DSA indexer's key norm `k_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        kw = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(dim, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, **kw), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int, dtype=None, device=None):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype=dtype, device=device)
        self.w2 = Linear(inter_dim, dim, dtype=dtype, device=device)
        self.w3 = Linear(dim, inter_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._swiglu(x) if _KERNELS_ON_CPU or not x.is_cpu else None
        if h is None:
            h = self._swiglu_twin(x)
        return self.w2(h)

    def _swiglu_twin(self, x: torch.Tensor) -> torch.Tensor:
        # silu and the product in place: two fewer (tokens x inter_dim) temporaries per call.
        return F.silu(self.w1(x), inplace=True).mul_(self.w3(x))

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(w1 x) * w3 x in one Triton kernel (`dsv3.fp8.w8_matmul` with both weights: each
        activation tile read once, no (tokens x inter_dim) round trips, two kernels fewer) for
        bf16 or fp8 weights on CUDA (or Triton's interpreter), where it measured faster by GPU
        time than two matmuls and the product for this shape class; else None."""
        w1, w3 = self.w1, self.w3
        fp8_w = w1.scale is not None
        if (
            x.device.type == "meta"
            or x.numel() == 0
            or x.dtype != torch.bfloat16  # the kernel multiplies in bf16
            or w1.bias is not None
            or w3.bias is not None
            or w1.weight.dtype != w3.weight.dtype
            or (w1.weight.dtype != x.dtype and not fp8_w)
        ):
            return None
        from . import fp8, fused

        if not fused.available(x.device, "mlp_swiglu") or not (
            fp8.INTERPRET or fp8.triton_ok(x.device)
        ):
            return None
        rows = x.numel() // x.shape[-1]
        key = ("mlp-swiglu", 1 << (rows - 1).bit_length(), *w1.weight.shape, w1.weight.dtype)

        def kernel():
            return fp8.w8_matmul(x, w1.weight, w1.scale, w3.weight, w3.scale)

        return fused.run_measured("mlp_swiglu", key, x.device, kernel, lambda: self._swiglu_twin(x))


class Embedding(nn.Module):
    """Token embedding (the reference's ParallelEmbedding on one rank)."""

    def __init__(self, vocab_size: int, dim: int, dtype=None, device=None):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.weight = nn.Parameter(
            torch.empty(vocab_size, dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)
