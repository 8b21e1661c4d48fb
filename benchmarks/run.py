"""Performance benchmark: one command, one markdown table.

    python -m benchmarks.run --quick                  # about 2-3 minutes on 2 CPU cores
    python -m benchmarks.run --full                   # more rounds, a bigger build
    python -m benchmarks.run --reference DIR          # DeepSeek-V3's inference/ directory
                                                      # (or env DSV3_REFERENCE_DIR)
    python -m benchmarks.run --gpu                    # the CUDA section (needs a GPU)
    python -m benchmarks.run --only peers,build       # some sections only
    python -m benchmarks.run --json out.json          # the rows as JSON too
    python -m benchmarks.run --configs e16-top2-d384  # some of the other small MoE configs

What it measures (CPU, float32, same weights and thread count for every peer):
  peers      prefill 2 x 256 tokens and 64 decode steps after a 256-token prefill, dsv3 vs
             transformers (sdpa attention, grouped-matmul experts, its DynamicCache) vs the
             reference inference/model.py; the logits of all three are compared too.
  configs    prefill and decode vs transformers on other small MoE shapes (CONFIGS; pick
             some with --configs NAMES).
  bf16       the benchmark config's prefill and decode in bfloat16 vs transformers in
             bfloat16 (information: the targets are float32's).
  moe        the expert dispatch `auto` chose (measured on first use, dsv3.tuning) and the
             probe's times, vs padded bmm, grouped matmuls and the per-expert loop on the same
             inputs, for a prefill and a decode step; runs of experts vs one padded batch.
  flops      this machine's dense fp32 matmul rate and the achieved FLOP/s of a `small` preset
             prefill of 4 x 512 tokens, as a fraction of it.
  build      peak resident memory and time of a build (fresh interpreter) vs the weight bytes
             and vs filling as many elements with normal_.
  estimates  count_params + estimate of the 671B preset; a meta build + trace_shapes of it in a
             fresh interpreter.
  app        `python app.py` to first page vs a minimal Gradio app; the tiny preset's build +
             forward round trip through gradio_client.
  gpu        (--gpu, CUDA only) the seed demo in bf16 and fp8: build, 2 x 128 prefill (CUDA
             graph, as the app runs it) and decode steps at batch 1-8 vs their bytes floors,
             fp8 vs bf16; prefill and decode tokens/s vs transformers on the same card.

Peers run in one process, interleaved round by round, so that load from elsewhere on a shared
machine hits them alike. Each figure is the best of its rounds (the least disturbed); ratios
divide best by best. CPU decoding interleaves the peers 8 steps at a time and sums each chunk's
best over the rounds (`interleaved_decode`): load comes in bursts shorter than a 64-step run,
and a burst then spoils the chunk it hits, not a whole round. The reference is never copied
into this repository: it is imported from the directory given, with a stub `kernel` module (its
bf16 path calls no kernels).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: sys.path[0] is benchmarks/
    import _script

    _script.run_as_module(__file__)

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dsv3 import ModelArgs, Transformer, count_params, estimate
from dsv3.layers import ONEDNN_FP32, onednn_linear

from .peers import build_hf, build_reference, reference_dir
from .serve import start, stop

ROOT = Path(__file__).resolve().parent.parent

# The peer-comparison config: DeepSeek-V3's shape scaled to hidden 256 (4 layers, the first
# dense; 64 routed experts in 8 groups, 4 kept, top-4, sigmoid routing with the selection bias;
# q/kv LoRA; YaRN since max_seq_len > original_seq_len). Caches of 2 x 512 keep the reference's
# preallocation small.
BENCH = dict(
    vocab_size=8192,
    dim=256,
    inter_dim=1024,
    moe_inter_dim=128,
    n_layers=4,
    n_dense_layers=1,
    n_heads=8,
    n_routed_experts=64,
    n_shared_experts=1,
    n_activated_experts=4,
    n_expert_groups=8,
    n_limited_groups=4,
    score_func="sigmoid",
    route_scale=2.5,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_seq_len=512,
    original_seq_len=256,
    rope_factor=4,
    gate_bias=True,
    max_batch_size=2,
)
PREFILL = (2, 256)
DECODE_STEPS = 64
DECODE_ROUNDS, DECODE_CHUNK = 4, 8  # CPU decode: rounds of chunks of steps (`interleaved_decode`)
# CPU prefills vs a peer: twice the rounds of the rest (12 quick). On an AMD EPYC whose speed
# changed by up to 2x within seconds, best-of-6 gave the benchmark config 1.42-1.90x
# transformers from run to run (ours 35.5-52.2 ms): a slow burst spanned all six rounds.
PREFILL_ROUNDS = 2
DECODE_NOTE = (
    f"each {DECODE_CHUNK} steps' best of {DECODE_ROUNDS} rounds, summed; peers interleaved"
)

# Other small MoE shapes for the `configs` section (--configs NAMES picks some): the speed-ups
# must not hold for BENCH's shape alone.
CONFIGS = {
    # 16 experts in 4 groups (2 kept), top-2, wider model and experts
    "e16-top2-d384": {
        **BENCH,
        **dict(dim=384, moe_inter_dim=192, n_routed_experts=16, n_activated_experts=2),
        **dict(n_expert_groups=4, n_limited_groups=2),
    },
    # DeepSeek-V2-Lite-like routing: softmax scores, no groups or bias, top-6 of 32, two shared
    # experts, no q LoRA, narrower model
    "e32-top6-softmax-d192": {
        **BENCH,
        **dict(dim=192, moe_inter_dim=96, n_routed_experts=32, n_activated_experts=6),
        **dict(n_expert_groups=1, n_limited_groups=1, n_shared_experts=2, q_lora_rank=0),
        **dict(score_func="softmax", gate_bias=False, route_scale=1.0),
    },
    # many small experts: 128 of width 64, top-8 in 8 groups (4 kept), 3 layers
    "e128-top8-i64": {
        **BENCH,
        **dict(n_layers=3, moe_inter_dim=64, n_routed_experts=128, n_activated_experts=8),
    },
    # few wide experts, top-1 (Switch-like) with a shared expert as wide, dim 512: the
    # experts' matmuls dominate, and they are the same MKL products transformers runs
    "e8-top1-d512": {
        **BENCH,
        **dict(dim=512, inter_dim=1024, moe_inter_dim=512, n_routed_experts=8),
        **dict(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1),
    },
}


# ---------------------------------------------------------------------------- table rows
class Rows:
    """Collects result rows: measure, dsv3's figure, the peer and its figure, ratio, target."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, measure, ours, peer="", ratio=None, target="", ok=None, note=""):
        self.rows.append(
            dict(
                measure=measure, ours=ours, peer=peer, ratio=ratio, target=target, ok=ok, note=note
            )
        )
        mark = "" if ok is None else (" PASS" if ok else " FAIL")
        r = "" if ratio is None else f"  ratio {ratio:.2f}"
        print(f"  {measure}: {ours}  {peer}{r}{mark} {note}".rstrip(), flush=True)

    def markdown(self, machine: str) -> str:
        out = [
            f"Machine: {machine}",
            "",
            "| Measure | dsv3 | Peer (same run) | Ratio | Target | Result |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
            result = {None: "", True: "pass", False: "**FAIL**"}[r["ok"]]
            if r["note"]:
                result = f"{result} ({r['note']})" if result else r["note"]
            out.append(
                f"| {r['measure']} | {r['ours']} | {r['peer']} | {ratio} | {r['target']} | {result} |"
            )
        return "\n".join(out)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def best(ts: list[float]) -> float:
    return min(ts)


def interleaved(fns: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, list]:
    """Run every fn once per round, in turn, each round starting one fn later (as the probes
    do, `dsv3.tuning.measure`): in a fixed order the fn after the one that sweeps the caches
    always ran cold and the next one warm (a decode step's expert loop, always run after the
    padded dispatch, timed 0.5 ms where its probe took 0.25-0.31, and `auto` read 0.72-0.86x
    the fastest); a fn that returns a float reports its own elapsed time, any other is timed
    here. One untimed warm-up round first."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns.items())
    for r in range(rounds + 1):
        for name, fn in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            got = fn()
            dt = got if isinstance(got, float) else time.perf_counter() - t0
            if r:
                times[name].append(dt)
    return times


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name (lscpu "Model name", else /proc/cpuinfo, else platform): ratios
    of small-matmul kernels differ between CPUs (dsv3.tuning), so every table names it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    cpu = cpu_model()
    parts = [
        f"{cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}",
    ]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append(f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    parts.append(f"python {platform.python_version()}")
    if hasattr(os, "getloadavg"):  # other work on a shared machine shows up here
        parts.append("load average " + _load())
    return "; ".join(parts)


# ---------------------------------------------------------------------------- peers
def build_ours(args: ModelArgs, device="cpu", dtype="fp32", seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args, device=device, dtype=dtype).eval()


def section_peers(rows: Rows, opts) -> None:
    print("peers: prefill and decode vs transformers and the reference", flush=True)
    args = ModelArgs(**BENCH)
    ours = build_ours(args)
    B, S = PREFILL
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, args.vocab_size, (B, S + DECODE_STEPS), generator=g)
    peers: dict[str, object] = {}
    try:
        peers["transformers"] = build_hf(
            ours, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
        hcfg = peers["transformers"].config
        hf_note = f"attn={hcfg._attn_implementation}, experts={hcfg._experts_implementation}"
    except Exception as e:  # transformers missing or config not expressible
        rows.add("transformers peer", "skipped", note=f"{type(e).__name__}: {e}")
        hf_note = ""
    ref_dir = reference_dir(opts.reference)
    if ref_dir is None:
        rows.add(
            "reference peer",
            "skipped",
            note="no --reference DIR / DSV3_REFERENCE_DIR with inference/model.py",
        )
    else:
        peers["reference"] = build_reference(ours, ref_dir)

    prefill_tok = tok[:, :S]

    def run_prefill(name):
        m = ours if name == "dsv3" else peers[name]
        if name == "dsv3":
            return lambda: m(prefill_tok)
        if name == "transformers":
            return lambda: m(prefill_tok, use_cache=False, logits_to_keep=1).logits[:, -1]
        return lambda: m(prefill_tok)

    with torch.inference_mode():
        outs = {n: run_prefill(n)() for n in ("dsv3", *peers)}
        scale = outs["dsv3"].abs().max().item()
        for n in peers:
            diff = (outs[n] - outs["dsv3"]).abs().max().item()
            rows.add(
                f"logits vs {n}, prefill {B}x{S} (max abs diff)",
                f"{diff:.1e}",
                f"largest logit {scale:.2f}",
                target="< 1e-4",
                ok=diff < 1e-4,
            )
        fns = {n: run_prefill(n) for n in ("dsv3", *peers)}
        # The same forward with every layer on every position (no last-layer pruning): what
        # the kernels alone gain, shown next to the default.
        fns["dsv3 full"] = lambda: ours(prefill_tok, full=True)
        times = interleaved(fns, PREFILL_ROUNDS * opts.rounds)
    targets = {"transformers": 1.5, "reference": 2.0}
    for n in peers:
        ratio = best(times[n]) / best(times["dsv3"])
        rows.add(
            f"prefill {B}x{S}, fp32: speed-up vs {n}",
            ms(best(times["dsv3"])),
            f"{n} {ms(best(times[n]))}",
            ratio,
            f">= {targets[n]}x",
            ratio >= targets[n],
            hf_note if n == "transformers" else "",
        )
        rows.add(
            f"prefill {B}x{S}, fp32, full=True (last layer on every position): vs {n}",
            ms(best(times["dsv3 full"])),
            f"{n} {ms(best(times[n]))}",
            best(times[n]) / best(times["dsv3 full"]),
            note="information: the default prunes the last layer to the last position",
        )

    # Decode: prefill S tokens (untimed), then DECODE_STEPS single-token steps with the cache.
    def decoder(name):
        model = ours if name == "dsv3" else peers[name]
        return Decoder(model, tok, S, hf=name == "transformers")

    with torch.inference_mode():
        # The last step's logits agree too (the caches hold the same numbers).
        last = {}
        ours.reset_cache()
        ours(tok[:, :S])
        for i in range(S, S + 4):
            last["dsv3"] = ours(tok[:, i : i + 1], start_pos=i)
        if "transformers" in peers:
            from transformers import DynamicCache

            m = peers["transformers"]
            cache = DynamicCache(config=m.config)
            m(tok[:, :S], cache=cache, use_cache=True, logits_to_keep=1)
            for i in range(S, S + 4):
                out = m(tok[:, i : i + 1], cache=cache, use_cache=True, logits_to_keep=1)
            last["transformers"] = out.logits[:, -1]
            diff = (last["transformers"] - last["dsv3"]).abs().max().item()
            rows.add(
                "logits vs transformers, 4th decode step (max abs diff)",
                f"{diff:.1e}",
                target="< 1e-4",
                ok=diff < 1e-4,
            )
        times = interleaved_decode({n: decoder(n) for n in ("dsv3", *peers)}, DECODE_ROUNDS)
    for n in peers:
        ratio = times[n] / times["dsv3"]
        per = times["dsv3"] / DECODE_STEPS
        rows.add(
            f"decode {DECODE_STEPS} steps, batch {B}, after {S}-token prefill: speed-up vs {n}",
            f"{ms(times['dsv3'])} ({per * 1e3:.2f} ms/step)",
            f"{n} {ms(times[n])}",
            ratio,
            ">= 1.5x" if n == "transformers" else "",
            ratio >= 1.5 if n == "transformers" else None,
            DECODE_NOTE,
        )
    peers.clear()
    gc.collect()


def _choice_row(rows, kind: str, shape: slice, names: tuple[str, str], label: str) -> None:
    """A row of the classes `fused.prefer` measured for `kind`: which of its kernel (names[0])
    and twin (names[1]) each chose, with their GPU times in us, keyed by key[shape]."""
    from dsv3 import tuning

    named = {"kernel": names[0], "torch": names[1]}
    got = [
        (k[shape], named[c], {named[n]: round(v * 1e6, 1) for n, v in t.items()})
        for k, c, t in tuning.choices(kind)
    ]
    rows.add(
        label,
        f"{names[0]} chosen for {sum(c == names[0] for _, c, _ in got)} of {len(got)}",
        note=str(got)[:500],
    )


def _attend_times() -> tuple[str, str]:
    """(value, note) for the attention-core row: `fused.mla_attend` and its twin timed by GPU
    time at the seed demo's decode shapes (16 heads, C 512, R 64): a static step's 256-key span
    with the keys after position 136 masked at batch 1, 2 and 8, and 129 keys unmasked (an
    eager step) at batch 1."""
    from functools import partial
    from types import SimpleNamespace

    from dsv3 import fused, tuning
    from dsv3.attention import MLA

    if not fused.available(torch.device("cuda"), "mla_attend"):
        return "not run", str(fused.FAILED.get("mla_attend", "Triton missing or DSV3_FUSED=0"))
    me = SimpleNamespace(softmax_scale=576**-0.5)
    times = {}
    for B, T, masked in ((1, 256, True), (2, 256, True), (8, 256, True), (1, 129, False)):
        g = torch.Generator(device="cuda").manual_seed(0)
        qa, qp = (torch.randn(B, 16, n, device="cuda", generator=g).bfloat16() for n in (512, 64))
        lat = torch.randn(B, T, 576, device="cuda", generator=g).bfloat16()
        bias = None
        if masked:
            bias = torch.zeros(T, dtype=torch.bfloat16, device="cuda")
            bias[137:] = float("-inf")
        t = tuning.gpu_measure(
            {
                "kernel": partial(fused.mla_attend, qa, qp, lat, bias, me.softmax_scale),
                "torch": partial(MLA._attend_torch, me, qa, qp, lat, bias, 1),
            }
        )
        times[f"{B}x{T}{' mask' if masked else ''}"] = {n: round(v * 1e6, 1) for n, v in t.items()}
    speed = ", ".join(f"{k}: {t['torch'] / t['kernel']:.2f}x" for k, t in times.items())
    return f"kernel speed-up {speed}", str(times)


def time_decode(model, tok: torch.Tensor, S: int, hf: bool = False) -> float:
    """Prefill tok[:, :S] (untimed), then time one-token steps with the KV cache up to the end
    of `tok`, as one span with one device sync at its end (a GPU queues the steps)."""
    d = Decoder(model, tok, S, hf)
    d.start()
    _sync(tok.device)
    t0 = time.perf_counter()
    for i in range(S, tok.shape[1]):
        d.run(i)
    _sync(tok.device)
    return time.perf_counter() - t0


class Decoder:
    """One model's decoding, a step at a time: `start()` prefills tok[:, :S], `run(i)` runs
    the one-token step at position i, `step(i)` runs it and returns its time (CPU: no device
    sync). dsv3 and DeepSeek's reference take start_pos; transformers (hf) takes its cache."""

    def __init__(self, model, tok: torch.Tensor, S: int, hf: bool = False):
        self.model, self.tok, self.S, self.hf = model, tok, S, hf
        self.kw: dict = {}

    def start(self) -> None:
        if self.hf:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            self.kw = dict(cache=cache, use_cache=True, logits_to_keep=1)
        elif hasattr(self.model, "reset_cache"):
            self.model.reset_cache()
        self.model(self.tok[:, : self.S], **self.kw)

    def run(self, i: int) -> None:
        self.model(self.tok[:, i : i + 1], **(self.kw or {"start_pos": i}))

    def step(self, i: int) -> float:
        t0 = time.perf_counter()
        self.run(i)
        return time.perf_counter() - t0


def interleaved_decode(decoders: dict[str, Decoder], rounds: int) -> dict[str, float]:
    """Decode with every model in turn, DECODE_CHUNK steps at a time, `rounds` times after an
    untimed warm-up round. -> each model's time: the sum over chunks of the chunk's least
    disturbed time. Load from elsewhere on a shared machine comes in bursts shorter than a
    64-step run: a burst spoils the chunk it hits (of both models alike), not a whole round.
    Chunks of consecutive steps, not single steps, keep what one step leaves in the CPU's
    caches for the next, as in a real decode loop."""
    first = next(iter(decoders.values()))  # all decode the same tokens
    steps = range(first.S, first.tok.shape[1])
    chunks = [steps[a : a + DECODE_CHUNK] for a in range(0, len(steps), DECODE_CHUNK)]
    fastest = {n: [float("inf")] * len(chunks) for n in decoders}
    for r in range(rounds + 1):
        for d in decoders.values():
            d.start()
        for j, chunk in enumerate(chunks):
            for n, d in decoders.items():
                dt = sum(d.step(i) for i in chunk)
                if r:
                    fastest[n][j] = min(fastest[n][j], dt)
    return {n: sum(v) for n, v in fastest.items()}


def section_configs(rows: Rows, opts) -> None:
    """Prefill and decode vs transformers on the other small MoE shapes of CONFIGS."""
    print("configs: prefill and decode vs transformers on other small MoE configs", flush=True)
    for name in opts.configs:
        _config_rows(rows, opts, name)
        gc.collect()


def _config_rows(rows: Rows, opts, name: str) -> None:
    args = ModelArgs(**CONFIGS[name])
    label = (
        f"config {name} ({args.n_routed_experts} experts top-{args.n_activated_experts}, "
        f"dim {args.dim}, {args.n_layers} layers)"
    )
    _vs_transformers(rows, opts, args, label)


def section_bf16(rows: Rows, opts) -> None:
    """The benchmark config in bfloat16 on CPU vs transformers in bfloat16: information (issue
    16's CPU targets are float32). bf16 products go through oneDNN, whose ~30 us per call
    dwarfs a decode step's small products; `dsv3.layers.without_onednn` is measured against
    it per shape class."""
    print("bf16: the benchmark config in bfloat16 vs transformers in bfloat16", flush=True)
    _vs_transformers(rows, opts, ModelArgs(**BENCH), "benchmark config, bf16", "bf16", None)


def _vs_transformers(
    rows: Rows,
    opts: argparse.Namespace,
    args: ModelArgs,
    label: str,
    dtype: str = "fp32",
    target: float | None = 1.5,
) -> None:
    """Prefill PREFILL and decode DECODE_STEPS steps, dsv3 vs transformers (sdpa, grouped_mm)
    with the same weights in `dtype`, interleaved; `target` None: no speed target (the rows
    still fail when the logits disagree)."""
    B, S = PREFILL
    ours = build_ours(args, dtype=dtype)
    hf = build_hf(
        ours,
        dtype=ours.compute_dtype,
        attn_implementation="sdpa",
        experts_implementation="grouped_mm",
    )
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, args.vocab_size, (B, S + DECODE_STEPS), generator=g)

    with torch.inference_mode():
        hf_prefill = partial(hf, tok[:, :S], use_cache=False, logits_to_keep=1)
        logits = ours(tok[:, :S]).float()
        diff = (logits - hf_prefill().logits[:, -1].float()).abs().max().item()
        fns = {"dsv3": partial(ours, tok[:, :S]), "hf": hf_prefill}
        pre = interleaved(fns, PREFILL_ROUNDS * opts.rounds)
        decoders = {"dsv3": Decoder(ours, tok, S), "hf": Decoder(hf, tok, S, hf=True)}
        dec = {n: [t] for n, t in interleaved_decode(decoders, DECODE_ROUNDS).items()}
    # float32: the implementations agree to rounding; bf16: each rounds its own way
    tol = 1e-4 if dtype == "fp32" else 0.05 * logits.abs().max().item()
    for what, t, note in (
        (f"prefill {B}x{S}", pre, ""),
        (f"decode {DECODE_STEPS} steps, batch {B}", dec, f"; {DECODE_NOTE}"),
    ):
        ratio = best(t["hf"]) / best(t["dsv3"])
        rows.add(
            f"{label}: {what} vs transformers",
            ms(best(t["dsv3"])),
            f"transformers {ms(best(t['hf']))}",
            ratio,
            f">= {target}x" if target else "",
            (ratio >= target and diff < tol) if target else diff < tol,
            f"logits diff {diff:.1e} (tolerance {tol:.0e}){note}",
        )


