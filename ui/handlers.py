"""Thin event handlers: widget values -> one dsv3 call -> plain data and figures.

Every handler catches `ConfigError`/`ValueError` and returns a message for a status Markdown
(naming the field and layer) while keeping the last valid config and the built model; nothing
here shows a traceback. Figures come from ui.plots, model runs from ui.runtime.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from dsv3 import ConfigError, ModelArgs, count_params, memory, presets
from dsv3 import estimate as estimate_model
from dsv3.params import human_bytes

from . import fields, plots
from .state import Session, evict_lru, held_bytes, register, release


class _OnFirstUse:
    """A module imported on first attribute access. ui.runtime pulls in torch (about 1.3 s);
    the page needs it only at the first build, so `python app.py` serves sooner."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


runtime = _OnFirstUse("ui.runtime")

DEVICES = ["auto", "cpu", "cuda", "meta"]
DTYPES = ["fp32", "bf16", "fp8"]
EXPORT_LIMIT = memory.parse_bytes(os.environ.get("DSV3_EXPORT_LIMIT", "2GiB"))
IMPORT_LIMIT = memory.parse_bytes(os.environ.get("DSV3_IMPORT_LIMIT", "2GiB"))
TABLE_POSITIONS = 32
BALANCE_COLUMNS = [
    "layer",
    "n_tokens",
    "max_over_mean",
    "cv",
    "entropy",
    "entropy_norm",
    "group_counts",
]  # rows of the cos/sin tables shown as numbers


# ---------------------------------------------------------------------- messages
def ok(text: str) -> str:
    return f"✔ {text}"


def problem(e: Exception) -> str:
    """A ConfigError/ValueError as one Markdown line naming the field and the layer."""
    where = []
    if getattr(e, "field", None):
        where.append(f"field **{e.field}**")
    if getattr(e, "layer", None) is not None:
        where.append(f"layer **{e.layer}**")
    prefix = f"{', '.join(where)}: " if where else ""
    return f"⚠ {prefix}{e}"


def _int(value: Any, field: str, lo: int, hi: int | None = None) -> int:
    """A whole number from a form field (None, "", 2.0 and "3" arrive too) in lo..hi, else a
    ConfigError naming the field."""
    allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    try:
        f = float(value)
        ok = math.isfinite(f) and f == int(f)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{field}={value!r} must be a whole number, {allowed}", field=field)
    n = int(f)
    if n < lo or (hi is not None and n > hi):
        raise ConfigError(f"{field}={n} is out of range; allowed: {allowed}", field=field)
    return n


def _args(cfg: Any) -> ModelArgs:
    """The config hub's value (dict, or JSON text from an API client) -> ModelArgs."""
    if isinstance(cfg, str):
        return ModelArgs.from_json(cfg)
    if not cfg:
        raise ConfigError("no valid configuration yet: pick a preset", field="config")
    return ModelArgs.from_dict(cfg)


# ---------------------------------------------------------------------- presets and the form
def list_presets() -> list[str]:
    """Names of the shipped presets, tiny first."""
    return presets.names()


def initial_config() -> dict[str, Any]:
    names = presets.names()
    return presets.load("tiny" if "tiny" in names else names[0]).to_dict()


def load_preset(name: str) -> tuple[dict | Any, str]:
    """A shipped preset by name -> (config dict, status)."""
    try:
        doc = presets.load_preset(name)
    except ConfigError as e:
        return gr.skip(), problem(e)
    total = count_params(doc["args"])["total"]
    return doc["args"].to_dict(), ok(f"preset **{doc['name']}** ({plots.human(total)} params)")


def config_to_form(cfg: dict[str, Any]) -> list[Any]:
    """Config dict -> every form widget's value (FORM_FIELDS order), the override rows and the
    form's status line."""
    values, rows = fields.dict_to_form(cfg)
    return [*values, rows, _valid(cfg)]


def _valid(cfg: dict[str, Any]) -> str:
    n_over = len(cfg.get("layer_config") or {})
    extra = f", {n_over} layer override(s)" if n_over else ""
    return ok(f"valid: {cfg['n_layers']} layers, dim {cfg['dim']}{extra}")


