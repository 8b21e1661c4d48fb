"""Model configuration: `ModelArgs`, per-layer resolution and validation.

`ModelArgs` carries every field of the DeepSeek-V3 reference `ModelArgs` (same names, same
defaults: the 16B V2-Lite shape) plus three choices the reference hard-codes
(`rope_scaling`, `gate_bias`, `attn_impl`) and `layer_config`, per-layer overrides.

Configuration is resolved once: `args.for_layer(i)` returns a frozen `LayerArgs` with concrete
values for layer i; modules are built from that and never look at `layer_config` themselves.
Every value is validated at construction, for every layer's effective args, and a bad value
raises `ConfigError` naming the field, the layer, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCK_SIZE = 128  # fp8 quantisation block (the reference's `block_size`)


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the per-128x128-block float32 scale of an (out, in) fp8 weight."""
    return (-(-out_features // BLOCK_SIZE), -(-in_features // BLOCK_SIZE))


# Build dtype -> the dtype it computes in: fp8 weights compute in bf16 (dsv3.layers.compute_dtype).
COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16"}


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched by `factor` with coefficient `m`
    (the reference's and HF's `yarn_get_mscale`): 0.1 * m * ln(factor) + 1, and 1 without
    stretching. The softmax scale is multiplied by its square."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the layer, the value and
    what is allowed; `field` and `layer` carry the first two for UIs that show errors in place."""

    def __init__(self, message: str, field: str | None = None, layer: int | None = None):
        super().__init__(message)
        self.field = field
        self.layer = layer


# Fields a layer may override, with the type each must have.
LAYER_FIELDS: dict[str, type | tuple] = {
    "n_heads": int,
    "q_lora_rank": int,
    "kv_lora_rank": int,
    "qk_nope_head_dim": int,
    "v_head_dim": int,
    "inter_dim": int,
    "moe_inter_dim": int,
    "n_routed_experts": int,
    "n_shared_experts": int,
    "n_activated_experts": int,
    "n_expert_groups": int,
    "n_limited_groups": int,
    "score_func": str,
    "route_scale": float,
    "gate_bias": (bool, type(None)),
    "attn_impl": str,
    "attn_kind": str,
    "ffn": str,
}

# Field groups, in the order forms and tables show them.
MOE_FIELDS = (
    "moe_inter_dim",
    "n_routed_experts",
    "n_shared_experts",
    "n_activated_experts",
    "n_expert_groups",
    "n_limited_groups",
    "score_func",
    "route_scale",
    "gate_bias",
)


def unused_by(field: str, ffn: str) -> bool:
    """Whether a layer of kind `ffn` ("dense" or "moe") has no use for per-layer `field`: the
    experts' fields on a dense layer, inter_dim (the dense MLP's width) on a MoE layer. An
    override of such a field is accepted (the kind may change back) and changes nothing."""
    return field in MOE_FIELDS if ffn == "dense" else field == "inter_dim"


# DeepSeek Sparse Attention (V3.2-Exp): the per-layer switch, then the indexer's global shape.
DSA_FIELDS = ("attn_kind", "index_n_heads", "index_head_dim", "index_topk")
ROTARY_FIELDS = (
    "rope_scaling",
    "original_seq_len",
    "rope_theta",
    "rope_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
)

# Fields that shape the whole model (embedding, rotary tables, caches): never per layer.
GLOBAL_ONLY = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_dense_layers",
    "max_batch_size",
    "max_seq_len",
    "dtype",
    "scale_fmt",
    "qk_rope_head_dim",
    "norm_eps",
    "n_mtp_layers",
    *DSA_FIELDS[1:],
    *ROTARY_FIELDS,
)

CHOICES: dict[str, tuple] = {
    "dtype": ("bf16", "fp8"),
    "scale_fmt": (None, "ue8m0"),
    "score_func": ("softmax", "sigmoid"),
    "rope_scaling": ("auto", "yarn", "none"),
    "attn_impl": ("naive", "absorb"),
    "attn_kind": ("mla", "dsa"),
    "ffn": ("dense", "moe"),
}

# Upper bounds keep a typo (dim=20480000) from reaching the allocator; they are far above any
# published model. (minimum, maximum) per integer field.
INT_RANGES: dict[str, tuple[int, int]] = {
    "max_batch_size": (1, 1 << 16),
    "max_seq_len": (1, 1 << 22),
    "vocab_size": (1, 1 << 22),
    "dim": (1, 1 << 16),
    "inter_dim": (1, 1 << 20),
    "moe_inter_dim": (1, 1 << 18),
    "n_layers": (1, 1024),
    "n_dense_layers": (0, 1024),
    "n_heads": (1, 1024),
    "n_routed_experts": (1, 1 << 14),
    "n_shared_experts": (0, 1024),
    "n_activated_experts": (1, 1 << 14),
    "n_expert_groups": (1, 1 << 14),
    "n_limited_groups": (1, 1 << 14),
    "q_lora_rank": (0, 1 << 16),
    "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 1 << 12),
    "qk_rope_head_dim": (2, 1 << 12),
    "v_head_dim": (1, 1 << 12),
    "index_n_heads": (1, 1024),
    "index_head_dim": (2, 1 << 12),
    "index_topk": (1, 1 << 22),
    "original_seq_len": (1, 1 << 22),
    "beta_fast": (1, 1 << 12),
    "beta_slow": (1, 1 << 12),
    "n_mtp_layers": (0, 16),
}
FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    # (low, high, text); low is exclusive where the text says "> "
    "route_scale": (0.0, 1e6, "> 0"),
    "rope_theta": (1.0, 1e12, "> 1"),
    "rope_factor": (1.0, 1e6, ">= 1"),
    "mscale": (0.0, 1e3, ">= 0"),
    "norm_eps": (0.0, 1e-2, "> 0"),
}


@dataclass(frozen=True)
class LayerArgs:
    """Concrete, validated arguments of one layer (the result of `ModelArgs.for_layer`)."""

    layer_id: int
    dim: int
    ffn: Literal["dense", "moe"]
    # attention (MLA)
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attn_impl: Literal["naive", "absorb"]
    softmax_scale: float
    # DeepSeek Sparse Attention: "dsa" adds the lightning indexer, which keeps index_topk keys
    attn_kind: Literal["mla", "dsa"]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # feed-forward
    inter_dim: int
    moe_inter_dim: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int
    n_expert_groups: int
    n_limited_groups: int
    score_func: Literal["softmax", "sigmoid"]
    route_scale: float
    gate_bias: bool
    # the block's attn_norm/ffn_norm (q_norm/kv_norm keep the reference's 1e-6)
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModelArgs:
    """Model hyper-parameters. Defaults are the reference's (DeepSeek-V2-Lite, 16B).

    Beyond the reference:
        rope_scaling: "auto" applies YaRN only when max_seq_len > original_seq_len (the reference
            rule); "yarn" always; "none" never (plain rotary, softmax scale without mscale).
        gate_bias: the router's selection bias (`e_score_correction_bias`). None = the reference
            rule (only when dim == 7168, i.e. DeepSeek-V3); True/False force it.
        attn_impl: "naive" caches full per-head k/v; "absorb" caches the compressed kv and folds
            wkv_b into q and the output. Same numbers, different memory.
        attn_kind: "mla" attends to every earlier position; "dsa" (DeepSeek Sparse Attention,
            V3.2-Exp) adds the lightning indexer (index_n_heads x index_head_dim, needs q LoRA),
            which keeps the index_topk best-scored earlier positions per query. Per layer.
        norm_eps: epsilon of the blocks' attn_norm/ffn_norm, the final norm and the MTP norms
            (HF `rms_norm_eps`: 1e-5 in Moonlight). q_norm/kv_norm always use 1e-6, as the
            reference and transformers do.
        n_mtp_layers: multi-token-prediction modules after the main model (DeepSeek-V3: 1;
            see `dsv3.model.MTPBlock`). Their blocks are layers n_layers.. in `for_layer`, as
            checkpoints number them; they are not in `layers()` and not in the main forward.
        layer_config: {layer index: {field: value}} per-layer overrides; keys may be strings of
            ints (JSON). See LAYER_FIELDS for what may be overridden; `ffn` picks "dense"/"moe".
    The `dtype` field is the reference's checkpoint dtype ("bf16" or "fp8"); the dtype a model is
    built in is the `dtype` argument of `Transformer`.
    """

    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: Literal["bf16", "fp8"] = "bf16"
    scale_fmt: str | None = None
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # dsa (DeepSeek-V3.2-Exp's lightning indexer; the reference's defaults)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # beyond the reference
    rope_scaling: Literal["auto", "yarn", "none"] = "auto"
    gate_bias: bool | None = None
    attn_impl: Literal["naive", "absorb"] = "absorb"
    attn_kind: Literal["mla", "dsa"] = "mla"
    norm_eps: float = 1e-6
    n_mtp_layers: int = 0
    layer_config: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "layer_config":
                _check_value(f.name, getattr(self, f.name), None)
        self.layer_config = _normalise_layer_config(self.layer_config, self.n_layers)
        self._validate()

    # ------------------------------------------------------------------ resolution
    @property
    def use_yarn(self) -> bool:
        """Whether the rotary tables and softmax scale use YaRN."""
        if self.rope_scaling == "auto":
            return self.max_seq_len > self.original_seq_len
        return self.rope_scaling == "yarn"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5 of the default layer, times mscale**2 under YaRN (as the reference)."""
        return self.for_layer(0).softmax_scale if self.n_layers else 0.0

    def ffn_kind(self, layer_id: int) -> str:
        return self.layer_config.get(layer_id, {}).get(
            "ffn", "dense" if layer_id < self.n_dense_layers else "moe"
        )

    def for_layer(self, layer_id: int) -> LayerArgs:
        """Layer `layer_id`'s concrete arguments, overrides applied. Layers n_layers ..
        n_layers + n_mtp_layers - 1 are the MTP modules' blocks: MoE, global values (per-layer
        overrides name main layers only)."""
        n_all = self.n_layers + self.n_mtp_layers
        if not isinstance(layer_id, int) or not 0 <= layer_id < n_all:
            mtp = f" (MTP {self.n_layers}..{n_all - 1})" if self.n_mtp_layers else ""
            raise ConfigError(
                f"layer {layer_id!r} is out of range: layers are 0..{self.n_layers - 1}{mtp}",
                field="layer_config",
                layer=layer_id if isinstance(layer_id, int) else None,
            )
        over = self.layer_config.get(layer_id, {})
        vals = {k: over.get(k, getattr(self, k)) for k in LAYER_FIELDS if k != "ffn"}
        gate_bias = vals["gate_bias"]
        if gate_bias is None:
            gate_bias = self.dim == 7168  # the reference rule: only DeepSeek-V3 has the bias
        qk_head_dim = vals["qk_nope_head_dim"] + self.qk_rope_head_dim
        scale = qk_head_dim**-0.5
        if self.use_yarn:
            m = yarn_mscale(self.rope_factor, self.mscale)
            scale = scale * m * m
        vals.update(
            gate_bias=bool(gate_bias),
            route_scale=float(vals["route_scale"]),
            layer_id=layer_id,
            dim=self.dim,
            ffn=self.ffn_kind(layer_id) if layer_id < self.n_layers else "moe",
            qk_rope_head_dim=self.qk_rope_head_dim,
            softmax_scale=scale,
            index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim,
            index_topk=self.index_topk,
            norm_eps=float(self.norm_eps),
        )
        return LayerArgs(**vals)

    def layers(self) -> list[LayerArgs]:
        """The main model's layers (MTP blocks excluded: `mtp_layers`)."""
        return [self.for_layer(i) for i in range(self.n_layers)]

    def mtp_layers(self) -> list[LayerArgs]:
        """The MTP modules' blocks, numbered n_layers.. as in checkpoints."""
        return [self.for_layer(self.n_layers + k) for k in range(self.n_mtp_layers)]

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(
                f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}; "
                f"allowed: 0..{self.n_layers}",
                field="n_dense_layers",
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary rotates pairs)",
                field="qk_rope_head_dim",
            )
        # beta_slow == beta_fast is allowed (Kimi K2: 1/1): the ramp then widens its end by
        # 0.001 where the correction range collapses, as the reference and transformers do.
        if self.use_yarn and self.beta_slow > self.beta_fast:
            raise ConfigError(
                f"beta_slow={self.beta_slow} must be <= beta_fast={self.beta_fast} for YaRN",
                field="beta_slow",
            )
        for i in range(self.n_layers):
            _check_layer(self.for_layer(i), explicit=set(self.layer_config.get(i, {})))
        for la in self.mtp_layers():
            _check_layer(la, explicit=set())

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (layer_config keys as strings); `from_dict` inverts it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layer_config"] = {str(k): dict(v) for k, v in sorted(self.layer_config.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        if not isinstance(d, dict):
            raise ConfigError(f"model args must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown ModelArgs field(s): {', '.join(map(str, unknown))}; "
                f"known: {', '.join(sorted(known))}",
                field=str(unknown[0]),
            )
        return cls(**d)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> ModelArgs:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model args are not valid JSON: {e}", field="config") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelArgs:
        """A validated copy with `changes` applied."""
        d = self.to_dict()
        d.update(changes)
        return ModelArgs.from_dict(d)


