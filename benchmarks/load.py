"""Load test: many concurrent gradio_client sessions against one app server (loopback only).

Each session loads a preset, builds it with its own seed, runs forwards, reads the plots and
frees its model. Checks: every request succeeds, every session sees only its own model (its
logits are stable across its runs and differ from every other session's), and the server's
resident memory returns to within 10% of where it started.

    python -m benchmarks.load                         # 8 sessions, tiny + small, 5 forwards
    python -m benchmarks.load --sessions 4 --presets tiny --forwards 2
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: sys.path[0] is benchmarks/
    import _script

    _script.run_as_module(__file__)

import argparse
import statistics
import sys
import threading
import time
from collections import Counter

import psutil

from .serve import start, stop


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def session(url: str, preset: str, seed: int, forwards: int, out: dict) -> None:
    """One user: preset -> build(seed) -> forwards -> plots -> free. Fills `out`."""
    from gradio_client import Client

    lat: list[tuple[str, float]] = []
    failures: Counter = Counter()
    heads: list[list[float]] = []

    def call(name: str, *a):
        t0 = time.perf_counter()
        try:
            return client.predict(*a, api_name=f"/{name}")
        except Exception as e:  # counted, not raised: the table reports failures by kind
            failures[f"{name}: {type(e).__name__}"] += 1
            return None
        finally:
            lat.append((name, time.perf_counter() - t0))

    client = Client(url, verbose=False)
    got = call("preset", preset)
    if got is not None:
        cfg = got[0]
        built = call("build", cfg, "cpu", "fp32", seed)
        if built is None or not built[1].get("ok") or built[1].get("seed") != seed:
            failures["build: wrong or failed"] += 1
        for _ in range(forwards):
            r = call("forward", 2, 16, 0, "", 2)
            if r is None or not r[1].get("ok"):
                failures["forward: not ok"] += 1
                continue
            heads.append(r[1]["logits_head"])
            if not any(t["type"] == "heatmap" for t in _traces(r[4])):
                failures["forward: no heatmap"] += 1
        if call("rotary", cfg, 32) is None:
            pass
        call("estimate", cfg, "cpu", "fp32", 1, 0, 1)
        call("release")
    client.close()
    out.update(latencies=lat, failures=failures, heads=heads, preset=preset, seed=seed)


def _traces(plot: dict) -> list[dict]:
    import json

    return json.loads(plot["plot"])["data"] if plot else []


def run(sessions: int = 8, presets: tuple[str, ...] = ("tiny", "small"), forwards: int = 5) -> dict:
    proc, _, url = start(timeout=120)
    try:
        # Warm the server once (imports, first forward) so the baseline is the idle server.
        warm: dict = {}
        session(url, "tiny", 10_000, 1, warm)
        time.sleep(1.0)
        base = rss(proc)
        peak = base
        results = [dict() for _ in range(sessions)]
        threads = [
            threading.Thread(
                target=session,
                args=(url, presets[i % len(presets)], 1000 + i, forwards, results[i]),
            )
            for i in range(sessions)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss(proc))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        time.sleep(1.5)  # let the server finish freeing
        end = rss(proc)
    finally:
        stop(proc)

    failures = sum((r.get("failures", Counter()) for r in results), Counter())
    lat = [s for r in results for _, s in r.get("latencies", [])]
    # Isolation: a session's runs agree with each other and differ from every other session's.
    firsts = [tuple(r["heads"][0]) for r in results if r.get("heads")]
    stable = all(all(h == r["heads"][0] for h in r["heads"]) for r in results if r.get("heads"))
    distinct = len(set(firsts)) == len(firsts) == sessions
    return {
        "sessions": sessions,
        "presets": presets,
        "requests": len(lat),
        "failures": dict(failures),
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": statistics.quantiles(lat, n=20)[18] if len(lat) >= 20 else max(lat, default=0),
        "wall_s": wall,
        "rss_start": base,
        "rss_peak": peak,
        "rss_end": end,
        "rss_end_ratio": end / base,
        "sessions_stable": stable,
        "sessions_distinct": distinct,
    }


def table(r: dict) -> str:
    mib = 2**20
    rows = [
        ("sessions x presets", f"{r['sessions']} x {', '.join(r['presets'])}"),
        ("requests", r["requests"]),
        ("failures", sum(r["failures"].values()) if r["failures"] else 0),
        ("failures by kind", r["failures"] or "-"),
        ("latency p50 / p95", f"{r['p50_s'] * 1e3:.0f} ms / {r['p95_s'] * 1e3:.0f} ms"),
        ("wall time", f"{r['wall_s']:.1f} s"),
        ("server RSS start / peak / end", f"{r['rss_start'] / mib:.0f} / {r['rss_peak'] / mib:.0f} / {r['rss_end'] / mib:.0f} MiB"),
        ("end / start (target <= 1.10)", f"{r['rss_end_ratio']:.3f}"),
        ("each session sees only its own model", r["sessions_stable"] and r["sessions_distinct"]),
    ]  # fmt: skip
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--forwards", type=int, default=5)
    a = p.parse_args()
    r = run(a.sessions, tuple(a.presets.split(",")), a.forwards)
    print(table(r))
    ok = not r["failures"] and r["sessions_distinct"] and r["sessions_stable"]
    return 0 if ok and r["rss_end_ratio"] <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
