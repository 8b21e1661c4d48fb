"""`python -m dsv3`: size a config, build it, run one random-token forward.

python -m dsv3 --seed-demo                      # the example this project started from
python -m dsv3 --config dsv3/presets/tiny.json --device cpu --dtype fp32 --batch 2 --seq 64
python -m dsv3 --n-layers 4 --dim 256 --layer-config '{"2": {"ffn": "dense"}}'
torchrun --nproc-per-node 2 -m dsv3 --config tiny  # tensor/expert parallel over 2 processes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time

import torch

from . import tuning
from .config import CHOICES, FLOAT_RANGES, INT_RANGES, ConfigError, ModelArgs
from .dist.plan import param_bytes
from .dist.shard import init_process_group_from_env
from .memory import check_fits, default_device, is_oom
from .params import NO_FP8_PATH, count_params, estimate, human_bytes, run_bytes

SEED_DEMO = {
    "n_layers": 32,
    "dim": 2048,
    "layer_config": {5: {"n_heads": 32}, 10: {"moe_inter_dim": 4096}},
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block buried it under ~35 lines)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see python -m dsv3 --help)\n")


def _whole(lo: int, hi: int | None = None):
    """An argparse type: a whole number in lo..hi, else a message with the range."""
    allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"

    def whole(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number; allowed: {allowed}"
            ) from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{n} is out of range; allowed: {allowed}")
        return n

    return whole


def _real(text: str) -> float:
    """An argparse type: a finite number (the field's range is ModelArgs' to check: its message
    names the field and the range, and the option is put in front of it)."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


SEED_MAX = 2**53 - 1  # as the app's seeds (a browser's number box rounds larger ones)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dsv3", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="preset name, preset JSON or ModelArgs JSON file")
    source.add_argument(
        "--seed-demo",
        action="store_true",
        help="n_layers 32, dim 2048, overrides on layers 5 and 10, bf16, tokens (2, 128) "
        "unless --batch / --seq say otherwise",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when present, else cpu; meta, shapes only, when the model fits "
        "neither), cpu, cuda, cuda:N, meta",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp8"],
        help="default: fp32 on cpu, bf16 on cuda",
    )
    p.add_argument("--batch", type=_whole(1), default=None, help="1..max_batch_size (default 2)")
    p.add_argument(
        "--seq", type=_whole(1), default=None, help="prompt tokens, 1..max_seq_len (default 16)"
    )
    p.add_argument("--seed", type=_whole(0, SEED_MAX), default=0, help=f"0..{SEED_MAX}")
    p.add_argument(
        "--decode",
        type=_whole(0),
        default=0,
        metavar="N",
        help="then greedy-decode N tokens with the KV cache (CUDA: replayed CUDA graphs); "
        "--seq + N <= max_seq_len",
    )
    p.add_argument("--layer-config", help="per-layer overrides as JSON")
    for f in dataclasses.fields(ModelArgs):
        if f.name in ("layer_config", "dtype"):  # --dtype is the build dtype
            continue
        kind, allowed = str, ""
        if f.name in FLOAT_RANGES:
            lo, hi, low_rule = FLOAT_RANGES[f.name]
            kind, allowed = _real, f"{low_rule}, <= {hi:g}"
        elif f.name in INT_RANGES:
            kind, allowed = _whole(*INT_RANGES[f.name]), "{}..{}".format(*INT_RANGES[f.name])
        choices = [c for c in CHOICES.get(f.name, ()) if c is not None] or None
        if f.name == "gate_bias":
            choices = ["auto", "true", "false"]  # auto = the reference rule (dim == 7168)
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest="f_" + f.name, type=kind, default=None,
            choices=choices, help=allowed or None,
        )  # fmt: skip
    return p


def _device(text: str) -> str:
    """auto, cpu, meta, cuda or cuda:N, checked here rather than deep inside torch."""
    if text in ("auto", "cpu", "meta") or text == "cuda" or text.startswith("cuda:"):
        if text.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no CUDA device here; use auto, cpu or meta")
        return text
    raise ConfigError(f"--device {text!r}: choose auto, cpu, cuda, cuda:N or meta")


