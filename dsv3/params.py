"""Analytic parameter counts, memory and FLOP estimates: no allocation, exact counts.

`tensor_specs(args)` lists every tensor the model holds (name, shape, group, kind) from the
resolved per-layer args; counts and byte estimates are sums over it, and a test checks it against
a meta build's state_dict, name by name.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

from .config import COMPUTE_DTYPE, ModelArgs, scale_shape
from .names import placement

GROUPS = (
    "embedding",
    "attention",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "gate",
    "norms",
    "head",
    "mtp",  # the multi-token-prediction modules' own tensors (n_mtp_layers > 0)
)
LAYER_GROUPS = GROUPS[1:7]  # the groups of a main-model layer (attention .. norms)
BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    group: str  # one of GROUPS
    layer: int | None
    linear: bool  # stored as fp8 (with block scales) in an fp8 build
    sharded: bool  # split across tensor/expert-parallel ranks (as the reference)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _key(args: ModelArgs) -> tuple:
    """A hashable snapshot of every field of `args` (ModelArgs is mutable, so not hashable)."""
    vals = tuple(
        getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "layer_config"
    )
    lc = tuple((i, tuple(sorted(o.items()))) for i, o in sorted(args.layer_config.items()))
    return vals, lc


_CACHE: dict[tuple, tuple] = {}
_CACHE_LOCK = threading.Lock()


def _resolved(args: ModelArgs) -> tuple[tuple, tuple[TensorSpec, ...]]:
    """(resolved layers, tensor specs) of `args`, remembered for the last 16 configurations:
    an estimate of the 671B preset needs both several times, and resolving 61 layers dominated
    its cost. Keyed by value, so a changed ModelArgs is never served stale results."""
    key = _key(args)
    hit = _CACHE.get(key)
    if hit is None:
        layers = tuple(args.layers())
        hit = (layers, tuple(_tensor_specs(args, layers)))
        with _CACHE_LOCK:  # the app estimates from several threads
            while len(_CACHE) >= 16:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = hit
    return hit


def _layers(args: ModelArgs) -> tuple:
    return _resolved(args)[0]


def tensor_specs(args: ModelArgs) -> list[TensorSpec]:
    """Every parameter (not fp8 scales) of `Transformer(args)`, in state_dict order."""
    return list(_resolved(args)[1])


def _tensor_specs(args: ModelArgs, layers) -> list[TensorSpec]:
    D = args.dim
    out = [TensorSpec("embed.weight", (args.vocab_size, D), "embedding", None, False, True)]
    # The MTP modules' blocks come after the main layers (as in a meta build's state_dict),
    # under `mtp.N.`, all in group "mtp" and in no layer row.
    for la in (*layers, *args.mtp_layers()):
        mtp = la.layer_id >= args.n_layers
        i, p = (None, f"mtp.{la.layer_id}.") if mtp else (la.layer_id, f"layers.{la.layer_id}.")
        H = la.n_heads

        def add(name, shape, group, linear=True, sharded=True, p=p, i=i, mtp=mtp):
            group = "mtp" if mtp else group
            out.append(TensorSpec(p + name, tuple(shape), group, i, linear, sharded))

        a = "attn."
        if la.q_lora_rank == 0:
            add(a + "wq.weight", (H * la.qk_head_dim, D), "attention")
        else:
            add(a + "wq_a.weight", (la.q_lora_rank, D), "attention", sharded=False)
            add(a + "q_norm.weight", (la.q_lora_rank,), "attention", False, False)
            add(a + "wq_b.weight", (H * la.qk_head_dim, la.q_lora_rank), "attention")
        add(
            a + "wkv_a.weight",
            (la.kv_lora_rank + la.qk_rope_head_dim, D),
            "attention",
            sharded=False,
        )
        add(a + "kv_norm.weight", (la.kv_lora_rank,), "attention", False, False)
        kvb = (H * (la.qk_nope_head_dim + la.v_head_dim), la.kv_lora_rank)
        add(a + "wkv_b.weight", kvb, "attention")
        add(a + "wo.weight", (D, H * la.v_head_dim), "attention")
        if la.attn_kind == "dsa":  # the lightning indexer: replicated, as the reference's
            Hi, Di, ix = la.index_n_heads, la.index_head_dim, a + "indexer."
            add(ix + "wq_b.weight", (Hi * Di, la.q_lora_rank), "attention", sharded=False)
            add(ix + "wk.weight", (Di, D), "attention", sharded=False)
            add(ix + "k_norm.weight", (Di,), "attention", False, False)
            add(ix + "k_norm.bias", (Di,), "attention", False, False)
            add(ix + "weights_proj.weight", (Hi, D), "attention", False, False)
        if la.ffn == "dense":
            add("ffn.w1.weight", (la.inter_dim, D), "dense_mlp")
            add("ffn.w2.weight", (D, la.inter_dim), "dense_mlp")
            add("ffn.w3.weight", (la.inter_dim, D), "dense_mlp")
        else:
            E, I = la.n_routed_experts, la.moe_inter_dim
            add("ffn.gate.weight", (E, D), "gate", False, False)
            if la.gate_bias:
                add("ffn.gate.bias", (E,), "gate", False, False)
            add("ffn.experts.w1", (E, I, D), "routed_experts")
            add("ffn.experts.w2", (E, D, I), "routed_experts")
            add("ffn.experts.w3", (E, I, D), "routed_experts")
            if la.n_shared_experts > 0:
                W = la.n_shared_experts * I
                add("ffn.shared_experts.w1.weight", (W, D), "shared_experts")
                add("ffn.shared_experts.w2.weight", (D, W), "shared_experts")
                add("ffn.shared_experts.w3.weight", (W, D), "shared_experts")
        add("attn_norm.weight", (D,), "norms", False, False)
        add("ffn_norm.weight", (D,), "norms", False, False)
        if mtp:  # MTPBlock's own tensors; eh_proj stays unquantised in fp8 (as released)
            add("enorm.weight", (D,), "mtp", False, False)
            add("hnorm.weight", (D,), "mtp", False, False)
            add("eh_proj.weight", (D, 2 * D), "mtp", False, False)
            add("shared_head.norm.weight", (D,), "mtp", False, False)
    out.append(TensorSpec("norm.weight", (D,), "norms", None, False, False))
    out.append(TensorSpec("head.weight", (args.vocab_size, D), "head", None, False, True))
    return out


def count_params(args: ModelArgs) -> dict:
    """Exact counts without allocating: {"total", "main", "mtp", "active", "groups": {...},
    "layers": [...]}.

    "total" is every parameter the model holds: "main" (the model proper) plus "mtp" (the MTP
    modules' own tensors: blocks, eh_proj, enorm, hnorm, shared_head.norm; the embedding and head
    they share are counted once, in main). "active" is what one token of the main forward uses:
    everything but the input embedding and the MTP modules, with only n_activated_experts of
    each MoE layer's routed experts.
    """
    groups = dict.fromkeys(GROUPS, 0)
    layers = [
        {"layer": la.layer_id, "ffn": la.ffn, **dict.fromkeys(LAYER_GROUPS, 0)}
        for la in _layers(args)
    ]
    for t in _resolved(args)[1]:
        groups[t.group] += t.numel
        if t.layer is not None:
            layers[t.layer][t.group] += t.numel
    for row, la in zip(layers, _layers(args)):
        row["total"] = sum(row[g] for g in LAYER_GROUPS)
        routed_active = 0
        if la.ffn == "moe":
            routed_active = row["routed_experts"] // la.n_routed_experts * la.n_activated_experts
        row["active"] = row["total"] - row["routed_experts"] + routed_active
    total = sum(groups.values())
    active = groups["head"] + groups["norms"] - sum(r["norms"] for r in layers)
    active += sum(r["active"] for r in layers)
    return {
        "total": total,
        "main": total - groups["mtp"],
        "mtp": groups["mtp"],
        "active": active,
        "groups": groups,
        "layers": layers,
    }


def weight_bytes(args: ModelArgs, dtype: str) -> int:
    """Bytes of all weights in a build of `dtype` ("fp32", "bf16", "fp8"), fp8 scales included:
    `weight_bytes_per_gpu` on one GPU."""
    return weight_bytes_per_gpu(args, dtype, 1)


def weight_bytes_per_gpu(args: ModelArgs, dtype: str, n_gpus: int = 1) -> int:
    """Bytes of the weights one of `n_gpus` tensor/expert-parallel ranks holds, split as
    dsv3.parallel splits them (`sharded` tensors along their split dimension, experts by
    expert), fp8 scales included: the bytes of rank 0's state_dict, exactly."""
    if dtype not in (*BYTES, "fp8"):
        raise ValueError(f"dtype={dtype!r}: choose fp32, bf16 or fp8")
    n = max(int(n_gpus), 1)
    total = 0
    for t in _resolved(args)[1]:
        shape = _rank_shape(t, n)
        numel = math.prod(shape)
        if t.name.endswith("gate.bias"):
            total += numel * 4  # float32 in every build
        elif dtype in BYTES:
            total += numel * BYTES[dtype]
        elif t.linear:
            *lead, o, i = shape
            total += numel + 4 * math.prod(lead) * math.prod(scale_shape(o, i))
        else:
            total += numel * 2
    return total


