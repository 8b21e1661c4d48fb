"""The architecture view: every module's output shape with named axes, per group of layers.

Torch-free and instant for any config (61 layers of the 671B preset resolve in about a
millisecond): shapes follow from `ModelArgs` alone, as `Transformer` would produce them for a
prefill of `batch x seq` tokens from position 0.

Layers whose resolved args are equal and whose overrides are equal collapse into one group
("layers 3-60, x58"). A layer with entries in `layer_config` is an override layer: its group
lists what differs from the layer the config would give without overrides (`args.for_layer(i)`
against the same args with `layer_config` empty), and each module marks the axes whose size
differs from that un-overridden layer, so a head-count override shows as `heads 16` vs 8.

Axes (named as in the app): batch, seq (query positions), ctx (key positions: seq for a prefill
from 0), dim (model width), q_latent (q_lora_rank), latent (kv_lora_rank), rope
(qk_rope_head_dim), nope (qk_nope_head_dim), head_dim (nope + rope), v_dim (v_head_dim),
heads, inter (dense MLP width), tokens (batch * seq, flattened for routing), experts, groups,
kept_groups, topk, pairs (tokens * topk routed pairs), expert_inter (moe_inter_dim),
shared_inter (n_shared_experts * moe_inter_dim), vocab; on DSA layers index_heads,
index_dim (the lightning indexer's) and kept (min(index_topk, ctx) keys per query).
"""

from __future__ import annotations

import copy
from typing import Any

from .config import LAYER_FIELDS, LayerArgs, ModelArgs, unused_by

ATTN_PATHS = ("naive", "absorb")
# Modules that read as one step of the path (a compact view puts a step on one line).
STEPS = {
    "wq_a": "q",
    "q_norm": "q",
    "wq_b": "q",
    "wq": "q",
    "q_nope": "q split",
    "q_rope": "q split",
    "wkv_a": "kv",
    "k_rope": "kv",
    "kv_norm": "kv",
    "k cache": "cache",
    "v cache": "cache",
    "kv cache": "cache",
    "scores": "attend",
    "attention": "attend",
    "v absorbed": "out",
    "wo": "out",
    "w1, w3": "mlp",
    "w2": "mlp",
    "gate": "route",
    "group scores": "route",
    "kept groups": "route",
    "top-k": "route",
    "experts w1, w3": "experts",
    "experts w2": "experts",
    **dict.fromkeys(("index k", "index k cache"), "index keys"),
    **dict.fromkeys(("index weights", "index scores", "kept"), "index select"),
}


def _module(
    stage: str, name: str, op: str, axes: list[tuple[str, int]], minor: bool = False
) -> dict[str, Any]:
    """One module's output: `axes` as (name, size) pairs, `shape` the sizes, `text` both."""
    return {
        "stage": stage,
        "name": name,
        "op": op,
        "axes": [[a, int(n)] for a, n in axes],
        "shape": [int(n) for _, n in axes],
        "text": shape_text(axes),
        "step": STEPS.get(name, name),
        "minor": minor,  # norms and pure views: a compact view may leave them out
        "changed_axes": [],
    }


def shape_text(axes: list[tuple[str, int]] | list[list]) -> str:
    """[("batch", 1), ("heads", 128)] -> '(batch 1, heads 128)'."""
    return "(" + ", ".join(f"{a} {n}" for a, n in axes) + ")"


