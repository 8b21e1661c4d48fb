"""Build & run: build the config (refused before allocating when it will not fit), free it, run
forwards with optional decode steps; and the model status line, which says whether the built
model is the config on the form and, when not, what differs."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
import pandas as pd

from dsv3 import ConfigError, ModelArgs, count_params, memory
from dsv3 import estimate as estimate_model
from dsv3.compare import changes
from dsv3.params import NO_FP8_PATH, human_bytes, run_bytes

from .. import lazy, plots
from ..components import Choice, WholeNumber
from ..messages import (
    KEPT,
    META_RUN,
    args_of,
    choice,
    config_line,
    id_list,
    lit,
    ok,
    plain,
    problem,
    whole,
)
from ..state import Session, make_room, register
from .estimate import DEVICES, DTYPES, check_batch, dense_copies_here, weights_held

BALANCE_COLUMNS = [
    "layer",
    "n_tokens",
    "max_over_mean",
    "cv",
    "entropy",
    "entropy_norm",
    "group_counts",
]
# A browser reads a number box as a double: whole numbers past 2**53 arrive rounded (a typed
# 9007199254740993 arrives as ...992), so larger seeds are refused rather than silently changed.
SEED_MAX = 2**53 - 1
SEED_WHY = "a browser sends whole numbers past 2**53 rounded"


# ---------------------------------------------------------------------- model status
def _differences(built: dict[str, Any], cfg: Any, limit: int = 6) -> list[str]:
    """What differs between the built model's config and the hub's, as 'layer 1 n_heads 4 →
    8' lines (first `limit`)."""
    found = changes(ModelArgs.from_dict(built), args_of(cfg))
    out = [c["text"].replace(" -> ", " → ") for c in found[:limit]]
    if len(found) > limit:
        out.append(f"and {len(found) - limit} more")
    return out


def model_status(session: Any, cfg: Any, form_error: Any = "") -> str:
    """Whether the session's model is the config on the form; what differs when it is not."""
    if not isinstance(session, Session) or (session.model is None and session.source != "zerogpu"):
        note = session.notes.get("evicted") if isinstance(session, Session) else None
        return f"⚠ {note}" if note else "No model built yet: press Build."
    what = (
        f"{config_line(session.config or {})} on {session.device} in {session.dtype}"
        + (f", seed {session.seed}" if session.seed is not None else f", {session.source}")
        + (f", built {session.built_at}" if session.built_at else "")
    )
    try:
        diff = _differences(session.config or {}, cfg)
    except ConfigError:
        diff = []
    stale = " (the form has an error: compared with its last valid config)" if form_error else ""
    if not diff:
        return ok(f"the built model is the config on the form{stale}: {what}")
    return (
        f"⚠ **built from an older config: rebuild to apply**{stale}. Built: {what}. "
        f"Differs: {'; '.join(diff)}"
    )


def session_info(session: Any, form_error: Any = "") -> dict[str, Any]:
    """The session as plain data: the built model (if any), its config, the form's error."""
    s = session if isinstance(session, Session) else Session()
    return {
        **s.summary(),
        "config": s.config,
        "model_id": id(s.model) if s.model is not None else None,
        "form_error": form_error or "",
        "runs": s.runs,
    }


# ---------------------------------------------------------------------- build
def _build_request(cfg: Any, device: Any, dtype: Any, seed: Any, form_error: Any):
    """The build's inputs, checked: (args, seed, resolved device, dtype, weight bytes)."""
    if form_error:
        raise ConfigError(
            "the form has an error, so there is nothing valid to build: fix the field first "
            f"({plain(form_error)})",
            field="config",
        )
    args = args_of(cfg)
    seed = whole(seed, "seed", 0, SEED_MAX, SEED_WHY)
    dtype = choice(dtype, "dtype", DTYPES)
    dev = usable_device(device)
    wbytes = weights_held(estimate_model(args, dtype=dtype, batch=1, seq_len=1), dev)
    return args, seed, dev, dtype, wbytes


