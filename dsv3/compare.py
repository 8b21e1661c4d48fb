"""Two configs side by side (torch-free): what changed, and what it costs.

    result = compare(a, b, dtype="bf16", batch=1, seq_len=1024, n_gpus=8)
    result["changes"]   # [{"layers": (5, 5), "field": "n_heads", "a": 16, "b": 32,
                        #   "text": "layer 5 n_heads 16 -> 32"}, ...]
    result["rows"]      # [{"section", "metric", "unit", "a", "b"}, ...]
    to_markdown(result), to_csv(result)   # strings, for display and download

Per-layer changes compare the resolved `args.for_layer(i)`, so a changed global value shows on
every layer that inherits it where some layer overrides that field (collapsed into ranges:
"layers 0-4 n_heads 16 -> 8", "layers 6-7 ...": which layers follow the change); where no layer
does, the global change alone says it. A field neither side's layer uses
(`config.unused_by`: the experts' fields on a dense layer, inter_dim on a MoE one) is not a
change of that layer.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

from .config import LAYER_FIELDS, ModelArgs, unused_by
from .params import estimate, human_bytes
from .roofline import GPU, roofline, split_problem

__all__ = ["compare", "layer_map", "to_csv", "to_markdown"]


def layer_map(args: ModelArgs) -> str:
    """Consecutive layers with the same kind and overrides collapsed:
    "0: dense | 1-4: moe | 5: moe n_heads=32 | 6-31: moe"."""
    runs: list[list[Any]] = []  # [first, last, label]
    for i in range(args.n_layers):
        over = args.layer_config.get(i, {})
        label = " ".join([args.ffn_kind(i)] + [f"{k}={v}" for k, v in over.items() if k != "ffn"])
        if runs and runs[-1][2] == label:
            runs[-1][1] = i
        else:
            runs.append([i, i, label])
    return " | ".join(f"{_span(f, last)}: {label}" for f, last, label in runs)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _where(first: int, last: int) -> str:
    return ("layer " if first == last else "layers ") + _span(first, last)


def changes(a: ModelArgs, b: ModelArgs) -> list[dict[str, Any]]:
    """Top-level field changes, then per-layer changes of the resolved layer args, each run of
    consecutive layers with the same (field, a, b) as one entry."""
    out: list[dict[str, Any]] = []
    for f in dataclasses.fields(ModelArgs):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name != "layer_config" and va != vb:
            out.append({"layers": None, "field": f.name, "a": va, "b": vb})
    common = range(min(a.n_layers, b.n_layers))
    uniform = {  # global changes no layer overrides (where it is used): listed once
        c["field"]
        for c in out
        if not any(
            c["field"] in x.layer_config.get(i, {}) and not unused_by(c["field"], x.ffn_kind(i))
            for x in (a, b)
            for i in common
        )
    }
    per_layer: list[tuple[int, str, Any, Any]] = []
    for i in range(max(a.n_layers, b.n_layers)):
        if i >= a.n_layers or i >= b.n_layers:
            side = "B" if i >= a.n_layers else "A"
            per_layer.append((i, "layer", None, f"only in {side}"))
            continue
        la, lb = a.for_layer(i), b.for_layer(i)
        per_layer += [
            (i, k, getattr(la, k), getattr(lb, k))
            for k in LAYER_FIELDS
            if getattr(la, k) != getattr(lb, k)
            and k not in uniform
            and not (unused_by(k, la.ffn) and unused_by(k, lb.ffn))  # used on one side
        ]
    # Collapse runs: the same change on consecutive layers is one entry.
    open_runs: dict[tuple[str, Any, Any], dict[str, Any]] = {}
    layer_changes: list[dict[str, Any]] = []
    for i, k, va, vb in per_layer:
        key = (k, repr(va), repr(vb))
        run = open_runs.get(key)
        if run is not None and run["layers"][1] == i - 1:
            run["layers"] = (run["layers"][0], i)
        else:
            run = {"layers": (i, i), "field": k, "a": va, "b": vb}
            open_runs[key] = run
            layer_changes.append(run)
    out += sorted(layer_changes, key=lambda c: c["layers"][0])  # stable: field order kept
    for c in out:
        c["text"] = _change_text(c)
    return out


def _change_text(c: dict[str, Any]) -> str:
    where = "" if c["layers"] is None else _where(*c["layers"]) + " "
    if c["field"] == "layer":
        return f"{where}{c['b']}"
    f = c["field"]
    return f"{where}{f} {_value(f, c['a'])} -> {_value(f, c['b'])}"


def _value(field: str, v: Any) -> str:
    """A config value as the form shows it (gate_bias None is its "auto" choice)."""
    return "auto" if v is None and field == "gate_bias" else str(v)


def _side(
    args: ModelArgs,
    dtype: str,
    batch: int,
    seq_len: int,
    n_gpus: int,
    gpus: tuple[GPU | str, ...],
    splits: bool,
) -> list[tuple[str, str, str, Any]]:
    """(section, metric, unit, value) rows of one config; `splits` False: it does not split
    over n_gpus (`roofline.split_problem`)."""
    est = estimate(args, dtype, batch, seq_len, n_gpus)
    p = est["params"]
    rows = [
        ("size", "total parameters", "count", p["total"]),
        ("size", "active parameters per token", "count", p["active"]),
        ("size", "layers (dense, moe)", "text", _kinds(args)),
        ("size", "layer map", "text", layer_map(args)),
    ]
    rows += [
        ("weights", f"weights {d}", "bytes", est["weight_bytes_by_dtype"][d])
        for d in ("fp32", "bf16", "fp8")
    ]
    rows += [
        ("kv cache", f"KV per token, {k}", "bytes", est["kv_bytes_per_token"][k])
        for k in ("naive", "absorb")
    ]
    rows += [
        ("kv cache", f"KV cache {batch} x {seq_len}, {k}", "bytes", est["kv_cache_bytes"][k])
        for k in ("naive", "absorb")
    ]
    rows.append(("kv cache", "attention path it runs (attn_impl)", "text", args.attn_impl))
    rows.append(
        ("compute", f"FLOPs per token ({seq_len} context)", "flops", est["flops_per_token"])
    )

    # A split the model cannot take has no per-GPU figures (None: "does not split"), as the
    # Estimate shows none
    def split(value: Any) -> Any:
        return value if splits else None

    rows.append(
        (
            "memory",
            f"per-GPU weights ({_gpus(n_gpus)})",
            "bytes",
            split(est["per_gpu_weight_bytes"]),
        )
    )
    rows.append(
        ("memory", f"per-GPU memory ({_gpus(n_gpus)})", "bytes", split(est["per_gpu_bytes"]))
    )
    for g in gpus:
        r = roofline(args, g, dtype, batch, seq_len, n_gpus)
        name = f"{r['gpu']} x{n_gpus}"
        rows += [
            ("speed", f"{name}: prefill {batch} x {seq_len}", "seconds",
             split(r["prefill"]["seconds"])),
            ("speed", f"{name}: decode", "tokens/s", split(r["decode"]["tokens_per_s"])),
            ("speed", f"{name}: memory per GPU fits", "bool", r["memory"]["fits"]),
        ]  # fmt: skip
    return rows


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' if n > 1 else ''}"


def _kinds(args: ModelArgs) -> str:
    dense = sum(args.ffn_kind(i) == "dense" for i in range(args.n_layers))
    return f"{args.n_layers} ({dense}, {args.n_layers - dense})"


def compare(
    a: ModelArgs,
    b: ModelArgs,
    dtype: str = "bf16",
    batch: int = 1,
    seq_len: int = 1024,
    n_gpus: int = 1,
    gpus: tuple[GPU | str, ...] = ("H100 SXM", "H200"),
) -> dict[str, Any]:
    """A and B side by side: {"changes": [...], "rows": [...], "settings": {...}}. Rows hold
    parameters, weights per dtype, KV per token (naive/absorb), FLOPs per token, per-GPU memory
    for `n_gpus`, and the roofline's prefill seconds (batch x seq_len), decode tokens/s and fit
    on each of `gpus` (see dsv3.roofline)."""
    why = {name: split_problem(x, n_gpus, dtype) for name, x in (("A", a), ("B", b))}
    side_a = _side(a, dtype, batch, seq_len, n_gpus, gpus, not why["A"])
    side_b = _side(b, dtype, batch, seq_len, n_gpus, gpus, not why["B"])
    rows = [
        {"section": s, "metric": m, "unit": u, "a": va, "b": vb}
        for (s, m, u, va), (_, _, _, vb) in zip(side_a, side_b)
    ]
    settings = {"dtype": dtype, "batch": batch, "seq_len": seq_len, "n_gpus": n_gpus}
    notes = [note for name, x in (("A", a), ("B", b)) if (note := _beyond(name, x, batch, seq_len))]
    notes += [
        f"{name} does not split over {_gpus(n_gpus)} ({w}): no per-GPU or speed figures, and "
        "it fits no GPU"
        for name, w in why.items()
        if w
    ]
    return {"changes": changes(a, b), "rows": rows, "settings": settings, "notes": notes}


def _beyond(name: str, args: ModelArgs, batch: int, seq_len: int) -> str:
    """A note when the compared batch or length exceeds what this side's config allocates for
    (its figures there are a what-if: its KV cache would not hold them), else ""."""
    over = []
    if batch > args.max_batch_size:
        over.append(f"batch {batch} > its max_batch_size {args.max_batch_size}")
    if seq_len > args.max_seq_len:
        over.append(f"{seq_len:,} tokens > its max_seq_len {args.max_seq_len:,}")
    if not over:
        return ""
    return f"{name} is compared beyond what it allocates for ({'; '.join(over)}): a what-if"


def _numeric(row: dict[str, Any]) -> bool:
    return row["unit"] not in ("text", "bool")


def _scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """value in the largest unit it reaches (the last one below all): 3 significant digits."""
    if value == 0:
        return f"0 {units[-1][1]}"
    for size, name in units:
        if abs(value) >= size or size == units[-1][0]:
            v = value / size
            return f"{v:,.{max(0, 2 - len(str(int(abs(v)))) + 1)}f} {name}"
    raise AssertionError("unreachable")


FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"),
              (1.0, "FLOP"))  # fmt: skip
SECOND_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))


def _fmt(value: Any, unit: str, signed: bool = False) -> str:
    if value is None:
        return "does not split"
    sign = "+" if signed and value > 0 else ""
    if unit == "count":
        return f"{value:+,}" if signed else f"{value:,}"
    if unit == "bytes":
        return sign + human_bytes(value)
    if unit == "flops":
        return sign + _scaled(value, FLOP_UNITS)
    if unit == "seconds":
        return sign + _scaled(value, SECOND_UNITS)
    if unit == "tokens/s":
        return f"{sign}{value:,.0f} tok/s"
    if unit == "bool":
        return "yes" if value else "no"
    return str(value)


def _ratio(r: float) -> str:
    """B / A for the table: 3 decimals near 1, whole numbers with separators when large,
    3 significant digits when small."""
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 0.01:
        return f"{r:.3f}x"
    return f"{r:.3g}x"


def to_markdown(result: dict[str, Any]) -> str:
    """The comparison as Markdown: settings, the list of changes, one table of A vs B."""
    s = result["settings"]
    lines = [
        f"### A vs B ({s['dtype']}, batch {s['batch']} x {s['seq_len']} tokens, "
        f"{_gpus(s['n_gpus'])})",
        "",
    ]
    if result.get("notes"):
        lines += [f"*Note: {n}*" for n in result["notes"]] + [""]
    changes = result["changes"]
    lines.append(f"**Changes ({len(changes)})**" if changes else "**No changes**")
    lines += [f"- {c['text']}" for c in changes] + [""]
    lines += ["| metric | A | B | B - A | B / A |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        a, b, u = r["a"], r["b"], r["unit"]
        delta = ratio = ""
        if _numeric(r) and a is not None and b is not None:
            delta = _fmt(b - a, u, signed=True) if b != a else "="
            ratio = _ratio(b / a) if a else ""
        cells = [r["metric"], _fmt(a, u), _fmt(b, u), delta, ratio]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(result: dict[str, Any]) -> str:
    """The comparison as CSV: raw numbers (bytes, FLOPs, seconds, tokens/s), changes first as
    rows of kind "change"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "section", "metric", "unit", "a", "b", "delta", "ratio"])
    for c in result["changes"]:
        where = "global" if c["layers"] is None else _where(*c["layers"])
        w.writerow(["change", where, c["field"], "", c["a"], c["b"], "", ""])
    for r in result["rows"]:
        a, b = r["a"], r["b"]
        num = _numeric(r) and a is not None and b is not None
        delta = b - a if num else ""
        ratio = b / a if num and a else ""
        w.writerow(["metric", r["section"], r["metric"], r["unit"], a, b, delta, ratio])
    return buf.getvalue()