def form_changed(prev_cfg: dict | None, overrides: Any, **values: Any) -> tuple[dict | None, str]:
    """Form values by field name -> (validated config, status). On error the previous config
    is kept and the message names the field and layer."""
    try:
        missing = [name for name in fields.FORM_FIELDS if name not in values]
        if missing:
            raise ConfigError(f"missing form field(s): {', '.join(missing)}", field=missing[0])
        cfg = fields.form_to_dict([values[name] for name in fields.FORM_FIELDS], overrides)
    except ConfigError as e:
        return prev_cfg, problem(e)
    return cfg, _valid(cfg)


# ---------------------------------------------------------------------- estimate
def _fits_line(nbytes: float, device: str, what: str) -> tuple[bool, str]:
    dev = runtime.resolve_device(device)
    if dev == "meta":
        return True, f"✔ {what} on **meta**: shapes only, nothing is allocated"
    try:
        fits, reason = memory.check_fits(nbytes, dev)
    except (RuntimeError, AssertionError) as e:  # e.g. cuda asked on a machine without one
        return False, f"✘ {what} on **{dev}**: device not usable here ({e})"
    return fits, f"{'✔ fits' if fits else '✘ does not fit'} {what} on **{dev}**: {reason}"


def estimate(
    cfg: dict[str, Any],
    device: str = "auto",
    dtype: str = "bf16",
    batch: int = 1,
    seq_len: int | None = None,
    n_gpus: int = 1,
) -> tuple[str, pd.DataFrame, Any, Any]:
    """Analytic estimate, no build: -> (summary Markdown, per-layer table, layer map, params)."""
    try:
        args, batch, seq_len, n_gpus = _estimate_request(cfg, batch, seq_len, n_gpus)
        e = estimate_model(args, dtype=dtype, batch=batch, seq_len=seq_len, n_gpus=n_gpus)
        split_note = _split_note(args, n_gpus, dtype)
    except (ConfigError, ValueError) as err:
        return problem(err), gr.skip(), gr.skip(), gr.skip()
    md = _estimate_markdown(e, args, device, dtype, batch, seq_len, split_note)
    layers = [la.to_dict() for la in args.layers()]
    return (
        md,
        pd.DataFrame(e["layers"]),
        plots.layer_map(layers),
        plots.params_by_group(e["params"]),
    )


def _estimate_request(cfg, batch, seq_len, n_gpus) -> tuple[ModelArgs, int, int, int]:
    """The estimate's inputs, checked: (args, batch, length (0 = max_seq_len), GPUs)."""
    args = _args(cfg)
    batch = _int(batch, "batch", 1)
    seq_len = _int(seq_len, "length", 1) if seq_len else args.max_seq_len
    n_gpus = _int(n_gpus, "n GPUs", 1, 4096)
    if seq_len > args.max_seq_len or batch > args.max_batch_size:
        raise ConfigError(
            f"estimate for batch {batch} x length {seq_len} exceeds max_batch_size="
            f"{args.max_batch_size} / max_seq_len={args.max_seq_len}",
            field="seq_len" if seq_len > args.max_seq_len else "batch",
        )
    return args, batch, seq_len, n_gpus


def _split_note(args: ModelArgs, n_gpus: int, dtype: str) -> str:
    """Why the model does not split over n_gpus (tensor/expert parallel), or ""."""
    if n_gpus == 1:
        return ""
    from dsv3.parallel import check_shardable  # torch: first use only

    try:
        check_shardable(args, n_gpus, dtype=dtype)
    except ConfigError as why:
        return f"✘ does not split over {n_gpus} GPUs: {why}"
    return ""