def _rank_shape(t: TensorSpec, n_gpus: int) -> list[int]:
    """The shape of the part of `t` one of `n_gpus` ranks holds (dsv3.parallel's split)."""
    shape = list(t.shape)
    if t.sharded and n_gpus > 1:
        shape[placement(t.name)[1]] //= n_gpus
    return shape


# Why an fp8 model keeps bf16 copies of its weights on some GPUs (`dense_copy_bytes`)
NO_FP8_PATH = "this GPU has no fp8 path (compute capability below 8.9, or no Triton)"


def dense_copy_bytes(args: ModelArgs, n_gpus: int = 1) -> int:
    """Bytes of the bf16 copies an fp8 model keeps on a GPU without an fp8 path
    (`dsv3.fp8.fp8_matmul_ok`: compute capability below 8.9, or no Triton), made once at build
    (`Transformer.dequantize_once`): every fp8 weight of the main model at 2 bytes per element,
    on one of `n_gpus` ranks as the weights split. An MTP module's, made when `forward(mtp=True)`
    first runs it, are not counted."""
    n = max(int(n_gpus), 1)
    return sum(2 * math.prod(_rank_shape(t, n)) for t in _dense_specs(args))


def dense_work_bytes(args: ModelArgs, n_gpus: int = 1) -> int:
    """Working memory of making those copies (`layers.dequantize`: a float32 copy of one
    matrix, an expert stack one expert at a time): 4 bytes per element of the largest."""
    n = max(int(n_gpus), 1)
    return max((4 * math.prod(_rank_shape(t, n)[-2:]) for t in _dense_specs(args)), default=0)