def usable_device(device: Any) -> str:
    """The Build device choice resolved ('auto' -> cuda or cpu), refused when it is cuda on a
    server without one."""
    dev = lazy.runtime.resolve_device(choice(device, "device", DEVICES))
    if dev == "cuda" and not (lazy.runtime.ZERO_GPU or lazy.runtime.cuda_ok()):
        raise ConfigError(
            "device cuda is not available here; use auto, cpu or meta", field="device"
        )
    return dev


def _suggest(args: ModelArgs, device: str, dtype: str, session: Session | None) -> str:
    """Alternatives for a build that does not fit: smaller dtypes, meta, a smaller preset."""
    from ..state import fits

    tips = []
    for d in ("bf16", "fp8"):
        if d == "fp8" and dense_copies_here(device):
            continue  # fp8 keeps bf16 copies as well here: not smaller
        if DTYPES.index(d) > DTYPES.index(dtype):
            nbytes = weights_held(estimate_model(args, dtype=d, batch=1, seq_len=1), device)
            ok_ = fits(nbytes, device, session)[0]
            tips.append(
                f"dtype {d} ({human_bytes(nbytes)}{', fits' if ok_ else ', still too big'})"
            )
    tips.append("device meta (shapes only, no memory)")
    tips.append("a smaller preset (tiny, small)")
    return "Try: " + "; ".join(tips) + "."


def _refusal(args: ModelArgs, dev: str, dtype: str, reason: str, session: Session) -> str:
    reason = reason.split("; try")[0]  # our own suggestion follows, with numbers
    msg = (
        f"✘ Not built, nothing allocated, no other session's model freed: the {dtype} weights "
        f"{reason}. {_suggest(args, dev, dtype, session)}"
    )
    msg = msg.replace("weights needs", "weights need")
    if session.model is not None:
        msg += f" {KEPT.capitalize()}."
    return msg


def adopt(
    session: Session,
    model,
    seed,
    seconds: float,
    nbytes: int,
    source: str,
    request,
    copy_bytes: int = 0,
) -> None:
    """Make `model` the session's (built or imported) and register the session; `nbytes` its
    weights, `copy_bytes` the bf16 copies of fp8 weights it keeps (`Transformer.dequantize_once`)."""
    session.model, session.config = model, model.args.to_dict()
    session.device, session.dtype = model.device.type, model.dtype_name
    session.seed, session.build_seconds, session.source = seed, seconds, source
    session.model_bytes = 0 if session.device == "meta" else nbytes  # meta holds no memory
    session.copy_bytes = copy_bytes
    session.built_at = time.strftime("%H:%M:%S")
    session.runs = 0
    session.notes.pop("evicted", None)
    session.touch()
    register(getattr(request, "session_hash", None), session)


def build(
    cfg: Any,
    device: Any,
    dtype: Any,
    seed: Any,
    session: Session | None,
    form_error: Any = "",
    request: gr.Request | None = None,
    progress: Any = gr.Progress(),
) -> tuple[Session, str, dict[str, Any]]:
    """Build the config on `device` in `dtype` (refused before allocating if it won't fit)."""
    session = session if isinstance(session, Session) else Session()
    try:
        args, seed, dev, dtype, wbytes = _build_request(cfg, device, dtype, seed, form_error)
    except (ConfigError, ValueError) as e:
        kept = f"  \nNot built; {KEPT}." if session.model is not None else ""
        return session, problem(e) + kept, {**session.summary(), "ok": False, "error": str(e)}
    with session.in_use():
        fits, reason, evicted = make_room(wbytes, dev, session)
        if not fits:
            msg = _refusal(args, dev, dtype, reason, session)
            return session, msg, {**session.summary(), "ok": False, "error": reason}
        session.free()  # the next build replaces the previous model: free it first
        if lazy.runtime.ZERO_GPU and dev == "cuda":
            return _defer_to_zerogpu(session, args, dev, dtype, seed, request)

        def tick(done: int, total: int) -> None:
            progress((done, total), desc=f"initialising layer {done}/{total}", unit="layers")

        try:
            model, info = lazy.runtime.build(args, dev, dtype, seed, progress=tick)
        except (ConfigError, ValueError, RuntimeError) as e:  # RuntimeError: out of memory
            msg = problem(e) + " (the previous model, if any, had been freed to make room)"
            return session, msg, {**session.summary(), "ok": False, "error": str(e)}
        copies = info.get("dense_kept_bytes", 0)
        adopt(session, model, seed, info["seconds"], info["model_bytes"], "build", request, copies)
    if evicted:
        reason += f"; freed {evicted} idle session model(s), least recently used first"
    msg = _built_message(args, dev, dtype, info, reason)
    return session, msg, {**session.summary(), "ok": True}