def _estimate_markdown(
    e: dict, args: ModelArgs, device: str, dtype: str, batch: int, seq_len: int, split_note: str
) -> str:
    p = e["params"]
    wb, kvt, kvc = e["weight_bytes_by_dtype"], e["kv_bytes_per_token"], e["kv_cache_bytes"]
    mark = {k: " (configured)" if k == args.attn_impl else "" for k in ("naive", "absorb")}
    fits_weights = _fits_line(e["weight_bytes"], device, f"a {dtype} build")[1]
    fits_all = _fits_line(e["per_gpu_bytes"], device, "weights + KV + activations per GPU")[1]
    return "\n".join(
        [
            f"**{p['total']:,} parameters** ({plots.human(p['total'])}), "
            f"**{p['active']:,} active** per token ({plots.human(p['active'])})",
            "",
            "| | fp32 | bf16 | fp8 |",
            "|---|---|---|---|",
            "| weights | " + " | ".join(human_bytes(wb[d]) for d in DTYPES) + " |",
            "",
            f"| KV cache ({dtype}) | naive{mark['naive']} | absorb{mark['absorb']} |",
            "|---|---|---|",
            f"| per token | {human_bytes(kvt['naive'])} | {human_bytes(kvt['absorb'])} |",
            f"| batch {batch} x {seq_len} | {human_bytes(kvc['naive'])} | "
            f"{human_bytes(kvc['absorb'])} |",
            "",
            f"Forward FLOPs: **{plots.human(e['flops_per_token'])}** per token, "
            f"{plots.human(e['flops_forward'])} for batch {batch} x {seq_len}.",
            f"Memory ({dtype}): weights {human_bytes(e['weight_bytes'])} + activations "
            f"{human_bytes(e['activation_bytes'])} + KV = **{human_bytes(e['total_bytes'])}**; "
            f"per GPU with {e['n_gpus']} GPU(s): **{human_bytes(e['per_gpu_bytes'])}**.",
            "",
            f"{fits_weights}  ",
            f"{fits_all}" + (f"  \n{split_note}" if split_note else ""),
        ]
    )


def rotary(
    cfg: dict[str, Any], n_positions: int = 64
) -> tuple[Any, Any, pd.DataFrame, pd.DataFrame, str]:
    """Rotary tables for the config -> (frequency figure, cos/sin figure, cos, sin, Markdown)."""
    try:
        args = _args(cfg)
        n = max(1, min(int(n_positions or 64), args.max_seq_len))
        from dsv3.rotary import rotary_info  # torch: loaded on first use, not with the page

        info = rotary_info(args, n_positions=n)
    except (ConfigError, ValueError) as e:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), problem(e)
    cols = [f"pair {d}" for d in info["dims"]]
    cos = pd.DataFrame(info["cos"][:TABLE_POSITIONS], columns=cols).round(4)
    sin = pd.DataFrame(info["sin"][:TABLE_POSITIONS], columns=cols).round(4)
    cos.insert(0, "pos", info["positions"][:TABLE_POSITIONS])
    sin.insert(0, "pos", info["positions"][:TABLE_POSITIONS])
    state = "on" if info["use_yarn"] else "off"
    md = (
        f"YaRN **{state}** (max_seq_len {args.max_seq_len}, original_seq_len "
        f"{args.original_seq_len}, factor {args.rope_factor:g}); correction range pairs "
        f"{info['low']}..{info['high']}; **mscale {info['mscale']:.4f}**; softmax scale "
        f"**{info['softmax_scale']:.6f}** (= qk_head_dim^-0.5 x mscale^2)"
    )
    return plots.rotary_freqs(info), plots.rotary_tables(info), cos, sin, md


# ---------------------------------------------------------------------- build and run
def _suggest(args: ModelArgs, device: str, dtype: str, session: Session | None = None) -> str:
    """Alternatives for a build that does not fit: smaller dtypes, meta, a smaller preset."""
    tips = []
    for d in ("bf16", "fp8"):
        if DTYPES.index(d) > DTYPES.index(dtype):
            nbytes = estimate_model(args, dtype=d, batch=1, seq_len=1)["weight_bytes"]
            fits = _fits_server(nbytes, device, session)[0]
            tips.append(
                f"dtype {d} ({human_bytes(nbytes)}{', fits' if fits else ', still too big'})"
            )
    tips.append("device meta (shapes only, no memory)")
    tips.append("a smaller preset (tiny, small)")
    return "Try: " + "; ".join(tips) + "."