def _attention(la: LayerArgs, B: int, S: int, path: str) -> list[dict[str, Any]]:
    H, Dn, Dr, Dv = la.n_heads, la.qk_nope_head_dim, la.qk_rope_head_dim, la.v_head_dim
    C, Q, T = la.kv_lora_rank, la.q_lora_rank, S
    bs = [("batch", B), ("seq", S)]
    bt = [("batch", B), ("ctx", T)]
    m = [_module("attention", "attn_norm", "RMSNorm", bs + [("dim", la.dim)], minor=True)]
    if Q:
        m += [
            _module("attention", "wq_a", "Linear dim -> q_latent", bs + [("q_latent", Q)]),
            _module("attention", "q_norm", "RMSNorm", bs + [("q_latent", Q)], minor=True),
            _module(
                "attention",
                "wq_b",
                "Linear q_latent -> heads x head_dim",
                bs + [("heads", H), ("head_dim", Dn + Dr)],
            ),
        ]
    else:
        m.append(
            _module(
                "attention",
                "wq",
                "Linear dim -> heads x head_dim (no q LoRA)",
                bs + [("heads", H), ("head_dim", Dn + Dr)],
            )
        )
    m += [
        _module("attention", "q_nope", "split of q", bs + [("heads", H), ("nope", Dn)]),
        _module("attention", "q_rope", "split of q, rotated", bs + [("heads", H), ("rope", Dr)]),
        _module(
            "attention", "wkv_a", "Linear dim -> latent + rope", bs + [("latent+rope", C + Dr)]
        ),
        _module(
            "attention",
            "k_rope",
            "split of wkv_a, rotated, one for all heads",
            bs + [("rope", Dr)],
        ),
        _module("attention", "kv_norm", "RMSNorm of the latent", bs + [("latent", C)]),
    ]
    if path == "naive":
        m += [
            _module(
                "attention",
                "wkv_b",
                "Linear latent -> heads x (nope + v_dim)",
                bs + [("heads", H), ("nope+v_dim", Dn + Dv)],
            ),
            _module(
                "attention",
                "k cache",
                "[k_nope, k_rope] per head",
                bt + [("heads", H), ("head_dim", Dn + Dr)],
            ),
            _module("attention", "v cache", "values per head", bt + [("heads", H), ("v_dim", Dv)]),
            _module(
                "attention", "scores", "softmax(q k^T) over ctx", bs + [("heads", H), ("ctx", T)]
            ),
            _module("attention", "attention", "scores x v", bs + [("heads", H), ("v_dim", Dv)]),
        ]
    else:
        m += [
            _module(
                "attention",
                "kv cache",
                "latent + k_rope, shared by all heads",
                bt + [("latent+rope", C + Dr)],
            ),
            _module(
                "attention",
                "q absorbed",
                "q_nope x wkv_b's key half",
                bs + [("heads", H), ("latent", C)],
            ),
            _module(
                "attention",
                "scores",
                "softmax([q_abs, q_rope] cache^T) over ctx",
                bs + [("heads", H), ("ctx", T)],
            ),
            _module(
                "attention", "attention", "scores x latent", bs + [("heads", H), ("latent", C)]
            ),
            _module(
                "attention",
                "v absorbed",
                "x wkv_b's value half",
                bs + [("heads", H), ("v_dim", Dv)],
            ),
        ]
    m.append(_module("attention", "wo", "Linear heads x v_dim -> dim", bs + [("dim", la.dim)]))
    if la.attn_kind == "dsa":  # the indexer decides which keys the scores above keep
        at = next(i for i, mod in enumerate(m) if mod["name"] == "scores")
        m[at:at] = _indexer(la, B, S)
        m[at + len(_INDEXER_STEPS)]["op"] += ", keys the indexer dropped masked"
    return m


_INDEXER_STEPS = ("index q", "index k", "index k cache", "index weights", "index scores", "kept")


def _indexer(la: LayerArgs, B: int, S: int) -> list[dict[str, Any]]:
    """The lightning indexer of a DSA layer (`attention.Indexer`), for a prefill from 0."""
    Hi, Di, T = la.index_n_heads, la.index_head_dim, S
    bs, bt = [("batch", B), ("seq", S)], [("batch", B), ("ctx", T)]
    ops = (
        "Linear q_latent -> index_heads x index_dim, rope dims rotated (half split)",
        "Linear dim -> index_dim, LayerNorm, rope dims rotated: one key per token",
        "index keys of every position, shared by the index heads",
        "Linear dim -> index_heads: each head's weight",
        "sum over heads of weight x relu(q k^T / sqrt(index_dim)), future at -inf",
        f"the index_topk ({la.index_topk}) best-scored earlier positions per query",
    )
    axes = (
        bs + [("index_heads", Hi), ("index_dim", Di)],
        bs + [("index_dim", Di)],
        bt + [("index_dim", Di)],
        bs + [("index_heads", Hi)],
        bs + [("ctx", T)],
        bs + [("kept", min(la.index_topk, T))],
    )
    if T <= la.index_topk:  # every query keeps all its earlier keys: only the keys are made
        skipped = (
            f" (a plain forward skips this while ctx <= index_topk {la.index_topk}: every key "
            "is kept; the app's run computes it for Inspect > DSA)"
        )
        ops = tuple(o if n in ("index k", "index k cache") else o + skipped
                    for n, o in zip(_INDEXER_STEPS, ops))  # fmt: skip
    return [_module("attention", n, o, a) for n, o, a in zip(_INDEXER_STEPS, ops, axes)]