def _defer_to_zerogpu(session, args, dev, dtype, seed, request) -> tuple[Session, str, dict]:
    """ZeroGPU: no GPU outside @spaces.GPU calls, so build + run happen together in each Run."""
    session.config, session.device, session.dtype = args.to_dict(), dev, dtype
    session.seed, session.source = int(seed), "zerogpu"
    session.built_at = time.strftime("%H:%M:%S")
    register(getattr(request, "session_hash", None), session)
    msg = ok("ZeroGPU: the model is built on the GPU inside each Run.")
    return session, msg, {**session.summary(), "ok": True}


def _built_message(args: ModelArgs, dev: str, dtype: str, info: dict, reason: str) -> str:
    mem = "no memory (meta)" if dev == "meta" else human_bytes(info["model_bytes"])
    if "dense_kept_bytes" in info:
        mem += (
            f" + the fp8 weights kept dequantised to bf16, "
            f"{human_bytes(info['dense_kept_bytes'])} ({NO_FP8_PATH})"
        )
    if "cuda_peak_bytes" in info:
        mem += f", CUDA peak {human_bytes(info['cuda_peak_bytes'])}"
    return ok(
        f"built {plots.human(count_params(args)['total'])} params on **{dev}** in **{dtype}** "
        f"in **{info['seconds']:.2f} s**, {mem} ({reason})"
    )


def _after_build(msg: Any) -> Any:
    ok_ = isinstance(msg, str) and msg.startswith("✔")
    return "the session's model now comes from Build" if ok_ else gr.skip()


def release_model(session: Session | None) -> tuple[Session, str]:
    """Free this session's model now (the Free button; API clients call it when done)."""
    session = session if isinstance(session, Session) else Session()
    held = session.model is not None
    session.free()
    return session, ok("model freed") if held else "nothing to free"


# ---------------------------------------------------------------------- run
def _check_shape(args: ModelArgs, B: int, S: int, decode_steps: int) -> None:
    """Batch and length (prefill + decode) against the config, before anything is allocated."""
    check_batch(args, B)
    if S + decode_steps > args.max_seq_len:
        raise ConfigError(
            f"seq length {S} + decode steps {decode_steps} = {S + decode_steps} exceeds "
            f"max_seq_len={args.max_seq_len}; allowed: seq length + decode steps "
            f"<= {args.max_seq_len}",
            field="seq length",
        )


def _run_request(args: ModelArgs, batch, seq_len, token_seed, token_ids, decode_steps):
    """The run's tokens (typed ids, else random from the seed) and decode steps, checked
    against the config before anything runs (on meta too: it cannot check values itself)."""
    decode_steps = whole(decode_steps, "decode steps", 0, args.max_seq_len)
    try:
        tokens = lazy.runtime.parse_token_ids(token_ids or "", args.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e), field="token ids") from None
    if tokens is None:
        batch = check_batch(args, batch)
        seq_len = whole(
            seq_len, "seq length", 1, args.max_seq_len, f"max_seq_len={args.max_seq_len}"
        )
        seed = whole(token_seed, "token seed", 0, SEED_MAX, SEED_WHY)
        tokens = lazy.runtime.make_tokens(args.vocab_size, batch, seq_len, seed)
    _check_shape(args, *tokens.shape, decode_steps)
    return tokens, decode_steps