# ---------------------------------------------------------------------------- MoE dispatch
def section_moe(rows: Rows, opts) -> None:
    print("moe: the dispatch `auto` measured and chose vs padded / grouped / loop", flush=True)
    from dsv3 import tuning
    from dsv3.moe import (
        FEW_PAIRS,
        default_run,
        dispatch_class,
        dispatch_gathered,
        dispatch_grouped,
        dispatch_loop,
        dispatch_padded,
        grouped_mm_supported,
        measured_impl,
        padded_rows,
    )

    args = ModelArgs(**BENCH)
    model = build_ours(args)
    moe = model.layers[args.n_dense_layers].ffn
    B, S = PREFILL
    # A prefill's tokens and a decode step's (batch B, one token each)
    for T, what in ((B * S, f"prefill {B}x{S}"), (B, f"decode step, batch {B}")):
        with torch.inference_mode():
            x = torch.randn(T, args.dim, generator=torch.Generator().manual_seed(2))
            weights, idx = moe.gate(x)
            K = idx.shape[1]
            order = idx.flatten().argsort(stable=True)
            counts = torch.bincount(idx.flatten(), minlength=args.n_routed_experts).tolist()
            x_ND = x.index_select(0, order // K)
            ex = moe.experts
            w = (ex.w1, ex.w2, ex.w3)
            a = (x_ND, counts, *w)  # partial, not lambdas: this loop rebinds the names
            fns = {"padded": partial(dispatch_padded, *a), "loop": partial(dispatch_loop, *a)}
            if grouped_mm_supported(x_ND, *w):
                fns["grouped"] = partial(dispatch_grouped, *a)
            if len(x_ND) < len(counts):  # as `measured_impl`: decoding may gather
                fns["gathered"] = partial(dispatch_gathered, *a)
            if len(counts) > default_run():  # as `measured_impl`
                fns["padded-one"] = partial(dispatch_padded, *a, run=len(counts))
            want = dispatch_loop(x_ND, counts, *w)
            diff = max((fn() - want).abs().max().item() for fn in fns.values())
            if tuning.measured():
                chosen = measured_impl(x_ND, len(x_ND), counts, *w)
                key = dispatch_class(len(x_ND), len(counts), w[0], x_ND)
                probe = next((t for k, _, t in tuning.choices("moe") if k == key), {})
            else:
                chosen, probe = "rule", {}
            # A decode step's dispatches take 0.2-2.5 ms: 300 rounds (~2 s). With 60, on an
            # AMD EPYC whose speed changes in phases of seconds, the loop and gathered forms
            # (0.22 and 0.28 ms at best over 2,000 rounds) swapped places in 1 run of 3.
            rounds = opts.rounds * 3 if T > len(counts) else opts.rounds * 50
            times = interleaved(fns, rounds)
        t = {k: best(v) for k, v in times.items()}
        title = f"MoE dispatch, {what}: {len(x_ND)} pairs (top-{K}) over {len(counts)} experts"
        fastest = min(t, key=t.__getitem__)
        probed = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in probe.items())
        others = ", ".join(f"{k} {ms(v)}" for k, v in t.items() if k != chosen)
        if chosen in t:
            ratio = t[fastest] / t[chosen]
            rows.add(
                f"{title}: `auto` chose {chosen} (measured on first use) vs the fastest here",
                ms(t[chosen]),
                others,
                ratio,
                ">= 0.9 and agree",
                ratio >= 0.9 and diff < 1e-4,
                f"probe: {probed}; max diff over all paths {diff:.1e}; padded rows "
                f"{padded_rows(counts, default_run()) / len(x_ND):.2f}x the useful ones",
            )
        else:  # DSV3_DISPATCH=rule: no measured choice to show
            rows.add(
                f"{title}: DSV3_DISPATCH=rule, no measured choice",
                others,
                target="agree",
                ok=diff < 1e-4,
                note=f"max diff over all paths {diff:.1e}",
            )
        if "padded-one" in t:
            rows.add(
                f"{title}: padded in runs of {default_run()} experts vs one padded batch",
                ms(t["padded"]),
                f"one batch (padded-one) {ms(t['padded-one'])}",
                t["padded-one"] / t["padded"],
                note=f"one batch pads {padded_rows(counts, len(counts)) / len(x_ND):.2f}x",
            )
        if T * K <= FEW_PAIRS:
            _few_pairs_row(rows, opts, moe.experts, x, weights, idx, counts, what)
        _layout_row(rows, opts, moe.experts, x, weights, idx, counts, what)


