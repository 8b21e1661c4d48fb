"""CUDA checks (run on a GPU machine): the fast paths agree with the CPU, every dtype runs, and
the seed demo builds and runs. Prints one markdown table; exits 1 on a failed check.

    python -m benchmarks.gpu_check [--no-seed-demo]

--no-seed-demo leaves out the 19.7B seed demo's build and timings (benchmarks/run.py --gpu
measures them), for a short loan of a GPU.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: sys.path[0] is benchmarks/
    import _script

    _script.run_as_module(__file__)

import sys
import time
import traceback
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dsv3 import ConfigError, ModelArgs, Transformer, count_params
from dsv3.moe import dispatch_grouped, dispatch_loop, grouped_mm_supported

DEV = "cuda"  # `--dry-run` checks this script's own logic on the CPU (no graphs there)

TINY = dict(
    vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=4, n_dense_layers=1,
    n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
    n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=64, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=512,
    original_seq_len=128, gate_bias=True, layer_config={2: {"n_heads": 8, "ffn": "dense"}},
)  # fmt: skip


class _Rows(list):
    """The table's rows, each also written to stderr as it comes: a run cut short by its time
    limit still shows what it checked (every check builds its rows in one of these)."""

    def append(self, row) -> None:
        super().append(row)
        print(
            f"  | {row[0]} | {row[1]} | {'yes' if row[2] else 'NO'} |", file=sys.stderr, flush=True
        )

    def extend(self, rows) -> None:
        if isinstance(rows, _Rows):  # a check's own rows: written as they came
            super().extend(rows)
            return
        for row in rows:
            self.append(row)


def _cuda_copy(cpu: Transformer, dtype: str, **kw) -> Transformer:
    """A CUDA model of `dtype` with the CPU model's weights (fp8: quantised from them)."""
    m = Transformer(cpu.args, device="meta", dtype=dtype, **kw)
    m.to_empty(device=DEV)
    if dtype == "fp8":
        from dsv3.checkpoint.plan import quantize

        sd = {}
        for k, t in cpu.state_dict().items():
            target = m.state_dict()[k]
            if target.dtype == torch.float8_e4m3fn:
                q, sc = quantize(t.float())
                (
                    sd[k],
                    sd[
                        k.removesuffix("weight") + "scale"
                        if k.endswith(".weight")
                        else k + "_scale"
                    ],
                ) = q, sc
            elif k not in sd:
                sd[k] = t
        m.load_state_dict(sd)
    else:
        m.load_state_dict(cpu.state_dict())
    m.reset_cache()
    return m


def _greedy(m: Transformer, tok: torch.Tensor, steps: int):
    """Prefill tok, then `steps` greedy decode steps -> (ids (B, steps), last logits)."""
    m.reset_cache()
    logits = m(tok)
    ids, S = [], tok.shape[1]
    for i in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        ids.append(nxt)
        logits = m(nxt, start_pos=S + i)
    return torch.cat(ids, 1), logits.float()


def _kept_rows_rel(ids_g, lg_g, ids_e, lg_e) -> tuple[int, float]:
    """(rows whose greedy ids agree, relative difference of their last logits). The graph's
    step reads a masked static span where eager reads the keys there are, so the split of the
    attention's keys and some measured kernel choices differ: 16-bit roundings may differ,
    and a near tie may then pick another greedy token. A row that did has another context
    after it, so only the rows that kept the same ids are compared."""
    kept = (ids_g == ids_e).all(1)
    same = int(kept.sum())
    a, b = lg_g[kept], lg_e[kept]
    return same, ((a - b).norm() / b.norm()).item() if same else float("inf")


def check_graph_decode(args: ModelArgs, cpu: Transformer) -> list:
    """Graph decode (static cache, device position) == eager decode, both cache layouts, bf16;
    crossing a span boundary (255 -> 256 keys) recaptures and stays right."""
    rows = _Rows()
    for impl in ("absorb", "naive"):
        a = args.replace(attn_impl=impl)
        torch.manual_seed(0)
        c = Transformer(a, device="cpu")
        m = _cuda_copy(c, "bf16")
        tok = torch.randint(0, a.vocab_size, (3, 250), device=DEV)
        m.graphs.enabled = False
        ids_e, lg_e = _greedy(m, tok, 12)
        m.graphs.enabled = True
        m.free_cache()
        ids_g, lg_g = _greedy(m, tok, 12)
        g = m.graphs
        same, rel = _kept_rows_rel(ids_g, lg_g, ids_e, lg_e)
        ok = g.replays >= 12 and g.note is None and rel < 2e-2 and same >= 2
        rows.append(
            (
                f"bf16 graph decode vs eager ({impl}, batch 3, positions 250-261)",
                f"replays {g.replays}, captures {g.captures}, rows with equal greedy ids {same}/3, "
                f"their last logits rel {rel:.1e}, note {g.note}",
                ok,
            )
        )
    rows.append(_bad_id_after_replay(m, tok))
    return rows