def _load_args(ns: argparse.Namespace) -> ModelArgs:
    base: dict = {}
    if ns.seed_demo:
        base = json.loads(json.dumps(SEED_DEMO))
    elif ns.config:
        plain = _plain_args_file(ns.config)
        if plain is not None:  # a ModelArgs JSON file, not a preset document
            return _with_flags(plain, ns)
        from . import presets

        return _with_flags(presets.load(ns.config).to_dict(), ns)
    return _with_flags(base, ns)


def _plain_args_file(path: str) -> dict | None:
    """The fields of a plain ModelArgs JSON file (`{"n_layers": 2, "dim": 128}`: no preset
    document around them), or None for anything else (a preset name or document: presets.load
    reads and checks those)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None  # presets.load names the problem
    if isinstance(doc, dict) and "args" not in doc and "schema" not in doc:
        return doc
    return None


def _with_flags(base: dict, ns: argparse.Namespace) -> ModelArgs:
    for k, v in vars(ns).items():
        if k.startswith("f_") and v is not None:
            name = k[2:]
            base[name] = (
                {"none": None, "auto": None, "true": True, "false": False}.get(v, v)
                if isinstance(v, str)
                else v
            )
    if ns.layer_config:
        try:
            base["layer_config"] = json.loads(ns.layer_config)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--layer-config is not valid JSON: {e}", field="layer_config"
            ) from None
    return ModelArgs.from_dict(base)


def _option(e: ConfigError, ns: argparse.Namespace) -> str:
    """ "--dim: " when the error's field came from that option, else "" (a field of a preset or
    file keeps the field's own name)."""
    field = getattr(e, "field", None)
    if field and getattr(ns, f"f_{field}", None) is not None:
        return f"--{field.replace('_', '-')}: "
    return ""


def _shape_problem(args: ModelArgs, ns: argparse.Namespace) -> str:
    """Why --batch / --seq / --decode do not fit the config's caches, or ""."""
    if ns.batch > args.max_batch_size:
        return f"--batch {ns.batch} is out of range; allowed: 1..{args.max_batch_size} (max_batch_size)"
    if ns.seq > args.max_seq_len:
        return f"--seq {ns.seq} is out of range; allowed: 1..{args.max_seq_len} (max_seq_len)"
    if ns.seq + ns.decode > args.max_seq_len:
        return (
            f"--seq {ns.seq} + --decode {ns.decode} = {ns.seq + ns.decode} exceeds "
            f"max_seq_len={args.max_seq_len}; allowed: --seq + --decode <= {args.max_seq_len}"
        )
    return ""


