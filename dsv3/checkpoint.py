"""Checkpoints: dsv3's own safetensors files, Hugging Face DeepSeek-V2/V3 checkpoints, and the
DeepSeek reference format (`inference/convert.py` output). Also THE one HF <-> dsv3 translation
table (names, config fields, expert layouts); HF names appear nowhere else in dsv3.

    save(model, "m.safetensors")            one file: state_dict + args/dtype metadata
    load("m.safetensors", device, dtype)    -> Transformer, bit-identical to what was saved
    load_hf("dir/", device, dtype)          config.json + model.safetensors or shards
    load_reference("dir/", args, ...)       model{rank}-mp{N}.safetensors, any N

Only safetensors and JSON are ever read. PyTorch pickles (.bin/.pt/.pth/.pkl, or a pickle
renamed .safetensors) are refused with `CheckpointError` and never unpickled: unpickling runs
arbitrary code. Every file header is checked (and truncation detected) before any tensor is read.

Loading builds the model on the meta device, moves it to `device` with `to_empty`, then copies the
checkpoint in one tensor (or one expert) at a time, so peak memory is about the model's size.
Names, coverage and shapes are all checked before any data is read: missing, unexpected or
mis-shaped tensors raise `CheckpointError` listing the first few by name, with counts.
When the checkpoint dtype differs from the requested one, weights are cast, or fp8
(de)quantised block by block.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import BLOCK_SIZE, MOE_FIELDS, ConfigError, ModelArgs
from .dist.comm import resolve_world
from .dist.plan import check_shardable, local_index, reference_files, split_widths
from .dist.shard import stack_rank_experts
from .layers import FP8, dequantize, quantize_fp8
from .model import Transformer
from .names import SPLIT_DIM, layer_of, placement

__all__ = [
    "FORMAT_VERSION",
    "REFERENCE_SPLIT_DIM",
    "CheckpointError",
    "args_from_hf_config",
    "dsv3_to_hf_state_dict",
    "hf_config_from_args",
    "hf_to_dsv3_state_dict",
    "load",
    "load_hf",
    "load_reference",
    "save",
]

FORMAT_VERSION = 1  # of dsv3's own file: bump when its names or metadata change meaning
_META_VERSION, _META_ARGS, _META_DTYPE = "dsv3.format_version", "dsv3.args", "dsv3.dtype"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model. `missing`, `unexpected` and
    `mismatched` hold the offending tensor names (all of them; the message shows a few)."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ):
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


# ====================================================================== the translation table
# dsv3 (reference) module name -> HF module name. Used in both directions.
ATTN_NAMES = {
    "wq": "q_proj",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}
MLP_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
NORM_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
TOP_NAMES["head.weight"] = "lm_head.weight"
HF_SCALE = "weight_scale_inv"  # HF's name for the fp8 block scale (dsv3/reference: `scale`)

# ModelArgs field -> HF config key, for the fields that map one to one.
CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_seq_len": "max_position_embeddings",
}

# transformers 5.24's config-class defaults, used for keys a config.json leaves out (so the
# model we build is the one HF would build from the same file).
_HF_DEFAULTS = {
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "rope_interleave": True,
    },
    "deepseek_v2": {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": None,
        "topk_group": None,
        "topk_method": "greedy",
        "num_experts_per_tok": None,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "max_position_embeddings": 2048,
    },
}


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """A transformers DeepseekV3/DeepseekV2 `config.json` dict -> ModelArgs computing exactly
    what transformers computes.

    transformers' DeepseekV3 always scores experts with a sigmoid, always has the selection bias
    (`e_score_correction_bias`) and renormalises the top-k weights; DeepseekV2 uses softmax
    without bias or renormalisation. With a `yarn` rope type HF applies YaRN whatever the
    sequence lengths, so the result says `rope_scaling="yarn"` (else "none") and
    `gate_bias=True/False` explicitly. Configs the reference model cannot reproduce exactly
    (cos/sin attention factor != 1, mscale != mscale_all_dim, renormalised softmax,
    unrenormalised sigmoid, moe_layer_freq != 1, biases, other activations/eps...) raise
    `ConfigError` saying why. Both transformers 5.x `rope_parameters` and the legacy
    `rope_scaling` + `rope_theta` keys are read.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"HF config must be a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type", "deepseek_v3")
    if model_type not in _HF_DEFAULTS:
        raise ConfigError(
            f"HF model_type={model_type!r} is not supported; this loader reads deepseek_v3 and "
            f"deepseek_v2 configs",
            field="model_type",
        )
    c = {**_HF_DEFAULTS[model_type], **cfg}  # an explicit null stays null, as in HF

    def unsupported(key: str, why: str) -> ConfigError:
        return ConfigError(f"HF config {key}={c.get(key)!r}: {why}", field=key)

    # Architecture switches the reference model does not have.
    if c.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", "only SwiGLU with silu is supported")
    if not math.isclose(float(c.get("rms_norm_eps", 1e-6)), 1e-6, rel_tol=1e-9):
        raise unsupported("rms_norm_eps", "the reference RMSNorm uses eps 1e-6")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise unsupported(key, "the reference model has no biases in its linear layers")
    if c.get("moe_layer_freq", 1) != 1:
        raise unsupported(
            "moe_layer_freq",
            "only every layer after first_k_dense_replace being MoE (moe_layer_freq 1) is "
            "supported",
        )
    if c.get("n_routed_experts") is None or c.get("num_experts_per_tok") is None:
        raise ConfigError(
            "HF config without n_routed_experts / num_experts_per_tok (a dense model) is not "
            "supported",
            field="n_routed_experts",
        )

    out: dict[str, Any] = {}
    for ours, theirs in CONFIG_NAMES.items():
        out[ours] = c.get(theirs)
    out["q_lora_rank"] = out["q_lora_rank"] or 0
    out["n_shared_experts"] = out["n_shared_experts"] or 0
    out["n_dense_layers"] = out["n_dense_layers"] or 0

    # Router.
    top_k = out["n_activated_experts"]
    norm = c.get("norm_topk_prob")
    if model_type == "deepseek_v3":
        if c.get("scoring_func", "sigmoid") != "sigmoid":
            raise unsupported(
                "scoring_func", "transformers' DeepseekV3 always scores experts with a sigmoid"
            )
        if not norm:
            raise unsupported(
                "norm_topk_prob",
                "sigmoid routing without renormalising the top-k weights cannot be represented "
                "(the reference always renormalises sigmoid weights)",
            )
        out.update(score_func="sigmoid", gate_bias=True)
        out["n_expert_groups"] = out["n_expert_groups"] or 1
        out["n_limited_groups"] = out["n_limited_groups"] or 1
    else:
        if norm and top_k > 1:
            raise unsupported(
                "norm_topk_prob",
                "softmax routing with renormalised top-k weights cannot be represented (the "
                "reference never renormalises softmax weights)",
            )
        method = c.get("topk_method", "greedy")
        if method == "greedy":
            out["n_expert_groups"] = out["n_limited_groups"] = 1
        elif method == "group_limited_greedy":
            out["n_expert_groups"] = out["n_expert_groups"] or 1
            out["n_limited_groups"] = out["n_limited_groups"] or 1
        else:
            raise unsupported("topk_method", "DeepseekV2 supports greedy and group_limited_greedy")
        out.update(score_func="softmax", gate_bias=False)

    out.update(_rope_from_hf(c))

    quant = c.get("quantization_config")
    out["dtype"] = "bf16"
    if quant:
        if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
            quant = quant if isinstance(quant, dict) else {"quant_method": quant}
            raise ConfigError(
                f"HF quantization {quant.get('quant_method')!r} is not supported (only fp8)",
                field="quantization_config",
            )
        if list(quant.get("weight_block_size", [BLOCK_SIZE, BLOCK_SIZE])) != [BLOCK_SIZE] * 2:
            raise ConfigError(
                f"fp8 weight_block_size={quant.get('weight_block_size')} is not supported; "
                f"only [{BLOCK_SIZE}, {BLOCK_SIZE}]",
                field="quantization_config",
            )
        out["dtype"] = "fp8"
    try:
        return ModelArgs.from_dict(out)
    except ConfigError as e:
        hf_key = CONFIG_NAMES.get(e.field or "", e.field)
        raise ConfigError(f"HF config ({hf_key}): {e}", field=e.field, layer=e.layer) from None


