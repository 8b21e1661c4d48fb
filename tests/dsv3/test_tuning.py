"""Measured kernel choices (dsv3.tuning): cached once per class, thread-safe, skippable, and the
choice never changes the numbers."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelArgs, Transformer, tuning
from dsv3.layers import ONEDNN_FP32, linear
from dsv3.moe import (
    dispatch,
    dispatch_class,
    dispatch_gathered,
    dispatch_loop,
    measured_impl,
)
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def fresh_choices():
    tuning.clear()
    yield
    tuning.clear()


def test_choose_measures_once_and_caches():
    calls = {"a": 0, "b": 0}

    def cand(name):
        def run():
            calls[name] += 1

        return run

    assert tuning.choose(("t", 1), {"a": cand("a"), "b": cand("b")}) in ("a", "b")
    first = dict(calls)
    assert first["a"] >= 2 and first["b"] >= 2  # a warm-up and at least one timed round
    tuning.choose(("t", 1), {"a": cand("a"), "b": cand("b")})
    assert calls == first  # cached: nothing runs again
    ((key, chosen, times),) = tuning.choices("t")
    assert key == ("t", 1) and set(times) == {"a", "b"} and chosen == tuning.pick(times)


def test_choose_picks_the_faster_candidate():
    import time

    got = tuning.choose(("t", 2), {"slow": lambda: time.sleep(0.002), "fast": lambda: None})
    assert got == "fast"


def test_choose_is_thread_safe_one_probe_per_key():
    runs = []
    lock = threading.Lock()

    def cand():
        with lock:
            runs.append(1)

    threads = [
        threading.Thread(target=tuning.choose, args=(("t", 3), {"a": cand, "b": cand}))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tuning.choices("t")) == 1
    n = len(runs)
    tuning.choose(("t", 3), {"a": cand, "b": cand})
    assert len(runs) == n
    assert n <= 2 * (1 + tuning.PROBE_ROUNDS)  # one probe, not eight


def test_a_probe_times_at_least_min_rounds_whatever_the_budget():
    """One timed round of candidates that each outlast the budget is one noisy sample apiece:
    a probe of 5-6 ms expert dispatches picked one 0.87x as fast as the best that way."""
    calls = {"a": 0, "b": 0}

    def slow(name):
        def run():
            calls[name] += 1
            time.sleep(0.002)

        return run

    tuning.measure({"a": slow("a"), "b": slow("b")}, budget_s=0.0)
    assert calls == {"a": 1 + tuning.PROBE_MIN_ROUNDS, "b": 1 + tuning.PROBE_MIN_ROUNDS}
    calls.update(a=0, b=0)
    tuning.measure({"a": slow("a"), "b": slow("b")}, budget_s=10.0)
    assert calls == {"a": 1 + tuning.PROBE_ROUNDS, "b": 1 + tuning.PROBE_ROUNDS}


def test_past_the_first_rounds_only_contenders_run():
    """A candidate several times slower than the fastest stops after the first rounds, so the
    close ones get the rounds (and the budget) that tell them apart."""
    calls = {"a": 0, "b": 0, "slow": 0}

    def cand(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)

        return run

    fns = {"a": cand("a", 0.001), "b": cand("b", 0.0012), "slow": cand("slow", 0.02)}
    tuning.measure(fns, budget_s=10.0)
    assert calls["slow"] == 1 + tuning.PROBE_MIN_ROUNDS
    assert calls["a"] == calls["b"] == 1 + tuning.PROBE_ROUNDS


def test_mode_from_environment(monkeypatch):
    monkeypatch.delenv("DSV3_DISPATCH", raising=False)
    assert tuning.mode() == "measured"
    monkeypatch.setenv("DSV3_DISPATCH", "rule")
    assert tuning.mode() == "rule" and not tuning.measured()
    monkeypatch.setenv("DSV3_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="DSV3_DISPATCH"):
        tuning.mode()


@pytest.mark.parametrize("n_pairs", [3, 12, 200, 2000])
@pytest.mark.parametrize("mode", ["measured", "rule"])
def test_auto_dispatch_measured_or_rule_equals_loop(monkeypatch, n_pairs, mode):
    monkeypatch.setenv("DSV3_DISPATCH", mode)
    torch.manual_seed(0)
    E, D, I = 16, 32, 16
    counts = torch.bincount(torch.randint(0, E, (n_pairs,)), minlength=E).tolist()
    x = torch.randn(n_pairs, D)
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    want = dispatch_loop(x, counts, w1, w2, w3)
    torch.testing.assert_close(dispatch(x, counts, w1, w2, w3), want, rtol=1e-5, atol=1e-4)
    moe = tuning.choices("moe")
    assert len(moe) == (mode == "measured")
    if moe:
        key, chosen, times = moe[0]
        assert key == dispatch_class(n_pairs, E, w1, x) and chosen in times
        assert {"loop", "padded"} <= set(times)
        assert ("gathered" in times) == (n_pairs < E)


@pytest.mark.parametrize("n_pairs", [1, 3, 8, 12, 40])
def test_gathered_dispatch_equals_loop(n_pairs):
    torch.manual_seed(1)
    E, D, I = 16, 32, 8
    counts = torch.bincount(torch.randint(0, E, (n_pairs,)), minlength=E).tolist()
    x = torch.randn(n_pairs, D) * 0.1
    w1, w2, w3 = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(E, I, D)
    want = dispatch_loop(x, counts, w1, w2, w3)
    torch.testing.assert_close(dispatch_gathered(x, counts, w1, w2, w3), want)
    torch.testing.assert_close(dispatch(x, counts, w1, w2, w3, "gathered"), want)
    assert dispatch_gathered(x[:0], [0] * E, w1, w2, w3).shape == (0, D)


def test_probe_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    E, D, I = 8, 16, 8
    w1, w2, x = torch.randn(E, I, D), torch.randn(E, D, I), torch.randn(40, D)
    state = torch.get_rng_state()
    assert measured_impl(x, 40, [5] * E, w1, w2, w1) in ("loop", "padded", "grouped")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 33])
def test_measured_linear_equals_f_linear(monkeypatch, rows):
    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 1, 48), torch.randn(80, 48), torch.randn(80)
    got = linear(x, w, b)
    assert got.shape == (rows, 1, 80) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    kinds = {k[0] for k, _, _ in tuning.choices()}
    measured_rows = rows > 1 if ONEDNN_FP32 else 1 < rows <= 32  # oneDNN: any 2+ rows
    assert kinds == ({"linear"} if measured_rows else set())


@pytest.mark.skipif(not ONEDNN_FP32, reason="this torch has no oneDNN float32 linear")
@pytest.mark.parametrize(
    "rows, form",
    [(r, f) for r in (2, 8, 33, 300) for f in ("linear", "skinny", "oneDNN") if r <= 32 or
     f != "skinny"],
)  # fmt: skip
def test_every_float32_linear_form_agrees(monkeypatch, rows, form):
    """float32 products of 2+ rows measure oneDNN against F.linear (MKL), decode-sized ones
    also (W x^T)^T: whichever a probe on some CPU caches, the numbers are F.linear's up to
    summation order, strided inputs and a bias included."""
    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 2 * 96)[..., ::2]  # a strided view, as attention's slices are
    w, b = torch.randn(80, 96), torch.randn(80)
    linear(x, w, b)  # the probe
    ((key, _, times),) = tuning.choices()
    assert set(times) == {"linear", "oneDNN"} | ({"skinny"} if rows <= 32 else set())
    tuning._CHOICES[key] = form
    got = linear(x, w, b)
    assert got.shape == (rows, 1, 80)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not ONEDNN_FP32, reason="this torch has no oneDNN float32 linear")
def test_onednn_form_keeps_gradients(monkeypatch):
    """oneDNN's op has no backward: an input that needs a gradient takes F.linear even where
    the cached form is oneDNN's, so the gradient is there and right."""
    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    torch.manual_seed(0)
    w = torch.randn(80, 96)
    linear(torch.randn(64, 96), w)
    ((key, _, _),) = tuning.choices()
    tuning._CHOICES[key] = "oneDNN"
    x = torch.randn(64, 96, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(64, 96))
    b = torch.zeros(80, requires_grad=True)  # only the bias needs one
    linear(torch.randn(64, 96), w, b).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((80,), 64.0))