def _run_session(session: Session, args: ModelArgs, tokens, decode_steps: int):
    """-> (run info, shape trace) of the session's model (or a ZeroGPU build + run)."""
    rt = lazy.runtime
    if session.source == "zerogpu":
        result = rt.build_and_run(
            session.config, session.device, session.dtype, session.seed, tokens, decode_steps
        )
        return result["run"], result["trace"]
    if session.device == "meta":
        tokens = tokens.to("meta")
    else:
        need = estimate_model(args, session.dtype, tokens.shape[0], tokens.shape[1] + decode_steps)
        extra = run_bytes(need, session.device) - need["weight_bytes"]
        what = "KV cache and activations"
        if extra > need["total_bytes"] - need["weight_bytes"]:  # fp8 on CPU
            what += " and fp8 weights dequantised per call"
        fits, reason = memory.check_fits(extra, session.device)
        if not fits:
            raise ConfigError(f"this run's {what} {reason}", field="batch")
    try:
        r = memory.run_guarded(rt.run, session.model, tokens, decode_steps)
        return r, memory.run_guarded(rt.trace, session.model, tokens)
    except memory.MemoryBudgetError:
        session.model.reset_cache()  # drop the half-grown KV cache; the model stays
        memory.release_memory()
        raise
    finally:  # a shared server: activations go back to the OS between clicks
        memory.trim_heap()


def forward(
    session: Session | None,
    batch: Any = 1,
    seq_len: Any = 16,
    token_seed: Any = 0,
    token_ids: Any = "",
    decode_steps: Any = 0,
) -> tuple[Any, ...]:
    """Run the session's model -> (session, Markdown, run info, trace table, trace figure,
    expert heatmap, routing balance figure, balance table)."""
    session = session if isinstance(session, Session) else Session()
    if session.model is None and session.source != "zerogpu":
        msg = "⚠ " + session.notes.get("evicted", "nothing built yet: press Build first")
        return (session, msg, {"ok": False, "error": msg}, *([gr.skip()] * 5))
    args = ModelArgs.from_dict(session.config)
    try:
        tokens, decode_steps = _run_request(
            args, batch, seq_len, token_seed, token_ids, decode_steps
        )
        with session.in_use():
            r, trace = _run_session(session, args, tokens, decode_steps)
    except (ConfigError, ValueError, RuntimeError) as e:
        return (session, problem(e), {"ok": False, "error": str(e)}, *([gr.skip()] * 5))
    session.runs += 1
    r["ran"] = {"config": config_line(session.config), "built_at": session.built_at}
    if r.get("device") == "cuda":
        r["floor"] = _floor(args, session.dtype, r)
    session.last_run = {
        "routing": r.get("routing", []),
        "router": r.pop("router", []),
        "trace": trace,
        "n_layers": args.n_layers,
        "meta": bool(r.get("meta")),
        "input_shape": list(r["input_shape"]),
    }
    return (session, *_run_outputs(r, trace, args.n_layers))


def _mtp_line(n: int) -> str:
    return (
        f"the MTP module ({n} layer{'s' if n > 1 else ''}) is built but not run: the forward "
        "predicts the next token only, as the reference's inference does"
    )


def _floor(args: ModelArgs, dtype: str, r: dict[str, Any]) -> dict[str, Any] | None:
    """This run's prefill and decode step against the roofline floor of this GPU (measured
    once): the fraction of the physical limit the run reached."""
    from dsv3.roofline import roofline

    from .estimate import this_gpu

    gpu = this_gpu()
    if gpu is None:
        return None
    B, S = r["input_shape"]
    f = roofline(args, gpu, dtype=dtype, batch=B, prompt_len=S)
    out = {"gpu": gpu.name, "prefill_floor_s": f["prefill"]["seconds"]}
    out["prefill_fraction"] = f["prefill"]["seconds"] / max(r["prefill_seconds"], 1e-12)
    if r.get("decode_steps"):
        step = r["decode_seconds"] / r["decode_steps"]
        out["decode_floor_s"] = f["decode"]["seconds"]
        out["decode_fraction"] = f["decode"]["seconds"] / max(step, 1e-12)
    return out