SERVER_LIMIT = (
    memory.parse_bytes(os.environ["DSV3_SERVER_MEMORY"])
    if os.environ.get("DSV3_SERVER_MEMORY")
    else None
)


def _fits_server(nbytes: float, device: str, session: Session | None = None) -> tuple[bool, str]:
    """The device's free-memory budget, and the server-wide cap on what all sessions' models may
    hold together (DSV3_SERVER_MEMORY, optional). `session`'s own model does not count: a new
    build or import replaces it."""
    fits, reason = memory.check_fits(nbytes, device)
    if fits and SERVER_LIMIT is not None and device != "meta":
        held = held_bytes(exclude=session)
        if held + nbytes > SERVER_LIMIT:
            return False, (
                f"needs {human_bytes(nbytes)} but the sessions' models already hold "
                f"{human_bytes(held)} of the server's {human_bytes(SERVER_LIMIT)} "
                "(DSV3_SERVER_MEMORY)"
            )
    return fits, reason


def build(
    cfg: dict[str, Any],
    device: str,
    dtype: str,
    seed: int,
    session: Session | None,
    request: gr.Request | None = None,
    progress: Any = gr.Progress(),
) -> tuple[Session, str, dict[str, Any]]:
    """Build the config on `device` in `dtype` (refused before allocating if it won't fit)."""
    session = session if session is not None else Session()
    try:
        args, seed, dev, wbytes = _build_request(cfg, device, dtype, seed)
        fits, reason = (
            _fits_server(wbytes, dev, session) if dev != "meta" else (True, "meta device")
        )
    except (ConfigError, ValueError) as e:
        return session, problem(e), {**session.summary(), "ok": False, "error": str(e)}
    evicted = 0
    if not fits:  # make room: free other sessions' least recently used models first
        evicted = evict_lru(dev, lambda: _fits_server(wbytes, dev, session)[0], keep=session)
        fits, reason = _fits_server(wbytes, dev, session)
    if not fits:
        return session, _refusal(args, dev, dtype, reason, session), {
            **session.summary(), "ok": False, "error": reason
        }  # fmt: skip
    session.free()  # the next build replaces the previous model: free it first
    if runtime.ZERO_GPU and dev == "cuda":
        return _defer_to_zerogpu(session, args, dev, dtype, seed, request)

    def tick(done: int, total: int) -> None:
        progress((done, total), desc=f"initialising layer {done}/{total}", unit="layers")

    try:
        model, info = runtime.build(args, dev, dtype, seed, progress=tick)
    except (ConfigError, ValueError, RuntimeError) as e:  # RuntimeError: out of memory
        msg = problem(e) + " (the previous model, if any, had been freed to make room)"
        return session, msg, {**session.summary(), "ok": False, "error": str(e)}
    _adopt(session, model, seed, info["seconds"], info["model_bytes"], "build", request)
    if evicted:
        reason += f"; freed {evicted} idle session model(s), least recently used first"
    msg = _built_message(args, dev, dtype, info, reason)
    return session, msg, {**session.summary(), "ok": True}


def _adopt(session, model, seed, seconds: float, nbytes: int, source: str, request) -> None:
    """Make `model` the session's (built or imported) and register the session."""
    session.model, session.config = model, model.args.to_dict()
    session.device, session.dtype = model.device.type, model.dtype_name
    session.seed, session.build_seconds, session.source = seed, seconds, source
    session.model_bytes = 0 if session.device == "meta" else nbytes  # meta holds no memory
    session.notes.pop("evicted", None)
    session.touch()
    register(getattr(request, "session_hash", None), session)


def _build_request(cfg, device, dtype, seed) -> tuple[ModelArgs, int, str, int]:
    """The build's inputs, checked: (args, seed, resolved device, weight bytes)."""
    args = _args(cfg)
    seed = _int(seed, "seed", 0, 2**63 - 1)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}", field="dtype")
    if device not in DEVICES:
        raise ConfigError(f"device={device!r}: choose one of {', '.join(DEVICES)}", field="device")
    dev = runtime.resolve_device(device)
    if dev == "cuda" and not (runtime.ZERO_GPU or _cuda_ok()):
        raise ConfigError(
            "device cuda is not available here; use auto, cpu or meta", field="device"
        )
    wbytes = estimate_model(args, dtype=dtype, batch=1, seq_len=1)["weight_bytes"]
    return args, seed, dev, wbytes