def _table(args: ModelArgs) -> str:
    c = count_params(args)
    lines = [f"{'layer':>5} {'ffn':>5} {'params':>16} {'active':>16}"]
    for r in c["layers"]:
        lines.append(f"{r['layer']:>5} {r['ffn']:>5} {r['total']:>16,} {r['active']:>16,}")
    lines.append(f"{'':>5} {'':>5} {'total':>16} {'active':>16}")
    lines.append(f"{'all':>5} {'':>5} {c['total']:>16,} {c['active']:>16,}")
    for g, n in c["groups"].items():
        lines.append(f"  {g:<16} {n:>16,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (env WORLD_SIZE > 1) the model is sharded over the processes (nccl on
    CUDA, gloo on CPU, dsv3.parallel) and only rank 0 prints."""
    ns = _parser().parse_args(argv)
    try:
        ns.device = _device(ns.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    want = "cpu" if ns.device in ("cpu", "meta") else ns.device.split(":")[0]
    world, rank, local_rank = init_process_group_from_env(want)
    quiet = rank != 0
    try:
        with contextlib.ExitStack() as stack:
            if quiet:  # other ranks stay silent; uncaught exceptions still reach stderr
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            return _run(ns, world, local_rank)
    finally:
        if world > 1 and owned:
            torch.distributed.destroy_process_group()


def _run(ns: argparse.Namespace, world: int, local_rank: int) -> int:
    try:
        args = _load_args(ns)
    except (ConfigError, OSError) as e:
        print(f"error: {_option(e, ns)}{e}", file=sys.stderr)
        return 2
    if ns.seed_demo:
        ns.dtype = ns.dtype or "bf16"
    ns.batch = ns.batch or 2
    ns.seq = ns.seq or (128 if ns.seed_demo else 16)
    if why := _shape_problem(args, ns):
        print(f"error: {why}", file=sys.stderr)
        return 2
    device = ns.device
    dtype = ns.dtype or ("fp32" if device == "cpu" else "bf16")
    auto = device == "auto"
    if auto:
        device = default_device()
        if ns.dtype is None:
            dtype = "bf16" if device == "cuda" else "fp32"
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process
    dense = False  # fp8 on a GPU without an fp8 path: bf16 copies of the weights too
    if dtype == "fp8" and device != "meta":
        from .fp8 import keeps_dense_copies  # imports Triton: only where fp8 asks for it

        dense = keeps_dense_copies(torch.device(device))
    if device != "meta":
        kind = device.split(":")[0]
        need = run_bytes(estimate(args, dtype, ns.batch, ns.seq), kind, fp8_path=not dense)
        if world > 1:  # this rank's share; CPU ranks of one machine share its RAM
            e = estimate(args, dtype, ns.batch, ns.seq, n_gpus=world)
            per_rank = run_bytes(e, kind, per_gpu=True, fp8_path=not dense)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device == "cpu" else 1
            need = per_rank * local
        fits, why = check_fits(need, device, dtype=dtype, fp8_smaller=not dense)
        if not fits and not auto:
            print(f"error: {device}: {why}", file=sys.stderr)
            return 2
        if not fits:
            print(f"{device}: {why}; running on meta (shapes only)")
            device = "meta"
    print(_table(args))
    est = estimate(args, dtype, ns.batch, ns.seq)
    print(f"weights ({dtype}): {human_bytes(est['weight_bytes'])}; device {device}")
    from .model import Transformer

    torch.manual_seed(ns.seed)
    t0 = time.perf_counter()
    try:
        model = Transformer(args, device=device, dtype=dtype)
        if dense:
            kept = human_bytes(model.dequantize_once())
            print(f"fp8 weights also kept dequantised to bf16 ({kept}): {NO_FP8_PATH}")
        build_s = time.perf_counter() - t0
        tokens = torch.randint(0, args.vocab_size, (ns.batch, ns.seq), device=device)
        if world > 1:
            if device != "meta":
                torch.distributed.broadcast(tokens, 0)  # every rank runs the same tokens
            pb = param_bytes(model)
            print(
                f"sharded over {world} ranks ({torch.distributed.get_backend()}): rank 0 holds "
                f"{human_bytes(pb['total'])} of weights ({human_bytes(pb['sharded'])} sharded, "
                f"{human_bytes(pb['replicated'])} replicated)"
            )
        probes = tuning.count()
        t0 = time.perf_counter()
        out = model(tokens)
    except (ConfigError, ValueError) as e:  # MemoryBudgetError and CheckpointError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # out of memory (the build's bf16 copies of fp8 weights included)
        if not is_oom(e):
            raise
        print(f"error: out of memory on {device} ({type(e).__name__}): {e}", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"build {build_s:.2f} s, forward {time.perf_counter() - t0:.3f} s{_probed(probes)}")
    print(out.size())
    if ns.decode > 0 and device != "meta":
        _decode(model, out, ns.seq, ns.decode)
    elif ns.decode > 0:
        print(f"the {ns.decode} decode steps asked were not run: meta has shapes only")
    return 0


def _decode(model, logits, seq: int, steps: int) -> None:
    """Greedy decoding after the prefill, timed (the first steps capture the CUDA graphs that
    the others replay; `model.graphs.note` says why not, when they cannot be used)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    probes = tuning.count()
    t0 = time.perf_counter()
    ids = []
    for i in range(steps):
        nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        ids.append(nxt)
        logits = model(nxt, start_pos=seq + i)
    sync()
    dt = time.perf_counter() - t0
    B = logits.shape[0]
    how = model.graphs.note or (
        f"{model.graphs.replays} CUDA graph replays" if model.graphs.replays else "eager"
    )
    print(
        f"decode {steps} steps x batch {B}: {dt:.3f} s, {B * steps / dt:,.1f} tokens/s "
        f"({how}){_probed(probes)}"
    )
    print("row 0:", torch.cat(ids, 1)[0].tolist()[:32])


def _probed(before: int) -> str:
    note = tuning.probe_note(before)
    return f" ({note})" if note else ""


if __name__ == "__main__":
    sys.exit(main())