def run_markdown(r: dict[str, Any]) -> str:
    ran = r.get("ran") or {}
    which = (
        f"ran the model built {ran['built_at']} from **{ran['config']}**: "
        if ran.get("built_at")
        else ""
    )
    if r.get("meta"):
        steps = r.get("decode_steps_asked") or 0
        skipped = f"; the {steps} decode steps asked were not run" if steps else ""
        return ok(
            f"{which}meta run: input {r['input_shape']} -> logits {r['output_shape']} (shapes "
            f"only, nothing computed{skipped})"
        ) + (f"  \n{_mtp_line(r['mtp_layers'])}" if r.get("mtp_layers") else "")
    lines = [
        f"{which}input {r['input_shape']} -> logits **{r['output_shape']}** on {r['device']} "
        f"({r['dtype']})",
        f"prefill **{r['prefill_seconds'] * 1e3:.1f} ms**, "
        f"**{r['prefill_tokens_per_s']:,.0f} tokens/s** ({lit(r.get('prefill_how', 'eager'))})",
    ]
    if r.get("decode_steps"):
        lines.append(
            f"decode {r['decode_steps']} steps with the KV cache (start_pos > 0): "
            f"{r['decode_seconds'] * 1e3:.1f} ms, **{r['decode_tokens_per_s']:,.1f} tokens/s** "
            f"({lit(r.get('decode_how', 'eager'))}); generated {id_list(r['generated'])}"
        )
    used = r.get("kv_cache_used_bytes")
    kv = f"KV cache {human_bytes(r['kv_cache_bytes'])} allocated"
    if used is not None and used != r["kv_cache_bytes"]:
        kv = (
            f"KV cache {human_bytes(used)} holding this run's {r['input_shape'][0]} x "
            f"{r['input_shape'][1] + r.get('decode_steps', 0)} positions, "
            f"{human_bytes(r['kv_cache_bytes'])} allocated"
        )
    lines.append(f"{kv}; peak memory **{human_bytes(r['peak_bytes'])}** ({r['peak_kind']})")
    fl = r.get("floor")
    if fl:
        line = (
            f"roofline on {fl['gpu']} (measured): prefill floor "
            f"{fl['prefill_floor_s'] * 1e3:.2f} ms, this run reached **{fl['prefill_fraction']:.0%}**"
        )
        if "decode_fraction" in fl:
            line += (
                f"; decode step floor {fl['decode_floor_s'] * 1e3:.2f} ms, reached "
                f"**{fl['decode_fraction']:.0%}**"
            )
        lines.append(line)
    if r.get("mtp_layers"):
        lines.append(_mtp_line(r["mtp_layers"]))
    if not r.get("logits_finite", True):
        lines.append("⚠ logits contain NaN/inf")
    return ok("  \n".join(lines))


def _run_views_follow(page: Any, event: Any) -> None:
    """After `event` (a build, free or import) the run's views show the session's run: the
    previous model's run is gone with it, so they say so instead of showing it as current
    (a refused build keeps the model and its run, and they redraw the same)."""
    event.then(
        run_gone,
        [page.session, page.run_msg],
        [page.run_msg, page.balance, page.balance_table],
        **page.quiet(),
    )
    _redraw_run_views(page, event)
    from .files import weights_follow  # files imports this module

    event.then(weights_follow, page.session, [page.weights_file, page.weights_msg], **page.quiet())


def _redraw_run_views(page: Any, event: Any) -> None:
    """The Inspect views that read the run from the session, redrawn after `event`."""
    for step in page.run_views_steps:
        event.then(*step, **page.quiet())


_NOT_KNOWN = object()  # `run_gone` called without the page's run message


def run_gone(session: Any, shown: Any = _NOT_KNOWN) -> tuple[Any, Any, Any]:
    """The run message, balance figure and table once the model that ran is gone, or skips
    while its run is still the session's, or when the page shows no run message (`shown`
    empty or None: nothing ran, so no run is gone)."""
    if (isinstance(session, Session) and session.last_run) or shown in ("", None):
        return gr.skip(), gr.skip(), gr.skip()
    built = isinstance(session, Session) and session.model is not None
    return (
        "the model that made the last run is gone: "
        + ("press Run forward for this one" if built else "build one, then press Run forward"),
        plots.empty(
            "press Run forward to see the routing balance of this model"
            if built
            else "build a model and press Run forward to see its routing balance"
        ),
        pd.DataFrame(columns=BALANCE_COLUMNS),
    )