def _refusal(args: ModelArgs, dev: str, dtype: str, reason: str, session: Session) -> str:
    reason = reason.split("; try")[0]  # our own suggestion follows, with numbers
    msg = f"✘ Not built, nothing allocated: the {dtype} weights {reason}. {_suggest(args, dev, dtype, session)}"
    msg = msg.replace("weights needs", "weights need")
    if session.model is not None:
        msg += " The previous model is kept."
    return msg


def _defer_to_zerogpu(session, args, dev, dtype, seed, request) -> tuple[Session, str, dict]:
    """ZeroGPU: no GPU outside @spaces.GPU calls, so build + run happen together in each Run."""
    session.config, session.device, session.dtype = args.to_dict(), dev, dtype
    session.seed, session.source = int(seed), "zerogpu"
    register(getattr(request, "session_hash", None), session)
    msg = ok("ZeroGPU: the model is built on the GPU inside each Run.")
    return session, msg, {**session.summary(), "ok": True}


def _built_message(args: ModelArgs, dev: str, dtype: str, info: dict, reason: str) -> str:
    mem = "no memory (meta)" if dev == "meta" else human_bytes(info["model_bytes"])
    if "cuda_peak_bytes" in info:
        mem += f", CUDA peak {human_bytes(info['cuda_peak_bytes'])}"
    return ok(
        f"built {plots.human(count_params(args)['total'])} params on **{dev}** in **{dtype}** "
        f"in **{info['seconds']:.2f} s**, {mem} ({reason})"
    )


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_markdown(r: dict[str, Any]) -> str:
    if r.get("meta"):
        return ok(
            f"meta run: input {r['input_shape']} -> logits {r['output_shape']} (shapes only, "
            "nothing computed)"
        )
    lines = [
        f"input {r['input_shape']} -> logits **{r['output_shape']}** on {r['device']} "
        f"({r['dtype']})",
        f"prefill **{r['prefill_seconds'] * 1e3:.1f} ms**, "
        f"**{r['prefill_tokens_per_s']:,.0f} tokens/s**",
    ]
    if r.get("decode_steps"):
        lines.append(
            f"decode {r['decode_steps']} steps with the KV cache (start_pos > 0): "
            f"{r['decode_seconds'] * 1e3:.1f} ms, **{r['decode_tokens_per_s']:,.1f} tokens/s**; "
            f"generated ids {r['generated'][:2]}{' ...' if len(r['generated']) > 2 else ''}"
        )
    lines.append(
        f"KV cache {human_bytes(r['kv_cache_bytes'])}; peak memory "
        f"**{human_bytes(r['peak_bytes'])}** ({r['peak_kind']})"
    )
    if not r.get("logits_finite", True):
        lines.append("⚠ logits contain NaN/inf")
    return ok("  \n".join(lines))


def _check_shape(args: ModelArgs, B: int, S: int, decode_steps: int) -> None:
    """Batch and length (prefill + decode) against the config, before anything is allocated."""
    if B > args.max_batch_size:
        raise ConfigError(
            f"batch={B} exceeds max_batch_size={args.max_batch_size}; allowed: 1..{args.max_batch_size}",
            field="batch",
        )
    if S + decode_steps > args.max_seq_len:
        raise ConfigError(
            f"seq length {S} + decode steps {decode_steps} = {S + decode_steps} exceeds "
            f"max_seq_len={args.max_seq_len}",
            field="seq length",
        )


def _check_run(args: ModelArgs, tokens: Any, decode_steps: int) -> None:
    """Shape and token ids against the config, before any device work (a meta model cannot
    check values, so this is where they are checked)."""
    _check_shape(args, *tokens.shape, decode_steps)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= args.vocab_size:
        raise ConfigError(
            f"token id {lo if lo < 0 else hi} is outside the vocabulary; allowed: "
            f"0..{args.vocab_size - 1}",
            field="tokens",
        )


