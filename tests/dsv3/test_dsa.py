"""DeepSeek Sparse Attention (attn_kind="dsa", V3.2-Exp's lightning indexer): parity with
transformers' DeepseekV32ForCausalLM on identical weights (fp32) where index_topk is smaller
than the context, so the indexer really drops keys; agreement of the cache layouts; counts,
estimates, config translation, the preset and the recorded selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.peers import build_hf
from dsv3 import ConfigError, ModelArgs, Transformer, count_params, estimate, presets
from dsv3.checkpoint import args_from_hf_config, hf_config_from_args, load_hf
from dsv3.params import kv_elems_per_token, sparse_pairs, tensor_specs
from dsv3.stats import indexer_selection, record_indexer

from ..conftest import TINY, clone_model
from ..hf_oracle import decode_diff, hf_model_from_dsv3, hf_param_count

TOL = 1e-4
# 8 index heads: index scores tie (all heads' relu at zero) too rarely to reorder a top-k.
DSA = {**TINY, "attn_kind": "dsa", "index_n_heads": 8, "index_head_dim": 16, "index_topk": 8}
V32_TOTAL = 671_877_944_064  # DeepSeek-V3.2-Exp, MTP excluded


def _build(cfg: dict, dtype=torch.float32, seed: int = 0) -> Transformer:
    """A model with dsv3's init and a non-trivial indexer key norm (its bias matters)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**cfg), device="cpu", dtype=dtype)
    with torch.no_grad():
        for block in model.layers:
            ix = block.attn.indexer
            if ix is not None:
                ix.k_norm.weight.normal_(1.0, 0.2)
                ix.k_norm.bias.normal_(0.0, 0.2)
    return model


def _tokens(args: ModelArgs, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (2, length), generator=g)


def _dropped(model: Transformer) -> int:
    """Causal keys the indexers dropped in the last forward (recording must be on)."""
    n = 0
    for block in model.layers:
        ix = block.attn.indexer
        if ix is not None and ix.last_kept is not None:
            Sq, T = ix.last_kept.shape[1:]
            visible = (
                torch.arange(T)[None] <= torch.arange(ix.last_q_pos, ix.last_q_pos + Sq)[:, None]
            )
            n += int((visible & ~ix.last_kept).sum())
    return n


@pytest.fixture(scope="module")
def pair():
    model = _build(DSA)
    return model, hf_model_from_dsv3(model)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_all_positions_match_transformers(pair, attn_impl):
    model, hf = pair
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    ours = clone_model(model, model.args.replace(attn_impl=attn_impl))
    record_indexer(ours)
    x = _tokens(ours.args, 40)
    ref = hf(x).logits
    got = ours(x, all_logits=True)
    assert _dropped(ours) > 0  # index_topk 8 < 40 positions: the mask really drops keys
    assert ref.abs().max() > 1.0
    diff = (got - ref).abs().max().item()
    print(f"DSA prefill ({attn_impl}): max |dsv3 - transformers| = {diff:.2e}")
    assert diff <= TOL
    last = (ours(x) - ref[:, -1]).abs().max().item()  # the pruned last-position forward
    assert last <= TOL, last


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_chunked_prefill_and_decode_match_transformers(pair, attn_impl):
    model, hf = pair
    ours = clone_model(model, model.args.replace(attn_impl=attn_impl))
    x = _tokens(ours.args, 40, seed=2)
    out = hf(x[:, :12], use_cache=True)
    cache = out.past_key_values
    ours(x[:, :12])
    chunk = hf(x[:, 12:30], past_key_values=cache, use_cache=True)  # a prefill from 12
    mine = ours(x[:, 12:30], start_pos=12, all_logits=True)
    worst_chunk = (mine - chunk.logits).abs().max().item()
    worst = decode_diff(ours, hf, x, 30, cache=chunk.past_key_values)
    print(f"DSA ({attn_impl}): chunked prefill {worst_chunk:.2e}, decode {worst:.2e}")
    assert worst_chunk <= TOL and worst <= TOL


def test_cache_layouts_and_absorbed_prefill_agree(pair):
    model, _ = pair
    x = _tokens(model.args, 30)
    want = model(x, all_logits=True)
    for other in (
        clone_model(model, model.args.replace(attn_impl="naive")),
        clone_model(model, model.args, absorbed_prefill=True),
    ):
        assert (other(x, all_logits=True) - want).abs().max().item() <= 1e-5