@pytest.mark.parametrize(
    "rows, form",
    [(r, f) for r in (1, 2, 8) for f in ("linear", "skinny", "linear, no oneDNN") if r > 1 or
     f != "skinny"] + [(33, "linear")],
)  # fmt: skip
def test_every_16_bit_linear_form_agrees(monkeypatch, rows, form):
    """bf16 decode-sized products measure three forms (oneDNN's per-call cost makes torch's own
    kernels faster on small ones); whichever is cached, the numbers are F.linear's up to bf16
    rounding. One row is measured too (for float32 it stays a plain F.linear)."""
    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    torch.manual_seed(0)
    x, w = torch.randn(rows, 1, 256).bfloat16(), torch.randn(128, 256).bfloat16()
    b = torch.randn(128).bfloat16()
    assert torch._C._get_mkldnn_enabled()
    linear(x, w, b)  # the probe
    if rows > 32:
        assert tuning.choices() == []
        return
    ((key, _, times),) = tuning.choices()
    assert set(times) == {"linear", "linear, no oneDNN"} | ({"skinny"} if rows > 1 else set())
    tuning._CHOICES[key] = form  # what a probe on another machine may pick
    got = linear(x, w, b)
    assert got.shape == (rows, 1, 128) and torch._C._get_mkldnn_enabled()
    want = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=6e-2)


