"""Hugging Face DeepseekV3/V32/V2 checkpoints: HF <-> dsv3 state dicts and `load_hf`, with names
from the one table (`dsv3.names`) plus HF's fused in-memory experts and rope row order."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import ModelArgs
from ..model import Transformer
from ..names import (
    HF_SCALE,
    MTP_COPIES,
    STACKED,
    dsv3_to_hf,
    from_mtp,
    hf_to_dsv3,
    mtp_copy,
    per_expert,
    to_mtp,
)
from .hf_config import args_from_hf_config, hf_config_from_args, read_hf_config
from .plan import Piece, empty_model, fill, targets_of
from .reader import CheckpointError, Source, hf_files

__all__ = ["dsv3_to_hf_state_dict", "hf_to_dsv3_state_dict", "load_hf"]


_HF_LAYER = re.compile(r"model\.layers\.(\d+)\..+")
# transformers 5.x's in-memory experts: not one-to-one names, so not in the table.
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_ROPE_ROWS = ("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_a.weight")


def _hf_pieces(
    src: Source, args: ModelArgs, rope_interleave: bool = True, tie: bool = False
) -> tuple[list[Piece], list[str]]:
    """HF names -> pieces of dsv3 tensors, through the one name table (`dsv3.names`). Returns
    (pieces, unexpected HF names). Layers n_layers.. go to the MTP modules (`mtp.N.`, their
    copies of the embedding and head skipped) as far as args.n_mtp_layers has them; further
    layers and old `rotary_emb.inv_freq` buffers are skipped."""
    names = set(src.keys())
    pieces: list[Piece] = []
    unexpected: list[str] = []

    def scale_of(name: str) -> str | None:
        s = name[: -len("weight")] + HF_SCALE if name.endswith(".weight") else None
        return s if s in names else None

    for name in src.keys():
        if name.endswith(HF_SCALE):
            if name[: -len(HF_SCALE)] + "weight" not in names:
                unexpected.append(name)  # a scale without its weight
            continue  # else it travels with its weight (see scale_of)
        m = _HF_LAYER.fullmatch(name)
        layer = int(m.group(1)) if m else None
        n_all = args.n_layers + args.n_mtp_layers
        if name.endswith("rotary_emb.inv_freq") or (layer is not None and layer >= n_all):
            continue  # old rope buffers / MTP layers this model leaves out: not its weights
        fused = _FUSED.fullmatch(name)
        if fused and fused.group(2) == "down_proj":
            pieces.append(Piece(name, f"layers.{layer}.ffn.experts.w2"))  # (E, D, I), as ours
            continue
        if fused:  # (E, 2I, D): gate rows first, then up rows
            half = src.shape(name)[1] // 2
            for w, rows in (("w1", slice(0, half)), ("w3", slice(half, 2 * half))):
                dst = f"layers.{layer}.ffn.experts.{w}"
                pieces.append(Piece(name, dst, src_index=(slice(None), rows)))
            continue
        ours = hf_to_dsv3(name)
        if ours is None:
            unexpected.append(name)
            continue
        if mtp_copy(ours) is not None:
            continue  # an MTP layer's copy of the embedding/head: the model shares its own
        expert = per_expert(ours)  # one expert of a stacked tensor
        dst, index = (expert[0], (expert[1],)) if expert else (ours, ())
        piece = Piece(name, dst, index, scale=scale_of(name))
        if not rope_interleave and dst.endswith(_ROPE_ROWS):
            piece.rows = _rope_rows(args, layer, dst, src.shape(name)[0])
        pieces.append(piece)
    if tie and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        pieces.append(Piece("model.embed_tokens.weight", "head.weight"))
    for p in pieces:  # checkpoint layer n_layers + k is MTP module `mtp.{n_layers + k}`
        p.dst = to_mtp(p.dst, args.n_layers)
    return pieces, unexpected


def _rope_rows(args: ModelArgs, layer: int, name: str, n_rows: int) -> torch.Tensor:
    """Row order turning HF's half-split rope layout (pairs j, j+R/2) into the reference's
    interleaved pairs (2j, 2j+1). Applied to the rope rows of q (every head) and of k_pe."""
    la = args.for_layer(layer)
    R = la.qk_rope_head_dim
    half = torch.arange(R // 2)
    inter = torch.stack([half, half + R // 2], dim=1).flatten()  # 0, R/2, 1, R/2+1, ...
    rows = torch.arange(n_rows)
    if n_rows < R:
        return rows  # mis-shaped: the shape check reports it
    if name.endswith("wkv_a.weight"):
        rows[-R:] = n_rows - R + inter
    else:
        Dqk = la.qk_head_dim
        for h in range(n_rows // Dqk):
            start = h * Dqk + la.qk_nope_head_dim
            rows[start : start + R] = start + inter
    return rows


def hf_to_dsv3_state_dict(
    hf_sd: dict[str, torch.Tensor], args: ModelArgs, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """HF state dict (either transformers 5.x's fused `mlp.experts.gate_up_proj`/`down_proj` or
    per-expert `mlp.experts.E.gate_proj.weight` keys) -> dsv3 names, experts stacked. fp8
    weights keep their dtype with `weight_scale_inv` renamed to `scale`/`w*_scale`. MTP layers
    (>= n_layers) are dropped. `rope_interleave=False` re-orders rope rows (HF's other layout)."""
    src = Source.from_dict(hf_sd)
    fp8 = any(k.endswith(HF_SCALE) for k in hf_sd)
    shapes = targets_of(Transformer(args, device="meta", dtype="fp8" if fp8 else "fp32"))
    pieces, unexpected = _hf_pieces(src, args, rope_interleave)
    dtypes = {p.dst: hf_sd[p.src].dtype for p in pieces}
    targets = {}
    for name, t in shapes.items():  # keep the source's dtypes; scales stay float32
        targets[name] = torch.empty(t.shape, dtype=dtypes.get(name, t.dtype))
    fill(targets, pieces, src, unexpected, label="HF state dict")
    return targets


def dsv3_to_hf_state_dict(
    sd: dict[str, torch.Tensor], args: ModelArgs, fused_experts: bool = True
) -> dict[str, torch.Tensor]:
    """dsv3 state dict -> HF names. `fused_experts=True` gives transformers 5.x's in-memory
    layout (`mlp.experts.gate_up_proj` (E, 2I, D), `down_proj` (E, D, I)), what
    `model.load_state_dict` takes; False gives per-expert keys as in saved HF files (fp8 scales
    as `weight_scale_inv`). Adds what HF has and dsv3 leaves out: a zero selection bias when
    the model has none, zero-size shared experts when there are none. MTP modules become
    layers n_layers.., with the copies of the embedding and head the released checkpoints
    keep there (`embed_tokens`, `shared_head.head`); transformers itself loads no MTP layer,
    so leave them out (n_mtp_layers 0) for `load_state_dict` into a transformers model."""
    cfg = hf_config_from_args(args)  # raises if HF cannot express the model
    sd = {from_mtp(k): t for k, t in sd.items()}  # mtp.61.x -> layers.61.x, as checkpoints
    for la in args.mtp_layers():
        for copy, main in MTP_COPIES.items():
            sd[f"layers.{la.layer_id}.{copy}"] = sd[main].clone()  # own storage: savable
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = STACKED.fullmatch(name)
        if m is None:
            hf = dsv3_to_hf(name)
            if hf is None:
                raise CheckpointError(f"unexpected dsv3 tensor name {name!r}")
            out[hf] = t
            continue
        layer, w, is_scale = m.group(1), m.group(2), bool(m.group(3))
        if not fused_experts:  # per-expert keys through the table
            kind = "scale" if is_scale else "weight"
            for e in range(t.shape[0]):  # contiguous: CPU stacks are in-major (moe.expert_layout)
                out[dsv3_to_hf(f"layers.{layer}.ffn.experts.{e}.{w}.{kind}")] = t[e].contiguous()
            continue
        if is_scale:
            raise CheckpointError(
                "fused HF experts have no fp8 scale layout; dequantise first or use "
                "fused_experts=False"
            )
        p = f"model.layers.{layer}.mlp.experts."
        if w == "w2":
            out[p + "down_proj"] = t.contiguous()  # (E, D, I), as ours
        elif w == "w1":  # (E, 2I, D): gate rows, then up rows
            out[p + "gate_up_proj"] = torch.cat([t, sd[f"layers.{layer}.ffn.experts.w3"]], dim=1)
    for la in (*args.layers(), *args.mtp_layers()):
        if la.ffn != "moe":
            continue
        p = f"model.layers.{la.layer_id}.mlp."
        like = sd["embed.weight"]
        has_bias = cfg["model_type"] in ("deepseek_v3", "deepseek_v32")
        if has_bias and p + "gate.e_score_correction_bias" not in out:
            out[p + "gate.e_score_correction_bias"] = torch.zeros(
                la.n_routed_experts, dtype=torch.float32, device=like.device
            )
        if la.n_shared_experts == 0:
            for w, (o, i) in (("gate_proj", (0, la.dim)), ("up_proj", (0, la.dim))):
                out[f"{p}shared_experts.{w}.weight"] = like.new_zeros(o, i)
            out[f"{p}shared_experts.down_proj.weight"] = like.new_zeros(la.dim, 0)
    return out


def _present_mtp(args: ModelArgs, names) -> ModelArgs:
    """`args` with n_mtp_layers cut to the MTP layers the checkpoint holds (none, when it was
    saved by transformers, which drops them)."""
    layers = {int(m.group(1)) for m in map(_HF_LAYER.fullmatch, names) if m}
    k = 0
    while k < args.n_mtp_layers and args.n_layers + k in layers:
        k += 1
    return args if k == args.n_mtp_layers else args.replace(n_mtp_layers=k)


def load_hf(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Load a Hugging Face DeepseekV3/V32/V2 checkpoint directory (config.json plus
    model.safetensors, or shards with model.safetensors.index.json).

    dtype None picks the checkpoint's: "fp8" when it has `weight_scale_inv` scales, "fp32" for
    float32 weights, else "bf16". MTP layers (num_nextn_predict_layers of them after
    num_hidden_layers) load into the model's MTP modules; a checkpoint without them (what
    transformers' `save_pretrained` writes) gives a model without them.
    """
    root = Path(path)
    if root.is_file() and root.name == "config.json":
        root = root.parent
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected a checkpoint directory with config.json")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    cfg = read_hf_config(cfg_path)
    args = args_from_hf_config(cfg)
    rope_interleave = cfg.get("model_type", "deepseek_v3") != "deepseek_v3" or cfg.get(
        "rope_interleave", True
    )
    with Source(hf_files(root)) as src:
        args = _present_mtp(args, src.keys())
        if dtype is None:
            embed = "model.embed_tokens.weight"
            if any(k.endswith(HF_SCALE) for k in src.keys()):
                dtype = "fp8"
            elif embed in src and src.dtype(embed) == "F32":
                dtype = "fp32"
            else:
                dtype = "bf16"
        model = empty_model(args, device, dtype)
        pieces, unexpected = _hf_pieces(
            src, args, rope_interleave, tie=bool(cfg.get("tie_word_embeddings"))
        )
        fill(
            targets_of(model),
            pieces,
            src,
            unexpected,
            label=str(root.name),
            scale_fmt=args.scale_fmt,
        )
    return model.eval()
