"""THE one name table: Hugging Face checkpoint names <-> dsv3 (reference) names, with the
dimension tensor parallelism splits each tensor along. Torch-free.

In the spirit of DeepSeek's `inference/convert.py`, one mapping holds both the new name and the
split dimension; `{}` stands for a layer (and expert) number. Both directions are generated from
it (`hf_to_dsv3`, `dsv3_to_hf`), and so is `SPLIT_DIM` (module -> dimension), the table
`dsv3.dist.plan` shards by. fp8 block scales follow their weights: HF `X.weight_scale_inv` is
dsv3 `X.scale`.

dsv3 stores routed experts stacked (`layers.N.ffn.experts.w1`, (E, I, D)); the per-expert names
here (`layers.N.ffn.experts.E.w1.weight`) are the reference's, which `per_expert` reads. HF's
in-memory fused experts (`mlp.experts.gate_up_proj`, `down_proj`) are not one-to-one names: the
checkpoint code handles them next to this table.
"""

from __future__ import annotations

import re

# HF name -> (dsv3 name, split dimension over tensor-parallel ranks, None = replicated).
HF_TABLE: dict[str, tuple[str, int | None]] = {
    "model.embed_tokens.weight": ("embed.weight", 0),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("head.weight", 0),
    "model.layers.{}.input_layernorm.weight": ("layers.{}.attn_norm.weight", None),
    "model.layers.{}.post_attention_layernorm.weight": ("layers.{}.ffn_norm.weight", None),
    "model.layers.{}.self_attn.q_proj.weight": ("layers.{}.attn.wq.weight", 0),
    "model.layers.{}.self_attn.q_a_proj.weight": ("layers.{}.attn.wq_a.weight", None),
    "model.layers.{}.self_attn.q_a_layernorm.weight": ("layers.{}.attn.q_norm.weight", None),
    "model.layers.{}.self_attn.q_b_proj.weight": ("layers.{}.attn.wq_b.weight", 0),
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight": ("layers.{}.attn.wkv_a.weight", None),
    "model.layers.{}.self_attn.kv_a_layernorm.weight": ("layers.{}.attn.kv_norm.weight", None),
    "model.layers.{}.self_attn.kv_b_proj.weight": ("layers.{}.attn.wkv_b.weight", 0),
    "model.layers.{}.self_attn.o_proj.weight": ("layers.{}.attn.wo.weight", 1),
    # DeepSeek Sparse Attention's lightning indexer (DeepseekV32): replicated on every rank, as
    # the reference builds it from plain Linear layers.
    "model.layers.{}.self_attn.indexer.wq_b.weight": ("layers.{}.attn.indexer.wq_b.weight", None),
    "model.layers.{}.self_attn.indexer.wk.weight": ("layers.{}.attn.indexer.wk.weight", None),
    "model.layers.{}.self_attn.indexer.k_norm.weight": (
        "layers.{}.attn.indexer.k_norm.weight",
        None,
    ),
    "model.layers.{}.self_attn.indexer.k_norm.bias": ("layers.{}.attn.indexer.k_norm.bias", None),
    "model.layers.{}.self_attn.indexer.weights_proj.weight": (
        "layers.{}.attn.indexer.weights_proj.weight",
        None,
    ),
    "model.layers.{}.mlp.gate_proj.weight": ("layers.{}.ffn.w1.weight", 0),
    "model.layers.{}.mlp.down_proj.weight": ("layers.{}.ffn.w2.weight", 1),
    "model.layers.{}.mlp.up_proj.weight": ("layers.{}.ffn.w3.weight", 0),
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": (
        "layers.{}.ffn.shared_experts.w1.weight",
        0,
    ),
    "model.layers.{}.mlp.shared_experts.down_proj.weight": (
        "layers.{}.ffn.shared_experts.w2.weight",
        1,
    ),
    "model.layers.{}.mlp.shared_experts.up_proj.weight": (
        "layers.{}.ffn.shared_experts.w3.weight",
        0,
    ),
    "model.layers.{}.mlp.gate.weight": ("layers.{}.ffn.gate.weight", None),
    "model.layers.{}.mlp.gate.e_score_correction_bias": ("layers.{}.ffn.gate.bias", None),
    # Routed experts one by one (saved HF files; the reference's names): whole experts go to
    # ranks (see per_expert), so no split dimension.
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": ("layers.{}.ffn.experts.{}.w1.weight", None),
    "model.layers.{}.mlp.experts.{}.down_proj.weight": ("layers.{}.ffn.experts.{}.w2.weight", None),
    "model.layers.{}.mlp.experts.{}.up_proj.weight": ("layers.{}.ffn.experts.{}.w3.weight", None),
    # The multi-token-prediction modules (layers n_layers.. of a checkpoint; 61 in DeepSeek-V3):
    # a block under the names above plus these. dsv3 keeps them as `mtp.N.` (see `to_mtp`).
    "model.layers.{}.enorm.weight": ("layers.{}.enorm.weight", None),
    "model.layers.{}.hnorm.weight": ("layers.{}.hnorm.weight", None),
    "model.layers.{}.eh_proj.weight": ("layers.{}.eh_proj.weight", None),
    "model.layers.{}.shared_head.norm.weight": ("layers.{}.shared_head.norm.weight", None),
    # ... and copies of the embedding and head, which dsv3 shares with the main model
    # (MTP_COPIES): loaders skip them, `dsv3_to_hf_state_dict` writes them.
    "model.layers.{}.embed_tokens.weight": ("layers.{}.embed.weight", 0),
    "model.layers.{}.shared_head.head.weight": ("layers.{}.shared_head.head.weight", 0),
}
HF_SCALE = "weight_scale_inv"  # HF's name of the fp8 block scale (dsv3/reference: `scale`)