def _bad_id_after_replay(m: Transformer, tok: torch.Tensor) -> tuple[str, str, bool]:
    """A graph decode step checks its ids after the replay is queued (the replay reads them
    clamped): an out-of-range id fails with a ConfigError, not a device assert, and a retry at
    that position replays and equals a fresh eager step."""
    m.graphs.enabled = True
    m.reset_cache()
    P = tok.shape[1] - 2  # prefill, one good step at P, the bad one at P + 1
    m(tok[:, :P])
    m(tok[:, P : P + 1], start_pos=P)
    bad = tok[:, P + 1 : P + 2].clone()
    bad[0, 0] = m.args.vocab_size
    n = m.graphs.replays
    try:
        m(bad, start_pos=P + 1)
        err = "no error"
    except ConfigError as e:
        err = f"ConfigError({e.field})"
    replayed = m.graphs.replays - n
    got = m(tok[:, P + 1 : P + 2], start_pos=P + 1).float()
    m.graphs.enabled = False
    m.reset_cache()
    m(tok[:, : P + 1])
    want = m(tok[:, P + 1 : P + 2], start_pos=P + 1).float()
    rel = _rel(got, want)
    ok = err == "ConfigError(tokens)" and replayed == 1 and rel < 2e-2
    return (
        "bf16 graph decode, an out-of-range id (checked after the replay), then a retry",
        f"{err}, replays of the bad step {replayed}, retry vs eager logits rel {rel:.1e}",
        ok,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_fused(args: ModelArgs, cpu: Transformer) -> list:
    """The fused decode kernels (dsv3.fused) against their torch twins: the router (routings
    of V3, Kimi K2, the seed demo, groups without bias), the few-token MoE (fp32, bf16, fp8;
    with and without shared experts) and a whole decode step (mla_step + the rest); float32
    where the twins must agree to rounding, bf16 where routing may flip on a near tie."""
    from dsv3 import fused
    from dsv3.layers import quantize_fp8
    from dsv3.moe import MoE
    from dsv3.routing import Gate

    rows = _Rows()
    g = torch.Generator().manual_seed(0)
    routings = [  # (E, K, groups, kept, score, bias)
        (64, 6, 1, 1, "softmax", False), (256, 8, 8, 4, "sigmoid", True),
        (384, 8, 1, 1, "sigmoid", True), (24, 3, 3, 2, "softmax", False),
    ]  # fmt: skip
    for E, K, G, KG, func, bias in routings:
        a = ModelArgs(dim=64, n_routed_experts=E, n_activated_experts=K, n_expert_groups=G,
                      n_limited_groups=KG, score_func=func, gate_bias=bias, route_scale=2.5)  # fmt: skip
        gate = Gate(a.for_layer(a.n_layers - 1), dtype=torch.float32, device=DEV)
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.3)
        if gate.bias is not None:
            gate.bias.copy_(torch.randn(E, generator=g) * 0.1)
        x = torch.randn(7, 64, generator=g).to(DEV)
        got = []
        for keep in (False, True):  # keep_scores=True takes the torch twin
            gate.keep_scores = keep
            c = torch.zeros(E, dtype=torch.long, device=DEV)
            w, i = gate(x, c)
            order = i.argsort(-1)
            got.append((i.gather(1, order), w.gather(1, order), c))
        same = torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][2], got[1][2])
        rel = _rel(got[0][1], got[1][1])
        rows.append((f"fused router, {E} experts top-{K}, {G} groups, {func}, bias {bias}",
                     f"same ids and counts {same}, weights rel {rel:.1e}", same and rel < 1e-5))  # fmt: skip

    cases = [  # (compute dtype, weight dtype, shared, I, D, tokens)
        (torch.float32, None, 2, 128, 256, 3), (torch.float32, None, 0, 96, 160, 8),
        (torch.bfloat16, None, 2, 1408 // 4, 512, 1), (torch.bfloat16, "fp8", 2, 256, 512, 8),
        (torch.bfloat16, "fp8", 1, 384, 256, 2),
    ]  # fmt: skip
    for dt, wd, S, I, D, T in cases:
        a = ModelArgs(dim=D, moe_inter_dim=I, n_routed_experts=16, n_activated_experts=6,
                      n_shared_experts=S, score_func="softmax")  # fmt: skip
        moe = MoE(a.for_layer(a.n_layers - 1), torch.float8_e4m3fn if wd else dt, DEV)
        sd = {}
        for k, t in moe.state_dict().items():
            if k.endswith("scale"):
                continue
            w = torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5
            if t.dtype == torch.float8_e4m3fn:
                q, sc = quantize_fp8(w)
                (
                    sd[k],
                    sd[k[: -len("weight")] + "scale" if k.endswith("weight") else k + "_scale"],
                ) = q, sc
            else:
                sd[k] = w.to(t.dtype)
        moe.load_state_dict(sd)
        x = torch.randn(T, 1, D, generator=g).to(DEV, dt)
        ys = {}
        for form in ("whole", "split"):  # both forms of `_down`
            fused.DOWN_FORM = form
            try:
                ys[form] = moe(x)
            finally:
                fused.DOWN_FORM = None
        # did the kernels run (a failure falls back and is remembered)?
        used = fused.moe_small_ok(moe.experts, moe.shared_experts, x.view(T, D), T * 6)
        used = used and "moe_down_split" not in fused.FAILED
        moe.impl = "loop"  # the torch twin (fp8: dequantised per call)
        ref = moe(x)
        rel = max(_rel(y, ref) for y in ys.values())
        tol = 1e-5 if dt == torch.float32 else 2e-2
        rows.append((f"fused MoE, {T} tokens, {wd or dt} weights, {S} shared, I {I}, D {D}",
                     f"used {used}, rel (worse of whole and split down) {rel:.1e}",
                     used and rel < tol))  # fmt: skip

    # The absorbed attention core (mla_attend) against its twin: heads not a multiple of the
    # tile, key counts not a multiple of a split, a static step's mask (keys after pos at
    # -inf, whole splits of them), float32 and bf16.
    from types import SimpleNamespace

    from dsv3.attention import MLA

    attend = [  # (batch, heads, C, R, keys, masked after, dtype)
        (1, 16, 512, 64, 257, None, torch.float32), (2, 20, 128, 16, 97, 60, torch.float32),
        (3, 8, 64, 8, 40, 5, torch.bfloat16), (1, 32, 256, 32, 129, None, torch.bfloat16),
    ]  # fmt: skip
    for B, H, C, R, T, pos, dt in attend:
        qa, qp = (torch.randn(B, H, n, generator=g).to(DEV, dt) for n in (C, R))
        lat = torch.randn(B, T + 3, C + R, generator=g).to(DEV, dt)[:, :T]  # a cache's slice
        bias = None
        if pos is not None:
            bias = torch.zeros(T, dtype=dt, device=DEV)
            bias[pos + 1 :] = float("-inf")
        scale = (C + R) ** -0.5
        ref = MLA._attend_torch(SimpleNamespace(softmax_scale=scale), qa, qp, lat, bias, 1)
        got = fused.mla_attend(qa, qp, lat, bias, scale)
        rel = _rel(got, ref)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        rows.append((f"fused attention core, batch {B}, {H} heads, C {C}, {T} keys, mask "
                     f"{pos is not None}, {dt}", f"rel {rel:.1e}", rel < tol))  # fmt: skip

    for dt, ql in (("fp32", 0), ("fp32", 64), ("bf16", 64)):
        a = args.replace(q_lora_rank=ql)
        torch.manual_seed(0)
        m = _cuda_copy(Transformer(a, device="cpu"), dt)
        tok = torch.randint(0, a.vocab_size, (2, 20), generator=g).to(DEV)
        outs, spans = [], []  # spans: positions per mla_step call with the kernels on
        step = fused.mla_step
        fused.mla_step = lambda kv, *r, seen=spans, run=step: (
            seen.append(kv.shape[1]) or run(kv, *r)
        )
        for on in (True, False):
            fused.ENABLED = on
            try:
                with torch.inference_mode():
                    m.reset_cache()  # a prefill in two chunks: mla_step on S > 1 positions
                    pre = torch.cat([m(tok[:, :12], all_logits=True),
                                     m(tok[:, 12:], start_pos=12, all_logits=True)], 1)  # fmt: skip
                    pre_cache = torch.cat(
                        [b.attn.cache.packed[:2, :20].flatten() for b in m.layers]
                    )
                    m.graphs.reserve(2, 32)
                    lg = [_static_logits(m, p, torch.randint(0, a.vocab_size, (2, 1), generator=
                          torch.Generator().manual_seed(p)).to(DEV)) for p in range(20, 23)]  # fmt: skip
                    cache = torch.cat([b.attn.cache.packed[:2, :23].flatten() for b in m.layers])
                    outs.append((torch.stack(lg), cache, pre, pre_cache))
            finally:
                fused.ENABLED = True
        fused.mla_step = step
        # every layer's two prefill chunks took the kernel (not the last-position-only layer)
        prefill_calls = sum(n > 1 for n in spans)
        # bf16: the twin rounds where the kernels round; Triton's interpreter truncates instead,
        # at every prefill position's latent now, which a tiny random model amplifies
        tol = 1e-4 if dt == "fp32" else 2e-1 if fused.INTERPRET else 5e-2
        rl, rc = _rel(outs[0][2], outs[1][2]), _rel(outs[0][3], outs[1][3])
        ok = rl < tol and rc < tol and prefill_calls == 2 * len(m.layers)
        rows.append((f"fused prefill latent step vs torch twin ({dt}, q_lora {ql}), 2 chunks",
                     f"kernel calls {prefill_calls}, logits rel {rl:.1e}, cache rel {rc:.1e}",
                     ok))  # fmt: skip
        rl, rc = _rel(outs[0][0], outs[1][0]), _rel(outs[0][1], outs[1][1])
        rows.append((f"fused decode step vs torch twin ({dt}, q_lora {ql}), 3 steps",
                     f"logits rel {rl:.1e}, cache rel {rc:.1e}", rl < tol and rc < tol))  # fmt: skip
    # A 16-bit Linear's few rows through the Triton kernel (`Linear._cuda`) against F.linear:
    # rows below the kernel's 16-row block, N and K not multiples of its tiles.
    from dsv3 import fp8

    gl = torch.Generator().manual_seed(1)
    for n, N, K in ((1, 3072, 1536), (3, 576, 2048), (8, 200, 300)):
        x = torch.randn(n, K, generator=gl).to(DEV, torch.bfloat16)
        w = (torch.randn(N, K, generator=gl) / K**0.5).to(DEV, torch.bfloat16)
        rel = _rel(fp8.w8_matmul(x, w, None), F.linear(x, w))
        rows.append((f"bf16 Linear kernel, {n} rows, {N}x{K}", f"rel {rel:.1e}", rel < 1e-2))
    # A SwiGLU MLP's up projection in one kernel (`MLP._swiglu`: w1, w3, silu * up) against
    # the same in float32 from the (dequantised) weights: 16-bit and fp8 weights, rows below
    # and past the kernel's row blocks, widths not multiples of its tiles or of 128
    from dsv3.layers import MLP, dequantize, quantize_fp8

    for wdt, n, D, I in ((torch.bfloat16, 3, 256, 384), (torch.bfloat16, 70, 200, 300),
                         (fp8.FP8, 5, 256, 384), (fp8.FP8, 130, 200, 300)):  # fmt: skip
        mlp = MLP(D, I, wdt, DEV)
        dense = {}
        for name in ("w1", "w3"):
            lin = getattr(mlp, name)
            w = torch.randn(I, D, generator=gl) / D**0.5
            if wdt == fp8.FP8:
                q, sc = quantize_fp8(w)
                lin.weight.copy_(q.to(DEV))
                lin.scale.copy_(sc.to(DEV))
                w = dequantize(q, sc, torch.float32)
            else:
                lin.weight.copy_(w.to(DEV, wdt))
                w = lin.weight.float().cpu()
            dense[name] = w.to(DEV)
        x = torch.randn(n, D, generator=gl).to(DEV, torch.bfloat16)
        want = F.silu(x.float() @ dense["w1"].t()) * (x.float() @ dense["w3"].t())
        with _kernels_forced(("mlp_swiglu",), fp8, "w8_matmul") as calls:
            got = mlp._swiglu(x)
        ok = got is not None and bool(calls) and "mlp_swiglu" not in fused.FAILED
        rel = _rel(got, want) if got is not None else float("nan")
        rows.append((f"SwiGLU MLP kernel, {str(wdt)[6:]} weights, {n} rows, {D} -> {I}",
                     f"used {bool(calls)}, rel {rel:.1e}", ok and rel < 2e-2))  # fmt: skip

    # The router's float32 matmul in one kernel against its twin (cast, then F.linear in
    # float32): a bf16 weight read as it is, expert and K counts not multiples of the tiles.
    for n, E, D, wdt in ((1, 64, 2048, torch.bfloat16), (5, 24, 300, torch.float32)):
        x = torch.randn(n, D, generator=gl).to(DEV, torch.bfloat16)
        w = torch.randn(E, D, generator=gl).to(DEV, wdt)
        rel = _rel(fused.gate_logits(x, w), F.linear(x.float(), w.float()))
        rows.append((f"router logits kernel, {n} tokens, {E} experts, D {D}, {wdt} weight",
                     f"rel {rel:.1e}", rel < 1e-6))  # fmt: skip

    # RMSNorm in one kernel, with and without the residual add before it, against its twin
    # (the add, then F.rms_norm): a width not a power of two, a residual that is a strided
    # view (a last-position slice), float32 and bf16. The sum must be bit-equal.
    from dsv3.layers import RMSNorm

    for n, D, dt, res in ((1, 2048, torch.bfloat16, True), (3, 300, torch.float32, True),
                          (2, 1536, torch.bfloat16, False), (5, 512, torch.float32, False)):  # fmt: skip
        norm = RMSNorm(D, 1e-6, dtype=dt, device=DEV)
        norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=gl))
        x = torch.randn(n, 1, D, generator=gl).to(DEV, dt)
        r = torch.randn(n, 4, D, generator=gl).to(DEV, dt)[:, -1:] if res else None
        y, s = fused.rms_norm(x, norm.weight, norm.eps, r)
        y0, s0 = norm._twin(x, r)
        rel = _rel(y, y0)
        # Triton's interpreter truncates float32 -> bf16 (a GPU rounds to nearest, as torch)
        exact = not (fused.INTERPRET and dt == torch.bfloat16)
        if r is None:
            same = s is None
        else:
            same = torch.equal(s, s0) if exact else _rel(s, s0) < 1e-2
        tol = 1e-6 if dt == torch.float32 else 1e-2
        rows.append((f"RMSNorm kernel, {n} rows, D {D}, {dt}, residual {res}",
                     f"normed rel {rel:.1e}, sum {'bit-equal' if exact else 'close'} {same}",
                     rel < tol and same))  # fmt: skip

    # A prefill's pairs sorted by expert from the router's counts (a counting sort) and each
    # token's weighted sum of its experts' outputs, against the torch twins: more pairs than a
    # program reads at a time, experts with no pairs, float32 and bf16.
    from dsv3.moe import combine_pairs_torch, sort_pairs_torch

    for T, K, E, D, dt in ((300, 4, 16, 96, torch.bfloat16), (37, 8, 24, 130, torch.float32)):
        idx = torch.stack([torch.randperm(E - 3, generator=gl)[:K] for _ in range(T)]).to(DEV)
        w = torch.rand(T, K, generator=gl).to(DEV, dt)
        counts = torch.bincount(idx.flatten(), minlength=E)
        order, inv, tok, wn = fused.sort_pairs(idx, w, counts)
        o0, t0, w0 = sort_pairs_torch(idx, w)
        n = torch.arange(T * K, device=DEV)
        same = (torch.equal(order, o0) and torch.equal(tok, t0) and torch.equal(wn, w0)
                and torch.equal(inv[order], n))  # fmt: skip
        y = torch.randn(T * K, D, generator=gl).to(DEV, dt)
        rel = _rel(fused.combine_pairs(y, inv, w), combine_pairs_torch(y.clone(), o0, w0, T, K))
        tol = 1e-6 if dt == torch.float32 else 2e-2  # the interpreter truncates to bf16
        rows.append((f"pairs sorted and combined, {T} tokens top-{K} of {E}, D {D}, {dt}",
                     f"sort equal to argsort {same}, combine rel {rel:.1e}", same and rel < tol))  # fmt: skip

    # The same two kernels inside the experts' sorted dispatch (`GroupedExperts._sorted`, the
    # counts on the device as a CUDA forward passes them) against that dispatch without them
    from dsv3.moe import MoE

    for dt in (torch.float32, torch.bfloat16):
        a = ModelArgs(dim=64, moe_inter_dim=32, n_routed_experts=12, n_activated_experts=3,
                      n_expert_groups=1, n_limited_groups=1, score_func="softmax")  # fmt: skip
        moe = MoE(a.for_layer(a.n_layers - 1), dt, DEV)
        for t in moe.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gl) * 0.2)
        x = torch.randn(40, 64, generator=gl).to(DEV, dt)
        counts = torch.zeros(12, dtype=torch.long, device=DEV)
        w, idx = moe.gate(x, counts)
        with _kernels_forced(("sort_pairs",), fused, "sort_pairs") as calls:
            got = moe.experts._sorted(x, w, idx, counts, "loop")
        with _fused_off():
            want = moe.experts._sorted(x, w, idx, counts, "loop")
        rel = _rel(got, want)
        tol = 1e-6 if dt == torch.float32 else 2e-2
        rows.append((f"experts' sorted dispatch with the sort/combine kernels, {dt}",
                     f"used {bool(calls)}, rel {rel:.1e}", bool(calls) and rel < tol))  # fmt: skip

    rows.extend(_unpadded_attention_rows(gl))
    # unpadded attention may simply not run on this GPU's attention kernels: padded is kept
    bad = set(fused.FAILED) - {"sdpa_unpadded"}
    rows.append(("fused kernels that failed to run", str(fused.FAILED) or "none", not bad))
    return rows


