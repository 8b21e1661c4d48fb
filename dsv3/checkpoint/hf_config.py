"""HF config.json <-> ModelArgs: exact translation, or a `ConfigError` saying why the other side
cannot represent the model. Torch-free."""

from __future__ import annotations

import json
import math
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import BLOCK_SIZE, MOE_FIELDS, ConfigError, ModelArgs, yarn_mscale

__all__ = [
    "CONFIG_NAMES",
    "args_from_hf_config",
    "fetch_hf_config",
    "hf_config_from_args",
    "hf_defaulted",
    "read_hf_config",
]


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
    "n_mtp_layers": "num_nextn_predict_layers",
}

# model_type -> the transformers model family whose semantics (and defaults) it has. Kimi K2
# ships DeepseekV3ForCausalLM under its own model_type; V3.2 is V3 plus the sparse-attention
# indexer (its index_* keys are read where ModelArgs has them).
_FAMILY = {
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "deepseek_v32": "deepseek_v3",
    "deepseek_v2": "deepseek_v2",
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

# DeepseekV32Config's defaults where they differ from DeepseekV3Config's (transformers 5.24).
_V32_DEFAULTS = {
    "max_position_embeddings": 163840,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
}


def args_from_hf_config(cfg: dict[str, Any] | str | os.PathLike) -> ModelArgs:
    """A transformers DeepseekV3/DeepseekV2 `config.json` (a dict, or the path of the file or of
    its directory) -> ModelArgs computing exactly what transformers computes. Torch-free.

    model_type deepseek_v3, kimi_k2 (architectures DeepseekV3ForCausalLM), deepseek_v32 and
    deepseek_v2 are read; a multimodal wrapper's `text_config` (Kimi K2.5) is unwrapped.
    `rms_norm_eps` becomes `norm_eps`, `num_nextn_predict_layers` `n_mtp_layers`, an fp8
    `quantization_config`'s `scale_fmt` (ue8m0 in V3.1) `scale_fmt`.

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
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        cfg = read_hf_config(path / "config.json" if path.is_dir() else path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"HF config must be a JSON object, got {type(cfg).__name__}")
    cfg = _language_model(cfg)
    model_type = cfg.get("model_type", "deepseek_v3")
    if model_type not in _FAMILY:
        raise ConfigError(
            f"HF model_type={model_type!r} is not supported; this loader reads "
            f"{', '.join(_FAMILY)} configs",
            field="model_type",
        )
    arch = cfg.get("architectures") or []
    if model_type == "kimi_k2" and arch and "DeepseekV3ForCausalLM" not in arch:
        raise ConfigError(
            f"HF architectures={arch!r}: a kimi_k2 config is read as DeepseekV3ForCausalLM",
            field="architectures",
        )
    family = _FAMILY[model_type]
    c = {**_defaults(model_type), **cfg}  # an explicit null stays null, as in HF

    def unsupported(key: str, why: str) -> ConfigError:
        return ConfigError(f"HF config {key}={c.get(key)!r}: {why}", field=key)

    # Architecture switches the reference model does not have.
    if c.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", "only SwiGLU with silu is supported")
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
    out["n_mtp_layers"] = out["n_mtp_layers"] or 0
    eps = c.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise unsupported("rms_norm_eps", "must be a number")
    out["norm_eps"] = float(eps)
    out["n_shared_experts"] = out["n_shared_experts"] or 0
    out["n_dense_layers"] = out["n_dense_layers"] or 0

    # Router.
    top_k = out["n_activated_experts"]
    norm = c.get("norm_topk_prob")
    if family == "deepseek_v3":
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

    if model_type == "deepseek_v32":  # DeepSeek Sparse Attention: the indexer on every layer
        types = c.get("layer_types") or ["indexed_attention"]
        if set(types) != {"indexed_attention"}:
            raise unsupported("layer_types", "DeepseekV32 layers other than indexed_attention")
        out["attn_kind"] = "dsa"
        for key in ("index_n_heads", "index_head_dim", "index_topk"):
            out[key] = c.get(key)

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
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(
                f"fp8 fmt={quant.get('fmt')!r} is not supported; only e4m3",
                field="quantization_config",
            )
        if quant.get("scale_fmt") not in (None, "ue8m0"):
            raise ConfigError(
                f"fp8 scale_fmt={quant.get('scale_fmt')!r} is not supported; only ue8m0 "
                f"(power-of-two scales) or none",
                field="quantization_config",
            )
        out["dtype"] = "fp8"
        out["scale_fmt"] = quant.get("scale_fmt")
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

    # HF multiplies cos/sin by `attention_factor`; the reference never does, so it must be 1.
    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
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


def hf_defaulted(cfg: dict[str, Any]) -> list[str]:
    """The shape keys (hidden_size, n_routed_experts, ...) of a config.json that
    `args_from_hf_config` takes from transformers' config class defaults because the file
    leaves them out (a near-empty deepseek_v3 config is V3 671B), in the defaults' order; []
    for what is not a supported config. Switches released files omit (rope_interleave,
    norm_topk_prob) are not listed."""
    if not isinstance(cfg, dict):
        return []
    cfg = _language_model(cfg)
    model_type = cfg.get("model_type", "deepseek_v3")
    if model_type not in _FAMILY:
        return []
    shape = set(CONFIG_NAMES.values()) | set(_V32_DEFAULTS)  # not switches real files omit
    return [k for k in _defaults(model_type) if k in shape and k not in cfg]


def _language_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal wrapper's (Kimi K2.5) `text_config`."""
    return cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg


def _defaults(model_type: str) -> dict[str, Any]:
    """transformers' config-class defaults for a supported `model_type` (V3.2 over V3's)."""
    extra = _V32_DEFAULTS if model_type == "deepseek_v32" else {}
    return {**_HF_DEFAULTS[_FAMILY[model_type]], **extra}


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
        rms_norm_eps=float(args.norm_eps),
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
    attn_kinds = [la.attn_kind for la in args.layers()]
    if "dsa" in attn_kinds:  # DeepseekV32: V3 with the DSA indexer on every layer
        if "mla" in attn_kinds or ref.score_func != "sigmoid":
            layer = attn_kinds.index("mla") if "mla" in attn_kinds else None
            raise ConfigError(
                "HF DeepseekV32 has the sparse-attention indexer on every layer and sigmoid "
                f"routing; this model has {'an mla layer' if layer is not None else 'softmax'}",
                field="attn_kind" if layer is not None else "score_func",
                layer=layer,
            )
        cfg.pop("rope_interleave", None)  # DeepseekV32's MLA rotary is always interleaved
        cfg.update(
            model_type="deepseek_v32",
            architectures=["DeepseekV32ForCausalLM"],
            index_n_heads=args.index_n_heads,
            index_head_dim=args.index_head_dim,
            index_topk=args.index_topk,
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


def fetch_hf_config(repo_id: str, token: str | None = None) -> dict[str, Any]:
    """A Hub repository's `config.json` (that file alone) as a dict, through huggingface_hub
    (imported here, so the rest of dsv3 does not need it). `token` None uses `HF_TOKEN` or the
    saved login. No network, unknown repo, gated repo or no config.json -> `ConfigError` saying
    which."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ConfigError("give a Hub repository id such as deepseek-ai/DeepSeek-V3", field="repo")
    repo_id = repo_id.strip()
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError(
            "reading a config from the Hub needs huggingface_hub (pip install huggingface_hub)",
            field="repo",
        ) from None
    token = token or os.environ.get("HF_TOKEN") or None
    # With no route to the Hub huggingface_hub retries for ~25 s before it gives up; a server
    # that cannot even open a connection reads its cache only, and says so at once.
    cache_only = {"local_files_only": True} if hub_unreachable() else {}
    try:
        path = hf_hub_download(repo_id, "config.json", token=token, **cache_only)
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        # (before EntryNotFoundError, of which LocalEntryNotFoundError is a kind)
        why = "cannot be reached: no internet on this server (or HF_HUB_OFFLINE is set)"
    except hub_errors.GatedRepoError:
        why = "is gated: accept its terms on the Hub and set HF_TOKEN"
    except hub_errors.RepositoryNotFoundError:
        why = "was not found (or is private: set HF_TOKEN)"
    except hub_errors.EntryNotFoundError:
        why = "has no config.json"
    except hub_errors.HFValidationError as e:
        why = f"is not a valid repository id ({e})"
    except (hub_errors.HfHubHTTPError, OSError) as e:
        why = f"could not be read: {type(e).__name__}: {str(e)[:200]}"
    else:
        return read_hf_config(path)
    raise ConfigError(f"Hub repository {repo_id!r} {why}", field="repo")


def hub_unreachable(timeout: float = 3.0) -> bool:
    """True when no TCP connection to the Hub's host (HF_ENDPOINT, default huggingface.co)
    opens within `timeout` s: no name resolution, no route. False where a proxy serves that
    host (the proxy, not the host, is what the download reaches), with HF_HUB_OFFLINE set
    (huggingface_hub then reads the cache itself) and whenever a connection opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(
        url.hostname or ""
    ):
        return False
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError):
        return True
    return False


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; not JSON, not UTF-8 or not an object -> ConfigError."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name} is not valid JSON: {e}", field="config.json") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path.name} must hold a JSON object", field="config.json")
    return cfg