def _run_outputs(r: dict[str, Any], trace: list[dict], n_layers: int) -> tuple[Any, ...]:
    """Run info + trace -> (Markdown, info, trace table, trace figure, expert load relative to
    uniform, balance figure, balance table). Dense layers show as gaps."""
    routing = r.pop("routing", [])
    trace_df = pd.DataFrame(
        [{**t, "shape": str(t["shape"])} for t in trace], columns=["name", "type", "layer", "shape"]
    )
    balance = pd.DataFrame(
        [{**s, "group_counts": str(s["group_counts"])} for s in routing], columns=BALANCE_COLUMNS
    ).round(4)
    info = {"ok": True, **r, "routing": routing, "trace_len": len(trace)}
    meta = bool(r.get("meta"))
    if meta:
        heat = bal = plots.empty(META_RUN.format("routing"))
    else:
        heat = plots.expert_load(routing, n_layers=n_layers)
        bal = plots.routing_balance(routing, n_layers=n_layers, groups=False)
    return run_markdown(r), info, trace_df, plots.shape_trace(trace), heat, bal, balance


# ---------------------------------------------------------------------- layout
def render_build(page: Any) -> None:
    gr.Markdown("## Build")
    with gr.Row():
        page.device = Choice(DEVICES, value="auto", label="device", min_width=100)
        page.dtype = Choice(DTYPES, value="fp32", label="dtype", min_width=100)
        page.seed = WholeNumber(0, label="seed", min_width=100, elem_id="build-seed")
    with gr.Row():
        page.build_btn = gr.Button("Build", variant="primary", elem_id="build-btn", scale=3)
        page.free_btn = gr.Button("Free model", variant="secondary", elem_id="free-btn", scale=1)
    page.build_msg = gr.Markdown(elem_classes="status", elem_id="build-msg")
    page.model_status = gr.Markdown(
        "No model built yet: press Build.", elem_classes="status", elem_id="model-status"
    )
    page.build_info = gr.JSON(label="built model", visible=False)


def render_run(page: Any) -> None:
    gr.Markdown("## Run")
    with gr.Row():
        page.batch = WholeNumber(2, label="batch", min_width=80, elem_id="run-batch")
        page.seq_len = WholeNumber(16, label="seq length", min_width=80, elem_id="run-len")
        page.token_seed = WholeNumber(0, label="token seed", min_width=80, elem_id="run-seed")
        page.decode_steps = WholeNumber(
            0, label="decode steps", info="with KV cache", min_width=80, elem_id="run-steps"
        )
    page.token_ids = gr.Textbox(
        label="token ids (optional)",
        placeholder="1 2 3; 4 5 6  (rows = batch; overrides batch/length/seed)",
    )
    page.run_btn = gr.Button("Run forward", variant="primary", elem_id="run-btn")
    page.run_msg = gr.Markdown(elem_classes="status", elem_id="run-msg")
    page.run_info = gr.JSON(label="run", visible=False)
    page.session_btn = gr.Button(visible=False)
    page.session_json = gr.JSON(visible=False)


def wire(page: Any) -> None:
    status = (model_status, [page.session, page.cfg, page.form_error], page.model_status)
    built = page.build_btn.click(
        build,
        [page.cfg, page.device, page.dtype, page.seed, page.session, page.form_error],
        [page.session, page.build_msg, page.build_info],
        api_name="build",
        concurrency_id="model",
    )
    built.then(*status, **page.quiet())
    # A new model replaces an imported one: the import's line no longer describes the model.
    built.then(_after_build, page.build_msg, page.hf_msg, **page.quiet())
    freed = page.free_btn.click(
        release_model, page.session, [page.session, page.build_msg], api_name="release"
    )
    freed.then(*status, **page.quiet())
    page.model_replaced = lambda event: _run_views_follow(page, event)
    page.model_replaced(built)
    page.model_replaced(freed)
    ran = page.run_btn.click(
        forward,
        [
            page.session,
            page.batch,
            page.seq_len,
            page.token_seed,
            page.token_ids,
            page.decode_steps,
        ],
        [
            page.session,
            page.run_msg,
            page.run_info,
            page.trace_table,
            page.trace_plot,
            page.heatmap,
            page.balance,
            page.balance_table,
        ],
        api_name="forward",
        concurrency_id="model",
    )
    ran.then(*status, **page.quiet())
    _redraw_run_views(page, ran)
    page.model_status_step = status
    # /session: what the session holds (API clients and tests check it after every call).
    page.session_btn.click(
        session_info, [page.session, page.form_error], page.session_json, api_name="session"
    )
