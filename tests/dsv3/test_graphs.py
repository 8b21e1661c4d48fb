"""The CPU-checkable parts of the CUDA-graph and fp8 GPU paths (dsv3/graphs.py, dsv3/fp8.py):
the graph-captured decode step computes what an eager decode step computes, the expert layout
of the grouped kernel, the cache bookkeeping graphs rely on, and what the CLI and the app say
about how a forward ran. The GPU itself is checked by benchmarks/gpu_check.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dsv3 import ConfigError, ModelArgs, Transformer
from dsv3.fp8 import moe_layout
from dsv3.graphs import MIN_SPAN, _step, span_for

ARGS = ModelArgs(
    vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=3, n_dense_layers=1,
    n_heads=4, n_routed_experts=8, n_activated_experts=2, q_lora_rank=64, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=1024,
    original_seq_len=128, rope_factor=4.0, layer_config={2: {"n_heads": 8}},
)  # fmt: skip


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_static_step_matches_eager_decode(attn_impl):
    """The step a decode graph captures (device position, a span of keys with the later ones
    masked, the new key written by index_copy_) gives the eager step's logits, across YaRN
    positions and with leftovers of another sequence in the masked part of the cache."""
    args = ARGS.replace(attn_impl=attn_impl)
    torch.manual_seed(0)
    m = Transformer(args, dtype="fp32")
    tok = torch.randint(0, args.vocab_size, (2, 40))
    m(tok[:, :30])
    ref = [m(tok[:, p : p + 1], start_pos=p) for p in range(30, 40)]
    m.reset_cache()
    m.reserve_cache(2, MIN_SPAN)
    m(torch.randint(0, args.vocab_size, (2, 200)))  # leftovers past position 30
    m(tok[:, :30])
    with torch.inference_mode():
        for i, p in enumerate(range(30, 40)):
            inputs = {"tokens": tok[:, p : p + 1], "pos": torch.tensor([p])}
            got = _step(m, inputs, span_for(p + 1, args.max_seq_len))
            torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5)


def test_span_buckets():
    assert span_for(1, 4096) == MIN_SPAN
    assert span_for(256, 4096) == 256
    assert span_for(257, 4096) == 512
    assert span_for(3000, 4096) == 4096
    assert span_for(900, 1000) == 1000  # never past max_seq_len


@pytest.mark.parametrize("BM", [16, 32])
def test_moe_layout_places_every_pair_in_its_experts_blocks(BM):
    g = torch.Generator().manual_seed(0)
    E, T, K = 12, 37, 3
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[:, 0] = 5  # one busy expert spanning several blocks; some experts get nothing
    order = idx.flatten().argsort(stable=True)
    expert_N = idx.flatten()[order]
    counts = torch.bincount(idx.flatten(), minlength=E)
    N = T * K
    slot_P, block_e = moe_layout(counts, N, BM)
    assert slot_P.numel() % BM == 0 and slot_P.numel() >= N + E * (BM - 1)
    assert block_e.numel() == slot_P.numel() // BM
    real = slot_P < N
    assert sorted(slot_P[real].tolist()) == list(range(N))  # every pair exactly once
    for p in torch.nonzero(real).flatten().tolist():
        assert block_e[p // BM].item() == expert_N[slot_P[p]].item()
    used = {e for e in block_e.tolist() if e >= 0}
    assert used == set(torch.nonzero(counts).flatten().tolist())  # idle experts: no block
    assert (slot_P[block_e.repeat_interleave(BM) < 0] == N).all()  # blocks past the end: empty


def test_graphs_off_the_gpu_say_why_and_forward_runs_eagerly():
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    assert m.graphs.reason() == "CUDA graphs need a CUDA model"
    assert not m.graphs.usable()
    tok = torch.randint(0, ARGS.vocab_size, (1, 8))
    m(tok)
    m(tok[:, :1], start_pos=8)
    assert m.graphs.replays == 0 and m.graphs.captures == 0


def test_reset_cache_frees_without_graphs_and_versions_change():
    """Without graphs reset_cache frees the cache; every reallocation gives the cache a new
    version (what graphs check before a replay)."""
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    cache = m.layers[0].attn.cache
    v0 = cache.version
    m(torch.randint(0, ARGS.vocab_size, (1, 8)))
    v1 = cache.version
    assert v1 != v0 and m.cache_bytes() > 0
    m(torch.randint(0, ARGS.vocab_size, (1, 4)))  # fits: same buffers
    assert cache.version == v1
    m.reset_cache()
    assert m.cache_bytes() == 0 and cache.version != v1
    m(torch.randint(0, ARGS.vocab_size, (1, 8)))
    m.free_cache()
    assert m.cache_bytes() == 0


def test_gate_float32_weight_follows_a_load():
    """A bf16 router keeps a float32 copy of its weight; loading new weights updates it."""
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="bf16")
    tok = torch.randint(0, ARGS.vocab_size, (1, 16))
    m(tok)
    gate = m.layers[1].ffn.gate
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["layers.1.ffn.gate.weight"] = -sd["layers.1.ffn.gate.weight"]
    m.load_state_dict(sd)
    torch.testing.assert_close(gate._weight32(), gate.weight.float())


def test_fp8_dense_weight_follows_a_load():
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp8")
    lin = m.layers[0].attn.wkv_b
    first = lin.dense_weight(torch.bfloat16).clone()
    sd = dict(m.state_dict())
    sd["layers.0.attn.wkv_b.scale"] = sd["layers.0.attn.wkv_b.scale"] * 2
    m.load_state_dict(sd)
    torch.testing.assert_close(lin.dense_weight(torch.bfloat16).float(), 2 * first.float())


def test_cli_decodes_and_says_how():
    out = subprocess.run(
        [sys.executable, "-m", "dsv3", "--config", "tiny", "--device", "cpu", "--seq", "8",
         "--decode", "4"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "decode 4 steps x batch 2" in out and "(eager)" in out
    assert "row 0: [" in out


def test_app_run_says_how_the_forward_ran():
    from ui import runtime
    from ui.tabs.run import run_markdown

    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    tok = torch.randint(0, ARGS.vocab_size, (1, 8))
    runtime.run(m, tok, decode_steps=2)  # first use: kernel choices measured (below)
    r = runtime.run(m, tok, decode_steps=2)
    assert r["prefill_how"] == "eager" and r["decode_how"] == "eager"
    text = run_markdown(r)
    assert "tokens/s** (eager)" in text


def test_a_first_run_says_its_time_includes_kernel_measurements(monkeypatch):
    """A CPU run's first use of a shape measures kernel choices (`dsv3.tuning`; the small
    preset's first prefill took 6.7x the next one's): the run says so, and the next does not."""
    from dsv3 import tuning
    from ui import runtime
    from ui.tabs.run import run_markdown

    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    tuning.clear()
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    tok = torch.randint(0, ARGS.vocab_size, (2, 8))
    first, again = (runtime.run(m, tok, decode_steps=2) for _ in range(2))
    n = len(tuning.choices())
    assert n > 0
    note = "the time includes measuring"
    assert note in first["prefill_how"] and note in first["decode_how"]
    assert note in run_markdown(first) and "on first use" in run_markdown(first)
    assert again["prefill_how"] == again["decode_how"] == "eager"
    assert len(tuning.choices()) == n


def test_triton_experts_off_a_gpu_say_so():
    m = Transformer(ARGS, dtype="fp32", moe_impl="triton")
    with pytest.raises(ValueError, match="moe_impl='triton' needs a CUDA GPU"):
        m(torch.randint(0, ARGS.vocab_size, (1, 8)))


class _ReplayOnCPU:
    """Stands in for a captured CUDA graph on the CPU. A replay writes into the tensors the
    capture made (the output, and the router's `last_*` tensors it left on modules) and
    changes no module attribute, as a graph replay does: it runs the captured function again,
    copies the results into those tensors and puts the attributes back as they were."""

    def __init__(self, graphs, fn, inputs, out):
        self.fn, self.inputs, self.out = fn, inputs, out
        self.marks = [(mod, name, value) for mod, name, value in graphs._marks()]

    def replay(self):
        before = [(mod, name, mod.__dict__.get(name)) for mod, name, _ in self.marks]
        self.out.copy_(self.fn(self.inputs))
        for mod, name, static in self.marks:
            static.copy_(getattr(mod, name))
        for mod, name, value in before:
            mod.__dict__[name] = value


def _simulated_graphs(m: Transformer) -> None:
    """Route `m`'s forwards through dsv3.graphs' bookkeeping with CPU stand-ins for capture."""

    def record(fn, inputs):
        out = fn(inputs)
        return _ReplayOnCPU(m.graphs, fn, inputs, out), out

    m.graphs.usable = lambda: True
    m.graphs._record = record


def test_graph_bookkeeping_replays_what_eager_computes():
    """Through forward, as the app runs it: graphs per (batch, span) and per prefill shape are
    captured once and replayed after; a second run captures nothing; passing a span (positions
    255 -> 256) grows the static cache and drops the graphs of the old buffers; the router's
    instrumentation after a replay is the replayed forward's; the logits equal eager ones."""
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    tok = torch.randint(0, ARGS.vocab_size, (2, 260))

    def run(model, prefill=250, steps=10):
        model.reset_cache()
        outs = [model(tok[:, :prefill], full=True)]
        counts = model.layers[1].ffn.last_counts.clone()
        outs += [model(tok[:, p : p + 1], start_pos=p) for p in range(prefill, prefill + steps)]
        return outs, counts

    want, want_counts = run(m)
    _simulated_graphs(m)
    got, got_counts = run(m)
    g = m.graphs
    assert g.captures == 3  # the prefill, decode at span 256, decode at span 512 (from 256)
    assert g.replays == 11 and g.note is None
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_counts, want_counts, rtol=0, atol=0)
    capacity = m.layers[0].attn.cache.capacity
    run(m)  # the graphs captured before the cache grew are captured again, on the new buffers
    assert g.captures == 5
    got3, counts3 = run(m)  # and from then on the static cache stays and nothing is captured
    assert g.captures == 5 and m.layers[0].attn.cache.capacity == capacity
    torch.testing.assert_close(got3[-1], want[-1], rtol=1e-5, atol=1e-5)
    # the prefill's replay put its routing back on the modules (decode graphs had replaced it)
    torch.testing.assert_close(counts3, want_counts, rtol=0, atol=0)
    # an eager forward (too many tokens for a graph) that reallocates the cache: graphs on the
    # old buffers are never replayed, they are captured again
    m(torch.randint(0, ARGS.vocab_size, (5, 900)))
    got4, _ = run(m)
    assert g.captures == 8
    torch.testing.assert_close(got4[-1], want[-1], rtol=1e-5, atol=1e-5)
    m.free_cache()
    assert not g.entries and m.cache_bytes() == 0