@pytest.mark.parametrize("how", ["pairs", "pairs, no oneDNN", "pairs, gathered", "sorted"])
def test_every_16_bit_few_pairs_form_agrees(monkeypatch, how):
    """A bf16 decode step's routed experts: the forms `_few_or_sorted` measures (torch's own
    matrix-vector kernels among them) give the same outputs, whichever a probe picks."""
    from dsv3.moe import GroupedExperts

    monkeypatch.setenv("DSV3_DISPATCH", "measured")
    torch.manual_seed(0)
    E, D, I, T, K = 16, 256, 128, 2, 4
    ex = GroupedExperts(E, D, I, dtype=torch.bfloat16)
    for name in ("w1", "w2", "w3"):
        getattr(ex, name).data = (
            torch.randn_like(getattr(ex, name), dtype=torch.float32) * 0.1
        ).bfloat16()
    x = torch.randn(T, D).bfloat16()
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K).bfloat16()
    counts = torch.bincount(idx.flatten(), minlength=E).tolist()
    want = ex(x, weights, idx, counts, impl="loop").float()  # "pairs", no probe
    ex(x, weights, idx, counts)  # auto: the probe
    ((key, _, times),) = tuning.choices("moe-pairs")
    assert set(times) == {"pairs", "pairs, no oneDNN", "pairs, gathered", "sorted"}
    tuning._CHOICES[key] = how
    got = ex(x, weights, idx, counts)
    assert got.dtype == torch.bfloat16 and torch._C._get_mkldnn_enabled()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_without_onednn_restores_the_switch():
    from dsv3.layers import without_onednn

    def fail():
        assert not torch._C._get_mkldnn_enabled()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        without_onednn(fail)
    assert torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # a user who turned it off keeps it off
    try:
        without_onednn(lambda: None)
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_model_measured_equals_rule(monkeypatch):
    """A forward and decode steps give the same logits with measured and with rule choices."""
    args = ModelArgs(**TINY)
    torch.manual_seed(0)
    model = Transformer(args, dtype="fp32")
    tok = torch.randint(0, args.vocab_size, (2, 40))
    outs = {}
    for mode in ("rule", "measured"):
        monkeypatch.setenv("DSV3_DISPATCH", mode)
        model.reset_cache()
        full = model(tok[:, :32], all_logits=True)
        steps = [model(tok[:, i : i + 1], start_pos=i) for i in range(32, 40)]
        outs[mode] = torch.cat([full.flatten(), *(s.flatten() for s in steps)])
    torch.testing.assert_close(outs["measured"], outs["rule"], rtol=1e-5, atol=1e-5)
    assert tuning.choices("moe")


@pytest.mark.parametrize("start_pos", [0, 7])
@pytest.mark.parametrize("mode", ["measured", "rule"])
def test_attention_kernel_choice_agrees(monkeypatch, start_pos, mode):
    """Blocked and flash attention give the same numbers; the measured choice is cached per
    class, rule mode always takes blocked."""
    from dsv3.attention import _blocked_causal, _flash, blocked_or_flash

    monkeypatch.setenv("DSV3_DISPATCH", mode)
    torch.manual_seed(0)
    B, S, H, Dqk, Dv = 2, 24, 3, 20, 12
    T = start_pos + S
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, T, H, Dqk), torch.randn(B, T, H, Dv)
    want = _flash(q, k, v, 0.3, start_pos)
    torch.testing.assert_close(_blocked_causal(q, k, v, 0.3, start_pos), want)
    got = blocked_or_flash(q, k, v, 0.3, start_pos)
    assert got == "blocked" if mode == "rule" else got in ("blocked", "flash")
    assert len(tuning.choices("attn")) == (mode == "measured")
    assert blocked_or_flash(q, k, v, 0.3, start_pos) == got


def test_choose_takes_a_timer():
    """GPU kernels are timed by `gpu_measure` (device time, not the host's launches): whatever
    timer is given decides, once, and its times are kept."""
    seen = []

    def timer(cands):
        seen.append(sorted(cands))
        return {"slow": 2e-3, "fast": 1e-3}

    cands = {"slow": lambda: None, "fast": lambda: None}
    assert tuning.choose(("timer", 1), cands, timer) == "fast"
    assert tuning.choose(("timer", 1), cands, timer) == "fast"
    assert seen == [["fast", "slow"]]
    assert tuning.choices("timer")[0][2] == {"slow": 2e-3, "fast": 1e-3}