def test_topk_at_least_the_context_equals_plain_mla():
    dsa = _build({**DSA, "index_topk": 64})
    mla = Transformer(ModelArgs(**TINY), device="meta")
    mla.to_empty(device="cpu")
    sd = {k: v for k, v in dsa.state_dict().items() if ".indexer." not in k}
    mla.load_state_dict(sd)
    mla.reset_cache()
    x = _tokens(dsa.args, 48)
    assert (dsa(x, all_logits=True) - mla(x, all_logits=True)).abs().max().item() == 0.0
    # ...and with index_topk below the context the same weights give other logits.
    sparse = clone_model(dsa, dsa.args.replace(index_topk=8))
    assert (sparse(x, all_logits=True) - mla(x, all_logits=True)).abs().max().item() > 1e-3


def test_per_layer_attn_kind():
    args = ModelArgs(**{**DSA, "attn_kind": "mla", "layer_config": {2: {"attn_kind": "dsa"}}})
    assert [la.attn_kind for la in args.layers()] == ["mla", "mla", "dsa", "mla"]
    model = Transformer(args, device="meta")
    assert [b.attn.indexer is not None for b in model.layers] == [False, False, True, False]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {t.name: t.shape for t in tensor_specs(args)}
    assert count_params(args)["total"] == sum(p.numel() for p in model.parameters())
    indexer = 8 * 16 * 32 + 16 * 64 + 2 * 16 + 8 * 64  # wq_b, wk, k_norm w+b, weights_proj
    assert count_params(args)["total"] - count_params(ModelArgs(**TINY))["total"] == indexer
    with pytest.raises(ConfigError) as e:
        hf_config_from_args(args)  # HF's DeepseekV32 has the indexer on every layer
    assert e.value.field == "attn_kind"


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"q_lora_rank": 0}, "attn_kind"),
        ({"index_head_dim": 4}, "index_head_dim"),
        ({"index_topk": 0}, "index_topk"),
        ({"index_n_heads": 2000}, "index_n_heads"),
        ({"attn_kind": "sparse"}, "attn_kind"),
        ({"layer_config": {1: {"index_topk": 4}}}, "index_topk"),
    ],
)
def test_bad_dsa_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelArgs(**{**DSA, **changes})
    assert e.value.field == field


def test_estimate_counts_the_indexer_cache():
    args, plain = ModelArgs(**DSA), ModelArgs(**TINY)
    for impl in ("naive", "absorb"):
        assert kv_elems_per_token(args, impl) == kv_elems_per_token(plain, impl) + 4 * 16
    e = estimate(args, "fp32", batch=2, seq_len=40)
    assert e["layers"][0]["kv_bytes_per_token"] == (32 + 8 + 16) * 4
    model = _build(DSA)
    model(_tokens(args, 40))
    assert model.cache_bytes() == e["kv_cache_bytes"]["absorb"]  # what a forward allocates
    assert sparse_pairs(40, 8) == sum(min(t, 8) for t in range(1, 41))
    assert e["flops_forward"] != estimate(plain, "fp32", batch=2, seq_len=40)["flops_forward"]


def test_indexer_selection_records_kept_positions():
    model = _build(DSA)
    x = _tokens(model.args, 20)
    model(x, full=True)
    assert indexer_selection(model, 1) is None  # recording is off by default
    assert record_indexer(model) == 4
    model(x, full=True)
    sel = indexer_selection(model, 1, head=3, batch=1)
    assert sel["query_positions"] == list(range(20)) and sel["n_keys"] == 20
    for s, kept in enumerate(sel["kept"]):
        assert len(kept) == min(8, s + 1) and all(t <= s for t in kept)
        assert kept == sorted(kept)
        assert [t for t, v in enumerate(sel["matrix"][s]) if v == 2] == kept
        assert all(v == 0 for v in sel["matrix"][s][s + 1 :])
    assert len(sel["head_kept"]) == 20 and 0.0 <= sel["head_agreement"] <= 1.0
    model(x[:, :1], start_pos=20)  # a decode step: one query at position 20
    step = indexer_selection(model, 3)
    assert step["query_positions"] == [20] and len(step["kept"][0]) == 8
    record_indexer(model, on=False)
    assert indexer_selection(model, 3) is None
    with pytest.raises(ValueError):
        indexer_selection(model, 9)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_low_precision_builds_run(dtype):
    args = ModelArgs(**{**DSA, "dim": 128, "q_lora_rank": 128})
    torch.manual_seed(0)
    model = Transformer(args, device="cpu", dtype=dtype)
    x = _tokens(args, 24)
    assert torch.isfinite(model(x, all_logits=True).float()).all()
    assert torch.isfinite(model(x[:, :1], start_pos=24).float()).all()