def _dense_specs(args: ModelArgs) -> list[TensorSpec]:
    """The fp8 weights a plain forward multiplies by (an MTP module runs only when asked)."""
    return [t for t in _resolved(args)[1] if t.linear and not t.name.startswith("mtp.")]


def layer_kv_elems(la, attn_impl: str) -> int:
    """Cached elements per token of one layer (`LayerArgs`) in a cache layout: per-head k and v
    (naive) or the latent and the rope key (absorb), plus the DSA indexer's key
    (index_head_dim) on a DSA layer."""
    if attn_impl == "naive":
        n = la.n_heads * (la.qk_head_dim + la.v_head_dim)
    else:
        n = la.kv_lora_rank + la.qk_rope_head_dim
    return n + (la.index_head_dim if la.attn_kind == "dsa" else 0)


def kv_elems_per_token(args: ModelArgs, attn_impl: str) -> int:
    """Cached elements per token, summed over layers, for a cache layout (DSA indexer keys
    included)."""
    return sum(layer_kv_elems(la, attn_impl) for la in _layers(args))


def configured_kv_elems(args: ModelArgs, n_gpus: int = 1) -> float:
    """Cached elements per token on one of `n_gpus` GPUs, summed over layers, each layer in its
    own attn_impl (an override may differ from the config's): naive k/v per head (heads split
    over GPUs), absorb latent + rope key (replicated), plus a DSA layer's indexer key
    (replicated). What the built model's cache holds (`Transformer.cache_bytes`)."""
    n = max(int(n_gpus), 1)
    total = 0.0
    for la in _layers(args):
        index = la.index_head_dim if la.attn_kind == "dsa" else 0
        own = layer_kv_elems(la, la.attn_impl) - index
        total += (own / n if la.attn_impl == "naive" else own) + index
    return total


def kv_impl(args: ModelArgs) -> str:
    """The cache layout the layers use: "naive", "absorb", or "mixed" (overrides differ)."""
    impls = {la.attn_impl for la in _layers(args)}
    return impls.pop() if len(impls) == 1 else "mixed"