def forward(
    session: Session | None,
    batch: int = 1,
    seq_len: int = 16,
    token_seed: int = 0,
    token_ids: str = "",
    decode_steps: int = 0,
) -> tuple[Any, ...]:
    """Run the session's model -> (session, Markdown, run info, trace table, trace figure,
    expert heatmap, routing balance figure, balance table)."""
    session = session if session is not None else Session()
    if session.model is None and session.source != "zerogpu":
        msg = "⚠ " + session.notes.get("evicted", "nothing built yet: press Build first")
        return (session, msg, {"ok": False, "error": msg}, *([gr.skip()] * 5))
    args = ModelArgs.from_dict(session.config)
    try:
        tokens, decode_steps = _run_request(
            args, batch, seq_len, token_seed, token_ids, decode_steps
        )
        r, trace = _run_session(session, args, tokens, decode_steps)
    except (ConfigError, ValueError, RuntimeError) as e:
        return (session, problem(e), {"ok": False, "error": str(e)}, *([gr.skip()] * 5))
    session.runs += 1
    return (session, *_run_outputs(r, trace))


def _run_request(args, batch, seq_len, token_seed, token_ids, decode_steps) -> tuple[Any, int]:
    """The run's tokens (typed ids, else random from the seed) and decode steps, checked
    against the config before anything runs (on meta too: it cannot check values itself)."""
    decode_steps = _int(decode_steps, "decode steps", 0, args.max_seq_len)
    tokens = runtime.parse_token_ids(token_ids)
    if tokens is None:
        batch = _int(batch, "batch", 1, 2**20)  # the config's maxima: _check_run
        seq_len = _int(seq_len, "seq length", 1, 2**24)
        _check_shape(args, batch, seq_len, decode_steps)
        seed = _int(token_seed, "token seed", 0, 2**63 - 1)
        tokens = runtime.make_tokens(args.vocab_size, batch, seq_len, seed)
    _check_run(args, tokens, decode_steps)
    return tokens, decode_steps


def _run_session(session: Session, args: ModelArgs, tokens, decode_steps: int):
    """-> (run info, shape trace) of the session's model (or a ZeroGPU build + run)."""
    if session.source == "zerogpu":
        result = runtime.build_and_run(
            session.config, session.device, session.dtype, session.seed, tokens, decode_steps
        )
        return result["run"], result["trace"]
    if session.device == "meta":
        tokens = tokens.to("meta")
    else:
        need = estimate_model(args, session.dtype, tokens.shape[0], tokens.shape[1] + decode_steps)
        fits, reason = memory.check_fits(need["total_bytes"] - need["weight_bytes"], session.device)
        if not fits:
            raise ConfigError(f"this run's KV cache and activations {reason}", field="batch")
    session.touch()
    try:
        r = memory.run_guarded(runtime.run, session.model, tokens, decode_steps)
        return r, memory.run_guarded(runtime.trace, session.model, tokens)
    except memory.MemoryBudgetError:
        session.model.reset_cache()  # drop the half-grown KV cache; the model stays
        memory.release_memory()
        raise
    finally:  # a shared server: activations go back to the OS between clicks
        memory.trim_heap()


def _run_outputs(r: dict[str, Any], trace: list[dict]) -> tuple[Any, ...]:
    """Run info + trace -> (Markdown, info, trace table, trace figure, heatmap, balance figure,
    balance table)."""
    routing = r.pop("routing", [])
    trace_df = pd.DataFrame(
        [{**t, "shape": str(t["shape"])} for t in trace], columns=["name", "type", "layer", "shape"]
    )
    balance = pd.DataFrame(
        [{**s, "group_counts": str(s["group_counts"])} for s in routing], columns=BALANCE_COLUMNS
    ).round(4)
    info = {"ok": True, **r, "routing": routing, "trace_len": len(trace)}
    meta = bool(r.get("meta"))
    heat = plots.empty("meta run: no routing") if meta else plots.expert_heatmap(routing)
    bal = plots.empty("meta run: no routing") if meta else plots.routing_balance(routing)
    return _run_markdown(r), info, trace_df, plots.shape_trace(trace), heat, bal, balance


