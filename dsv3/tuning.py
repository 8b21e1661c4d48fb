"""Measured choices between equivalent kernels: time the candidates once per shape class, keep
the fastest for the rest of the process.

Which of two forms of one product is faster depends on the CPU, not on the shapes alone: on an
AMD EPYC `(W x^T)^T` beat `x W^T` for decode-sized inputs and padded `bmm` beat grouped matmuls
for the routed experts; on an Intel Xeon both orders reversed (benchmarks/run.py). So instead
of a rule, the first call of a shape class (the caller's key: shapes, a size bucket, dtype,
device, thread count) runs every candidate a few times, interleaved, and caches the one with
the least best time. The candidates compute the same numbers up to rounding (in bf16,
bf16's; tests/dsv3/test_perf_paths.py), so the choice changes speed only.

`DSV3_DISPATCH=rule` skips the measurement and uses the callers' fixed rules (deterministic
choices for tests; the default is `measured`). `choices()` lists what was chosen and measured.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable

MODES = ("measured", "rule")
PROBE_BUDGET_S = 0.02  # time one class's probe may spend after its warm-up round
PROBE_ROUNDS = 7  # timed rounds at most (fewer when the budget runs out): a probe of
# sub-millisecond candidates on a shared machine needs several to see through noise
PROBE_MIN_ROUNDS = 3  # timed rounds at least, whatever the budget: with one, a probe of
# 5-6 ms candidates (the benchmark's 2x256 expert dispatch) picked one 0.87x as fast as the best

_LOCK = threading.RLock()  # re-entrant: a candidate may probe an inner class on its warm-up
_CHOICES: dict[Hashable, str] = {}
_TIMES: dict[Hashable, dict[str, float]] = {}
_PROBES = [0]  # probes timed in this process (only ever grows: `clear` keeps it)


def mode() -> str:
    """ "measured" (default) or "rule", from the environment variable DSV3_DISPATCH."""
    m = os.environ.get("DSV3_DISPATCH", "measured").strip().lower() or "measured"
    if m not in MODES:
        raise ValueError(f"DSV3_DISPATCH={m!r}: choose one of {', '.join(MODES)}")
    return m


def measured() -> bool:
    return mode() == "measured"


def cached(key: Hashable) -> str | None:
    """The choice already made for `key`, or None."""
    return _CHOICES.get(key)


def choose(
    key: Hashable, candidates: dict[str, Callable[[], object]], timer: Callable | None = None
) -> str:
    """The fastest candidate name for `key`, measured on the first call (thread-safe: one probe
    per key, others wait for it rather than disturb it) and cached after. `timer(candidates)`
    -> {name: seconds} replaces the wall-clock `measure` (GPU kernels: `gpu_measure`)."""
    got = _CHOICES.get(key)
    if got is not None:
        return got
    with _LOCK:
        got = _CHOICES.get(key)
        if got is not None:
            return got
        if len(candidates) == 1:
            times = {next(iter(candidates)): 0.0}
        else:
            times = (timer or measure)(candidates)
            _PROBES[0] += 1
        # wall-clock probes tie within TIE; GPU time (CUDA events, no host noise) orders them
        best = pick(times) if timer is None else min(times, key=times.__getitem__)
        _TIMES[key], _CHOICES[key] = times, best
        return best


TIE = 0.05  # candidates within this fraction of the fastest count as equally fast


def pick(times: dict[str, float]) -> str:
    """The first-listed candidate within TIE of the fastest: callers list the plain form first
    (F.linear, the per-expert loop, one product per pair), and best-of-a-few rounds on a shared
    machine cannot order candidates this close. Three probes that picked the runner-up by
    0.7-3% chose a dispatch 0.75-0.86x as fast as the plain one in the benchmark's timing."""
    fastest = min(times.values())
    return next(n for n, t in times.items() if t <= fastest * (1 + TIE))


CONTENDER = 3.0  # past the first rounds, a candidate this many times the fastest drops out