# ---------------------------------------------------------------------- helpers
def _where(layer: int | None) -> str:
    return "" if layer is None else f" in layer {layer}"


def _check_value(name: str, value: Any, layer: int | None) -> None:
    """Type, choice and range of one field's value."""
    where = _where(layer)
    if name in CHOICES:
        if value not in CHOICES[name]:
            allowed = ", ".join(repr(c) for c in CHOICES[name])
            raise ConfigError(
                f"{name}={value!r}{where} is not allowed; choose one of {allowed}",
                field=name,
                layer=layer,
            )
        return
    if name == "gate_bias":
        if value is not None and not isinstance(value, bool):
            raise ConfigError(
                f"gate_bias={value!r}{where} must be true, false or null (reference rule)",
                field=name,
                layer=layer,
            )
        return
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{name}={value!r}{where} must be an integer in {lo}..{hi}", field=name, layer=layer
            )
        if not lo <= value <= hi:
            raise ConfigError(
                f"{name}={value}{where} is out of range; allowed: {lo}..{hi}",
                field=name,
                layer=layer,
            )
        return
    if name in FLOAT_RANGES:
        lo, hi, text = FLOAT_RANGES[name]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(value):
            raise ConfigError(
                f"{name}={value!r}{where} must be a finite number {text}", field=name, layer=layer
            )
        low_ok = value > lo if text.startswith(">") and not text.startswith(">=") else value >= lo
        if not (low_ok and value <= hi):
            raise ConfigError(
                f"{name}={value}{where} is out of range; allowed: {text} and <= {hi:g}",
                field=name,
                layer=layer,
            )
        return
    raise ConfigError(f"unknown field {name!r}{where}", field=name, layer=layer)