def _ffn(la: LayerArgs, B: int, S: int) -> list[dict[str, Any]]:
    bs = [("batch", B), ("seq", S)]
    m = [_module("ffn", "ffn_norm", "RMSNorm", bs + [("dim", la.dim)], minor=True)]
    if la.ffn == "dense":
        return m + [
            _module(
                "ffn", "w1, w3", "Linear dim -> inter (SwiGLU)", bs + [("inter", la.inter_dim)]
            ),
            _module("ffn", "w2", "Linear inter -> dim", bs + [("dim", la.dim)]),
        ]
    T, E, K, G = B * S, la.n_routed_experts, la.n_activated_experts, la.n_expert_groups
    tok = [("tokens", T)]
    m += [
        _module("ffn", "gate", f"{la.score_func} router scores", tok + [("experts", E)]),
    ]
    if G > 1:
        m += [
            _module(
                "ffn",
                "group scores",
                "best expert per group" + (" pair (with bias)" if la.gate_bias else ""),
                tok + [("groups", G)],
                minor=True,
            ),
            _module(
                "ffn",
                "kept groups",
                "top n_limited_groups groups",
                tok + [("kept_groups", la.n_limited_groups)],
                minor=True,
            ),
        ]
    bias = ", selected with the bias" if la.gate_bias else ""
    m += [
        _module("ffn", "top-k", f"expert ids and weights{bias}", tok + [("topk", K)]),
        _module(
            "ffn",
            "experts w1, w3",
            "routed pairs, grouped by expert",
            [("pairs", T * K), ("expert_inter", la.moe_inter_dim)],
        ),
        _module("ffn", "experts w2", "weighted and summed per token", tok + [("dim", la.dim)]),
    ]
    if la.n_shared_experts:
        m.append(
            _module(
                "ffn",
                "shared experts",
                "one MLP of n_shared x expert width",
                tok + [("shared_inter", la.n_shared_experts * la.moe_inter_dim)],
            )
        )
    m.append(_module("ffn", "output", "routed + shared", bs + [("dim", la.dim)], minor=True))
    return m


def _relevant(name: str, la: LayerArgs, base: LayerArgs) -> bool:
    """A field one kind of feed-forward does not use (`unused_by`) is no difference between
    two layers of that kind: it has no effect, so it is not listed."""
    return not (unused_by(name, la.ffn) and unused_by(name, base.ffn))


def _differences(la: LayerArgs, base: LayerArgs) -> dict[str, list]:
    """{field: [un-overridden value, value]} over the per-layer fields that matter here."""
    out = {}
    for name in LAYER_FIELDS:
        a, b = getattr(base, name), getattr(la, name)
        if a != b and _relevant(name, la, base):
            out[name] = [a, b]
    return out


def _axis_sizes(la: LayerArgs, B: int, S: int) -> dict[str, int]:
    """The size of every named axis in layer `la` (module by module they agree)."""
    T, K = B * S, la.n_activated_experts
    return {
        "batch": B,
        "seq": S,
        "ctx": S,
        "dim": la.dim,
        "q_latent": la.q_lora_rank,
        "heads": la.n_heads,
        "head_dim": la.qk_head_dim,
        "nope": la.qk_nope_head_dim,
        "rope": la.qk_rope_head_dim,
        "latent": la.kv_lora_rank,
        "latent+rope": la.kv_lora_rank + la.qk_rope_head_dim,
        "nope+v_dim": la.qk_nope_head_dim + la.v_head_dim,
        "v_dim": la.v_head_dim,
        "inter": la.inter_dim,
        "tokens": T,
        "experts": la.n_routed_experts,
        "groups": la.n_expert_groups,
        "kept_groups": la.n_limited_groups,
        "topk": K,
        "pairs": T * K,
        "expert_inter": la.moe_inter_dim,
        "shared_inter": la.n_shared_experts * la.moe_inter_dim,
        "index_heads": la.index_n_heads,
        "index_dim": la.index_head_dim,
        "kept": min(la.index_topk, S),
    }


def _mark_changes(modules: list[dict], base: LayerArgs, B: int, S: int) -> None:
    """Set each module's `changed_axes`: axes whose size differs from the same axis of the
    layer the config would give without overrides (so `heads 16` in every module with heads)."""
    sizes = _axis_sizes(base, B, S)
    for m in modules:
        m["changed_axes"] = [a for a, n in m["axes"] if sizes.get(a) != n]