def measure(
    candidates: dict[str, Callable[[], object]],
    budget_s: float = PROBE_BUDGET_S,
    rounds: int = PROBE_ROUNDS,
    min_rounds: int = PROBE_MIN_ROUNDS,
) -> dict[str, float]:
    """Best time of each candidate: one untimed warm-up round, then `min_rounds` interleaved
    rounds of all (so that load from elsewhere hits them alike), then up to `rounds` in all of
    the contenders (within CONTENDER times the fastest) while those take under `budget_s`: a
    slow candidate's rounds no longer spend the budget that close ones need (a decode step's
    loop and grouped dispatches, 0.3-0.5 ms apart by 20-40%, got three rounds each behind
    padded ones of 2-3 ms, and the probe picked the one the benchmark then timed 0.85x as
    fast). Each round starts one candidate later than the last: what one candidate leaves in
    the caches helps or hurts the next, and in a fixed order the same one paid for it every
    round (the padded expert dispatch measured 3.6 ms behind the loop, 3.0 ms behind the
    one-batch form, and lost a probe it wins by 17%)."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    order = list(candidates.items())
    t_extra = 0.0
    for r in range(1, rounds + 1):
        live = order
        if r > min_rounds:  # contenders only
            fastest = min(best.values())
            live = [(n, fn) for n, fn in order if best[n] <= CONTENDER * fastest]
        for name, fn in live[r % len(live) :] + live[: r % len(live)]:
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        if r == min_rounds:
            t_extra = time.perf_counter()
        if r >= min_rounds and time.perf_counter() - t_extra >= budget_s:
            break
    return best


def count() -> int:
    """How many probes have timed candidates so far in this process (it only grows): a
    caller that times its own work compares this before and after (`probe_note`)."""
    return _PROBES[0]


def probe_note(before: int) -> str:
    """What a timed run should add when probes ran since `count()` was `before`: a first run
    of a shape pays for them (the small preset's first CPU prefill took 6.7x the next one's
    on an Intel Xeon), the next does not. "" when none ran."""
    n = count() - before
    if n <= 0:
        return ""
    return (
        f"the time includes measuring {n} kernel choice{'s' if n > 1 else ''} on first use "
        "(the next run of these shapes skips that)"
    )


def choices(prefix: str | None = None) -> list[tuple[Hashable, str, dict[str, float]]]:
    """[(key, chosen, {candidate: best seconds})] of every measured class (keys starting with
    `prefix` when given: keys are tuples whose first item names the kind of choice)."""
    with _LOCK:
        return [
            (k, c, dict(_TIMES[k]))
            for k, c in _CHOICES.items()
            if prefix is None or (isinstance(k, tuple) and k and k[0] == prefix)
        ]


def clear() -> None:
    """Forget every choice (tests, benchmarks)."""
    with _LOCK:
        _CHOICES.clear()
        _TIMES.clear()


def gpu_measure(candidates: dict[str, Callable[[], object]], reps: int = 8) -> dict[str, float]:
    """GPU time of each candidate, without the host's launch time: the stream first sleeps
    (`torch.cuda._sleep`) while `reps` calls are queued behind it, so CUDA events time the
    kernels back to back, as a CUDA graph replays them. Best of three interleaved rounds, after
    two untimed ones (a Triton kernel's first calls may still compile or autotune).

    The sleep is sized from each candidate's host time per call (a Triton kernel launched from
    Python can take ~100 us to queue, more than the kernel runs), and a round whose calls were
    not all queued before the sleep ended is timed again with a longer one: else the events
    would time the host, not the GPU."""
    import torch

    host = dict.fromkeys(candidates, 0.0)
    for _ in range(2):
        torch.cuda.synchronize()
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            host[name] = time.perf_counter() - t0  # the second round's: compiled by then
    # cycles to sleep: 2x the time to queue the calls at ~2 GHz (a slower clock sleeps longer)
    cycles = {n: max(2_000_000, int(2 * reps * h * 2e9)) for n, h in host.items()}
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(3):
        for name, fn in candidates.items():
            for _try in range(4):
                slept_from = torch.cuda.Event(enable_timing=True)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                slept_from.record()
                torch.cuda._sleep(cycles[name])
                start.record()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                queued = time.perf_counter() - t0
                end.record()
                end.synchronize()
                if queued < slept_from.elapsed_time(start) / 1e3:
                    break  # every call was queued while the stream slept: GPU time
                cycles[name] *= 2
            best[name] = min(best[name], start.elapsed_time(end) / 1e3 / reps)
    return best