def _few_pairs_row(rows: Rows, opts, ex, x, weights, idx, counts, what: str) -> None:
    """The routed experts of a decode step as the model runs them on CPU: the pairs planned on
    the host (`GroupedExperts._few_pairs`, and `_few_pairs_gathered` where it applies) vs
    sorted on the device around the dispatch `auto` picks (`_sorted`), whole (routing weights
    and the per-token sum included)."""
    from dsv3 import tuning

    with torch.inference_mode():
        fns = {
            "pairs": partial(ex._few_pairs, x, weights, idx),
            "sorted": partial(ex._sorted, x, weights, idx, counts, "auto"),
        }
        if ex._gather_ok(counts):
            fns["pairs, gathered"] = partial(ex._few_pairs_gathered, x, weights, idx)
        want = fns["sorted"]()
        diff = max((fn() - want).abs().max().item() for fn in fns.values())
        ex(x, weights, idx, counts)  # the model's own choice, measured on first use
        chosen = next((c for k, c, _ in tuning.choices("moe-pairs")), "rule: pairs")
        times = interleaved(fns, opts.rounds * 10)
    t = {k: best(v) for k, v in times.items()}
    host = min((k for k in t if k != "sorted"), key=t.__getitem__)
    rows.add(
        f"MoE routed experts, {what}: pairs planned on the host ({host}) vs sorted on the "
        f"device (`auto` chose {chosen})",
        ms(t[host]),
        ", ".join(f"{k} {ms(v)}" for k, v in t.items() if k != host),
        t["sorted"] / t[host],
        "agree",
        diff < 1e-5,
        f"max diff {diff:.1e}",
    )