def _unpadded_attention_rows(gl: torch.Generator) -> list:
    """CUDA: attention with Dqk != Dv unpadded (`attention._sdpa_call`, where `_flash` measures
    it faster) equals the padded form, causal and chunked; or says that it does not run here
    (then the padded form always runs)."""
    if DEV != "cuda":
        return []
    from dsv3.attention import _sdpa_call, _sdpa_padded

    rows = []
    for S, T, start in ((128, 128, 0), (64, 192, 128), (1, 300, 299)):
        q, k = (torch.randn(2, n, 16, 192, generator=gl).to(DEV, torch.bfloat16) for n in (S, T))
        v = torch.randn(2, T, 16, 128, generator=gl).to(DEV, torch.bfloat16)
        want = _sdpa_padded(q, k, v, 0.1, start, None)
        try:
            rel = _rel(_sdpa_call(q, k, v, 0.1, start, None), want)
            res, ok = f"rel {rel:.1e}", rel < 1e-2
        except Exception as e:  # noqa: BLE001 - not supported here: the padded form runs
            res, ok = f"does not run here ({type(e).__name__}): padded always", True
        rows.append(
            (f"attention 192/128 head dims unpadded vs padded, {S} queries {T} keys", res, ok)
        )
    return rows


@contextmanager
def _kernels_forced(kinds: tuple[str, ...], module, name: str):
    """`fused.prefer` picks the kernels of these kinds whatever they measure; yields a list that
    gets an entry per call of module.name (a layer that used them)."""
    from dsv3 import fused

    calls: list[int] = []
    prefer, fn = fused.prefer, getattr(module, name)
    fused.prefer = lambda kind, *r: kind in kinds or prefer(kind, *r)
    setattr(module, name, lambda *r: calls.append(1) or fn(*r))
    try:
        yield calls
    finally:
        fused.prefer = prefer
        setattr(module, name, fn)