def test_a_model_built_under_inference_mode_runs():
    """Kept float32 / dequantised weights of inference tensors (no version counter)."""
    with torch.inference_mode():
        m = Transformer(ARGS, dtype="bf16")
        out = m(torch.randint(0, ARGS.vocab_size, (1, 8)))
    assert out.isfinite().all()


def test_app_run_says_when_fused_kernels_did_not_run(monkeypatch):
    """A GPU where a fused kernel failed runs its torch twin; the Run line says so."""
    from dsv3 import fused
    from ui import runtime

    monkeypatch.setattr(fused, "FAILED", {"route": "CompilationError: ..."})
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    tok = torch.randint(0, ARGS.vocab_size, (1, 8))
    runtime.run(m, tok, decode_steps=2)  # first use: kernel choices measured
    r = runtime.run(m, tok, decode_steps=2)
    assert r["decode_how"] == "eager; fused kernels not used here: route"


def test_graph_decode_checks_ids_after_the_replay_and_a_retry_continues():
    """A graph decode step reads its ids' range back after the replay is queued (so the GPU is
    not left idle while the host prepares the call): a bad id still fails with the field and
    the allowed range, the replay ran on ids clamped into the vocabulary (no out-of-range read),
    the positions before the failed step stay valid, and a retry at the same position gives the
    eager logits; the failed position is no longer counted as held."""
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    tok = torch.randint(0, ARGS.vocab_size, (2, 40))
    m(tok[:, :30])
    want = [m(tok[:, p : p + 1], start_pos=p) for p in range(30, 33)]
    _simulated_graphs(m)
    m.reset_cache()
    m(tok[:, :30])
    got = [m(tok[:, 30:31], start_pos=30)]
    bad = tok[:, 31:32].clone()
    bad[1, 0] = ARGS.vocab_size + 7
    n = m.graphs.replays
    with pytest.raises(ConfigError, match=r"token id 519 .*allowed: 0\.\.511") as err:
        m(bad, start_pos=31)
    assert err.value.field == "tokens"
    assert m.graphs.replays == n + 1  # the failed step was replayed, on clamped ids
    with pytest.raises(ConfigError, match="cache holds batch 2 x 31"):
        m(tok[:, 32:33], start_pos=32)  # position 31 holds the clamped ids: not counted
    got += [m(tok[:, p : p + 1], start_pos=p) for p in (31, 32)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"token id -1 "):
        m(torch.full((2, 1), -1), start_pos=33)