def _summary(la: LayerArgs, path: str) -> str:
    q = f"q_latent {la.q_lora_rank}" if la.q_lora_rank else "no q LoRA"
    attn = (
        f"MLA {path}: {la.n_heads} heads x head_dim {la.qk_head_dim} "
        f"(nope {la.qk_nope_head_dim} + rope {la.qk_rope_head_dim}), v_dim {la.v_head_dim}, "
        f"{q}, latent {la.kv_lora_rank}"
    )
    if la.attn_kind == "dsa":
        attn += (
            f", DSA indexer {la.index_n_heads} heads x {la.index_head_dim} keeps "
            f"{la.index_topk} keys"
        )
    if la.ffn == "dense":
        return f"{attn}; dense MLP inter {la.inter_dim}"
    groups = (
        f", {la.n_expert_groups} groups keep {la.n_limited_groups}"
        if la.n_expert_groups > 1
        else ""
    )
    return (
        f"{attn}; MoE {la.n_routed_experts} experts top-{la.n_activated_experts}{groups}, "
        f"{la.score_func}{' + bias' if la.gate_bias else ''}, expert_inter {la.moe_inter_dim}, "
        f"{la.n_shared_experts} shared"
    )


def _span(first: int, last: int) -> str:
    if first == last:
        return f"layer {first}"
    return f"layers {first}-{last}, x{last - first + 1}"


def architecture(
    args: ModelArgs, batch: int = 1, seq: int = 128, attn_path: str | None = None
) -> list[dict[str, Any]]:
    """Row groups of the architecture view for a prefill of `batch x seq` tokens.

    `attn_path`: "naive" or "absorb" shows that attention math for every layer; None shows each
    layer's own `attn_impl`. (With the absorb cache a multi-token prefill expands the latent per
    head as naive does unless the model is built with `absorbed_prefill`; decode steps always
    use the absorbed form. The group's `note` says so.)

    Returns, in model order, dicts with:
      kind: "embed", "layers", "head" or "mtp" (built, not run);
      label ("layers 3-60, x58"); first, last, count;
      ffn ("dense" | "moe", layers only); attn_path; override (any layer of the group has
      `layer_config` entries); diff {field: [un-overridden value, value]}; diff_text
      ("n_heads 8 -> 16"); same_as (label of an earlier group with the same shapes, or None);
      summary (one line of the key sizes); note; modules [{stage, name, op, axes [[name, size]],
      shape, text "(batch 1, seq 128, heads 16, ...)", step (modules of one step of the path
      share it: "q", "kv", "cache", "attend", "route", "experts", ...), minor, changed_axes}].
    """
    if attn_path is not None and attn_path not in ATTN_PATHS:
        raise ValueError(f"attn_path={attn_path!r}: choose one of naive, absorb or None")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch={batch} and seq={seq} must be >= 1")
    B, S = int(batch), int(seq)
    plain = copy.copy(args)  # the same config without overrides, resolved without validation
    plain.layer_config = {}
    rows: list[dict[str, Any]] = [
        _end_row(
            "embed",
            "embed",
            f"vocab {args.vocab_size} -> dim {args.dim}",
            "",
            [
                _module(
                    "embed",
                    "embed",
                    "Embedding vocab -> dim",
                    [("batch", B), ("seq", S), ("dim", args.dim)],
                )
            ],
        )
    ]
    seen: dict[tuple, int] = {}  # shapes -> index of the first group with them
    prev_key = None
    for i in range(args.n_layers):
        la, base = args.for_layer(i), plain.for_layer(i)
        path = attn_path or la.attn_impl
        diff = _differences(la, base)
        shape_key = (tuple(v for k, v in la.to_dict().items() if k != "layer_id"), path)
        key = (shape_key, tuple((k, tuple(v)) for k, v in diff.items()), i in args.layer_config)
        if key == prev_key:
            row = rows[-1]
            row["last"], row["count"] = i, row["count"] + 1
            row["label"] = _span(row["first"], i)
            continue
        prev_key = key
        modules = _attention(la, B, S, path) + _ffn(la, B, S)
        if i in args.layer_config:
            _mark_changes(modules, base, B, S)
        note = ""
        if path == "absorb" and S > 1:
            note = (
                "absorb: a multi-token prefill expands the cached latent per head as naive does "
                "(unless absorbed_prefill); decode steps use this absorbed form"
            )
        rows.append(
            {
                "kind": "layers",
                "label": _span(i, i),
                "first": i,
                "last": i,
                "count": 1,
                "ffn": la.ffn,
                "attn_path": path,
                "override": i in args.layer_config,
                "diff": diff,
                "diff_text": ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()),
                "same_as": seen.get(shape_key),  # an index until the labels are final
                "summary": _summary(la, path),
                "note": note,
                "modules": modules,
            }
        )
        seen.setdefault(shape_key, len(rows) - 1)
    for r in rows:
        if r["same_as"] is not None:
            r["same_as"] = rows[r["same_as"]]["label"]
    rows.append(
        _end_row(
            "head",
            "norm + head",
            f"dim {args.dim} -> vocab {args.vocab_size}",
            "logits of the last position; (batch, seq, vocab) with all_logits",
            [
                _module(
                    "head", "norm", "RMSNorm", [("batch", B), ("seq", S), ("dim", args.dim)], True
                ),
                _module(
                    "head",
                    "head",
                    "Linear dim -> vocab",
                    [("batch", B), ("vocab", args.vocab_size)],
                ),
            ],
        )
    )
    for la in args.mtp_layers():  # built and counted, not run by the forward: shown as such
        D, bsd = args.dim, [("batch", B), ("seq", S), ("dim", args.dim)]
        rows.append(
            _end_row(
                "mtp",
                f"MTP {la.layer_id} (not run)",
                f"[norm(h) | norm(embed(next token))] 2*dim {2 * D} -> dim {D}, then a "
                f"{la.ffn} block (checkpoint layers.{la.layer_id}), the shared norm + head",
                "multi-token prediction: built, counted and loaded, but a forward predicts the "
                "next token only (as the reference's inference)",
                [
                    _module("head", "enorm", "RMSNorm (next token's embedding)", bsd, True),
                    _module("head", "hnorm", "RMSNorm (the main model's hidden state)", bsd, True),
                    _module("head", "eh_proj", "Linear 2*dim -> dim", bsd),
                    _module("head", "block", f"MLA + {la.ffn} as a layer", bsd),
                    _module(
                        "head",
                        "head",
                        "shared norm + head",
                        [("batch", B), ("vocab", args.vocab_size)],
                    ),
                ],
            )
        )
    return rows