def estimate(
    args: ModelArgs,
    dtype: str = "bf16",
    batch: int = 1,
    seq_len: int | None = None,
    n_gpus: int = 1,
) -> dict:
    """What a build and a forward of `batch` x `seq_len` tokens cost, before allocating.

    Memory = weights + KV cache (each layer's attn_impl; DSA indexer keys included) +
    activations (a bound on the live tensors of one layer plus the logits). FLOPs count 2 per
    multiply-add of the matmuls a token passes through (active parameters, embedding excluded)
    plus causal attention over its context; on a DSA layer attention covers the index_topk
    kept keys (as a sparse kernel computes it; dsv3 masks dense scores) and the indexer scores
    every earlier position. Per-GPU memory shards what the reference shards (tensor/expert
    parallel) and replicates the rest (norms, router, wq_a/wkv_a, the absorb latent cache, the
    DSA indexer and its keys).
    """
    seq_len = args.max_seq_len if seq_len is None else seq_len
    counts = count_params(args)
    specs = _resolved(args)[1]
    act_bytes = BYTES[COMPUTE_DTYPE[dtype]] if dtype in COMPUTE_DTYPE else 2
    wbytes = {d: weight_bytes(args, d) for d in ("fp32", "bf16", "fp8")}
    kv_tok = {k: kv_elems_per_token(args, k) * act_bytes for k in ("naive", "absorb")}
    kv_cache = {k: v * batch * seq_len for k, v in kv_tok.items()}

    # Matmul FLOPs per token: active params minus vectors (norms, biases) and embedding lookup;
    # the main model's vectors only, as "active" counts the main forward (MTP is not run).
    vec = sum(t.numel for t in specs if len(t.shape) == 1 and not t.name.startswith("mtp."))
    matmul_active = counts["active"] - vec + sum(t.numel for t in specs if t.name == "norm.weight")
    pairs = seq_len * (seq_len + 1) / 2  # causal (query, key) pairs in a prefill
    attn_pair_flops = 0.0  # per sequence: MLA scores and values, DSA indexer scores
    for la in _layers(args):
        per_pair = la.n_heads * (la.qk_head_dim + la.v_head_dim)
        if la.attn_kind == "dsa":  # MLA over the kept keys; the indexer scores every pair
            attn_pair_flops += per_pair * sparse_pairs(seq_len, la.index_topk)
            attn_pair_flops += la.index_n_heads * la.index_head_dim * pairs
        else:
            attn_pair_flops += per_pair * pairs
    flops_forward = batch * (2 * matmul_active * seq_len + 2 * attn_pair_flops)
    flops_per_token = flops_forward / max(batch * seq_len, 1)

    width = max(
        max(
            la.n_heads * (la.qk_head_dim * 2 + la.v_head_dim * 2),
            3 * (la.inter_dim if la.ffn == "dense" else la.moe_inter_dim * la.n_activated_experts),
        )
        for la in _layers(args)
    )
    activation = batch * seq_len * (4 * args.dim + width) * act_bytes + batch * args.vocab_size * 4
    if any(la.attn_kind == "dsa" for la in _layers(args)) and seq_len > args.index_topk:
        # DSA: float32 index scores and the kept-key mask, (seq_len x seq_len) per sequence.
        activation += batch * seq_len * seq_len * 5
    # The cache the model holds: each layer in its own attn_impl (kv_cache: every layer in one)
    kv_model = configured_kv_elems(args) * act_bytes * batch * seq_len
    total = wbytes[dtype] + kv_model + activation
    dequant = dequant_bytes(args) if dtype == "fp8" else 0
    dense = dense_copy_bytes(args) if dtype == "fp8" else 0

    n = max(int(n_gpus), 1)
    per_gpu_weights = weight_bytes_per_gpu(args, dtype, n)
    kv_gpu = configured_kv_elems(args, n) * act_bytes * batch * seq_len
    per_gpu = per_gpu_weights + kv_gpu + activation

    rows = []
    for row, la in zip(counts["layers"], _layers(args)):
        rows.append(
            {
                "layer": la.layer_id,
                "ffn": la.ffn,
                "heads": la.n_heads,
                "experts": la.n_routed_experts if la.ffn == "moe" else 0,
                "top_k": la.n_activated_experts if la.ffn == "moe" else 0,
                "ffn_width": la.moe_inter_dim if la.ffn == "moe" else la.inter_dim,
                "params": row["total"],
                "active": row["active"],
                "kv_bytes_per_token": layer_kv_elems(la, la.attn_impl) * act_bytes,
            }
        )
    return {
        "params": counts,
        "checkpoint_params": checkpoint_params(args),
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq_len,
        "weight_bytes": wbytes[dtype],
        "weight_bytes_by_dtype": wbytes,
        "kv_bytes_per_token": kv_tok,
        "kv_cache_bytes": kv_cache,  # every layer in that layout
        "kv_model_bytes": kv_model,  # each layer in its own (what a build holds)
        "kv_impl": kv_impl(args),
        "kv_dtype": "bf16" if dtype == "fp8" else dtype,  # fp8 models cache in bf16
        "flops_per_token": flops_per_token,
        "flops_forward": flops_forward,
        "activation_bytes": activation,
        "dequant_bytes": dequant,  # fp8 on CPU only: see dequant_bytes
        "dense_copy_bytes": dense,  # fp8 on a GPU without an fp8 path: see dense_copy_bytes
        "per_gpu_dense_copy_bytes": dense_copy_bytes(args, n) if dtype == "fp8" else 0,
        "dense_work_bytes": dense_work_bytes(args) if dtype == "fp8" else 0,
        "per_gpu_dense_work_bytes": dense_work_bytes(args, n) if dtype == "fp8" else 0,
        "total_bytes": total,
        "n_gpus": n,
        "per_gpu_weight_bytes": per_gpu_weights,
        "per_gpu_kv_bytes": kv_gpu,
        "per_gpu_bytes": per_gpu,
        "layers": rows,
    }