# ---------------------------------------------------------------------- presets in the browser
def saved_names_update(store: dict | None) -> Any:
    names = sorted(store or {})
    return gr.update(choices=names, value=names[-1] if names else None)


def save_browser(store: dict | None, name: str, cfg: dict) -> tuple[dict, Any, str]:
    """Save the current config in the browser's localStorage under `name`."""
    name = (name or "").strip()
    if not name:
        return gr.skip(), gr.skip(), "⚠ give the preset a name first"
    try:
        args = _args(cfg)
    except ConfigError as e:
        return gr.skip(), gr.skip(), problem(e)
    store = dict(store or {})
    store[name] = args.to_dict()  # plain, JSON-safe dict
    return (
        store,
        gr.update(choices=sorted(store), value=name),
        ok(f"saved **{name}** in this browser"),
    )


def load_browser(store: dict | None, name: str) -> tuple[Any, str]:
    if not name or name not in (store or {}):
        return gr.skip(), f"⚠ no preset named {name!r} saved in this browser"
    try:
        return _args(store[name]).to_dict(), ok(f"loaded **{name}** from this browser")
    except ConfigError as e:  # saved by an older version, say
        return gr.skip(), problem(e)


def delete_browser(store: dict | None, name: str) -> tuple[Any, Any, str]:
    store = dict(store or {})
    if store.pop(name, None) is None:
        return gr.skip(), gr.skip(), f"⚠ no preset named {name!r} saved in this browser"
    return store, saved_names_update(store), ok(f"deleted **{name}** from this browser")


# ---------------------------------------------------------------------- files
def _tmp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dsv3-"))


def export_config(cfg: dict, name: str = "") -> tuple[Any, str]:
    """The current config as a preset JSON file to download."""
    try:
        args = _args(cfg)
    except ConfigError as e:
        return gr.skip(), problem(e)
    name = (name or "").strip() or "my-preset"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    path = _tmp_dir() / f"{safe}.json"
    path.write_text(presets.to_json(args, name), encoding="utf-8")
    return gr.update(value=str(path), visible=True), ok(f"{path.name} ready to download")


def import_config(file: Any) -> tuple[Any, str]:
    """An uploaded preset JSON (a preset document, or plain ModelArgs fields) -> config."""
    if not file:
        return gr.skip(), "⚠ no file uploaded"
    path = Path(file if isinstance(file, str) else getattr(file, "name", file))
    try:
        if path.stat().st_size > 1 << 20:
            raise ConfigError(
                f"{path.name} is larger than 1 MiB; a preset is a small JSON file", field="preset"
            )
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path.name} is not valid JSON: {e}", field="preset") from None
        except RecursionError:  # absurdly nested JSON: refuse rather than crash the handler
            raise ConfigError(
                f"{path.name} is nested too deeply to be a preset", field="preset"
            ) from None
        if isinstance(doc, dict) and "args" in doc:
            args = presets.parse(text, source=path.name)["args"]
        else:
            try:
                args = ModelArgs.from_dict(doc)
            except ConfigError as e:
                raise ConfigError(f"{path.name}: {e}", field=e.field, layer=e.layer) from None
    except UnicodeDecodeError:
        return gr.skip(), problem(ConfigError(f"{path.name} is not UTF-8 text", field="preset"))
    except (ConfigError, TypeError) as e:
        return gr.skip(), problem(e)
    return args.to_dict(), ok(
        f"imported **{path.name}** ({plots.human(count_params(args)['total'])} params)"
    )