@contextmanager
def _fused_off():
    """Every fused kernel off (their torch twins run) inside the block."""
    from dsv3 import fused

    fused.ENABLED = False
    try:
        yield
    finally:
        fused.ENABLED = True


def _static_logits(m: Transformer, pos: int, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step through the static-step code (what a CUDA graph captures), eagerly."""
    from dsv3 import graphs

    return graphs._step(m, {"pos": torch.tensor([pos], device=DEV), "tokens": tokens}, 32).float()


FP8_LINEARS = ((1, 2048, 7168), (3, 1536, 2048), (256, 3072, 1536), (7, 200, 300))  # M, N, K
FP8_EXPERTS = (64, 2048, 1408, 6, (2, 256))  # E, D, I, top-k, token counts: the seed demo's


def check_fp8_kernels(
    args: ModelArgs, cpu: Transformer, linears=FP8_LINEARS, experts=FP8_EXPERTS
) -> list:
    """The fp8 kernels against the dequantised product, shapes of V3 and of the seed demo
    (smaller ones for Triton's CPU interpreter: tests/dsv3/test_fused_interpreter.py)."""
    from dsv3 import fp8
    from dsv3.layers import dequantize, quantize_fp8

    rows = _Rows()
    g = torch.Generator(device=DEV).manual_seed(1)
    for M, N, K in linears:
        w, s = quantize_fp8(torch.randn(N, K, device=DEV, generator=g) / K**0.5)
        x = torch.randn(M, K, device=DEV, generator=g).bfloat16()
        ref = x.float() @ dequantize(w, s, torch.float32).t()
        t = fp8.w8_matmul(x, w, s).float()
        rel = ((t - ref).norm() / ref.norm()).item()
        res = f"triton rel {rel:.1e}"
        ok = rel < 1e-2
        if M == 1:  # the single-row kernel, fp8 and (the same weight dequantised) bf16
            r1 = _rel(fp8.w8_row(x, w, s), ref)
            r2 = _rel(fp8.w8_row(x, dequantize(w, s, torch.bfloat16), None), ref)
            res += f", row rel {r1:.1e} (bf16 weight {r2:.1e})"
            ok = ok and r1 < 1e-2 and r2 < 1e-2
        if fp8.scaled_mm_shape_ok(w):
            try:
                y = fp8.scaled_mm_linear(x, w, fp8.scaled_mm_scale(s)).float()
                r2 = ((y - ref).norm() / ref.norm()).item()
                res += f", scaled_mm rel {r2:.1e}"
            except Exception as e:  # noqa: BLE001
                res += f", scaled_mm {type(e).__name__}: {str(e)[:120]}"
        rows.append((f"fp8 linear {M}x{K} @ {N}x{K}^T", res, ok))
    E, D, I, K, token_counts = experts  # noqa: E741 - the legend's I
    ws = {}
    for name, (o, i) in {"w1": (I, D), "w3": (I, D), "w2": (D, I)}.items():
        q, sc = zip(
            *(quantize_fp8(torch.randn(o, i, device=DEV, generator=g) / i**0.5) for _ in range(E))
        )
        ws[name] = (torch.stack(q), torch.stack(sc))
    from dsv3.moe import dispatch_loop

    deq = {n: dequantize(*ws[n], torch.bfloat16) for n in ws}
    bf16 = {n: (deq[n], None) for n in deq}  # the 16-bit form of the same kernels
    for T in token_counts:
        x = torch.randn(T, D, device=DEV, generator=g).bfloat16()
        idx = torch.rand(T, E, device=DEV, generator=g).topk(K, -1).indices
        order = idx.flatten().argsort(stable=True)
        token_N = order // K
        counts = torch.bincount(idx.flatten(), minlength=E)
        ref = dispatch_loop(
            x.index_select(0, token_N), counts.tolist(), deq["w1"], deq["w2"], deq["w3"]
        ).float()
        for weights, form in ((ws, "fused"), (ws, "separate"), (bf16, "fused")):
            with _swiglu_form(form):
                y = fp8.experts_w8(x, token_N, counts, weights).float()
            failed = fp8_failed()
            rel = ((y - ref).norm() / ref.norm()).item()
            kind = "fp8" if weights is ws else "bf16"
            rows.append(
                (
                    f"{kind} grouped experts ({form} up projection), {T} tokens top-{K} of {E}",
                    f"rel {rel:.1e}, kernels failed: {failed or 'none'}",
                    rel < 2e-2 and not failed,
                )
            )
    rows.extend(_layout_rows(g))
    return rows


def fp8_failed() -> dict:
    """The grouped expert kernels that failed here (their twins ran instead)."""
    from dsv3 import fused

    return {k: v for k, v in fused.FAILED.items() if k in ("moe_layout", "w8_swiglu")}


@contextmanager
def _swiglu_form(form: str):
    """`dsv3.fp8.experts_w8` with its up projection in this form ("fused" or "separate")."""
    from dsv3 import fp8

    old, fp8.SWIGLU_FORM = fp8.SWIGLU_FORM, form
    try:
        yield
    finally:
        fp8.SWIGLU_FORM = old


def _layout_rows(g: torch.Generator) -> list:
    """The row-block layout kernel against its torch twin, equal element for element: a busy
    expert over several blocks, idle experts, an empty routing."""
    from dsv3 import fp8

    rows = []
    for E, N, BM in ((64, 1536, 32), (8, 50, 16), (12, 0, 16), (3, 700, 64)):
        counts = torch.zeros(E, dtype=torch.long, device=DEV)
        if N:
            busy = torch.randint(0, E, (N,), device=DEV, generator=g)
            busy[: N // 3] = E // 2  # one expert with many more pairs than a block
            counts = torch.bincount(busy, minlength=E)
            counts[0] = 0  # an idle expert first
        n = int(counts.sum())
        got = fp8.moe_layout(counts, n, BM)
        want = fp8.moe_layout_torch(counts, n, BM)
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        rows.append(
            (
                f"expert row-block layout kernel, {n} pairs over {E} experts, blocks of {BM}",
                f"equal to its twin {same}, kernels failed: {fp8_failed() or 'none'}",
                same and not fp8_failed(),
            )
        )
    return rows


def check_fp8_model(args: ModelArgs, cpu: Transformer) -> list:
    """An fp8 model on CUDA (fast paths) == the same fp8 weights dequantised into bf16; graph
    decode of the fp8 model == its eager decode."""
    from dsv3 import fp8, tuning

    m8 = _cuda_copy(cpu, "fp8")
    ref = Transformer(args, device="meta", dtype="bf16")
    ref.to_empty(device=DEV)
    sd = {}
    for name, mod in m8.named_modules():
        for k, t in mod.named_parameters(recurse=False):
            if t.dtype == torch.float8_e4m3fn:
                from dsv3.layers import dequantize

                sc = getattr(mod, "scale", None) if k == "weight" else getattr(mod, f"{k}_scale")
                t = dequantize(t, sc, torch.bfloat16)
            sd[f"{name}.{k}" if name else k] = t
    ref.load_state_dict(sd, strict=False)
    ref.reset_cache()
    tok = torch.randint(0, args.vocab_size, (2, 64), device=DEV)
    a = m8(tok, all_logits=True).float()
    b = ref(tok, all_logits=True).float()
    rel = ((a - b).norm() / b.norm()).item()
    rows = [
        (
            "fp8 model (fast paths) vs its weights dequantised (bf16), all logits",
            f"rel {rel:.1e}",
            rel < 3e-2,
        )
    ]
    m8.graphs.enabled = False
    ids_e, lg_e = _greedy(m8, tok, 8)
    m8.graphs.enabled = True
    ids_g, lg_g = _greedy(m8, tok, 8)
    same, rel = _kept_rows_rel(ids_g, lg_g, ids_e, lg_e)
    rows.append(
        (
            "fp8 graph decode vs eager",
            f"replays {m8.graphs.replays}, note {m8.graphs.note}, rows with equal greedy ids "
            f"{same}/2, their last logits rel {rel:.1e}",
            m8.graphs.replays >= 8 and same >= 1 and rel < 3e-2,
        )
    )
    chosen = [
        (k[1:], c, {n: round(t * 1e6) for n, t in ts.items()})
        for k, c, ts in tuning.choices("fp8_linear")
    ]
    rows.append(("fp8 linear choices (rows bucket, N, K: chosen, us)", str(chosen)[:600], True))
    rows.append(("fp8 fast paths rejected", str(fp8.REJECTED)[:400] or "none", True))
    return rows


def check_app_path(args: ModelArgs, cpu: Transformer) -> list:
    """The app's run (ui.runtime.run) on CUDA: prefill and decode replay graphs; a second run
    of the same shape captures nothing new."""
    from ui import runtime

    m = _cuda_copy(cpu, "bf16")
    tok = torch.randint(0, args.vocab_size, (2, 32))
    r1 = runtime.run(m, tok, decode_steps=6)
    caps = m.graphs.captures
    r2 = runtime.run(m, tok, decode_steps=6)
    same = r1["generated"] == r2["generated"]
    return [
        (
            "app run on CUDA (graphs)",
            f"captures {caps} then {m.graphs.captures}, replays {m.graphs.replays}, same ids {same}, "
            f"note {m.graphs.note}",
            same and m.graphs.captures == caps and m.graphs.replays >= 12,
        )
    ]


# The checks added with graphs, fp8 and the fused kernels (`--dry-run` runs them on the CPU).
def check_moe_sort_model(args: ModelArgs, cpu: Transformer) -> list:
    """A whole bf16 and fp8 prefill on CUDA with the MoE's pairs sorted and combined by the
    kernels (`fused.sort_pairs`, `fused.combine_pairs`; chosen here whatever they measure)
    against the same prefill with the fused kernels off (the torch sort and combine); and a
    bf16 prefill with the routed experts through the grouped Triton kernels of `dsv3.fp8`
    (`GroupedExperts._triton_pays`, forced) against the same without."""
    if DEV != "cuda":
        return []  # `MoE._sort_kernel` runs on CUDA only (the kernels: check_fused)
    from dsv3 import fp8, fused

    rows = _Rows()
    tok = torch.randint(0, args.vocab_size, (2, 48), device=DEV)
    sort = (("sort_pairs",), fused, "sort_pairs")
    triton = (("moe_triton", "w8_swiglu"), fp8, "experts_w8")
    cases = (("bf16", "the MoE sort/combine kernels", sort),
             ("fp8", "the MoE sort/combine kernels", sort),
             ("bf16", "the grouped Triton experts (layout, fused SwiGLU)", triton))  # fmt: skip
    for dt, what, (kinds, module, name) in cases:
        m = _cuda_copy(cpu, dt)
        m.graphs.enabled = False
        with _kernels_forced(kinds, module, name) as calls:
            m.reset_cache()
            got = m(tok, all_logits=True).float()
        with _fused_off():
            m.reset_cache()
            want = m(tok, all_logits=True).float()
        watched = ("sort_pairs", "combine_pairs", "moe_triton", "w8_swiglu", "moe_layout")
        failed = {k: v for k, v in fused.FAILED.items() if k in watched}
        rel = _rel(got, want)
        ok = bool(calls) and not failed and rel < 5e-2
        rows.append((f"{dt} prefill with {what} vs without fused kernels",
                     f"layers that used them {len(calls)}, logits rel {rel:.1e}, failed {failed}",
                     ok))  # fmt: skip
        del m
    return rows


NEW_CHECKS = (
    check_fused,
    check_moe_sort_model,
    check_graph_decode,
    check_fp8_kernels,
    check_fp8_model,
    check_app_path,
)


def dry_run() -> int:
    """The new checks on the CPU (fp8 kernels need Triton's interpreter: TRITON_INTERPRET=1)."""
    global DEV
    DEV = "cpu"
    args = ModelArgs(**TINY)
    torch.manual_seed(0)
    cpu = Transformer(args, device="cpu")
    for check in NEW_CHECKS:
        try:
            for row in check(args, cpu):
                print(row)
        except Exception as e:  # noqa: BLE001
            print(check.__name__, type(e).__name__, e)
            traceback.print_exc()
    return 0


def main() -> int:
    if "--dry-run" in sys.argv:
        return dry_run()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); nothing checked.")
        return 0
    rows: list[tuple[str, str, bool]] = _Rows()
    args = ModelArgs(**TINY)
    tok = torch.randint(0, args.vocab_size, (2, 64))

    # fp32 on CUDA == fp32 on CPU (same seed -> same weights? no: CUDA RNG differs; copy them)
    torch.manual_seed(0)
    cpu = Transformer(args, device="cpu")
    gpu = Transformer(args, device="meta")
    gpu.to_empty(device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    gpu.reset_cache()
    ref = cpu(tok, all_logits=True)
    got = gpu(tok.cuda(), all_logits=True).cpu()
    d = (got - ref).abs().max().item()
    rows.append(("fp32 CUDA vs CPU, all logits", f"max diff {d:.1e}", d < 1e-3))

    # decode on CUDA == full forward on CUDA
    gpu.reset_cache()
    full = gpu(tok.cuda(), all_logits=True)
    gpu(tok[:, :48].cuda())
    worst = 0.0
    for p in range(48, 64):
        step = gpu(tok[:, p : p + 1].cuda(), start_pos=p)
        worst = max(worst, (step - full[:, p]).abs().max().item())
    rows.append(("fp32 CUDA prefill+decode vs full", f"max diff {worst:.1e}", worst < 1e-3))

    # a CUDA-graph prefill equals the eager one (bf16: the sync-free grouped_mm path; new
    # tokens after capture), within eager-vs-eager noise (atomic index_add)
    g16 = Transformer(args, device="meta", dtype="bf16")
    g16.to_empty(device="cuda")
    g16.load_state_dict(cpu.state_dict())
    g16.reset_cache()
    run = g16.graphed_prefill(2, 64, all_logits=True)
    tok2 = torch.randint(0, args.vocab_size, (2, 64), device="cuda")
    g = run(tok2).float().clone()
    g16.graphs.enabled = False  # eager from here
    g16.reset_cache()
    e1 = g16(tok2, all_logits=True).float()
    g16.reset_cache()
    e2 = g16(tok2, all_logits=True).float()
    d, noise = (g - e1).abs().max().item(), (e1 - e2).abs().max().item()
    rows.append(
        (
            "bf16 graphed_prefill vs eager (new tokens)",
            f"max diff {d:.1e} (eager vs eager {noise:.1e})",
            d <= max(4 * noise, 0.05),
        )
    )

    # grouped_mm vs loop on CUDA, bf16
    E, D, I = 16, 256, 128
    counts = [int(c) for c in torch.randint(0, 40, (E,))]
    x = torch.randn(sum(counts), D, device="cuda", dtype=torch.bfloat16)
    w1, w3 = (torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(2))
    w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16) * 0.05
    if grouped_mm_supported(x, w1, w2, w3):
        a, b = dispatch_grouped(x, counts, w1, w2, w3), dispatch_loop(x, counts, w1, w2, w3)
        rel = ((a - b).float().norm() / b.float().norm()).item()
        rows.append(("bf16 grouped_mm vs loop (CUDA)", f"rel diff {rel:.1e}", rel < 2e-2))
        from dsv3.moe import dispatch_triton

        t = dispatch_triton(x, torch.tensor(counts, device="cuda"), w1, w2, w3)
        rel = ((t - b).float().norm() / b.float().norm()).item()
        rows.append(
            ("bf16 Triton grouped kernel vs loop (CUDA)", f"rel diff {rel:.1e}", rel < 2e-2)
        )
    else:
        rows.append(("bf16 grouped_mm vs loop (CUDA)", "grouped_mm not supported here", True))

    for check in NEW_CHECKS:
        try:
            rows.extend(check(args, cpu))
        except Exception as e:  # noqa: BLE001 - report and go on: one run checks everything
            rows.append((check.__name__, f"{type(e).__name__}: {str(e)[:300]}", False))
            traceback.print_exc()

    # every dtype runs on CUDA, loop and grouped MoE agree on a whole model
    for dtype in ("bf16",):
        torch.manual_seed(0)
        outs = {}
        for impl in ("loop", "auto"):
            torch.manual_seed(0)  # the same weights for both dispatches
            m = Transformer(args, device="cuda", dtype=dtype, moe_impl=impl)
            outs[impl] = m(tok.cuda(), all_logits=True).float()
            del m
        fin = bool(outs["auto"].isfinite().all())
        rel = ((outs["auto"] - outs["loop"]).norm() / outs["loop"].norm()).item()
        rows.append(
            (
                f"{dtype} forward on CUDA (auto vs loop MoE)",
                f"finite {fin}, rel {rel:.1e}",
                fin and rel < 5e-2,
            )
        )

    if "--no-seed-demo" not in sys.argv:
        rows.extend(check_seed_demo())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| check | result | ok |\n|---|---|---|")
    for name, res, good in rows:
        print(f"| {name} | {res} | {'yes' if good else 'NO'} |")
    return 0 if all(g for *_, g in rows) else 1


def check_seed_demo() -> list:
    """The seed demo builds, has its exact parameter count and runs, eager and graphed."""
    rows = _Rows()
    # the seed demo: n_layers 32, dim 2048, overrides on layers 5 and 10, bf16, tokens (2, 128)
    seed = ModelArgs(
        n_layers=32, dim=2048, layer_config={5: {"n_heads": 32}, 10: {"moe_inter_dim": 4096}}
    )
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    demo = Transformer(seed, device="cuda", dtype=torch.bfloat16)
    demo.graphs.enabled = False  # eager timings first
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    wbytes = sum(t.numel() * t.element_size() for t in demo.state_dict().values())
    x = torch.randint(0, seed.vocab_size, (2, 128), device="cuda")
    out = demo(x)
    for _ in range(2):
        demo(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        out = demo(x)
    torch.cuda.synchronize()
    fwd_s = (time.perf_counter() - t0) / n
    ok = tuple(out.shape) == (2, 102400) and bool(out.isfinite().all())
    rows.append(
        (
            "seed demo params",
            f"{count_params(seed)['total']:,}",
            count_params(seed)["total"] == 19_733_301_248,
        )
    )
    rows.append(("seed demo output", str(out.size()), ok))
    rows.append(
        (
            "seed demo build (bf16, CUDA)",
            f"{build_s:.2f} s, {wbytes / 1e9:.1f} GB weights, peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB",
            True,
        )
    )
    rows.append(
        (
            "seed demo 2x128 prefill (bf16)",
            f"{fwd_s * 1e3:.1f} ms (floor: see benchmarks/run.py --gpu)",
            True,
        )
    )
    # The same prefill replayed from a CUDA graph: same logits, fewer host launches.
    run = demo.graphed_prefill(2, 128)
    g_out = run(x).clone()
    demo.graphs.enabled = False  # eager from here (run() still replays its graph)
    demo.reset_cache()
    e_out = demo(x)
    diff = (g_out.float() - e_out.float()).abs().max().item()
    demo.reset_cache()
    noise = (demo(x).float() - e_out.float()).abs().max().item()  # eager vs eager (atomics)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        run(x)
    torch.cuda.synchronize()
    g_s = (time.perf_counter() - t0) / n
    rows.append(
        (
            "seed demo 2x128 prefill, CUDA graph (graphed_prefill)",
            f"{g_s * 1e3:.1f} ms ({fwd_s / g_s:.2f}x eager); bf16 max diff vs eager {diff:.1e} "
            f"(eager vs eager {noise:.1e})",
            True,  # bf16 + atomic index_add: exactness is checked in fp32 below
        )
    )
    return rows


if __name__ == "__main__":
    sys.exit(main())