def _check_layer(la: LayerArgs, explicit: set[str]) -> None:
    """Cross-field rules on one layer's effective args. Errors name the field the user set when
    the layer overrides it, else the global one."""
    i = la.layer_id

    def fail(name: str, msg: str, *involved: str) -> None:
        # Blame the field this layer sets among those the rule involves (the user changed it),
        # else `name`. A rule broken by global values reads better without "in layer 0".
        name = next((f for f in involved if f in explicit), name)
        layer = i if explicit else None
        head, sep, allowed = msg.partition("; allowed:")  # "... in layer 3; allowed: 1..16"
        raise ConfigError(f"{head}{_where(layer)}{sep}{allowed}", field=name, layer=layer)

    if la.attn_kind == "dsa":
        if la.q_lora_rank == 0:
            fail(
                "attn_kind",
                "attn_kind='dsa' needs q_lora_rank > 0: the indexer's queries come from the "
                "q latent",
                "attn_kind",
                "q_lora_rank",
            )
        if la.index_head_dim < la.qk_rope_head_dim:
            fail(
                "index_head_dim",
                f"index_head_dim={la.index_head_dim} must be >= qk_rope_head_dim="
                f"{la.qk_rope_head_dim}: the indexer rotates its first qk_rope_head_dim dims",
            )
    if la.ffn == "moe":
        if la.n_activated_experts > la.n_routed_experts:
            if "n_routed_experts" in explicit and "n_activated_experts" not in explicit:
                # this layer's expert count is what went below the top-k it inherits
                groups = la.n_expert_groups
                fail(
                    "n_routed_experts",
                    f"n_routed_experts={la.n_routed_experts} is below n_activated_experts="
                    f"{la.n_activated_experts}; allowed: {la.n_activated_experts}.."
                    f"{INT_RANGES['n_routed_experts'][1]}"
                    + (f", a multiple of n_expert_groups={groups}" if groups > 1 else ""),
                )
            fail(
                "n_activated_experts",
                f"n_activated_experts={la.n_activated_experts} exceeds "
                f"n_routed_experts={la.n_routed_experts}; allowed: 1..{la.n_routed_experts}",
            )
        if la.n_routed_experts % la.n_expert_groups:
            fail(
                "n_expert_groups",
                f"n_routed_experts={la.n_routed_experts} is not divisible by "
                f"n_expert_groups={la.n_expert_groups}; allowed: n_routed_experts a multiple "
                f"of {la.n_expert_groups}, or n_expert_groups a divisor of {la.n_routed_experts}",
                "n_expert_groups",
                "n_routed_experts",
            )
        if la.n_limited_groups > la.n_expert_groups:
            fail(
                "n_limited_groups",
                f"n_limited_groups={la.n_limited_groups} exceeds "
                f"n_expert_groups={la.n_expert_groups}; allowed: 1..{la.n_expert_groups}",
                "n_limited_groups",
                "n_expert_groups",
            )
        per_group = la.n_routed_experts // la.n_expert_groups
        if la.n_expert_groups > 1 and la.gate_bias and per_group < 2:
            fail(
                "n_expert_groups",
                f"with the gate bias, groups are scored by their top-2 experts, so each group "
                f"needs >= 2 experts; n_routed_experts={la.n_routed_experts} / "
                f"n_expert_groups={la.n_expert_groups} = {per_group}",
                "n_expert_groups",
                "n_routed_experts",
                "gate_bias",
            )
        if la.n_expert_groups > 1 and la.n_limited_groups * per_group < la.n_activated_experts:
            fail(
                "n_limited_groups",
                f"n_limited_groups={la.n_limited_groups} groups of {per_group} experts hold "
                f"fewer than n_activated_experts={la.n_activated_experts}; allowed: "
                f"n_limited_groups >= {math.ceil(la.n_activated_experts / per_group)}",
                "n_limited_groups",
                "n_activated_experts",
                "n_routed_experts",
                "n_expert_groups",
            )


