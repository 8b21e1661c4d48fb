"""Where a decode step and a small prefill spend their GPU time (run on a CUDA machine).

    python -m benchmarks.gpu_profile [--layers N] [--compile]

For the seed demo's shape (N layers, default 8) in bf16 and fp8: kernels per decode step and per
2 x 128 prefill, their summed GPU time, the top kernels, and the time of one graph replay (CUDA
events) against a whole `model(...)` call (host work included). With --compile, the same step
with `torch.compile`d blocks inside the graph. Prints plain text; nothing is asserted.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: sys.path[0] is benchmarks/
    import _script

    _script.run_as_module(__file__)

import argparse
import sys
import time
from collections import defaultdict

import torch

from dsv3 import Transformer, presets


def kernels(fn, label: str, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg: dict[str, list] = defaultdict(lambda: [0, 0.0])
    n, total = 0, 0.0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.device_time
        agg[e.name][0] += 1
        agg[e.name][1] += us
        n += 1
        total += us
    print(f"{label}: {n} kernels, {total / 1e3:.2f} ms of kernel time")
    for name, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {us / 1e3:7.3f} ms  x{c:4d}  {name[:110]}")


def events_time(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n / 1e3


def host_time(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    ns = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device; nothing measured.")
        return 0
    args = presets.load("seed-demo").replace(n_layers=ns.layers, layer_config={})
    for dtype in ns.dtypes.split(","):
        torch.manual_seed(0)
        m = Transformer(args, device="cuda", dtype=dtype)
        print(f"== seed-demo shape, {ns.layers} layers, {dtype}")
        profile_model(m, args, ns, dtype)
        m = None
        torch.cuda.empty_cache()
    return 0


def profile_model(m: Transformer, args, ns, dtype: str) -> None:
    with torch.inference_mode():
        for B in (1, 4):
            tok = torch.randint(0, args.vocab_size, (B, 129), device="cuda")
            last = tok[:, 128:]
            m.reset_cache()
            m(tok[:, :128])
            m.graphs.enabled = False
            kernels(lambda last=last: m(last, start_pos=128), f"decode step B={B}, eager", ns.top)
            eager = host_time(lambda last=last: m(last, start_pos=128))
            m.graphs.enabled = True
            m(tok[:, 128:], start_pos=128)  # capture
            entry = next(e for k, e in m.graphs.entries.items() if k[0] == "decode")
            rep = events_time(entry.graph.replay)
            call = host_time(lambda last=last: m(last, start_pos=128))
            print(
                f"  decode B={B}: eager call {eager * 1e3:.2f} ms, graph replay "
                f"{rep * 1e3:.2f} ms, model() with graphs {call * 1e3:.2f} ms "
                f"(per layer replay {rep / ns.layers * 1e6:.0f} us)"
            )
        tok = torch.randint(0, args.vocab_size, (2, 128), device="cuda")
        m.graphs.enabled = False
        kernels(lambda: m(tok, full=True), "prefill 2x128, eager", ns.top)
        m.graphs.enabled = True
        m(tok, full=True)
        entry = next(e for k, e in m.graphs.entries.items() if k[0] == "prefill")
        print(f"  prefill 2x128 graph replay {events_time(entry.graph.replay) * 1e3:.2f} ms")
        if ns.compile:
            compiled(m, args)
    if dtype == "fp8":
        from dsv3 import fp8, tuning

        for k, c, ts in tuning.choices("fp8_linear"):
            print("  fp8 linear", k[1:4], c, {n: f"{t * 1e6:.0f} us" for n, t in ts.items()})
        print("  rejected:", fp8.REJECTED)


def compiled(m: Transformer, args) -> None:
    """The decode step with each block compiled (inductor fuses the small ops), in a graph."""
    from dsv3 import graphs

    try:
        t0 = time.perf_counter()
        for b in m.layers:
            b.forward = torch.compile(b.forward, dynamic=False)
        m.graphs.clear()
        m.graphs.failed.clear()
        tok = torch.randint(0, args.vocab_size, (1, 129), device="cuda")
        m.reset_cache()
        m(tok[:, :128])
        inputs = {"tokens": tok[:, 128:].clone(), "pos": torch.tensor([128], device="cuda")}
        graphs._step(m, inputs, 256)
        torch.cuda.synchronize()
        print(f"  compile: {time.perf_counter() - t0:.1f} s")
        m(tok[:, 128:], start_pos=128)
        entry = next(e for k, e in m.graphs.entries.items() if k[0] == "decode")
        rep = events_time(entry.graph.replay)
        print(f"  decode B=1 compiled blocks, graph replay {rep * 1e3:.2f} ms ({m.graphs.note})")
    except Exception as e:  # noqa: BLE001
        print(f"  compile failed: {type(e).__name__}: {str(e)[:400]}")


if __name__ == "__main__":
    sys.exit(main())