def export_weights(session: Session | None) -> tuple[Any, str]:
    """The built weights as a safetensors file (refused above DSV3_EXPORT_LIMIT)."""
    from dsv3 import checkpoint

    if session is None or session.model is None:
        return None, "⚠ nothing built yet: press Build first"
    if session.device == "meta":
        return None, "⚠ a meta model has shapes but no weights to export; build on cpu or cuda"
    if session.model_bytes > EXPORT_LIMIT:
        return None, (
            f"✘ not exported: the weights take {human_bytes(session.model_bytes)}, above the "
            f"export limit {human_bytes(EXPORT_LIMIT)} (DSV3_EXPORT_LIMIT)"
        )
    origin = f"seed{session.seed}" if session.seed is not None else "imported"
    path = _tmp_dir() / f"dsv3-{session.dtype}-{origin}.safetensors"
    t0 = time.perf_counter()
    checkpoint.save(session.model, path)
    size = path.stat().st_size
    return str(path), ok(f"{path.name}: {human_bytes(size)} in {time.perf_counter() - t0:.2f} s")


def import_hf(
    files: list[Any] | None,
    device: str,
    dtype: str,
    session: Session | None,
    request: gr.Request | None = None,
) -> tuple[Any, Any, str]:
    """An HF DeepseekV3 checkpoint (config.json + *.safetensors) -> a session model + config."""
    session = session if session is not None else Session()
    paths = [Path(f if isinstance(f, str) else getattr(f, "name", f)) for f in (files or [])]
    refused = _import_refusal(paths)
    if refused:
        return session, gr.skip(), refused
    dev = runtime.resolve_device(device)
    try:
        model, seconds = _load_hf_upload(paths, dev, dtype, session)
    except _Refused as e:
        return session, gr.skip(), str(e)
    except (ConfigError, ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        return session, gr.skip(), problem(e)  # CheckpointError and JSONDecodeError are ValueErrors
    session.free()
    _adopt(session, model, None, seconds, runtime.tensor_bytes(model), "hf import", request)
    total = plots.human(count_params(model.args)["total"])
    msg = f"imported {total} params from {len(paths)} file(s) in {seconds:.2f} s onto {dev}"
    return session, session.config, ok(msg)


class _Refused(Exception):
    """A request turned down before anything was allocated; the message says why."""


def _import_refusal(paths: list[Path]) -> str:
    """Why an upload cannot be an HF checkpoint import, or ""."""
    names = {p.name for p in paths}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return "⚠ upload config.json and at least one .safetensors file"
    total = sum(p.stat().st_size for p in paths)
    if total > IMPORT_LIMIT:
        return (
            f"✘ not imported: {human_bytes(total)} uploaded, above the import limit "
            f"{human_bytes(IMPORT_LIMIT)} (DSV3_IMPORT_LIMIT)"
        )
    return ""


def _load_hf_upload(paths: list[Path], dev: str, dtype: str, session: Session):
    """Copy the upload to a private temp dir, check the memory, load -> (model, seconds).
    The session's current model stays loaded until the import succeeds: it counts."""
    from dsv3 import checkpoint

    folder = _tmp_dir()
    try:
        for p in paths:
            shutil.copy(p, folder / p.name)
        args = checkpoint.args_from_hf_config(checkpoint.read_hf_config(folder / "config.json"))
        wbytes = estimate_model(args, dtype=dtype, batch=1, seq_len=1)["weight_bytes"]
        fits, reason = (True, "") if dev == "meta" else _fits_server(wbytes, dev)
        if not fits:
            evict_lru(dev, lambda: _fits_server(wbytes, dev)[0], keep=session)
            fits, reason = _fits_server(wbytes, dev)
        if not fits:
            raise _Refused(f"✘ not imported, nothing allocated: {dtype} weights: {reason}")
        t0 = time.perf_counter()
        model = checkpoint.load_hf(folder, device=dev, dtype=dtype)
        return model, time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- session end
def release_model(session: Session | None) -> tuple[Session, str]:
    """Free this session's model now (the Free button; API clients call it when done)."""
    session = session if session is not None else Session()
    held = session.model is not None
    session.free()
    return session, ok("model freed") if held else "nothing to free"


def on_unload(request: gr.Request) -> None:
    """Tab closed: free its model now (gr.State alone would hold it for an hour)."""
    release(getattr(request, "session_hash", None))