def _end_row(kind: str, label: str, summary: str, note: str, modules: list) -> dict[str, Any]:
    """The embedding's, the head's or an MTP module's row: one module group outside the
    layers, never overridden."""
    return {
        "kind": kind,
        "label": label,
        "first": None,
        "last": None,
        "count": 1,
        "override": False,
        "diff": {},
        "diff_text": "",
        "same_as": None,
        "summary": summary,
        "note": note,
        "modules": modules,
    }


def architecture_table(rows: list[dict[str, Any]], minor: bool = True) -> list[dict[str, Any]]:
    """One flat record per module (for a dataframe): group, stage, module, op, shape text,
    changed axes, override diff. `minor=False` leaves out norms and pure views."""
    out = []
    for r in rows:
        for m in r["modules"]:
            if m["minor"] and not minor:
                continue
            out.append(
                {
                    "layers": r["label"],
                    "stage": m["stage"],
                    "module": m["name"],
                    "op": m["op"],
                    "shape": m["text"],
                    "changed": ", ".join(m["changed_axes"]),
                    "override": r["diff_text"],
                }
            )
    return out


def architecture_markdown(rows: list[dict[str, Any]], minor: bool = False) -> str:
    """The view as Markdown: a heading per group (overrides called out), a table of modules."""
    parts = []
    for r in rows:
        head = f"### {r['label']}"
        if r.get("ffn"):
            head += f" ({r['ffn']}, {r['attn_path']})"
        if r["override"]:
            head += " **override**"
        parts.append(head)
        if r["diff_text"]:
            parts.append(f"differs from the base config: `{r['diff_text']}`")
        if r["same_as"]:
            parts.append(f"same shapes as {r['same_as']}")
        parts.append(r["summary"])
        if r["note"]:
            parts.append(f"_{r['note']}_")
        lines = ["| module | op | output shape |", "|---|---|---|"]
        for m in r["modules"]:
            if m["minor"] and not minor:
                continue
            changed = set(m["changed_axes"])
            text = ", ".join(f"**{a} {n}**" if a in changed else f"{a} {n}" for a, n in m["axes"])
            lines.append(f"| {m['name']} | {m['op']} | ({text}) |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def filter_trace(
    rows: list[dict[str, Any]],
    layer: int | str | None = None,
    module_type: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of `dsv3.stats.trace_shapes` ({name, type, layer, shape}) for one layer and/or one
    module type. `layer`: an int, "none" for the rows outside layers (embed, norm, head,
    output), or None for all; `module_type`: a type name ("MLA", "Linear", ...), case-blind,
    or None/"" for all."""
    out = []
    want_type = (module_type or "").strip().lower()
    for r in rows:
        if layer is not None:
            if isinstance(layer, str) and layer.strip().lower() in ("none", "global", "-"):
                if r.get("layer") is not None:
                    continue
            elif r.get("layer") != int(layer):
                continue
        if want_type and str(r.get("type", "")).lower() != want_type:
            continue
        out.append(r)
    return out