def _layout_row(rows: Rows, opts, ex, x, weights, idx, counts, what: str) -> None:
    """The routed experts as the model runs them (`GroupedExperts.forward`, dispatch `auto`)
    with CPU's in-major stacks vs the reference's row-major ones (`dsv3.moe.expert_layout`, a
    rule: this row checks it on the machine at hand)."""
    import os

    from dsv3.moe import FEW_PAIRS, GroupedExperts, is_in_major

    if not is_in_major(ex.w1):
        why = "not float32 on CPU, or DSV3_EXPERT_LAYOUT=out"
        rows.add(f"MoE experts' layout, {what}", "reference layout here", note=why)
        return
    before = os.environ.get("DSV3_EXPERT_LAYOUT")
    os.environ["DSV3_EXPERT_LAYOUT"] = "out"
    try:
        ref = GroupedExperts(ex.n_experts, ex.dim, ex.inter_dim, ex.w1.dtype, "meta")
        ref.to_empty(device="cpu")
    finally:
        if before is None:
            os.environ.pop("DSV3_EXPERT_LAYOUT")
        else:
            os.environ["DSV3_EXPERT_LAYOUT"] = before
    ref.load_state_dict(ex.state_dict())
    with torch.inference_mode():
        fns = {"in-major": partial(ex, x, weights, idx, counts),
               "reference": partial(ref, x, weights, idx, counts)}  # fmt: skip
        diff = (fns["in-major"]() - fns["reference"]()).abs().max().item()
        times = interleaved(fns, opts.rounds * (3 if len(x) > ex.n_experts else 10))
    t = {k: best(v) for k, v in times.items()}
    ratio = t["reference"] / t["in-major"]
    many = len(x) * idx.shape[1] > FEW_PAIRS  # a prefill: what the layout is for
    rows.add(
        f"MoE routed experts, {what}: in-major stacks (CPU's layout) vs the reference's layout",
        ms(t["in-major"]),
        f"reference layout {ms(t['reference'])}",
        ratio,
        ">= 0.95 and agree" if many else "agree",
        (ratio >= 0.95 if many else True) and diff < 1e-5,
        f"each with the dispatch `auto` measured for its layout; max diff {diff:.1e}"
        + ("" if many else "; a decode step's matrix-vector products read columns: the price"),
    )