def dequant_bytes(args: ModelArgs) -> int:
    """Working memory of an fp8 model on CPU, which dequantises its weights for each call
    (`layers.dequantize`: a float32 copy, then the bf16 result): the largest of one Linear's
    (6 bytes per element) and one MoE layer's expert stacks, whose three bf16 results live
    together while the last is made (2 bytes per element of all three + 4 of the last). A GPU
    with an fp8 path dequantises nothing per call. The main model only (MTP is not run)."""
    stacks: dict[str, list[int]] = {}
    largest = 0
    for t in _resolved(args)[1]:
        if not t.linear or t.name.startswith("mtp."):
            continue
        if len(t.shape) == 3:  # an expert stack (E, out, in)
            stacks.setdefault(t.name.rsplit(".", 1)[0], []).append(t.numel)
        else:
            largest = max(largest, 6 * t.numel)
    for sizes in stacks.values():
        largest = max(largest, 2 * sum(sizes) + 4 * max(sizes))
    return largest


def run_bytes(e: dict, device_type: str, per_gpu: bool = False, fp8_path: bool = True) -> float:
    """What a build and run of estimate `e` need on a device of `device_type`: its total (or
    per-GPU) figure, plus for fp8 on CPU the weights dequantised for each call
    (`dequant_bytes`), on a CUDA GPU without an fp8 path (`fp8_path` False) the bf16 copies
    kept from the build and the working memory of making them (`dense_copy_bytes`,
    `dense_work_bytes`); 0 for other dtypes. The one rule the app, the
    CLI and `build_model` check against."""
    base = e["per_gpu_bytes"] if per_gpu else e["total_bytes"]
    if device_type == "cpu":
        return base + e["dequant_bytes"]
    if device_type == "cuda" and not fp8_path:
        pre = "per_gpu_" if per_gpu else ""
        return base + e[f"{pre}dense_copy_bytes"] + e[f"{pre}dense_work_bytes"]
    return base


def sparse_pairs(seq_len: int, topk: int) -> int:
    """(query, key) pairs a causal prefill of `seq_len` attends to when each query keeps at
    most `topk` keys (DSA): sum over positions t = 1..seq_len of min(t, topk)."""
    k = min(seq_len, topk)
    return k * (k + 1) // 2 + (seq_len - k) * topk


def checkpoint_params(args: ModelArgs) -> int:
    """Parameters a released checkpoint stores: the model's, plus the copies of the embedding and
    head that each MTP layer repeats (layer 61 of DeepSeek-V3: 671.0B main + 11.6B MTP + 1.9B
    copies = the "685B" of the model card)."""
    return count_params(args)["total"] + args.n_mtp_layers * 2 * args.vocab_size * args.dim


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