@pytest.mark.parametrize("start_pos", ["3", 2.0, True, -1])
def test_graph_path_names_a_bad_start_pos(start_pos):
    """The graph path decides on deferring the ids' check from start_pos: a bad one is still a
    ConfigError naming the field, not a TypeError from comparing it."""
    m = Transformer(ARGS, dtype="fp32")
    _simulated_graphs(m)
    with pytest.raises(ConfigError, match="start_pos") as err:
        m(torch.zeros(1, 1, dtype=torch.long), start_pos=start_pos)
    assert err.value.field == "start_pos"


def test_a_bad_id_with_no_replay_keeps_every_held_position(monkeypatch):
    """Where no graph replayed (its capture failed: eager), a bad id wrote nothing, so the
    positions held before stay held."""
    torch.manual_seed(0)
    m = Transformer(ARGS, dtype="fp32")
    _simulated_graphs(m)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # after a failed capture

    def fail(fn, inputs):
        raise RuntimeError("no capture here")

    m.graphs._record = fail
    tok = torch.randint(0, ARGS.vocab_size, (2, 12))
    m(tok[:, :10])
    m(tok[:, 10:11], start_pos=10)
    assert m.graphs.failed == {"prefill", "decode"}
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        m(torch.full((2, 1), ARGS.vocab_size), start_pos=5)
    m(tok[:, 11:12], start_pos=11)  # positions 0..10 are still held