# ---------------------------------------------------------------------------- FLOP/s
def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefill_flops(args: ModelArgs, batch: int, seq_len: int) -> float:
    """FLOPs of a full prefill (every layer on every position) with last-position logits."""
    f = estimate(args, "fp32", batch=batch, seq_len=seq_len)["flops_forward"]
    return f - 2 * batch * (seq_len - 1) * args.dim * args.vocab_size


def section_flops(rows: Rows, opts) -> None:
    print("flops: dense matmul peak and a small-preset prefill", flush=True)
    from dsv3 import presets

    n = 4096 if opts.full else 2048
    try:
        args, name = presets.load("small"), "small preset"
    except Exception:  # noqa: BLE001 - presets are another package's; fall back to BENCH
        args, name = ModelArgs(**{**BENCH, "max_batch_size": 4}), "bench config"
    B, S = 4, 512
    args = args.replace(max_batch_size=max(args.max_batch_size, B))
    model = build_ours(args)
    tok = torch.randint(0, args.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    flops = prefill_flops(args, B, S)
    a, b = torch.randn(n, n), torch.randn(n, n)
    b_t = b.t().contiguous()  # oneDNN's linear takes (out, in): a @ b as a linear

    def peak_round(product) -> Callable[[], float]:  # the best of a few: its own elapsed time
        return lambda: min(_timed(product) for _ in range(3))

    # The peak is the faster of torch's BLAS (MKL in x86 wheels) and oneDNN, the two the
    # model's products choose between (`dsv3.layers.linear`): on an AMD EPYC MKL's is lower.
    peaks = {"BLAS": peak_round(lambda: a @ b)}
    if ONEDNN_FP32:
        peaks["oneDNN"] = peak_round(lambda: onednn_linear(a, b_t))
    with torch.inference_mode():
        # full=True: every layer on every position, the work prefill_flops counts (a default
        # forward skips most of the last layer, and would overstate the rate). The peak is
        # measured in the same rounds, so that load from elsewhere on a shared machine hits
        # both alike.
        fns = {**peaks, "fwd": lambda: model(tok, full=True)}
        times = interleaved(fns, max(3, opts.rounds // 2))
    rates = {name: 2 * n**3 / best(times[name]) for name in peaks}
    peak = max(rates.values())
    rows.add(
        f"dense fp32 matmul {n}^3 (machine peak)",
        f"{peak / 1e9:.1f} GFLOP/s",
        note=", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()),
    )
    t = best(times["fwd"])
    frac = flops / t / peak
    rows.add(
        f"prefill {B}x{S}, {name}, fp32: achieved FLOP/s",
        f"{flops / t / 1e9:.1f} GFLOP/s ({flops / 1e9:.0f} GFLOP in {ms(t)})",
        f"peak {peak / 1e9:.1f} GFLOP/s",
        frac,
        ">= 0.50 of peak",
        frac >= 0.5,
    )
    gc.collect()


# ---------------------------------------------------------------------------- build
_BUILD_SCRIPT = """
import gc, json, resource, sys, time
import psutil, torch
from dsv3 import ModelArgs, Transformer
torch.set_num_threads({threads})
args = ModelArgs.from_dict(json.loads({args!r}))
Transformer(args.replace(n_layers=1, n_dense_layers=1, layer_config={{}}, vocab_size=64,
                         dim=64, inter_dim=64), device="cpu", dtype="fp32")  # warm code paths
gc.collect()


def status(key):  # /proc/self/status field in bytes (Linux); None elsewhere
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None


# Reset the peak-RSS mark to the current RSS (Linux clear_refs 5), so that the peak measured
# below is this build's. (getrusage's ru_maxrss would also count the parent process's peak,
# which a child inherits across fork + exec.)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS") or psutil.Process().memory_info().rss
t0 = time.perf_counter()
m = Transformer(args, device="cpu", dtype="fp32")
t_first = time.perf_counter() - t0
peak = status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sd = m.state_dict()
nbytes = sum(t.numel() * t.element_size() for t in sd.values())
numel = sum(t.numel() for t in sd.values())
del m, sd
gc.collect()
build, floor = [t_first], []
for _ in range({rounds}):
    t0 = time.perf_counter(); x = torch.empty(numel).normal_(); floor.append(time.perf_counter() - t0)
    del x
    t0 = time.perf_counter(); m = Transformer(args, device="cpu", dtype="fp32")
    build.append(time.perf_counter() - t0)
    del m; gc.collect()
print(json.dumps(dict(base=base, peak=peak, nbytes=nbytes, numel=numel, build=build, floor=floor)))
"""


def run_script(code: str, timeout: float = 600) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_build(rows: Rows, opts) -> None:
    print("build: memory and time (fresh interpreter)", flush=True)
    from dsv3 import presets

    try:
        args, name = presets.load("small"), "small preset"
    except Exception:  # noqa: BLE001
        args, name = ModelArgs(**BENCH), "bench config"
    if opts.full:
        args, name = args.replace(n_layers=args.n_layers * 3), f"{name} x3 layers"
    code = _BUILD_SCRIPT.format(
        root=str(ROOT),
        threads=torch.get_num_threads(),
        args=json.dumps(args.to_dict()),
        rounds=3 if opts.full else 2,
    )
    r = run_script(code)
    extra = r["peak"] - r["base"]
    ratio = extra / r["nbytes"]
    rows.add(
        f"build {name} fp32 ({r['numel'] / 1e6:.0f}M params): peak RSS above baseline / weights",
        f"{extra / 2**20:.0f} MiB",
        f"weights {r['nbytes'] / 2**20:.0f} MiB",
        ratio,
        "<= 1.15",
        ratio <= 1.15,
    )
    ratio = min(r["build"]) / min(r["floor"])
    rows.add(
        f"build {name} fp32: time vs normal_ over as many elements",
        ms(min(r["build"])),
        f"normal_ {ms(min(r['floor']))}",
        ratio,
        "<= 2.0",
        ratio <= 2.0,
        f"first build {ms(r['build'][0])}",
    )


# ---------------------------------------------------------------------------- estimates
_TRACE_SCRIPT = """
import json, sys, time
import torch
from dsv3 import Transformer, presets
from dsv3.stats import trace_shapes
args = presets.load("deepseek-v3-671b")
t0 = time.perf_counter()
m = Transformer(args, device="meta")
rows = trace_shapes(m, torch.zeros(1, 16, dtype=torch.long, device="meta"))
print(json.dumps(dict(first=time.perf_counter() - t0, rows=len(rows))))
"""


def section_estimates(rows: Rows, opts) -> None:
    print("estimates: 671B counts, estimate, meta trace", flush=True)
    from dsv3 import params, presets

    args = presets.load("deepseek-v3-671b")
    ts = []
    for _ in range(20 if opts.full else 10):
        params._CACHE.clear()  # cold: nothing remembered from the previous round
        t0 = time.perf_counter()
        c = count_params(args)
        estimate(args, "bf16")
        ts.append(time.perf_counter() - t0)
    t = best(ts)
    rows.add(
        "count_params + estimate, 671B preset (cold)",
        ms(t),
        f"median {ms(statistics.median(ts))}",
        target="< 20 ms",
        ok=t < 0.020,
        note=f"{c['total']:,} params",
    )
    r = run_script(_TRACE_SCRIPT.format(root=str(ROOT)))
    rows.add(
        "meta build + trace_shapes (1x16 tokens), 671B preset, fresh interpreter",
        ms(r["first"]),
        target="< 3 s",
        ok=r["first"] < 3.0,
        note=f"{r['rows']} modules traced",
    )


# ---------------------------------------------------------------------------- app
_MINIMAL_APP = """
import os, gradio as gr
with gr.Blocks() as demo:
    gr.Markdown("minimal")
demo.launch(server_name="127.0.0.1", server_port=int(os.environ["GRADIO_SERVER_PORT"]))
"""


def section_app(rows: Rows, opts) -> None:
    print("app: startup and a gradio_client round trip", flush=True)
    if not (ROOT / "app.py").is_file():
        rows.add("app startup", "skipped", note="no app.py")
        return
    app_t, min_t = [], []
    for _ in range(2 if opts.full else 1):
        for cmd, ts in (
            ([sys.executable, "-c", _MINIMAL_APP], min_t),
            ([sys.executable, "app.py"], app_t),
        ):
            proc, t, _ = start(cmd)
            ts.append(t)
            stop(proc)
    ratio = best(app_t) / best(min_t)
    rows.add(
        "`python app.py` to first page vs a minimal Gradio app",
        ms(best(app_t)),
        f"minimal app {ms(best(min_t))}",
        ratio,
        "<= 1.6",
        ratio <= 1.6,
    )
    from gradio_client import Client

    proc, _, url = start([sys.executable, "app.py"])
    try:
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        names = set(api.get("named_endpoints", {}))
        if not {"/build", "/forward", "/preset"} <= names:
            rows.add("app round trip", "skipped", note=f"endpoints: {sorted(names)}")
            return
        cfg = client.predict("tiny", api_name="/preset")[0]
        ts = []
        for i in range(4 if opts.full else 3):
            t0 = time.perf_counter()
            built = client.predict(cfg, "cpu", "fp32", i, api_name="/build")
            ran = client.predict(1, 16, 0, "", 0, api_name="/forward")
            ts.append(time.perf_counter() - t0)
            if not (built[1].get("ok") and ran[1].get("ok")):
                raise RuntimeError(f"build/forward not ok: {built[1]} {ran[1]}")
        client.close()
    finally:
        stop(proc)
    rows.add(
        "tiny preset build + forward (1x16) through gradio_client",
        ms(best(ts)),
        f"median {ms(statistics.median(ts))}",
        target="< 1 s",
        ok=best(ts) < 1.0,
    )


# ---------------------------------------------------------------------------- GPU
def section_gpu(rows: Rows, opts) -> None:
    print("gpu: seed demo bf16 and transformers on the same card", flush=True)
    if not torch.cuda.is_available():
        rows.add("GPU section", "not measured (no GPU)")
        return
    from dsv3 import presets

    demo = presets.load("seed-demo")
    # Peers: the seed demo's shape without its per-layer overrides (which transformers cannot
    # express), 8 layers so that both models fit on the card at once.
    peer = demo.replace(layer_config={}, n_layers=8, max_seq_len=4096)
    gpu_checks(rows, torch.device("cuda"), demo, peer, "seed demo", "seed-demo shape, 8 layers")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_checks(rows, dev, demo: ModelArgs, peer: ModelArgs, demo_name: str, peer_name: str):
    """The GPU measurements on `dev` (a CPU device runs them too, for a dry run)."""

    def timed(fn, n):
        fn()
        _sync(dev)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    # Memory bandwidth: a large copy (read + write), and a pure read (a reduction), which is
    # what a forward does with its weights.
    a = torch.empty(1 << 29 if dev.type == "cuda" else 1 << 24, dtype=torch.bfloat16, device=dev)
    a.fill_(1.0)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 10)
    bw = 2 * a.numel() * a.element_size() / t
    read_bw = a.numel() * a.element_size() / timed(lambda: a.sum(dtype=torch.float32), 10)
    del a, b
    rows.add(f"{dev.type} read bandwidth (reduction)", f"{read_bw / 1e9:.0f} GB/s")
    rows.add(f"{dev.type} copy bandwidth (read + write)", f"{bw / 1e9:.0f} GB/s")

    # The demo in bf16, then fp8: build, 2 x 128 prefill (the app's path: a CUDA graph
    # captured on first use) and decode steps at batch 1-8, each against its bytes floor.
    timings: dict[str, dict] = {}
    for dtype in ("bf16", "fp8"):
        timings[dtype] = demo_rows(rows, dev, demo, demo_name, dtype, read_bw, timed)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for what, t8 in timings["fp8"].items():
        t16 = timings["bf16"].get(what)
        if t16:
            rows.add(
                f"{demo_name} fp8 vs bf16, {what}",
                ms(t8),
                f"bf16 {ms(t16)}",
                t8 / t16,
                "<= 0.8" if dev.type == "cuda" else "",
                ok=t8 / t16 <= 0.8 if dev.type == "cuda" else None,
                note="ratio = fp8 time / bf16 time",
            )
    if dev.type == "cuda":
        from dsv3 import fp8, fused, tuning

        picked = [(k[1:4], c) for k, c, _ in tuning.choices("fp8_linear")]
        rows.add("fp8 Linear paths chosen (rows bucket, N, K)", str(picked)[:300])
        if fp8.REJECTED:
            rows.add("fp8 fast paths rejected", str(fp8.REJECTED)[:300])
        rows.add(
            "fused decode kernels (dsv3.fused)",
            "failed here, torch twins ran" if fused.FAILED else "in use",
            note=str(fused.FAILED)[:300],
        )
        rows.add(
            "absorbed attention core: fused.mla_attend vs its torch twin, by GPU time",
            *_attend_times(),
        )
        _choice_row(
            rows,
            "moe-down",
            slice(1, 7),
            ("split", "whole"),
            "few-token down projection: split by pair vs whole per token, by GPU time",
        )
        _choice_row(
            rows,
            "gemv",
            slice(1, 4),
            ("triton", "cublas"),
            "16-bit Linear, few rows: Triton kernel vs cuBLAS, by GPU time",
        )
        _choice_row(
            rows,
            "rms-norm",
            slice(1, 5),
            ("kernel", "torch"),
            "RMSNorm of a few rows (with the residual add: True): one kernel vs add + "
            "F.rms_norm, by GPU time",
        )
        _choice_row(
            rows,
            "moe-sort",
            slice(1, 6),
            ("kernels", "torch"),
            "MoE pairs outside the fused few-token path (prefill): counting sort + combine "
            "kernels vs argsort + scatter + sum, by GPU time",
        )
        _choice_row(
            rows,
            "moe-triton",
            slice(1, 6),
            ("triton", "grouped_mm"),
            "16-bit routed experts (prefill): grouped Triton kernels (layout, SwiGLU up, down) "
            "vs row gather + three grouped matmuls, by GPU time",
        )
        _choice_row(
            rows,
            "w8-swiglu",
            slice(1, 6),
            ("fused", "separate"),
            "grouped Triton experts' up projection: w1 and w3 in one kernel vs two + silu * up, "
            "by GPU time",
        )
        _choice_row(
            rows,
            "sdpa-unpadded",
            slice(1, 8),
            ("unpadded", "padded"),
            "attention with Dqk != Dv: unpadded vs v padded to Dqk, by GPU time",
        )
        _choice_row(
            rows,
            "mlp-swiglu",
            slice(1, 5),
            ("kernel", "twin"),
            "dense MLP / shared experts' up projection: w1, w3 and silu * up in one Triton "
            "kernel vs two matmuls + silu * up, by GPU time",
        )
    ours = build_ours(peer, device=dev, dtype="bf16")
    try:
        hf = build_hf(
            ours,
            device=dev,
            dtype=torch.bfloat16,
            attn_implementation="sdpa",
            experts_implementation="grouped_mm",
        )
    except Exception as e:  # noqa: BLE001 - transformers missing or config not expressible
        rows.add(f"{dev.type} transformers peer", "skipped", note=f"{type(e).__name__}: {e}")
        return

    B, S, steps = 2, 128, 32
    tok = torch.randint(0, peer.vocab_size, (B, S + steps), device=dev)

    dec_ours = partial(time_decode, ours, tok, S)
    dec_hf = partial(time_decode, hf, tok, S, hf=True)

    with torch.inference_mode():
        a = ours(tok[:, :S]).float()
        b = hf(tok[:, :S], use_cache=False, logits_to_keep=1).logits[:, -1].float()
        diff = (a - b).abs().max().item()
        pre = interleaved(
            {
                "dsv3": lambda: ours(tok[:, :S]),
                "transformers": lambda: hf(tok[:, :S], use_cache=False, logits_to_keep=1),
            },
            5,
        )
        dec = interleaved({"dsv3": dec_ours, "transformers": dec_hf}, 3)
    _sync(dev)
    cfg = hf.config
    note = f"{cfg._attn_implementation}/{cfg._experts_implementation}; bf16 logits diff {diff:.2f}"
    tp, th = best(pre["dsv3"]), best(pre["transformers"])
    rows.add(
        f"{dev.type} bf16 prefill {B}x{S}, {peer_name}: tokens/s vs transformers",
        f"{B * S / tp:,.0f} tok/s",
        f"transformers {B * S / th:,.0f} tok/s",
        th / tp,
        ">= 2" if dev.type == "cuda" else "",
        ok=th / tp >= 2 if dev.type == "cuda" else None,
        note=note,
    )
    td, th = best(dec["dsv3"]), best(dec["transformers"])
    n = ours.graphs.replays
    graphs = ours.graphs.note or (f"{n} graph replays" if n else "eager")
    rows.add(
        f"{dev.type} bf16 decode {steps} steps, batch {B}: tokens/s vs transformers",
        f"{B * steps / td:,.0f} tok/s",
        f"transformers {B * steps / th:,.0f} tok/s",
        th / td,
        ">= 3" if dev.type == "cuda" else "",
        ok=th / td >= 3 if dev.type == "cuda" else None,
        note=graphs,
    )


def step_bytes(model: Transformer, batch: int, end_pos: int) -> float:
    """Bytes a decode step must read: every weight except the routed experts and the embedding,
    the routed experts the step's tokens picked (each MoE's `last_counts`), `batch` embedding
    rows, and the KV cache of end_pos positions."""
    from dsv3.moe import MoE

    total = 0.0
    for name, t in model.state_dict().items():
        if ".experts." in name or name.startswith("embed."):
            continue
        total += t.numel() * t.element_size()
    total += batch * model.args.dim * model.embed.weight.element_size()
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            ex = block.ffn.experts
            per_expert = sum(t[0].numel() * t.element_size() for t in ex.state_dict().values())
            total += int((block.ffn.last_counts > 0).sum()) * per_expert
    for block in model.layers:
        for cache in block.attn.caches:
            for t in cache.tensors.values():
                total += batch * end_pos * t.shape[-1] * t.element_size()
    return total


def _floor_row(rows, measure: str, t: float, floor: float, limit: float, enforce, note: str):
    """A time against its floor, with the target `<= limit` where `enforce`."""
    rows.add(
        measure,
        ms(t),
        f"floor {ms(floor)}",
        t / floor,
        f"<= {limit}" if enforce else "",
        ok=t / floor <= limit if enforce else None,
        note=note,
    )


def demo_rows(rows, dev, demo: ModelArgs, name: str, dtype: str, read_bw: float, timed) -> dict:
    """Build `demo` in `dtype` on dev; its 2 x 128 prefill (graphs, as the app runs it, and
    eager) and decode steps at batch 1, 2, 4, 8 against their bytes floors. -> times by row."""
    _sync(dev)
    t0 = time.perf_counter()
    model = build_ours(demo, device=dev, dtype=dtype)
    _sync(dev)
    t_build = time.perf_counter() - t0
    wbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows.add(
        f"{name} {dtype} build on {dev.type}",
        ms(t_build),
        f"{wbytes / 2**30:.1f} GiB of weights",
        note=f"{count_params(demo)['total'] / 1e9:.2f}B params",
    )
    out: dict[str, float] = {}
    tok = torch.randint(0, demo.vocab_size, (2, 128), device=dev)
    floor = wbytes / read_bw  # every weight read once, at the rate a pure read stream reaches
    with torch.inference_mode():
        model.graphs.enabled = False
        t_eager = timed(lambda: model(tok, full=True), 5)
        model.graphs.enabled = True
        t = timed(lambda: model(tok, full=True), 10)  # the first call captures, the rest replay
    graphs = model.graphs.note or "CUDA graph" if dev.type == "cuda" else "eager"
    enforce = dev.type == "cuda" and dtype == "bf16"  # the targets are for bf16 on a GPU
    measure = f"{name} {dtype} prefill 2x128 ({graphs}) vs weight-bytes / bandwidth floor"
    _floor_row(rows, measure, t, floor, 1.6, enforce, f"eager {ms(t_eager)}")
    out["prefill 2x128"] = t
    S, steps = 128, 16
    for B in (1, 2, 4, 8):
        tok = torch.randint(0, demo.vocab_size, (B, S + steps), device=dev)
        with torch.inference_mode():
            time_decode(model, tok, S)  # captures
            t_step = min(time_decode(model, tok, S) for _ in range(3)) / steps
            fl = step_bytes(model, B, S + steps) / read_bw
        n = model.graphs.replays
        graphs = model.graphs.note or (f"{n} graph replays" if n else "eager")
        measure = f"{name} {dtype} decode step, batch {B} (at position ~{S + steps // 2})"
        _floor_row(rows, measure, t_step, fl, 2.5, enforce, f"{B / t_step:,.0f} tok/s; {graphs}")
        out[f"decode step, batch {B}"] = t_step
    model.free_cache()
    return out


def choice_rows(rows: Rows) -> None:
    """What the measured kernel choices (dsv3.tuning) picked in this run, per kind."""
    from collections import Counter

    from dsv3 import tuning

    made = tuning.choices()
    if not made:
        return
    kinds: dict[str, Counter] = {}
    for key, chosen, _ in made:
        kinds.setdefault(key[0], Counter())[chosen] += 1
    summary = "; ".join(
        f"{kind}: " + ", ".join(f"{c} x{n}" for c, n in cnt.most_common())
        for kind, cnt in kinds.items()
    )
    rows.add(
        "kernel choices measured on first use this run (dsv3.tuning; DSV3_DISPATCH=rule skips)",
        f"{len(made)} shape classes",
        note=summary,
    )


# ---------------------------------------------------------------------------- main
SECTIONS = {
    "peers": section_peers,
    "configs": section_configs,
    "bf16": section_bf16,
    "moe": section_moe,
    "flops": section_flops,
    "build": section_build,
    "estimates": section_estimates,
    "app": section_app,
    "gpu": section_gpu,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer rounds (default)")
    mode.add_argument("--full", action="store_true", help="more rounds, a bigger build")
    p.add_argument("--reference", help="DeepSeek-V3 inference/ directory (or its repo root)")
    p.add_argument("--gpu", action="store_true", help="also run the CUDA section")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument(
        "--configs",
        help="comma-separated configs for the configs section (default all): " + ",".join(CONFIGS),
    )
    opts = p.parse_args(argv)
    opts.rounds = 12 if opts.full else 6
    opts.configs = opts.configs.split(",") if opts.configs else list(CONFIGS)
    if set(opts.configs) - set(CONFIGS):
        p.error(f"unknown config(s) {sorted(set(opts.configs) - set(CONFIGS))}: {list(CONFIGS)}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.set_default_dtype(torch.float32)
    names = opts.only.split(",") if opts.only else [n for n in SECTIONS if n != "gpu"]
    if opts.gpu and "gpu" not in names:
        names.append("gpu")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    rows = Rows()
    machine = machine_line()
    print(f"machine: {machine}", flush=True)
    t0 = time.perf_counter()
    for name in names:
        try:
            SECTIONS[name](rows, opts)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            rows.add(f"{name} section", "error", note=f"{type(e).__name__}: {e}"[:300])
    choice_rows(rows)
    if "gpu" not in names:
        rows.add(
            "GPU section",
            "not measured (no GPU)" if not torch.cuda.is_available() else "not run (pass --gpu)",
        )
    print()
    print(rows.markdown(machine))
    load = f" load average at the end {_load()};" if hasattr(os, "getloadavg") else ""
    print(f"\n({time.perf_counter() - t0:.0f} s;{load} figures are best of interleaved rounds)")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"machine": machine, "rows": rows.rows}, indent=1))
    return 0 if all(r["ok"] is not False for r in rows.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