def _normalise_layer_config(lc: Any, n_layers: Any) -> dict[int, dict[str, Any]]:
    """Int keys, known fields, checked types and choices; ranges/cross-field rules come later."""
    if lc is None:
        return {}
    if not isinstance(lc, dict):
        raise ConfigError(
            f"layer_config must be a mapping of layer index -> overrides, got {type(lc).__name__}",
            field="layer_config",
        )
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise ConfigError(f"n_layers={n_layers!r} must be an integer", field="n_layers")
    out: dict[int, dict[str, Any]] = {}
    for key, over in lc.items():
        layer = _layer_index(key, n_layers)
        if layer in out:
            raise ConfigError(f"layer {layer} appears twice in layer_config", field="layer_config")
        if not isinstance(over, dict):
            raise ConfigError(
                f"layer_config for layer {layer} must be a mapping of field -> value, "
                f"got {type(over).__name__}",
                field="layer_config",
                layer=layer,
            )
        clean: dict[str, Any] = {}
        for name, value in over.items():
            if name in GLOBAL_ONLY:
                raise ConfigError(
                    f"{name} cannot be overridden per layer (in layer {layer}): it is global; "
                    f"per-layer fields: {', '.join(LAYER_FIELDS)}",
                    field=str(name),
                    layer=layer,
                )
            if name not in LAYER_FIELDS:
                raise ConfigError(
                    f"unknown per-layer field {name!r} in layer {layer}; "
                    f"per-layer fields: {', '.join(LAYER_FIELDS)}",
                    field=str(name),
                    layer=layer,
                )
            if name == "route_scale" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            _check_value(name, value, layer)
            clean[name] = value
        out[layer] = clean
    return dict(sorted(out.items()))


def _layer_index(key: Any, n_layers: int) -> int:
    if isinstance(key, bool):
        key = repr(key)
    if isinstance(key, str):
        try:
            key = int(key.strip())
        except ValueError:
            raise ConfigError(
                f"layer_config key {key!r} is not a layer index; use integers 0..{n_layers - 1}",
                field="layer_config",
            ) from None
    if not isinstance(key, int):
        raise ConfigError(
            f"layer_config key {key!r} is not a layer index; use integers 0..{n_layers - 1}",
            field="layer_config",
        )
    if not 0 <= key < n_layers:
        raise ConfigError(
            f"layer_config names layer {key}, out of range: layers are 0..{n_layers - 1}",
            field="layer_config",
            layer=key,
        )
    return key