class _FakeStream:
    """One CUDA stream on a virtual clock: the host spends time queueing, the device runs what
    is queued in order, each item starting when the host queued it and the one before ended."""

    def __init__(self):
        self.host = 0.0
        self.free = 0.0  # when the device finishes what is queued

    def run(self, gpu_s: float) -> None:
        self.free = max(self.host, self.free) + gpu_s

    def call(self, host_s: float, gpu_s: float) -> None:
        self.host += host_s
        self.run(gpu_s)

    def install(self, monkeypatch) -> None:
        stream = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                stream.run(0.0)
                self.t = stream.free

            def synchronize(self):
                stream.host = max(stream.host, self.t)

            def elapsed_time(self, other):
                return (other.t - self.t) * 1e3

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: stream.run(cycles / 1.98e9))

        def synchronize():
            stream.host = max(stream.host, stream.free)

        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(tuning.time, "perf_counter", lambda: stream.host)


@pytest.mark.parametrize("slow_host_from", ["the start", "the timed rounds"])
def test_gpu_measure_times_the_device_even_when_the_host_is_slower(monkeypatch, slow_host_from):
    """A Triton kernel launched from Python may take longer to queue (here 300 us) than it runs
    (8 us), and longer than its twin (10 us to queue, 18 us to run). The measure must still see
    8 against 18 us: the stream sleeps long enough for every call to be queued, sized from the
    warm-up's host time, or slept again for longer when the timed calls queued slower."""
    s = _FakeStream()
    s.install(monkeypatch)
    calls = {"kernel": 0}

    def kernel():
        calls["kernel"] += 1
        slow = slow_host_from == "the start" or calls["kernel"] > 2  # after the 2 warm-ups
        s.call(300e-6 if slow else 20e-6, 8e-6)

    got = tuning.gpu_measure({"kernel": kernel, "torch": lambda: s.call(10e-6, 18e-6)})
    assert got["kernel"] == pytest.approx(8e-6, rel=1e-6)
    assert got["torch"] == pytest.approx(18e-6, rel=1e-6)


def test_overlapping_without_onednn_calls_put_the_switch_back():
    """Two threads inside `without_onednn` at once: the second used to save the switch the
    first had turned off and restore that, leaving oneDNN off for the rest of the process."""
    from dsv3.layers import without_onednn

    inside, release = threading.Barrier(2), threading.Event()

    def hold():
        inside.wait()
        release.wait(5)

    t = threading.Thread(target=without_onednn, args=(hold,))
    t.start()
    inside.wait()  # the first call holds oneDNN off
    assert not torch._C._get_mkldnn_enabled()

    def second():  # overlaps the first, lets it leave first, leaves last
        release.set()
        t.join()

    without_onednn(second)
    assert torch._C._get_mkldnn_enabled()


def test_a_probe_rotates_its_order_so_no_candidate_always_follows_the_same_one():
    """What one candidate leaves behind (its caches) can slow the next: in a fixed order the
    same candidate paid for it every round (the padded expert dispatch lost probes it wins)."""
    last = [""]

    def cand(name: str, slow_after: str = ""):
        def run():
            if last[0] == slow_after:
                time.sleep(0.01)
            last[0] = name

        return run

    best = tuning.measure({"a": cand("a"), "b": cand("b", slow_after="a")}, budget_s=0)
    assert best["b"] < 0.005


def test_candidates_within_the_tie_margin_keep_the_first_listed(monkeypatch):
    """Best-of-a-few on a shared machine cannot order candidates a few % apart: the plain form,
    listed first, is kept unless another beats it by more than tuning.TIE."""
    assert tuning.pick({"plain": 1.04, "other": 1.0}) == "plain"
    assert tuning.pick({"plain": 1.06, "other": 1.0}) == "other"
    assert tuning.pick({"a": 2.0, "plain": 1.04, "other": 1.0}) == "plain"
    times = {"plain": 1.03, "other": 1.0}
    cands = dict.fromkeys(times, lambda: None)
    monkeypatch.setattr(tuning, "measure", lambda c: times)  # a wall-clock probe: a tie
    assert tuning.choose("tie-key", cands) == "plain"
    # GPU time (a timer: CUDA events, no host noise) orders them strictly
    assert tuning.choose("gpu-key", cands, lambda c: times) == "other"