def _rope_from_hf(c: dict[str, Any]) -> dict[str, Any]:
    """HF rope settings -> ModelArgs rope fields, checking that the reference's formulas give
    exactly HF's cos/sin and softmax scale."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"HF rope_parameters must be an object, got {rp!r}", field="rope_theta")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported", field="rope_theta")
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    if rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(
            "partial_rotary_factor != 1 is not supported (MLA rotates all qk_rope_head_dim dims)",
            field="qk_rope_head_dim",
        )
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        out["rope_scaling"] = "none"
        return out
    if rope_type != "yarn":
        raise ConfigError(
            f"HF rope type {rope_type!r} is not supported; only 'default' and 'yarn'",
            field="rope_scaling",
        )
    max_pos = c.get("max_position_embeddings")
    orig = rp.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
    orig = orig or max_pos
    factor = rp.get("factor")
    if factor is None:  # HF then uses the ratio of the context lengths
        factor = max_pos / orig
    if rp.get("truncate", True) is not True:
        raise ConfigError(
            "YaRN with truncate=false is not supported (the reference rounds the correction range)",
            field="rope_scaling",
        )
    betas = {}
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        v = rp.get(key) or default  # HF: `or`, so 0/None mean the default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int):
            raise ConfigError(
                f"YaRN {key}={v!r} must be an integer (the reference's field is an int)", field=key
            )
        betas[key] = v
    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:  # HF's yarn_get_mscale
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    # HF multiplies cos/sin by `attention_factor`; the reference never does, so it must be 1.
    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    if not math.isclose(attention_factor, 1.0, rel_tol=0, abs_tol=1e-12):
        why = (
            f"mscale={mscale} != mscale_all_dim={mscale_all}"
            if mscale and mscale_all
            else "mscale/mscale_all_dim unset, so HF derives it from the factor"
        )
        raise ConfigError(
            f"YaRN attention_factor would be {attention_factor:.6g} ({why}); the reference "
            f"model scales only the softmax (by mscale_all_dim), never cos/sin, so this config "
            f"cannot be represented",
            field="mscale",
        )
    out.update(
        rope_scaling="yarn",
        rope_factor=factor,
        original_seq_len=orig,
        # The softmax scale uses mscale_all_dim (and none at all when it is unset/0).
        mscale=float(mscale_all or 0.0),
        **betas,
    )
    return out


def hf_config_from_args(args: ModelArgs) -> dict[str, Any]:
    """ModelArgs -> a transformers config dict (DeepseekV3Config, or DeepseekV2Config for
    softmax routing) with which transformers computes exactly what dsv3 computes.

    Raises `ConfigError` when HF cannot express the model: per-layer overrides that change a
    layer's shape or routing (only "first k layers dense" is expressible), sigmoid routing without
    the selection bias but with expert groups (HF scores groups by their top-2 sum, the
    reference by the max), softmax routing with the bias.
    """
    base = args.replace(layer_config={})
    kinds = [args.ffn_kind(i) for i in range(args.n_layers)]
    n_dense = kinds.count("dense")
    if kinds != ["dense"] * n_dense + ["moe"] * (args.n_layers - n_dense):
        raise ConfigError(
            "HF can only express the first k layers dense and the rest MoE; layer kinds are "
            + ", ".join(f"{i}:{k}" for i, k in enumerate(kinds)),
            field="layer_config",
        )
    attn = ("n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
    moe = MOE_FIELDS
    ref = base.for_layer(0)
    for i in range(args.n_layers):
        la = args.for_layer(i)
        for f in attn + (("inter_dim",) if kinds[i] == "dense" else moe):
            if getattr(la, f) != getattr(ref, f):
                raise ConfigError(
                    f"HF configs hold one value per model; layer {i} overrides {f}="
                    f"{getattr(la, f)!r} (model value {getattr(ref, f)!r})",
                    field=f,
                    layer=i,
                )
    cfg: dict[str, Any] = {theirs: getattr(args, ours) for ours, theirs in CONFIG_NAMES.items()}
    cfg.update(
        first_k_dense_replace=n_dense,
        q_lora_rank=args.q_lora_rank or None,
        num_key_value_heads=args.n_heads,  # MLA expands k/v per head; no grouped-query sharing
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        routed_scaling_factor=float(args.route_scale),
    )
    if ref.score_func == "sigmoid":
        if not ref.gate_bias and ref.n_expert_groups > 1:
            raise ConfigError(
                "sigmoid routing with expert groups but without the selection bias cannot be "
                "expressed in HF (it scores groups by their top-2 sum, the reference by the max)",
                field="gate_bias",
            )
        if ref.n_routed_experts // ref.n_expert_groups < 2:
            raise ConfigError(
                "HF DeepseekV3 scores each expert group by its top 2 experts: needs >= 2 experts "
                "per group",
                field="n_expert_groups",
            )
        cfg.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            rope_interleave=True,
            num_nextn_predict_layers=0,
        )
    else:
        if ref.gate_bias:
            raise ConfigError(
                "softmax routing with the selection bias has no HF model class",
                field="gate_bias",
            )
        if args.dim % args.n_heads:
            raise ConfigError(
                f"HF DeepseekV2Config requires dim={args.dim} divisible by n_heads={args.n_heads}",
                field="n_heads",
            )
        cfg.update(
            model_type="deepseek_v2",
            architectures=["DeepseekV2ForCausalLM"],
            norm_topk_prob=False,
            scoring_func="softmax",
            topk_method="group_limited_greedy" if ref.n_expert_groups > 1 else "greedy",
            mlp_bias=False,
        )
    if args.use_yarn:
        rope: dict[str, Any] = {
            "rope_type": "yarn",
            "rope_theta": float(args.rope_theta),
            "factor": float(args.rope_factor),
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            # mscale == mscale_all_dim: cos/sin unscaled, softmax scaled by mscale**2 (the
            # reference's formula).
            "mscale": float(args.mscale),
            "mscale_all_dim": float(args.mscale),
        }
        if not args.mscale:
            rope["attention_factor"] = 1.0  # HF would otherwise derive one from the factor
    else:
        rope = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    cfg["rope_parameters"] = rope
    return cfg


# ====================================================================== safetensors files
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _read_header(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete safetensors file and return its JSON header. Never
    unpickles: pickles and anything else are rejected by their bytes, before torch sees them."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: PyTorch pickle checkpoints ({path.suffix}) are not read: unpickling can "
            f"run arbitrary code. Convert it to .safetensors with a trusted tool first."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        if len(head) < 9 or head[8:9] != b"{" or n > _MAX_HEADER:
            # Not safetensors (whose JSON header follows an 8-byte length). Say what it is.
            if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
                raise CheckpointError(
                    f"{path.name}: this is a PyTorch pickle (torch.save) file, not safetensors; "
                    f"it is not loaded because unpickling can run arbitrary code"
                )
            raise CheckpointError(f"{path.name}: not a safetensors file ({size} bytes, no header)")
        f.seek(8)
        if 8 + n > size:
            raise CheckpointError(
                f"{path.name}: truncated safetensors file: the header needs {n} bytes, the file "
                f"holds {size - 8}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not an object)")
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for {name!r}") from None
        want = _DTYPE_BYTES.get(dtype)
        if want is not None and stop - start != want * math.prod(shape):
            raise CheckpointError(
                f"{path.name}: corrupt header: {name!r} {dtype}{shape} spans {stop - start} bytes"
            )
        end = max(end, stop)
    if end > data:
        raise CheckpointError(
            f"{path.name}: truncated safetensors file: tensors need {end} bytes of data, the file "
            f"holds {data}"
        )
    return header


class _Source:
    """Tensors by name from safetensors files (or a dict), read one at a time.
    `prefixes` namespaces each file's names (reference shards repeat names across ranks)."""

    def __init__(self, files: Iterable[Path] = (), prefixes: Iterable[str] | None = None):
        self._stack = ExitStack()
        self._handles: dict[str, tuple[Any, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        files = list(files)
        prefixes = list(prefixes) if prefixes is not None else [""] * len(files)
        try:
            for path, prefix in zip(files, prefixes):
                header = _read_header(path)
                self.metadata.update(header.get("__metadata__") or {})
                try:
                    handle = self._stack.enter_context(safe_open(path, framework="pt"))
                except Exception as e:  # the library's own checks: report them as ours
                    raise CheckpointError(f"{path.name}: cannot open as safetensors: {e}") from None
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    key = prefix + name
                    if key in self._handles:
                        raise CheckpointError(f"tensor {name!r} appears in two files ({path.name})")
                    self._handles[key] = (handle, name)
                    self._shapes[key] = tuple(info["shape"])
                    self._dtypes[key] = info["dtype"]
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_dict(cls, sd: dict[str, torch.Tensor]) -> _Source:
        src = cls()
        src._tensors = sd
        src._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        src._dtypes = {k: str(v.dtype) for k, v in sd.items()}
        return src

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        if hasattr(self, "_tensors"):
            return self._tensors[name]
        handle, real = self._handles[name]
        try:
            return handle.get_tensor(real)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {real!r}: {e}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ====================================================================== the copy plan
@dataclass
class _Piece:
    """One source tensor (or a slice of it) going to one target tensor (or a slice of it)."""

    src: str
    dst: str
    dst_index: tuple = ()  # into the target: (e,) for expert e, slices for model-parallel shards
    src_index: tuple = ()  # into the source: e.g. the gate half of a fused gate_up_proj
    scale: str | None = None  # source name of the fp8 block scale of this piece, if any
    rows: torch.Tensor | None = None  # a row permutation applied to the source (rope layout)


def _index_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta")[index].shape) if index else tuple(shape)


def _scale_index(index: tuple, ndim: int) -> tuple:
    """Index of a weight slice -> index of its block scale (slices of the last two dims in
    units of 128). A slice not on block boundaries cannot carry its own scale."""
    out = []
    for d, ix in enumerate(index):
        if isinstance(ix, slice) and d >= ndim - 2 and ix != slice(None):
            start, stop = ix.start or 0, ix.stop
            if start % BLOCK_SIZE:
                raise CheckpointError(
                    f"fp8 shard boundary at {start} is not a multiple of the {BLOCK_SIZE} block"
                )
            ix = slice(start // BLOCK_SIZE, None if stop is None else -(-stop // BLOCK_SIZE))
        out.append(ix)
    return tuple(out)


def _scale_name(name: str) -> str:
    """dsv3 name of the fp8 scale that goes with weight `name`."""
    return name[: -len("weight")] + "scale" if name.endswith(".weight") else name + "_scale"


def _is_fp8(dtype: str) -> bool:
    """A safetensors ("F8_E4M3") or torch ("torch.float8_e4m3fn") dtype name of an fp8 type."""
    return dtype.startswith("F8_") or dtype.startswith("torch.float8")


def _summary(kind: str, names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} {kind} ({shown})"


def _fill(
    targets: dict[str, torch.Tensor],
    pieces: list[_Piece],
    src: _Source,
    unexpected: list[str],
    label: str,
) -> None:
    """Check then copy `pieces` into `targets` (dsv3 name -> destination tensor).

    Every check runs before any data is read. Conversions: float -> float casts; fp8 -> fp8
    copies weight and scale; fp8 -> float dequantises; float -> fp8 quantises (per piece).
    """
    unexpected = list(unexpected)
    mismatched: list[str] = []
    covered: dict[str, int] = {}
    experts: dict[str, set[int]] = {}  # stacked-expert targets: which experts arrived
    seen: set[tuple[str, str]] = set()
    used_scales = set()
    for p in pieces:
        if p.dst not in targets:
            if math.prod(src.shape(p.src)) == 0:
                continue  # HF keeps zero-size shared experts when there are none
            unexpected.append(p.src)
            continue
        if p.scale is not None:
            used_scales.add(p.scale)
        key = (p.dst, repr(p.dst_index))
        if key in seen:
            mismatched.append(f"{p.src}: a second tensor for {p.dst}{list(p.dst_index)}")
            continue
        seen.add(key)
        want = _index_shape(tuple(targets[p.dst].shape), p.dst_index)
        got = _index_shape(src.shape(p.src), p.src_index)
        if got != want:
            mismatched.append(f"{p.src}: checkpoint {list(got)} vs model {list(want)}")
            continue
        if p.scale is not None:
            s_want = (*got[:-2], *(-(-d // BLOCK_SIZE) for d in got[-2:]))
            if src.shape(p.scale) != s_want:
                mismatched.append(
                    f"{p.scale}: checkpoint {list(src.shape(p.scale))} vs expected {list(s_want)}"
                )
                continue
            if p.rows is not None:
                mismatched.append(f"{p.src}: fp8 rows cannot be re-ordered (rope_interleave false)")
                continue
        elif _is_fp8(src.dtype(p.src)):
            mismatched.append(f"{p.src}: fp8 tensor without a block scale")
            continue
        if targets[p.dst].dtype == FP8 and _scale_name(p.dst) in targets:
            try:  # a shard of an fp8 weight must start on a block boundary to carry its scale
                _scale_index(p.dst_index, targets[p.dst].dim())
            except CheckpointError as e:
                mismatched.append(f"{p.src}: {e}")
                continue
        covered[p.dst] = covered.get(p.dst, 0) + math.prod(want)
        if p.dst_index and isinstance(p.dst_index[0], int):
            experts.setdefault(p.dst, set()).add(p.dst_index[0])
    missing = []
    for name, t in targets.items():
        if name.endswith("scale") and name[: -len("_scale")] in targets:
            continue  # stacked experts' scales come with their weights
        if name.endswith(".scale") and name[: -len("scale")] + "weight" in targets:
            continue  # so do Linear scales
        done = covered.get(name, 0)
        if done == 0:
            missing.append(name)
        elif done < t.numel() and name in experts:
            absent = sorted(set(range(t.shape[0])) - experts[name])
            shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
            missing.append(f"{name} (expert {shown} of {t.shape[0]})")
        elif done < t.numel():
            missing.append(f"{name} ({done} of {t.numel()} values)")
    # Scales that went with no weight are unexpected too.
    scale_like = {p.scale for p in pieces if p.scale}
    unexpected += [s for s in scale_like if s not in used_scales and s not in unexpected]
    if missing or unexpected or mismatched:
        parts = [
            _summary(kind, names)
            for kind, names in (
                ("missing", missing),
                ("unexpected", sorted(unexpected)),
                ("mis-shaped", mismatched),
            )
            if names
        ]
        raise CheckpointError(
            f"{label} does not fit the model: " + "; ".join(parts),
            missing=missing,
            unexpected=sorted(unexpected),
            mismatched=mismatched,
        )

    with torch.no_grad():
        for p in pieces:
            if p.dst not in targets:
                continue
            dst = targets[p.dst]
            t = src.get(p.src)
            if p.src_index:
                t = t[p.src_index]
            if p.rows is not None:
                t = t[p.rows]
            scale_dst = targets.get(_scale_name(p.dst))
            if dst.dtype == FP8 and scale_dst is not None:
                s_index = _scale_index(p.dst_index, dst.dim())
                if t.dtype == FP8 and p.scale is not None:
                    dst[p.dst_index].copy_(t)
                    scale_dst[s_index].copy_(src.get(p.scale))
                else:
                    if p.scale is not None:  # fp8 without our scale layout: go through float
                        t = dequantize(t, src.get(p.scale), torch.float32)
                    q, s = _quantize(t)
                    dst[p.dst_index].copy_(q)
                    scale_dst[s_index].copy_(s)
            elif p.scale is not None:
                dst[p.dst_index].copy_(dequantize(t, src.get(p.scale), dst.dtype))
            else:
                dst[p.dst_index].copy_(t)


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8 over a (..., out, in) tensor, one matrix at a time to bound temp memory."""
    if t.dim() == 2:
        return quantize_fp8(t)
    qs, ss = zip(*(_quantize(m) for m in t))
    return torch.stack(qs), torch.stack(ss)


def _empty_model(args: ModelArgs, device: Any, dtype: Any) -> Transformer:
    """A model with allocated but unset weights: every value gets written by `_fill`, so
    random init (seconds to minutes for big models) is skipped."""
    # One full (unsharded) model even inside a process group: sharded loads go through
    # dsv3.parallel.load_sharded.
    model = Transformer(args, device="meta", dtype=dtype, world_size=1, rank=0)
    model.to_empty(device=device if device is not None else torch.get_default_device())
    model.reset_cache()
    return model


def _targets(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors by name; writing into them writes the model (shared storage)."""
    return dict(model.state_dict(keep_vars=True))


# ====================================================================== dsv3's own format
def save(model: Transformer, path: str | os.PathLike) -> Path:
    """Write `model` to one .safetensors file: its state_dict under dsv3 names plus metadata
    (ModelArgs JSON, the build dtype name, the format version). Written to a temporary file
    then renamed, so an interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name}: dsv3 checkpoints are .safetensors files")
    if model.device.type == "meta":
        raise CheckpointError("a model built on meta has no weights to save; build it on cpu/cuda")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": "pt",
        _META_VERSION: str(FORMAT_VERSION),
        _META_ARGS: model.args.to_json(),
        _META_DTYPE: model.dtype_name,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Rebuild a model saved by `save`. With dtype None it is rebuilt in the saved dtype,
    bit-identical (fp8 scales included); another dtype casts or (de)quantises on load."""
    path = Path(path)
    with _Source([path]) as src:
        meta = src.metadata
        if _META_ARGS not in meta:
            raise CheckpointError(
                f"{path.name}: not a dsv3 checkpoint (no {_META_ARGS} metadata); use load_hf for "
                f"Hugging Face checkpoints or load_reference for DeepSeek's convert.py output"
            )
        version = meta.get(_META_VERSION, "?")
        if version != str(FORMAT_VERSION):
            raise CheckpointError(
                f"{path.name}: dsv3 checkpoint format {version!r}; this version reads "
                f"{FORMAT_VERSION}"
            )
        try:
            args = ModelArgs.from_json(meta[_META_ARGS])
        except ConfigError as e:
            raise ConfigError(f"{path.name}: {e}", field=e.field, layer=e.layer) from None
        model = _empty_model(args, device, dtype if dtype is not None else meta.get(_META_DTYPE))
        names = set(src.keys())
        scales = {_scale_name(n) for n in names} & names
        pieces = [
            _Piece(name, name, scale=_scale_name(name) if _scale_name(name) in names else None)
            for name in src.keys()
            if name not in scales  # a scale travels with its weight
        ]
        _fill(_targets(model), pieces, src, [], label=path.name)
    return model.eval()


# ====================================================================== Hugging Face format
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _hf_pieces(
    src: _Source, args: ModelArgs, rope_interleave: bool = True, tie: bool = False
) -> tuple[list[_Piece], list[str]]:
    """HF names -> pieces of dsv3 tensors. Returns (pieces, unexpected HF names). Layers at or
    past n_layers (the MTP module) and old `rotary_emb.inv_freq` buffers are skipped."""
    names = set(src.keys())
    attn = {v: k for k, v in ATTN_NAMES.items()}
    mlp = {v: k for k, v in MLP_NAMES.items()}
    norms = {v: k for k, v in NORM_NAMES.items()}
    top = {v: k for k, v in TOP_NAMES.items()}
    pieces: list[_Piece] = []
    unexpected: list[str] = []

    def scale_of(name: str) -> str | None:
        s = name[: -len("weight")] + HF_SCALE if name.endswith(".weight") else None
        return s if s in names else None

    for name in src.keys():
        if name.endswith(HF_SCALE):
            if name[: -len(HF_SCALE)] + "weight" not in names:
                unexpected.append(name)  # a scale without its weight
            continue  # else it travels with its weight (see scale_of)
        if name in top:
            pieces.append(_Piece(name, top[name], scale=scale_of(name)))
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            if not name.endswith("rotary_emb.inv_freq"):
                unexpected.append(name)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i >= args.n_layers or rest.endswith("rotary_emb.inv_freq"):
            continue  # multi-token-prediction layers / old rope buffers: not model weights
        p = f"layers.{i}."
        parts = rest.split(".")
        piece = None
        if (
            len(parts) == 3
            and parts[0] == "self_attn"
            and parts[1] in attn
            and parts[2] == "weight"
        ):
            piece = _Piece(name, f"{p}attn.{attn[parts[1]]}.weight", scale=scale_of(name))
            if not rope_interleave and parts[1] in ("q_proj", "q_b_proj", "kv_a_proj_with_mqa"):
                piece.rows = _rope_rows(args, i, parts[1], src.shape(name)[0])
        elif len(parts) == 2 and parts[0] in norms and parts[1] == "weight":
            piece = _Piece(name, f"{p}{norms[parts[0]]}.weight")
        elif len(parts) == 3 and parts[0] == "mlp" and parts[1] in mlp and parts[2] == "weight":
            piece = _Piece(name, f"{p}ffn.{mlp[parts[1]]}.weight", scale=scale_of(name))
        elif len(parts) == 4 and parts[:2] == ["mlp", "shared_experts"] and parts[2] in mlp:
            if parts[3] == "weight":
                dst = f"{p}ffn.shared_experts.{mlp[parts[2]]}.weight"
                piece = _Piece(name, dst, scale=scale_of(name))
        elif rest == "mlp.gate.weight":
            piece = _Piece(name, f"{p}ffn.gate.weight")
        elif rest == "mlp.gate.e_score_correction_bias":
            piece = _Piece(name, f"{p}ffn.gate.bias")
        elif len(parts) == 5 and parts[:2] == ["mlp", "experts"] and parts[2].isdigit():
            if parts[3] in mlp and parts[4] == "weight":  # per-expert keys (saved files)
                dst = f"{p}ffn.experts.{mlp[parts[3]]}"
                piece = _Piece(name, dst, (int(parts[2]),), scale=scale_of(name))
        elif rest == "mlp.experts.gate_up_proj":
            # transformers 5.x in memory: (E, 2I, D), gate rows first, then up rows.
            half = src.shape(name)[1] // 2
            gate, up = slice(0, half), slice(half, 2 * half)
            pieces.append(_Piece(name, f"{p}ffn.experts.w1", src_index=(slice(None), gate)))
            piece = _Piece(name, f"{p}ffn.experts.w3", src_index=(slice(None), up))
        elif rest == "mlp.experts.down_proj":
            piece = _Piece(name, f"{p}ffn.experts.w2")  # (E, D, I), as ours
        if piece is None:
            unexpected.append(name)
        else:
            pieces.append(piece)
    if tie and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        pieces.append(_Piece("model.embed_tokens.weight", "head.weight"))
    return pieces, unexpected


def _rope_rows(args: ModelArgs, layer: int, hf_name: str, n_rows: int) -> torch.Tensor:
    """Row order turning HF's half-split rope layout (pairs j, j+R/2) into the reference's
    interleaved pairs (2j, 2j+1). Applied to the rope rows of q (every head) and of k_pe."""
    la = args.for_layer(layer)
    R = la.qk_rope_head_dim
    half = torch.arange(R // 2)
    inter = torch.stack([half, half + R // 2], dim=1).flatten()  # 0, R/2, 1, R/2+1, ...
    rows = torch.arange(n_rows)
    if n_rows < R:
        return rows  # mis-shaped: the shape check reports it
    if hf_name == "kv_a_proj_with_mqa":
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
    src = _Source.from_dict(hf_sd)
    fp8 = any(k.endswith(HF_SCALE) for k in hf_sd)
    shapes = _targets(Transformer(args, device="meta", dtype="fp8" if fp8 else "fp32"))
    pieces, unexpected = _hf_pieces(src, args, rope_interleave)
    dtypes = {p.dst: hf_sd[p.src].dtype for p in pieces}
    targets = {}
    for name, t in shapes.items():  # keep the source's dtypes; scales stay float32
        targets[name] = torch.empty(t.shape, dtype=dtypes.get(name, t.dtype))
    _fill(targets, pieces, src, unexpected, label="HF state dict")
    return targets


def dsv3_to_hf_state_dict(
    sd: dict[str, torch.Tensor], args: ModelArgs, fused_experts: bool = True
) -> dict[str, torch.Tensor]:
    """dsv3 state dict -> HF names. `fused_experts=True` gives transformers 5.x's in-memory
    layout (`mlp.experts.gate_up_proj` (E, 2I, D), `down_proj` (E, D, I)), what
    `model.load_state_dict` takes; False gives per-expert keys as in saved HF files (fp8 scales
    as `weight_scale_inv`). Adds what HF has and dsv3 leaves out: a zero selection bias when
    the model has none, zero-size shared experts when there are none."""
    cfg = hf_config_from_args(args)  # raises if HF cannot express the model
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            raise CheckpointError(f"unexpected dsv3 tensor name {name!r}")
        p, rest = f"model.layers.{m.group(1)}.", m.group(2)
        parts = rest.split(".")
        hf_suffix = {"weight": "weight", "scale": HF_SCALE}
        if parts[0] == "attn" and len(parts) == 3:
            out[f"{p}self_attn.{ATTN_NAMES[parts[1]]}.{hf_suffix[parts[2]]}"] = t
        elif parts[0] in NORM_NAMES:
            out[f"{p}{NORM_NAMES[parts[0]]}.weight"] = t
        elif parts[:2] == ["ffn", "gate"]:
            hf = "weight" if parts[2] == "weight" else "e_score_correction_bias"
            out[f"{p}mlp.gate.{hf}"] = t
        elif parts[:2] == ["ffn", "shared_experts"]:
            out[f"{p}mlp.shared_experts.{MLP_NAMES[parts[2]]}.{hf_suffix[parts[3]]}"] = t
        elif parts[:2] == ["ffn", "experts"]:
            w, is_scale = parts[2].removesuffix("_scale"), parts[2].endswith("_scale")
            if fused_experts:
                if is_scale:
                    raise CheckpointError(
                        "fused HF experts have no fp8 scale layout; dequantise first or use "
                        "fused_experts=False"
                    )
                if w == "w2":
                    out[f"{p}mlp.experts.down_proj"] = t
                elif w == "w1":
                    w3 = sd[f"layers.{m.group(1)}.ffn.experts.w3"]
                    out[f"{p}mlp.experts.gate_up_proj"] = torch.cat([t, w3], dim=1)
                continue
            suffix = HF_SCALE if is_scale else "weight"
            for e in range(t.shape[0]):
                out[f"{p}mlp.experts.{e}.{MLP_NAMES[w]}.{suffix}"] = t[e]
        elif parts[0] == "ffn" and parts[1] in MLP_NAMES:
            out[f"{p}mlp.{MLP_NAMES[parts[1]]}.{hf_suffix[parts[2]]}"] = t
        else:
            raise CheckpointError(f"unexpected dsv3 tensor name {name!r}")
    for la in args.layers():
        if la.ffn != "moe":
            continue
        p = f"model.layers.{la.layer_id}.mlp."
        like = sd["embed.weight"]
        if cfg["model_type"] == "deepseek_v3" and p + "gate.e_score_correction_bias" not in out:
            out[p + "gate.e_score_correction_bias"] = torch.zeros(
                la.n_routed_experts, dtype=torch.float32, device=like.device
            )
        if la.n_shared_experts == 0:
            for w, (o, i) in (("gate_proj", (0, la.dim)), ("up_proj", (0, la.dim))):
                out[f"{p}shared_experts.{w}.weight"] = like.new_zeros(o, i)
            out[f"{p}shared_experts.down_proj.weight"] = like.new_zeros(la.dim, 0)
    return out


def _hf_files(root: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (index, single file, or any)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f:
                raise CheckpointError(f"{index.name}: shard name {f!r} is not a plain file name")
            if not (root / f).is_file():
                raise CheckpointError(f"{index.name} lists {f}, which is missing")
        return [root / f for f in files]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: only PyTorch pickle weights ({', '.join(pickles[:3])}); they are not read "
            f"because unpickling can run arbitrary code. Use a .safetensors checkpoint."
        )
    raise CheckpointError(f"{root}: no .safetensors weights found")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; not JSON, not UTF-8 or not an object -> ConfigError."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name} is not valid JSON: {e}", field="config.json") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path.name} must hold a JSON object", field="config.json")
    return cfg


def load_hf(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Load a Hugging Face DeepseekV3/V2 checkpoint directory (config.json plus
    model.safetensors, or shards with model.safetensors.index.json).

    dtype None picks the checkpoint's: "fp8" when it has `weight_scale_inv` scales, "fp32" for
    float32 weights, else "bf16". MTP layers (>= num_hidden_layers) are skipped.
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
    with _Source(_hf_files(root)) as src:
        if dtype is None:
            embed = "model.embed_tokens.weight"
            if any(k.endswith(HF_SCALE) for k in src.keys()):
                dtype = "fp8"
            elif embed in src and src.dtype(embed) == "F32":
                dtype = "fp32"
            else:
                dtype = "bf16"
        model = _empty_model(args, device, dtype)
        pieces, unexpected = _hf_pieces(
            src, args, rope_interleave, tie=bool(cfg.get("tie_word_embeddings"))
        )
        _fill(_targets(model), pieces, src, unexpected, label=str(root.name))
    return model.eval()


# ====================================================================== reference format
# convert.py's split dimensions (dsv3.sharding.SPLIT_DIM, one table for both). Routed experts
# are not split: rank r holds experts [r*E/mp, (r+1)*E/mp).
REFERENCE_SPLIT_DIM = SPLIT_DIM
_REF_EXPERT = re.compile(r"(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)")


def _reference_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        found = reference_files(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if found is None:
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
        extra = (
            f" (found pickles {', '.join(pickles[:3])}, which are never read)" if pickles else ""
        )
        raise CheckpointError(f"{path}: no model{{rank}}-mp{{N}}.safetensors files{extra}")
    return found[0]


def _reference_pieces(src: _Source, mp: int) -> tuple[list[_Piece], list[str]]:
    """Reference names (per-expert keys, tensors split over `mp` ranks) -> dsv3 pieces."""
    names = set(src.keys())
    by_name: dict[str, list[str]] = {}  # reference name -> its per-rank source keys
    for key in src.keys():
        by_name.setdefault(key.split(":", 1)[1], []).append(key)
    pieces: list[_Piece] = []
    unexpected: list[str] = []

    def scale_of(key: str) -> str | None:
        s = key[: -len("weight")] + "scale" if key.endswith(".weight") else None
        return s if s in names else None

    for name, keys in by_name.items():
        if name.endswith(".scale") and name[: -len("scale")] + "weight" in by_name:
            continue  # goes with its weight
        m = _REF_EXPERT.fullmatch(name)
        if m:
            if m.group(4) == "scale":
                unexpected += keys  # a scale without its weight
                continue
            for key in keys:  # each expert lives on one rank
                dst = f"{m.group(1)}.{m.group(3)}"
                pieces.append(_Piece(key, dst, (int(m.group(2)),), scale=scale_of(key)))
            continue
        module = name.split(".")[-2] if "." in name else ""
        dim = REFERENCE_SPLIT_DIM.get(module) if mp > 1 else None
        if dim is None:
            pieces.append(_Piece(keys[0], name, scale=scale_of(keys[0])))
            continue
        ranks = sorted(keys, key=lambda k: int(k.split(":", 1)[0]))
        if len(ranks) != mp:
            unexpected += [f"{name} (only on {len(ranks)} of {mp} ranks)"]
            continue
        offset = 0
        for key in ranks:
            n = src.shape(key)[dim]
            index = (slice(None),) * dim + (slice(offset, offset + n),)
            pieces.append(_Piece(key, name, index, scale=scale_of(key)))
            offset += n
    return pieces, unexpected


def load_reference(
    path: str | os.PathLike,
    args: ModelArgs,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Transformer:
    """Load DeepSeek's own format (`inference/convert.py` output): a directory of
    `model{rank}-mp{N}.safetensors`, or one such file. Shards are joined along the dims
    convert.py split them (REFERENCE_SPLIT_DIM) and the experts of all ranks are united.
    The reference format carries no config: pass the `args` it was made for. dtype None gives
    "fp8" when the files hold fp8 scales, else "bf16"."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
    files = _reference_files(Path(path))
    mp = len(files)
    with _Source(files, prefixes=[f"{r}:" for r in range(mp)]) as src:
        if dtype is None:
            dtype = "fp8" if any(k.endswith(".scale") for k in src.keys()) else "bf16"
        model = _empty_model(args, device, dtype)
        pieces, unexpected = _reference_pieces(src, mp)
        _fill(_targets(model), pieces, src, unexpected, label=Path(path).name)
    return model.eval()


def _safetensors_files(path: Path) -> tuple[list[Path], int | None]:
    """(files, mp): the reference's per-rank files in rank order with their mp, or every
    *.safetensors file of a directory (or the one file) with mp None (full tensors)."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    found = reference_files(path)
    if found is not None:
        return found
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    return files, None


def load_sharded(
    path: str | os.PathLike,
    args: ModelArgs,
    world_size: int | None = None,
    rank: int | None = None,
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict read from safetensors, touching only its slices (`get_slice`):

    - a file, or a directory of files, holding full tensors (dsv3's own files, a plain
      state_dict; with `rename`, a checkpoint whose names map one to one onto dsv3's, e.g. an
      HF checkpoint through checkpoint.py's name table; `rename` returns None to skip a key);
    - a directory of the reference's `model{rank}-mp{M}.safetensors` (convert.py output): for
      M == world_size each rank reads its own file; for another M the rank's range is read from
      the shards that cover it.
    Returns the keys and shapes of the sharded model's state_dict (experts stacked); load it
    with `model.load_state_dict(sd)`. Layers >= args.n_layers (HF's MTP layer) are skipped."""
    from safetensors import safe_open

    world_size, rank = resolve_world(world_size, rank)
    files, mp = _safetensors_files(Path(path))
    widths = split_widths(args)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    # name -> [(handle, key)] in rank order (several only for split tensors of per-rank files)
    pieces: dict[str, list[tuple[Any, str]]] = {}
    for h in handles:
        for key in h.keys():
            name = rename(key) if rename is not None else key
            if name is None:
                continue
            layer = layer_of(name)
            if layer is not None and layer >= args.n_layers:
                continue
            pieces.setdefault(name, []).append((h, key))
    fp8 = any(_dtype_of(h, k) == "F8_E4M3" for ps in pieces.values() for h, k in ps)
    check_shardable(args, world_size, "fp8" if fp8 else None)
    out: dict[str, torch.Tensor] = {}
    for name, ps in pieces.items():
        kind, dim = placement(name)
        if mp is None or kind != "split":
            h, key = ps[0]  # replicated tensors repeat on every per-rank file: take the first
            sl = h.get_slice(key)
            index = local_index(name, tuple(sl.get_shape()), args, world_size, rank, widths)
            if index is None:
                continue
            out[name] = sl[index] if index else h.get_tensor(key)
            continue
        if mp == world_size:
            h, key = ps[rank]
            out[name] = h.get_tensor(key)
            continue
        # Another layout: the full tensor is the per-rank pieces concatenated along `dim`.
        sizes = [h.get_slice(k).get_shape()[dim] for h, k in ps]
        full = list(ps[0][0].get_slice(ps[0][1]).get_shape())
        full[dim] = sum(sizes)
        index = local_index(name, tuple(full), args, world_size, rank, widths)
        want = index[dim] if index else slice(0, full[dim])
        parts, offset = [], 0
        for (h, key), size in zip(ps, sizes):
            lo, hi = max(want.start, offset), min(want.stop, offset + size)
            if lo < hi:
                sub = (slice(None),) * dim + (slice(lo - offset, hi - offset),)
                parts.append(h.get_slice(key)[sub])
            offset += size
        out[name] = torch.cat(parts, dim=dim)
    return stack_rank_experts(out, args, world_size, rank)


def _dtype_of(handle: Any, key: str) -> str:
    return handle.get_slice(key).get_dtype()
