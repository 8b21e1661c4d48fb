"""DeepSeekMoE: routed experts (stacked weights) + shared experts, and the token dispatch.

Legend: T tokens, D model dim, I expert width, E routed experts, K activated experts per token,
N = T*K routed (token, expert) pairs.

Dispatch: sort the N pairs by expert (stable), gather their inputs, run each expert on its
contiguous slice, scale by the routing weight and scatter-add back to tokens. Four
implementations with one signature: `dispatch_loop` (a matmul per expert that received tokens),
`dispatch_grouped` (`torch._grouped_mm` over all experts at once), `dispatch_padded` (every
expert's rows zero-padded to the largest count of its run of experts, then a batched matmul per
run; "padded-one": all experts one run) and `dispatch_gathered`
(the active experts' weights copied into one batch); `dispatch` picks, on CPU by measuring
them once per shape class (`measured_impl`, `dsv3.tuning`). A few pairs on CPU (decoding) may
skip the sort altogether: which experts they use comes to the host as a list, and
`GroupedExperts._few_pairs` (a product per pair) or `_few_pairs_gathered` (the pairs' expert
weights copied into one batch) runs them, when measured faster than the sorted dispatch.

Layout: on CPU float32 stacks are stored in-major (`expert_layout`): w1 keeps its (E, I, D)
shape, the reference's, with strides (I*D, 1, I), so every expert product x W^T multiplies by a
contiguous matrix (and `w1.view(...)` fails: reshape, or `.contiguous()` before saving). A CPU
`bmm` by a transposed batch ran at half the speed of the same product by a contiguous one (Intel
Xeon, torch 2.13), and the padded and grouped dispatches are such products;
`benchmarks/run.py` (section moe) measures both layouts.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8, fused, tuning
from .config import LayerArgs
from .layers import (
    FP8,
    HALF,
    MLP,
    SKINNY_ROWS,
    KeepsDerived,
    compute_dtype,
    dequantize,
    linear,
    scale_shape,
    without_onednn,
)
from .routing import Gate


def _expert_weights(experts: GroupedExperts, dtype: torch.dtype):
    return tuple(experts.effective(n, dtype) for n in ("w1", "w2", "w3"))


def dispatch_loop(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """x sorted by expert (N, D), tokens per expert (a list, or an (E,) tensor) -> expert
    outputs (N, D), same order."""
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    out_ND = torch.empty_like(x_ND)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = x_ND[start : start + n]
        h_nI = F.silu(linear(h, w1_EID[e]), inplace=True).mul_(linear(h, w3_EID[e]))
        if n > SKINNY_ROWS:  # straight into the output rows: no (n, D) temporary and copy
            torch.mm(h_nI, w2_EDI[e].t(), out=out_ND[start : start + n])
        else:  # few rows: `linear` picks the faster form on CPU
            out_ND[start : start + n] = linear(h_nI, w2_EDI[e])
        start += n
    return out_ND


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """`torch._grouped_mm` wants 16-byte aligned strides and data (and, on CUDA, bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type == "meta":
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    for t in (x, *weights):
        size = t.element_size()
        if t.shape[-1] * size % 16 or t.data_ptr() % 16:
            return False
        if any(st * size % 16 for st in t.stride() if st != 1):
            return False
    return True


def dispatch_grouped(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `dispatch_loop`, as three grouped matmuls. With counts as a tensor on
    x's device nothing waits for the device (no host copy of the counts)."""
    if not isinstance(counts, torch.Tensor):
        counts = torch.tensor(counts, device=x_ND.device)
    offs = counts.cumsum(0, dtype=torch.int32)
    h1 = torch._grouped_mm(x_ND, w1_EID.transpose(-2, -1), offs=offs)  # (N, I)
    h3 = torch._grouped_mm(x_ND, w3_EID.transpose(-2, -1), offs=offs)  # (N, I)
    h1 = F.silu(h1, inplace=True).mul_(h3)  # in place: fewer fresh pages per forward
    return torch._grouped_mm(h1, w2_EDI.transpose(-2, -1), offs=offs)  # (N, D)


def padded_layout(counts: list[int], run: int) -> list[tuple[int, int, int]]:
    """Experts in runs of `run` consecutive experts; each run's rows are padded to its largest
    count. -> [(first expert, experts in the run, padded rows per expert)], runs with no rows
    left out. Short runs pad less (the largest of 8 counts is nearer the mean than the largest
    of 64) and still give every core whole experts to multiply."""
    return [
        (r, len(counts[r : r + run]), max(counts[r : r + run]))
        for r in range(0, len(counts), run)
        if max(counts[r : r + run]) > 0
    ]


def padded_rows(counts: list[int], run: int) -> int:
    """Rows `dispatch_padded` multiplies for these counts (the useful ones are sum(counts))."""
    return sum(n * c for _, n, c in padded_layout(counts, run))


def default_run() -> int:
    """Experts per padded batch: four per core, at least 8 (benchmarks/run.py, moe)."""
    return max(8, 4 * torch.get_num_threads())


def padded_slots(
    counts: list[int], runs: list[tuple[int, int, int]], device
) -> tuple[torch.Tensor, int]:
    """-> (slot_N, P): the padded row of each expert-sorted pair, and the padded row count."""
    # Where each expert's first row goes in the padded buffer, minus where it is in x_ND.
    shift_E, base, seen = [0] * len(counts), 0, 0
    for first, n, cap in runs:
        for e in range(first, first + n):
            shift_E[e] = base - seen
            base += cap
            seen += counts[e]
    N = seen
    shift_N = torch.repeat_interleave(
        torch.tensor(shift_E, device=device), torch.tensor(counts, device=device), output_size=N
    )
    return torch.arange(N, device=device) + shift_N, base


def padded_experts(
    x_PD: torch.Tensor,
    runs: list[tuple[int, int, int]],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """The experts on padded rows (P, D) laid out as `runs` says -> (P, D); zero rows give 0."""
    P, D = x_PD.shape
    I = w1_EID.shape[1]  # noqa: E741 - the expert width, as in the legend
    h1_PI, h3_PI, y_PD = x_PD.new_empty(P, I), x_PD.new_empty(P, I), x_PD.new_empty(P, D)
    blocks, row = [], 0  # (padded rows, experts, n, cap) of each run
    for first, n, cap in runs:
        blocks.append((slice(row, row + n * cap), slice(first, first + n), n, cap))
        row += n * cap
    for rows, ws, n, cap in blocks:
        x_ncD = x_PD[rows].view(n, cap, D)
        torch.bmm(x_ncD, w1_EID[ws].transpose(1, 2), out=h1_PI[rows].view(n, cap, I))
        torch.bmm(x_ncD, w3_EID[ws].transpose(1, 2), out=h3_PI[rows].view(n, cap, I))
    h_PI = F.silu(h1_PI, inplace=True).mul_(h3_PI)
    for rows, ws, n, cap in blocks:
        out = y_PD[rows].view(n, cap, D)
        torch.bmm(h_PI[rows].view(n, cap, I), w2_EDI[ws].transpose(1, 2), out=out)
    return y_PD


def dispatch_padded(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
    run: int | None = None,
) -> torch.Tensor:
    """Same contract as `dispatch_loop`, as `bmm`s over runs of experts whose rows are
    zero-padded to the run's largest count (`padded_layout`). The zero rows cost FLOPs, but a
    CPU `bmm` gives each core whole expert products, while grouped or looped matmuls split every
    ~32-row product across all cores and pay a sync for each, so on CPU this beats both
    (benchmarks/run.py, section moe, measures it). `GroupedExperts.forward` runs the same products without the (N, D) copies."""
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    N, D = x_ND.shape
    if N == 0:
        return torch.empty_like(x_ND)
    runs = padded_layout(counts, run or default_run())
    slot_N, P = padded_slots(counts, runs, x_ND.device)
    x_PD = x_ND.new_zeros(P, D).index_copy_(0, slot_N, x_ND)
    y_PD = padded_experts(x_PD, runs, w1_EID, w2_EDI, w3_EID)
    return y_PD.index_select(0, slot_N)  # (N, D), the input's order


def dispatch_gathered(
    x_ND: torch.Tensor,
    counts: list[int],
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `dispatch_loop`: the weights of the experts that received pairs are
    gathered (copied) into one batch, their rows zero-padded to the largest count, and each
    projection is one `bmm`. For a few pairs over many small experts (decoding) one batched,
    multi-core matmul per projection can beat a matmul per expert despite the copy; measured
    (`measured_impl`) before it is used."""
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    N, D = x_ND.shape
    if N == 0:
        return torch.empty_like(x_ND)
    active = [e for e, n in enumerate(counts) if n]
    A, cap = len(active), max(counts)
    ix = torch.tensor(active, device=x_ND.device)
    slot_N = None
    if A * cap == N:  # every active expert has `cap` rows: no padding
        x_AcD = x_ND.view(A, cap, D)
    else:
        slots = [a * cap + r for a, e in enumerate(active) for r in range(counts[e])]
        slot_N = torch.tensor(slots, device=x_ND.device)
        x_AcD = x_ND.new_zeros(A * cap, D).index_copy_(0, slot_N, x_ND).view(A, cap, D)
    h_AcI = torch.bmm(x_AcD, gather_t(w1_EID, ix))
    h3_AcI = torch.bmm(x_AcD, gather_t(w3_EID, ix))
    h_AcI = F.silu(h_AcI, inplace=True).mul_(h3_AcI)
    y = torch.bmm(h_AcI, gather_t(w2_EDI, ix)).view(A * cap, D)
    return y if slot_N is None else y.index_select(0, slot_N)


def gather_t(w_EOI: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """Experts `ix` of a stack (E, out, in) -> their transposed weights (len(ix), in, out) for
    `bmm`, copied in the stack's own memory order (`expert_layout`): a contiguous copy of an
    in-major stack's rows, or of an out-major one's, transposed after. Gathering across the
    strides instead copies element by element."""
    if is_in_major(w_EOI):
        return w_EOI.transpose(1, 2).index_select(0, ix)
    return w_EOI.index_select(0, ix).transpose(1, 2)


def is_in_major(w_EOI: torch.Tensor) -> bool:
    """Whether a stack (E, out, in) is stored in-major: each expert's matrix with the `in`
    index slowest (strides (out*in, 1, out)), as `expert_layout` lays CPU stacks out."""
    return w_EOI.stride(-2) == 1 and w_EOI.stride(-1) == w_EOI.shape[-2] != 1


def expert_layout(device: torch.device, dtype: torch.dtype) -> str:
    """ "in" or "out": how `GroupedExperts` stores its stacks on `device`. "in" (in-major) on
    CPU for float32 weights, where the dispatches' batched products by contiguous weights ran
    up to twice as fast (module docstring); "out" (the reference's row-major layout)
    elsewhere: GPU kernels and fp8 weights read that, and so does Triton's interpreter, which
    runs the GPU kernels on CPU tensors. bf16 on CPU stays row-major: its prefill gained
    nothing in-major and its matrix-vector products (decoding) over columns were 1.5-3.4x
    slower. DSV3_EXPERT_LAYOUT=out keeps the reference's layout on CPU too (benchmarks/run.py
    compares the two)."""
    if device.type != "cpu" or dtype != torch.float32 or fp8.INTERPRET:
        return "out"
    return "out" if os.environ.get("DSV3_EXPERT_LAYOUT", "").strip() == "out" else "in"


def dispatch_triton(
    x_ND: torch.Tensor,
    counts: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `dispatch_loop` (counts an (E,) tensor on x's device), through the
    grouped Triton kernels of `dsv3.fp8` with 16-bit weights: CUDA with Triton only, sync-free.
    `moe_impl="triton"` forces it (benchmarks/gpu_check.py checks it against the loop); `auto`
    on CUDA runs it from the tokens themselves (`GroupedExperts._triton_pays`) where it
    measures faster than grouped matmuls."""
    if not fp8.triton_ok(x_ND.device):
        raise ValueError("moe_impl='triton' needs a CUDA GPU (sm89 or newer) and Triton")
    if not isinstance(counts, torch.Tensor):
        counts = torch.tensor(counts, device=x_ND.device)
    token_N = torch.arange(x_ND.shape[0], device=x_ND.device)
    w = {"w1": (w1_EID, None), "w2": (w2_EDI, None), "w3": (w3_EID, None)}
    return fp8.experts_w8(x_ND, token_N, counts, w)


DISPATCH_IMPLS = ("auto", "loop", "grouped", "padded", "padded-one", "gathered", "triton")
PAD_LIMIT = 2.0  # "auto" pads on CPU while padded rows <= PAD_LIMIT * N (benchmarks/run.py, moe)


def dispatch(x_ND, counts, w1, w2, w3, impl: str = "auto") -> torch.Tensor:
    """Run the experts on expert-sorted pairs. "auto": on CPU, the fastest candidate, measured
    once per shape class (`measured_impl`); with DSV3_DISPATCH=rule, the loop with fewer pairs
    than experts (decoding: most experts are idle, and a few small matmuls beat any batched
    call over all E), padded bmm while padding at most doubles the work, else grouped matmuls
    where supported. On a GPU grouped matmuls (the loop's launches and padding's FLOPs cost
    more)."""
    if impl == "auto":
        impl = _auto_impl(x_ND, x_ND.shape[0], counts, w1, w2, w3)
    if impl == "grouped":
        return dispatch_grouped(x_ND, counts, w1, w2, w3)
    if impl in ("padded", "padded-one"):
        return dispatch_padded(x_ND, counts, w1, w2, w3, padded_run(impl, len(counts)))
    if impl == "gathered":
        return dispatch_gathered(x_ND, counts, w1, w2, w3)
    if impl == "triton":
        return dispatch_triton(x_ND, counts, w1, w2, w3)
    return dispatch_loop(x_ND, counts, w1, w2, w3)


def _auto_impl(x, N: int, counts, w1, w2, w3) -> str:
    """The dispatch for N pairs of rows of x (x_ND, or the tokens x_TD they are gathered from:
    same device, dtype and row stride). On CPU measured per shape class (`measured_impl`)
    unless DSV3_DISPATCH=rule; otherwise (and on GPUs) the rule in `dispatch`'s docstring."""
    E = len(counts)
    if x.device.type == "cpu":
        if tuning.measured():
            return measured_impl(x, N, counts, w1, w2, w3)
        if N < E:
            return "loop"
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        if padded_rows(counts, default_run()) <= PAD_LIMIT * N:
            return "padded"
    return "grouped" if grouped_mm_supported(x, w1, w2, w3) else "loop"


def padded_run(impl: str, E: int) -> int:
    """Experts per batched product of the padded dispatch `impl`: runs of `default_run()` for
    "padded" (short runs pad less), all E for "padded-one" (fewer, larger products: with a few
    rows per expert the calls cost more than the padding)."""
    return E if impl == "padded-one" else default_run()


# A probe runs the real counts up to this many FLOPs (~4 ms a dispatch on 2 cores), else one
# run's experts: a run alone ranks loop, grouped and padded, but cannot weigh padded-one's
# fewer products against its padding (with 2e8, auto picked grouped at 0.86x of padded for the
# benchmark's 2x256 prefill, Intel Xeon)
PROBE_FLOPS = 1e9


def dispatch_class(N: int, E: int, w1: torch.Tensor, x: torch.Tensor) -> tuple:
    """The shape class of a dispatch: routed pairs per expert as a power-of-two bucket (below 1:
    experts per pair, negated), expert shapes and layout, dtype, device, thread count."""
    tpe = (N // E).bit_length() if N >= E else -((E // max(N, 1)).bit_length())
    _, I, D = w1.shape
    layout = "in" if is_in_major(w1) else "out"
    return ("moe", tpe, E, D, I, layout, x.dtype, x.device.type, torch.get_num_threads())


def measured_impl(x, N: int, counts, w1, w2, w3) -> str:
    """The fastest of loop / padded / padded-one / grouped (and, with fewer pairs than
    experts, gathered) for this shape class (`dispatch_class`): on its first use each runs on
    random rows with these counts (or, past PROBE_FLOPS, with those of the busiest run of
    `default_run()` consecutive experts, where the two padded forms are one) and the winner is
    cached (`dsv3.tuning`). A probe costs a dozen or more of these dispatches (~10-100 ms on 2
    cores), once per class per process."""
    key = dispatch_class(N, len(counts), w1, x)
    got = tuning.cached(key)
    if got is not None:
        return got
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    _, I, D = w1.shape
    if 6 * N * D * I > PROBE_FLOPS:
        # The run of default_run() consecutive experts with the most pairs (never an idle one)
        run = default_run()
        first = max(range(0, len(counts), run), key=lambda r: sum(counts[r : r + run]))
        counts = counts[first : first + run]
        w1, w2, w3 = (w[first : first + run] for w in (w1, w2, w3))
    g = torch.Generator(device=x.device).manual_seed(0)  # torch's global RNG stays untouched
    x_ND = torch.randn(sum(counts), D, generator=g, device=x.device).to(x.dtype)
    cands = {
        "loop": lambda: dispatch_loop(x_ND, counts, w1, w2, w3),
        "padded": lambda: dispatch_padded(x_ND, counts, w1, w2, w3),
    }
    if len(counts) > default_run():  # else both padded forms are one run
        one = padded_run("padded-one", len(counts))
        cands["padded-one"] = lambda: dispatch_padded(x_ND, counts, w1, w2, w3, one)
    if grouped_mm_supported(x_ND, w1, w2, w3):
        cands["grouped"] = lambda: dispatch_grouped(x_ND, counts, w1, w2, w3)
    if N < len(counts):  # few pairs (decoding): copying the active experts' weights may pay
        cands["gathered"] = lambda: dispatch_gathered(x_ND, counts, w1, w2, w3)
    return tuning.choose(key, cands)


class GroupedExperts(KeepsDerived):
    """E routed SwiGLU experts with stacked weights: w1/w3 (E, I, D), w2 (E, D, I); on CPU in
    float32 stored in-major (`expert_layout`: not contiguous).
    With fp8 weights, float32 buffers w1_scale/w2_scale/w3_scale hold each expert's block scales.
    `load_state_dict` also takes the reference's per-expert keys (`E.w1.weight`, `E.w1.scale`).
    Under expert parallelism (dsv3.parallel) this rank holds the n_experts experts numbered from
    `first`; routed pairs of other ranks' experts are skipped."""

    def __init__(
        self, n_experts: int, dim: int, inter_dim: int, dtype=None, device=None, first: int = 0
    ):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.first = first
        shapes = {"w1": (inter_dim, dim), "w2": (dim, inter_dim), "w3": (inter_dim, dim)}
        for name, (o, i) in shapes.items():
            w = torch.empty(n_experts, o, i, dtype=dtype, device=device)
            setattr(self, name, nn.Parameter(w, requires_grad=False))
            if dtype == FP8:
                s = torch.empty(n_experts, *scale_shape(o, i), dtype=torch.float32, device=device)
                self.register_buffer(f"{name}_scale", s)
        # Registered unbound (with_module) so the module does not reference itself through a
        # bound method: that cycle kept whole models alive until the next gc.collect().
        self._register_load_state_dict_pre_hook(
            GroupedExperts._stack_reference_keys, with_module=True
        )
        # load_state_dict(assign=True) puts the given tensors in place: lay them out after
        self.register_load_state_dict_post_hook(lambda module, _: module.lay_out())
        self.lay_out(keep_values=False)  # a CPU build: allocated in-major, not copied

    def _apply(self, fn, recurse: bool = True):
        """Every move or conversion (`to_empty`, `.to`) ends with the stacks laid out for
        their device (`lay_out`); stacks that come from the meta device have no values to keep
        (a build's `to_empty`): they are allocated in their layout, not copied."""
        from_meta = self.w1.device.type == "meta"
        super()._apply(fn, recurse)
        self.lay_out(keep_values=not from_meta)
        return self

    def lay_out(self, keep_values: bool = True) -> None:
        """Store w1/w2/w3 in-major or row-major as `expert_layout` says for their device and
        dtype: same shapes (and, with `keep_values`, values), other strides. Each stack that
        changes layout is new storage: the tensors of the other layout are not kept."""
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            if w.device.type == "meta" or w.dim() != 3:
                continue
            want_in = expert_layout(w.device, w.dtype) == "in"
            if want_in and not is_in_major(w) and min(w.shape[1:]) > 1:
                E, O, I = w.shape  # noqa: E741 - (experts, out, in)
                new = torch.empty(E, I, O, dtype=w.dtype, device=w.device).transpose(1, 2)
            elif not want_in and not w.is_contiguous():
                new = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            else:
                continue
            w.data = new.copy_(w.data) if keep_values else new

    def effective(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, name)
        if w.dtype != FP8:
            return w
        return dequantize(w, getattr(self, f"{name}_scale"), dtype)

    def _stack_reference_keys(self, state_dict, prefix, *args, **kwargs):
        """Per-expert reference keys `prefix{e}.w1.weight` -> stacked `prefix w1`."""
        stack_experts(state_dict, prefix, range(self.first, self.first + self.n_experts))

    def forward(self, x_TD, weights_TK, idx_TK, counts_E: list[int] | torch.Tensor, impl="auto"):
        """Routed experts' weighted sum per token (T, D)."""
        T, K = idx_TK.shape
        if x_TD.device.type == "cpu" and T * K <= FEW_PAIRS and impl in ("auto", "loop"):
            how = (
                "pairs"
                if impl == "loop"
                else self._few_or_sorted(x_TD, weights_TK, idx_TK, counts_E)
            )
            if how == "pairs":
                return self._few_pairs(x_TD, weights_TK, idx_TK)
            if how == "pairs, no oneDNN":
                return without_onednn(self._few_pairs, x_TD, weights_TK, idx_TK)
            if how == "pairs, gathered" and self._gather_ok(counts_E):
                return self._few_pairs_gathered(x_TD, weights_TK, idx_TK)
        return self._sorted(x_TD, weights_TK, idx_TK, counts_E, impl)

    def _few_or_sorted(self, x_TD, weights_TK, idx_TK, counts_E) -> str:
        """ "pairs" (`_few_pairs`), "pairs, gathered" (`_few_pairs_gathered`), "sorted" (the
        sorted dispatch `_sorted`, with the dispatch `auto` picks) or, for 16-bit inputs,
        "pairs, no oneDNN" (`_few_pairs` on torch's own kernels, `without_onednn`): the fastest
        for this shape class, measured on its first use on these inputs, then cached
        (`dsv3.tuning`). DSV3_DISPATCH=rule: "pairs"."""
        shape = dispatch_class(idx_TK.numel(), self.n_experts, self.w1, x_TD)[1:]
        key = ("moe-pairs", idx_TK.shape[1], self.w1.dtype, *shape)  # fp8 and bf16 apart
        got = tuning.cached(key)
        if got is not None:
            return got
        if not tuning.measured():
            return "pairs"
        cands = {
            "pairs": lambda: self._few_pairs(x_TD, weights_TK, idx_TK),
            "sorted": lambda: self._sorted(x_TD, weights_TK, idx_TK, counts_E, "auto"),
        }
        if x_TD.dtype in HALF:  # 16-bit matrix-vector products: oneDNN's per-call cost
            cands["pairs, no oneDNN"] = lambda: without_onednn(
                self._few_pairs, x_TD, weights_TK, idx_TK
            )
        if self._gather_ok(counts_E):
            cands["pairs, gathered"] = lambda: self._few_pairs_gathered(x_TD, weights_TK, idx_TK)
        return tuning.choose(key, cands)

    def _gather_ok(self, counts_E) -> bool:
        """`_few_pairs_gathered` runs here: weights that are not fp8, every expert on this rank
        (counts_E has one entry per expert of the model)."""
        return self.w1.dtype != FP8 and len(counts_E) == self.n_experts

    def _sorted(self, x_TD, weights_TK, idx_TK, counts_E, impl: str) -> torch.Tensor:
        """The pairs sorted by expert, the dispatch `impl` on them, each token's outputs summed."""
        T, K = idx_TK.shape
        sorted_pairs = self._sort_kernel(x_TD, weights_TK, idx_TK, counts_E)
        inv_N = None
        if sorted_pairs is not None:  # CUDA: one counting-sort kernel (`fused.sort_pairs`)
            order_N, inv_N, token_N, weight_N = sorted_pairs
        else:
            order_N, token_N, weight_N = sort_pairs_torch(idx_TK, weights_TK)
            if len(counts_E) != self.n_experts:  # expert parallel: this rank's experts' pairs
                lo = sum(counts_E[: self.first])
                counts_E = counts_E[self.first : self.first + self.n_experts]
                mine = slice(lo, lo + sum(counts_E))
                order_N, token_N, weight_N = order_N[mine], token_N[mine], weight_N[mine]
                if order_N.numel() == 0:
                    return torch.zeros_like(x_TD)
        if self.w1.dtype == FP8 and x_TD.device.type == "cuda":
            y_ND = self._fp8_cuda(x_TD, token_N, counts_E)
        else:
            y_ND = self._triton(x_TD, token_N, counts_E) if impl == "auto" else None
        if y_ND is None:
            w1, w2, w3 = _expert_weights(self, x_TD.dtype)
            if impl == "auto":
                impl = _auto_impl(x_TD, order_N.numel(), counts_E, w1, w2, w3)
            if impl in ("padded", "padded-one"):
                run = padded_run(impl, len(counts_E))
                return self._padded(x_TD, token_N, weight_N, counts_E, w1, w2, w3, run)
            x_ND = x_TD.index_select(0, token_N)  # index_select: several times faster than x[idx]
            y_ND = dispatch(x_ND, counts_E, w1, w2, w3, impl)
        if inv_N is not None:
            y_TD = fused.attempt("combine_pairs", fused.combine_pairs, y_ND, inv_N, weights_TK)
            if y_TD is not None:
                return y_TD
        if order_N.numel() == T * K and (y_ND.numel() <= SMALL_COMBINE or y_ND.is_cuda):
            # Few pairs (decoding), or CUDA: undo the sort and sum each token's K outputs. A
            # CPU index_add_ starts several multi-thread regions even for a few rows, and on a
            # busy machine each waits for a descheduled thread (~80 ms per call measured
            # with two cores contended, 10 us this way); on CUDA it adds with atomics (and
            # needs a zeroed float32 buffer): slower than the sum on an H200.
            return combine_pairs_torch(y_ND, order_N, weight_N, T, K)
        return _combine(x_TD, token_N, y_ND.mul_(weight_N[:, None]))

    def _sort_kernel(self, x_TD, weights_TK, idx_TK, counts_E):
        """(order_N, inv_N, token_N, weight_N) from `fused.sort_pairs` on CUDA (or Triton's
        interpreter) with every expert here and the counts on the device, where its kernels (the sort and the combine that reads inv_N) measured
        faster than their twins for this shape class; else None (the torch sort runs)."""
        if not (
            isinstance(counts_E, torch.Tensor)  # on the device: CUDA (the CPU path has a list)
            and counts_E.numel() == self.n_experts
            and fused.available(x_TD.device, "sort_pairs")
            and fused.available(x_TD.device, "combine_pairs")
        ):
            return None
        T, K = idx_TK.shape
        N = T * K
        key = ("moe-sort", 1 << (N - 1).bit_length(), self.n_experts, K, self.dim, x_TD.dtype)

        def kernel():  # the sort and the combine, on stand-in expert outputs
            _, inv_N, _, _ = fused.sort_pairs(idx_TK, weights_TK, counts_E)
            return fused.combine_pairs(x_TD.new_empty(N, self.dim), inv_N, weights_TK)

        def twin():
            order_N, token_N, weight_N = sort_pairs_torch(idx_TK, weights_TK)
            return combine_pairs_torch(x_TD.new_empty(N, self.dim), order_N, weight_N, T, K)

        if not fused.prefer("sort_pairs", key, x_TD.device, kernel, twin):
            return None
        return fused.attempt("sort_pairs", fused.sort_pairs, idx_TK, weights_TK, counts_E)

    def _few_pairs(self, x_TD, weights_TK, idx_TK) -> torch.Tensor:
        """The loop dispatch for a few (token, expert) pairs on CPU (decoding), one
        matrix-vector product per pair and projection, each written straight into its row of
        a (pairs, width) buffer; silu * up for all pairs at once; then every token's weighted
        sum of its K outputs as one batched (1, K) x (K, D) product. Which experts the pairs
        use comes to the host as a list, so there is no device-side sort, gather or combine:
        at a few pairs each of those ~15 calls, and the loop's calls per expert, cost more than
        their arithmetic (a pair whose expert another token also picked reads the weights again,
        from cache). fp8 experts are dequantised one at a time, only those that got pairs."""
        T, K = idx_TK.shape
        D, I = self.dim, self.inter_dim  # noqa: E741 - the expert width, as in the legend
        N = T * K
        h_2NI = x_TD.new_empty(2, N, I)  # w1 x | w3 x of every pair, (t, k) order
        h1_rows, h3_rows = (h.unbind(0) for h in h_2NI.unbind(0))
        ids = (e - self.first for e in idx_TK.flatten().tolist())
        pairs = [(n, e) for n, e in enumerate(ids) if 0 <= e < self.n_experts]  # this rank's
        y_ND = x_TD.new_empty(N, D) if len(pairs) == N else x_TD.new_zeros(N, D)  # others': 0
        x_rows, y_rows, experts = x_TD.unbind(0), y_ND.unbind(0), self._per_expert(x_TD.dtype)
        for n, e in pairs:
            w1, _, w3 = experts(e)
            torch.mv(w1, x_rows[n // K], out=h1_rows[n])
            torch.mv(w3, x_rows[n // K], out=h3_rows[n])
        F.silu(h_2NI[0], inplace=True).mul_(h_2NI[1])
        for n, e in pairs:
            torch.mv(experts(e)[1], h1_rows[n], out=y_rows[n])
        return _token_sums(weights_TK, y_ND)

    def _few_pairs_gathered(self, x_TD, weights_TK, idx_TK) -> torch.Tensor:
        """`_few_pairs` with each projection one batched product over the pairs: the pairs'
        expert weights are gathered (copied) into (pairs, out, in) stacks first. For many small
        experts the copy can cost less than a call per pair; measured (`_few_or_sorted`)."""
        T, K = idx_TK.shape
        N, D = T * K, self.dim
        e_N = idx_TK.flatten()
        x_N1D = x_TD[:, None].expand(T, K, D).reshape(N, 1, D)  # each pair's token row
        h_N1I = torch.bmm(x_N1D, gather_t(self.w1, e_N))
        h3_N1I = torch.bmm(x_N1D, gather_t(self.w3, e_N))
        h_N1I = F.silu(h_N1I, inplace=True).mul_(h3_N1I)
        y_ND = torch.bmm(h_N1I, gather_t(self.w2, e_N)).view(N, D)
        return _token_sums(weights_TK, y_ND)

    def _per_expert(self, dtype: torch.dtype):
        """e -> expert e's (w1, w2, w3) in `dtype`: views of the stacks, kept between calls (a
        view costs a call of its own), or fp8 ones dequantised on first request (one call's
        worth: every expert a forward touches, once)."""
        names = ("w1", "w2", "w3")
        if self.w1.dtype == FP8:
            made: dict[int, tuple] = {}  # this call's dequantised experts

            def dequantised(e: int) -> tuple:
                if e not in made:
                    made[e] = tuple(
                        dequantize(getattr(self, n)[e], getattr(self, f"{n}_scale")[e], dtype)
                        for n in names
                    )
                return made[e]

            return dequantised
        views = self.derived(
            "per_expert", (self.w1, self.w2, self.w3), lambda: list(zip(self.w1, self.w2, self.w3))
        )
        return views.__getitem__

    def _fp8_cuda(self, x_TD, token_N, counts_E) -> torch.Tensor:
        """fp8 experts on CUDA -> the expert outputs (N, D) of the sorted pairs: the grouped
        Triton kernels of `dsv3.fp8` (read only the experts that got pairs, each fp8 byte once,
        no host sync), or on GPUs without an fp8 path the weights dequantised once and the bf16
        dispatch."""
        if not fp8.fp8_matmul_ok(x_TD.device):
            w1, w2, w3 = (self._dense(n, x_TD.dtype) for n in ("w1", "w2", "w3"))
            return dispatch(x_TD.index_select(0, token_N), counts_E, w1, w2, w3)
        if not isinstance(counts_E, torch.Tensor):  # expert parallel: this rank's counts
            counts_E = torch.tensor(counts_E, device=x_TD.device)
        w = {n: (getattr(self, n), getattr(self, f"{n}_scale")) for n in ("w1", "w2", "w3")}
        return fp8.experts_w8(x_TD.contiguous(), token_N, counts_E, w)

    def _triton(self, x_TD, token_N, counts_E) -> torch.Tensor | None:
        """The expert outputs (N, D) of the sorted pairs through the grouped Triton kernels,
        where `_triton_pays`; None where not, or where they fail here (recorded: the grouped
        matmuls or the loop run instead from then on)."""
        if not self._triton_pays(x_TD, token_N, counts_E):
            return None
        w = {n: (getattr(self, n), None) for n in ("w1", "w2", "w3")}
        return fused.attempt("moe_triton", fp8.experts_w8, x_TD, token_N, counts_E, w)

    def _triton_pays(self, x_TD, token_N, counts_E) -> bool:
        """bf16 experts on CUDA with every expert here: do the grouped Triton kernels of
        `dsv3.fp8` (the row-block layout, the SwiGLU up projection reading the tokens' rows in
        place, the down projection: ~3 kernels) beat gathering the rows and three grouped
        matmuls for this shape class? Measured by GPU time on first use (`fused.prefer`), on
        these pairs."""
        if not (
            isinstance(counts_E, torch.Tensor)
            and counts_E.numel() == self.n_experts
            and x_TD.dtype == self.w1.dtype == torch.bfloat16  # the kernel multiplies in bf16
            and all(w.is_contiguous() for w in (self.w1, self.w2, self.w3))  # row-major stacks
            and fused.available(x_TD.device, "moe_triton")
            and fp8.triton_ok(x_TD.device)
        ):
            return False
        w1, w2, w3 = self.w1, self.w2, self.w3
        if not grouped_mm_supported(x_TD, w1, w2, w3):
            return True  # the loop is the alternative: a sync and a launch per expert
        N = token_N.numel()
        key = ("moe-triton", 1 << max(N - 1, 0).bit_length(), self.n_experts, self.dim,
               self.inter_dim, x_TD.dtype)  # fmt: skip
        ws = {"w1": (w1, None), "w2": (w2, None), "w3": (w3, None)}

        def kernel():
            return fp8.experts_w8(x_TD, token_N, counts_E, ws)

        def twin():
            return dispatch(x_TD.index_select(0, token_N), counts_E, w1, w2, w3, "grouped")

        return fused.prefer("moe_triton", key, x_TD.device, kernel, twin)

    def _dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Expert weight `name` dequantised once and kept (GPUs without an fp8 path), one
        expert at a time: the float32 working copy is one expert's, not the stack's (15 GB for
        V3's w1 on one GPU; `params.dense_work_bytes`)."""
        w, scale = getattr(self, name), getattr(self, f"{name}_scale")

        def make() -> torch.Tensor:
            out = torch.empty(w.shape, dtype=dtype, device=w.device)
            for e in range(w.shape[0]):
                out[e] = dequantize(w[e], scale[e], dtype)
            return out

        return self.derived(name, (w, scale), make, dtype)

    def _padded(self, x_TD, token_N, weight_N, counts, w1, w2, w3, run: int) -> torch.Tensor:
        """`dispatch_padded` gathering straight from the tokens into the padded rows and adding
        the padded rows back (padding rows point at a zero row T, dropped after): two (N, D)
        copies fewer than going through x_ND."""
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        T, D = x_TD.shape
        runs = padded_layout(counts, run)
        slot_N, P = padded_slots(counts, runs, x_TD.device)
        token_P = torch.full((P,), T, dtype=token_N.dtype, device=x_TD.device)
        token_P.index_copy_(0, slot_N, token_N)
        weight_P = weight_N.new_zeros(P).index_copy_(0, slot_N, weight_N)
        x_ext = torch.cat([x_TD, x_TD.new_zeros(1, D)])  # (T + 1, D): row T is the padding
        y_PD = padded_experts(x_ext.index_select(0, token_P), runs, w1, w2, w3)
        y_PD.mul_(weight_P[:, None])
        return _combine(x_ext, token_P, y_PD)[:T]


def stack_experts(sd: dict[str, torch.Tensor], prefix: str, experts: range) -> None:
    """The one way per-expert keys become stacked tensors, in place: `{prefix}{e}.w1.weight`
    (`.scale`) for every e in `experts` -> `{prefix}w1` (`w1_scale`), (len(experts), ...) in
    that order. Incomplete sets are left as they are for load_state_dict to report."""
    for name in ("w1", "w2", "w3"):
        for suffix, target in (("weight", name), ("scale", f"{name}_scale")):
            keys = [f"{prefix}{e}.{name}.{suffix}" for e in experts]
            if prefix + target in sd or not all(k in sd for k in keys):
                continue
            sd[prefix + target] = torch.stack([sd.pop(k) for k in keys])


FEW_PAIRS = 32  # CPU pairs up to which the loop dispatch is planned on the host (`_few_pairs`)


def _token_sums(weights_TK: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
    """Pairs' outputs y (T*K, D) in (t, k) order -> each token's weighted sum (T, D), in y's
    dtype: one (T, 1, K) x (T, K, D) product, in float32 (one rounding for bf16)."""
    T, K = weights_TK.shape
    if y_ND.dtype == torch.float32:
        return torch.bmm(weights_TK.unsqueeze(1), y_ND.view(T, K, -1)).squeeze(1)
    w_T1K, y_TKD = weights_TK.float().unsqueeze(1), y_ND.float().view(T, K, -1)
    return torch.bmm(w_T1K, y_TKD).squeeze(1).to(y_ND.dtype)


SMALL_COMBINE = 1 << 16  # expert outputs (elements) up to which the combine skips index_add_


def sort_pairs_torch(
    idx_TK: torch.Tensor, weights_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) pairs sorted by expert (stable) -> (order_N, token_N, weight_N): the twin
    of `fused.sort_pairs` (which also gives each pair's place in the order)."""
    order_N = idx_TK.flatten().argsort(stable=True)
    token_N = order_N // idx_TK.shape[1]
    return order_N, token_N, weights_TK.flatten().index_select(0, order_N)


def combine_pairs_torch(
    y_ND: torch.Tensor, order_N: torch.Tensor, weight_N: torch.Tensor, T: int, K: int
) -> torch.Tensor:
    """Each token's weighted sum of its K expert outputs, y_ND the outputs of the pairs in the
    sorted order (weighted here, in place) -> (T, D); 16-bit outputs summed in float32. The
    twin of `fused.combine_pairs`."""
    y_ND.mul_(weight_N[:, None])
    y_TKD = torch.empty_like(y_ND).index_copy_(0, order_N, y_ND).view(T, K, -1)
    if y_ND.dtype == torch.float32:
        return y_TKD.sum(1)
    return y_TKD.sum(1, dtype=torch.float32).to(y_ND.dtype)


def _combine(x_TD: torch.Tensor, token_N: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
    """Sum each token's weighted expert outputs: (T, D) with out[token_N[n]] += y_ND[n]."""
    if x_TD.dtype == torch.float32:
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)
    # bf16: sum each token's K expert outputs in float32. On CUDA index_add_ adds with
    # atomics in arbitrary order, and bf16 rounding at every add made the result vary from
    # run to run by several ulps.
    acc = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    return acc.index_add_(0, token_N, y_ND.float()).to(x_TD.dtype)


class MoE(nn.Module):
    """Router + routed experts + shared experts (an MLP of width n_shared_experts * I).

    After each forward `last_counts` (E,) holds tokens routed to each expert, and
    `last_weights`/`last_indices` (T, K) the routing of that forward: cheap instrumentation the
    app plots. On the meta device only shapes flow: expert outputs are not computed.
    """

    def __init__(
        self, la: LayerArgs, dtype=None, device=None, world_size=1, rank=0, impl: str = "auto"
    ):
        super().__init__()
        if impl not in DISPATCH_IMPLS:
            raise ValueError(f"moe_impl={impl!r}: choose one of {', '.join(DISPATCH_IMPLS)}")
        self.impl = impl  # the expert dispatch, see `dispatch`
        self.dim = la.dim
        self.n_routed_experts = la.n_routed_experts
        self.n_activated_experts = la.n_activated_experts
        self.n_expert_groups = la.n_expert_groups
        gate_dtype = compute_dtype(dtype)  # the router is never fp8
        self.gate = Gate(la, dtype=gate_dtype, device=device)
        n_local = la.n_routed_experts // world_size  # expert parallel (dsv3.parallel)
        self.experts = GroupedExperts(
            n_local, la.dim, la.moe_inter_dim, dtype, device, first=rank * n_local
        )
        if la.n_shared_experts > 0:
            width = la.n_shared_experts * la.moe_inter_dim // world_size
            self.shared_experts = MLP(la.dim, width, dtype, device)
        else:
            self.shared_experts = None
        self.last_counts: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)  # (B*S, D)
        counts_E = torch.zeros(self.n_routed_experts, dtype=torch.long, device=x.device)
        weights_TK, idx_TK = self.gate(x_TD, counts_E)
        self.last_counts, self.last_weights, self.last_indices = counts_E, weights_TK, idx_TK
        local = self.experts.n_experts == self.n_routed_experts
        if x.device.type == "meta":
            y_TD = torch.empty_like(x_TD)
        elif (
            self.impl == "auto"
            and local
            and fused.moe_small_ok(self.experts, self.shared_experts, x_TD, idx_TK.numel())
            and (y_TD := self._fused(x_TD, weights_TK, idx_TK)) is not None
        ):
            return y_TD.view(shape)  # routed and shared experts together
        else:
            # On a GPU with all experts here, the grouped path takes the counts as a tensor:
            # no host sync per layer. Otherwise (CPU, expert parallel) a list.
            on_host = x.device.type == "cpu" or not local
            counts = counts_E.tolist() if on_host else counts_E
            y_TD = self.experts(x_TD, weights_TK, idx_TK, counts, self.impl)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)

    def _fused(self, x_TD, weights_TK, idx_TK) -> torch.Tensor | None:
        """A few tokens on CUDA (decoding): routed and shared experts in two kernels
        (`dsv3.fused.moe_small`), or None if they cannot run here."""
        args = (x_TD, weights_TK, idx_TK, self.experts, self.shared_experts)
        return fused.attempt("moe_small", fused.moe_small, *args)