def test_hf_config_round_trip_and_load_hf(tmp_path, pair):
    model, hf = pair
    cfg = hf_config_from_args(model.args)
    assert cfg["model_type"] == "deepseek_v32" and "rope_interleave" not in cfg
    back = args_from_hf_config(cfg)
    assert back == model.args.replace(gate_bias=True, rope_scaling="yarn", max_batch_size=8)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["index_topk"] == 8
    loaded = load_hf(tmp_path)
    assert loaded.args.attn_kind == "dsa" and loaded.dtype_name == "fp32"
    x = _tokens(model.args, 32)
    diff = (loaded(x, all_logits=True) - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff


def test_v32_config_json_reads_the_indexer():
    """A config.json with the keys and values of DeepSeek-V3.2-Exp's published one."""
    args = args_from_hf_config(Path(__file__).parent / "configs" / "deepseek-v3.2-exp.json")
    assert args.attn_kind == "dsa" and (args.index_n_heads, args.index_head_dim) == (64, 128)
    assert args.index_topk == 2048 and args.dtype == "fp8" and args.scale_fmt == "ue8m0"
    assert count_params(args)["main"] == V32_TOTAL and args.n_mtp_layers == 1


def test_preset_count_and_transformers_meta_build():
    args = presets.load("deepseek-v3.2-exp")
    assert args.attn_kind == "dsa" and all(la.attn_kind == "dsa" for la in args.layers())
    assert (args.index_n_heads, args.index_head_dim, args.index_topk) == (64, 128, 2048)
    assert count_params(args)["main"] == V32_TOTAL
    v3 = presets.load("deepseek-v3-671b")
    assert args.n_mtp_layers == v3.n_mtp_layers  # the MTP module as V3's preset has it
    per_layer = 64 * 128 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168
    assert V32_TOTAL - count_params(v3)["main"] == 61 * per_layer
    assert count_params(args)["mtp"] - count_params(v3)["mtp"] == per_layer  # its block too
    # transformers' DeepseekV32 built on meta from the same config: same count (router
    # selection biases are buffers there, parameters here).
    assert hf_param_count(build_hf(args, device="meta")) == V32_TOTAL


def test_architecture_view_shows_the_indexer_as_it_runs():
    """The architecture view of a DSA layer lists the indexer's steps with the shapes a real
    prefill produces (hooks on its Linears and the kept-keys mask), and plain MLA layers none."""
    from dsv3.architecture import architecture

    cfg = {**DSA, "layer_config": {1: {"attn_kind": "mla"}}}
    model = _build(cfg)
    B, S = 2, 20
    seen = {}
    for i, block in enumerate(model.layers):
        ix = block.attn.indexer
        for name, mod in (("index q", ix and ix.wq_b), ("index k", ix and ix.wk),
                          ("index weights", ix and ix.weights_proj)):  # fmt: skip
            if mod is not None:
                mod.register_forward_hook(
                    lambda m, a, out, key=(i, name): seen.__setitem__(key, tuple(out.shape))
                )
    record_indexer(model)
    model(_tokens(model.args, S), full=True)
    rows = architecture(model.args, batch=B, seq=S)
    layers = [r for r in rows if r["kind"] == "layers"]
    checked = 0
    for group in layers:
        mods = {m["name"]: m for m in group["modules"]}
        for i in range(group["first"], group["last"] + 1):
            ix = model.layers[i].attn.indexer
            assert ("kept" in mods) == (ix is not None)
            if ix is None:
                continue
            Hi, Di = ix.n_heads, ix.head_dim
            assert mods["index q"]["shape"] == [B, S, Hi, Di]
            assert seen[(i, "index q")] == (B, S, Hi * Di)  # viewed as (B, S, Hi, Di)
            assert tuple(mods["index k"]["shape"]) == seen[(i, "index k")]
            assert tuple(mods["index weights"]["shape"]) == seen[(i, "index weights")]
            # every query keeps at most index_topk keys; the last ones exactly that many
            assert mods["kept"]["shape"] == [B, S, int(ix.last_kept.sum(-1).max())]
            names = [m["name"] for m in group["modules"]]
            assert names.index("kept") + 1 == names.index("scores")
            checked += 1
    assert checked == model.args.n_layers - 1  # every layer but the MLA override