_DSV3_TABLE = {ours: (theirs, dim) for theirs, (ours, dim) in HF_TABLE.items()}
# Module name -> dimension its weight (and fp8 scale) is split along; modules not listed are
# replicated. Equals the reference convert.py's mapping.
SPLIT_DIM: dict[str, int] = {
    ours.split(".")[-2]: dim
    for ours, dim in HF_TABLE.values()
    if dim is not None and ".experts." not in ours
}

# Module (with `{}` placeholders) -> split dimension, None = replicated: decides where a module
# name alone is ambiguous (the indexer's `wq_b` is replicated, MLA's is column parallel).
_MODULE_DIM: dict[str, int | None] = {
    ours.rsplit(".", 1)[0]: dim for ours, dim in HF_TABLE.values() if ".experts." not in ours
}

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")  # a layer or expert number between dots
# Stacked routed experts (dsv3; `mtp.N.` in the MTP modules): split along the expert axis.
STACKED = re.compile(r"(?:layers|mtp)\.(\d+)\.ffn\.experts\.(w[123])(_scale)?")
# Per-expert keys (the reference's files): expert e lives on one rank.
PER_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)")
# DeepSeek's convert.py output: one file per model-parallel rank.
REF_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")


# An MTP layer's copy of a main-model tensor (its name after "layers.N.") -> that tensor.
MTP_COPIES = {"embed.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_LAYER_PREFIX = re.compile(r"(layers|mtp)\.(\d+)\.(.+)")


def to_mtp(name: str, n_layers: int) -> str:
    """A reference name in layer >= n_layers (`layers.61.attn.wq.weight`) -> the MTP module's
    dsv3 name (`mtp.61.attn.wq.weight`); other names unchanged."""
    m = _LAYER_PREFIX.fullmatch(name)
    if m is None or m.group(1) != "layers" or int(m.group(2)) < n_layers:
        return name
    return f"mtp.{m.group(2)}.{m.group(3)}"


def from_mtp(name: str) -> str:
    """`mtp.61.x` -> `layers.61.x` (the checkpoint numbering); other names unchanged."""
    m = _LAYER_PREFIX.fullmatch(name)
    return f"layers.{m.group(2)}.{m.group(3)}" if m and m.group(1) == "mtp" else name


def mtp_copy(name: str) -> str | None:
    """The main-model tensor an MTP layer's reference name copies (`layers.61.embed.weight` ->
    `embed.weight`), None for other names."""
    m = _LAYER_PREFIX.fullmatch(name)
    return MTP_COPIES.get(m.group(3)) if m and m.group(1) == "layers" else None


def _template(name: str) -> tuple[str, list[str]]:
    """'a.3.b.12.c' -> ('a.{}.b.{}.c', ['3', '12'])."""
    return _NUMBER.sub("{}", name), _NUMBER.findall(name)


def _translate(name: str, table: dict[str, tuple[str, int | None]], scale: tuple[str, str]):
    src_scale, dst_scale = scale
    suffix = ""
    if name.endswith("." + src_scale):
        name, suffix = name[: -len(src_scale)] + "weight", dst_scale
    key, numbers = _template(name)
    if key not in table:
        return None
    out = table[key][0].format(*numbers)
    return out[: -len("weight")] + suffix if suffix else out


def hf_to_dsv3(name: str) -> str | None:
    """HF name -> dsv3 name (per-expert keys keep the reference's per-expert names), None when
    the table has no such name. `X.weight_scale_inv` -> `X.scale`."""
    return _translate(name, HF_TABLE, (HF_SCALE, "scale"))


def dsv3_to_hf(name: str) -> str | None:
    """dsv3 (or reference per-expert) name -> HF name, None when the table has no such name.
    `X.scale` -> `X.weight_scale_inv`."""
    return _translate(name, _DSV3_TABLE, ("scale", HF_SCALE))


def per_expert(name: str) -> tuple[str, int] | None:
    """A reference per-expert key -> (the stacked dsv3 tensor it is a slice of, expert number):
    `layers.3.ffn.experts.5.w1.weight` -> ("layers.3.ffn.experts.w1", 5), `...5.w1.scale` ->
    ("layers.3.ffn.experts.w1_scale", 5). None for other names."""
    m = PER_EXPERT.fullmatch(name)
    if m is None:
        return None
    layer, e, w, kind = m.groups()
    return f"layers.{layer}.ffn.experts.{w}{'_scale' if kind == 'scale' else ''}", int(e)


def scale_name(name: str) -> str:
    """dsv3 name of the fp8 scale that goes with weight `name` (Linear or stacked experts)."""
    return name[: -len("weight")] + "scale" if name.endswith(".weight") else name + "_scale"


def layer_of(name: str) -> int | None:
    """The layer number of a dsv3 name (MTP modules: their checkpoint number), None outside the
    layers."""
    m = re.match(r"(?:layers|mtp)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def placement(name: str) -> tuple[str, int | None]:
    """("experts", 0) stacked routed experts, ("expert", None) one expert of the reference's
    per-expert keys, ("split", dim) a SPLIT_DIM module, ("replicated", None) the rest."""
    if STACKED.fullmatch(name):
        return "experts", 0
    if PER_EXPERT.fullmatch(name):
        return "expert", None
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("weight", "scale", "bias"):
        module = _template(name)[0].rsplit(".", 1)[0]
        if module in _MODULE_DIM:
            dim = _MODULE_DIM[module]
            return ("replicated", None) if dim is None else ("split", dim)
        if parts[-1] != "bias" and parts[-2] in SPLIT_DIM:
            return "split", SPLIT_DIM[parts[-2]]
    return "replicated", None
