"""Tensor and expert parallelism (dsv3.parallel): two gloo processes on CPU give the logits of one
process; shards, checkpoint slices, byte counts and refusals."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from dsv3 import ConfigError, ModelArgs, Transformer
from dsv3.layers import FP8
from dsv3.parallel import (
    SPLIT_DIM,
    check_shardable,
    load_sharded,
    param_bytes,
    shard_state_dict,
)
from dsv3.params import estimate, tensor_specs, weight_bytes_per_gpu

from ..conftest import TINY

ROOT = Path(__file__).resolve().parents[2]

# Configs with overrides: q LoRA on and off, naive and absorb caches, per-layer heads, a dense
# layer turned MoE and an MoE layer turned dense, 16 experts in 2 groups without the bias next to
# 8 in 4 groups with it, no shared experts, one head per rank.
CASES = {
    "tiny": dict(TINY),
    "overrides": dict(
        TINY,
        q_lora_rank=0,
        attn_impl="naive",
        layer_config={
            0: {"ffn": "moe", "n_shared_experts": 2, "moe_inter_dim": 16},
            1: {"n_heads": 8, "q_lora_rank": 16, "attn_impl": "absorb"},
            2: {
                "n_routed_experts": 16,
                "n_expert_groups": 2,
                "n_limited_groups": 1,
                "n_activated_experts": 3,
                "n_shared_experts": 0,
                "score_func": "softmax",
                "gate_bias": False,
            },
            3: {"ffn": "dense", "inter_dim": 64},
        },
    ),
    "one_head_per_rank": dict(
        TINY,
        n_heads=2,
        n_dense_layers=2,
        n_expert_groups=1,
        n_limited_groups=1,
        score_func="softmax",
        gate_bias=None,
        vocab_size=320,
        rope_scaling="none",
    ),
    # DeepSeek Sparse Attention on layers 1-3: the indexer is replicated, keeps 4 of 8+ keys
    "dsa": dict(
        TINY,
        attn_kind="dsa",
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        layer_config={0: {"attn_kind": "mla"}},
    ),
}
# Big enough for fp8 shards on 128-row block boundaries (as DeepSeek's own checkpoints).
BLOCKS = dict(
    vocab_size=256,
    dim=128,
    inter_dim=256,
    moe_inter_dim=128,
    n_layers=2,
    n_dense_layers=1,
    n_heads=4,
    n_routed_experts=4,
    n_shared_experts=2,
    n_activated_experts=2,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    max_seq_len=64,
    max_batch_size=2,
)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype == FP8 else t


def _run(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill 8 tokens, a chunk of 3 at start_pos 8, then one decode step at 11."""
    return [
        model(tokens[:, :8], all_logits=True),
        model(tokens[:, 8:11], start_pos=8, all_logits=True),
        model(tokens[:, 11:12], start_pos=11),
    ]


def _tokens(args: ModelArgs) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab_size, (2, 12), generator=g)


# ---------------------------------------------------------------------- two processes
def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for name, kw in CASES.items():
            args = ModelArgs(**kw)
            torch.manual_seed(0)
            model = Transformer(args, device="cpu", dtype=torch.float32)  # the group's layout
            assert (model.world_size, model.rank) == (world, rank)
            results[name] = {"logits": _run(model, _tokens(args)), "bytes": param_bytes(model)}
        torch.manual_seed(0)
        args = ModelArgs(**CASES["tiny"])
        model = Transformer(args, device="cpu", dtype="bf16")
        results["tiny_bf16"] = {"logits": _run(model, _tokens(args))}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every case run by 2 gloo processes on CPU: per-rank {case: {"logits", "bytes"}}."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_match_one_process(two_ranks, case):
    args = ModelArgs(**CASES[case])
    torch.manual_seed(0)
    single = Transformer(args, device="cpu", dtype=torch.float32)
    want = _run(single, _tokens(args))
    for step, ref in enumerate(want):
        got0, got1 = (r[case]["logits"][step] for r in two_ranks)
        assert torch.equal(got0, got1)  # every rank returns the full, identical logits
        assert got0.shape == ref.shape
        diff = (got0 - ref).abs().max().item()
        assert diff < 1e-5, f"{case} step {step}: max |diff| {diff:.2e}"


def test_two_gloo_processes_bf16_close(two_ranks):
    args = ModelArgs(**CASES["tiny"])
    torch.manual_seed(0)
    want = _run(Transformer(args, device="cpu", dtype="bf16"), _tokens(args))
    for step, ref in enumerate(want):
        got = two_ranks[0]["tiny_bf16"]["logits"][step]
        assert got.dtype == torch.bfloat16
        assert (got.float() - ref.float()).abs().mean() < 0.05  # bf16 sums in another order


@pytest.mark.parametrize("case", list(CASES))
def test_rank_holds_half_of_the_sharded_bytes(two_ranks, case):
    args = ModelArgs(**CASES[case])
    full = param_bytes(Transformer(args, device="meta", dtype=torch.float32))
    for r in two_ranks:
        got = r[case]["bytes"]
        assert got["sharded"] * 2 == full["sharded"]
        assert got["replicated"] == full["replicated"]
        assert got["total"] == weight_bytes_per_gpu(args, "fp32", 2)


# ---------------------------------------------------------------------- shards, in one process
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("case", ["tiny", "overrides", "blocks"])
def test_sharded_init_is_the_slice_of_the_single_process_init(case, dtype):
    args = ModelArgs(**(BLOCKS if case == "blocks" else CASES[case]))
    torch.manual_seed(0)
    full = Transformer(args, device="cpu", dtype=dtype).state_dict()
    for world in (2, 4):
        try:
            check_shardable(args, world, dtype)
        except ConfigError:
            assert dtype == "fp8" and case != "blocks"  # tiny widths cross fp8 blocks at 4
            continue
        for rank in range(world):
            torch.manual_seed(0)
            model = Transformer(args, device="cpu", dtype=dtype, world_size=world, rank=rank)
            got, want = model.state_dict(), shard_state_dict(full, args, world, rank)
            assert list(got) == list(want)
            for name in got:
                assert torch.equal(_as_float(got[name]), _as_float(want[name])), name


def test_specs_sharded_flags_follow_the_split_table():
    args = ModelArgs(**CASES["overrides"])
    model = Transformer(args, device="meta", dtype=torch.float32, world_size=2, rank=1)
    local = model.state_dict()
    for t in tensor_specs(args):
        parts = t.name.split(".")
        split = parts[-2] in SPLIT_DIM or re.fullmatch(r".*\.experts\.w[123]", t.name)
        assert t.sharded == bool(split), t.name
        assert (tuple(local[t.name].shape) != t.shape) == t.sharded, t.name


@pytest.mark.parametrize("world", [2, 4, 8])
def test_meta_rank_bytes_and_estimate(world):
    args = ModelArgs(**dict(TINY, n_routed_experts=16, n_heads=8, inter_dim=128))
    full = param_bytes(Transformer(args, device="meta", dtype="bf16"))
    model = Transformer(args, device="meta", dtype="bf16", world_size=world, rank=world - 1)
    pb = param_bytes(model)
    assert pb["sharded"] * world == full["sharded"]
    assert pb["replicated"] == full["replicated"]
    est = estimate(args, "bf16", batch=1, seq_len=16, n_gpus=world)
    assert est["per_gpu_weight_bytes"] == pb["total"]
    out = model(torch.zeros(2, 5, dtype=torch.long, device="meta"))  # shapes flow on meta
    assert out.shape == (2, args.vocab_size)


def test_meta_671b_shards_like_the_reference():
    from dsv3 import presets

    args = presets.load("deepseek-v3-671b")
    model = Transformer(args, device="meta", dtype="fp8", world_size=8, rank=3)
    attn, moe = model.layers[5].attn, model.layers[5].ffn
    assert attn.n_heads == 16 and attn.wq_b.weight.shape == (16 * 192, 1536)
    assert attn.wo.weight.shape == (7168, 16 * 128) and attn.wo.scale.shape == (56, 16)
    assert moe.experts.w1.shape == (32, 2048, 7168) and moe.experts.first == 96
    assert moe.gate.weight.shape == (256, 7168)  # the router is replicated
    assert model.layers[0].ffn.w2.weight.shape == (7168, 18432 // 8)
    assert model.embed.weight.shape == model.head.weight.shape == (129280 // 8, 7168)
    with pytest.raises(ConfigError, match="inter_dim=18432") as e:
        Transformer(args, device="meta", dtype="fp8", world_size=32)  # reference refuses too
    assert e.value.field == "inter_dim"
    Transformer(args, device="meta", dtype="bf16", world_size=32)


BAD = [  # (changes to TINY, world_size, field named, layer named)
    (dict(layer_config={2: {"n_heads": 3}}), 2, "n_heads", 2),
    (dict(layer_config={0: {"inter_dim": 30}}), 4, "inter_dim", 0),
    (dict(layer_config={2: {"moe_inter_dim": 30}}), 4, "moe_inter_dim", 2),
    (dict(moe_inter_dim=30, n_shared_experts=2, layer_config={3: {"n_shared_experts": 1}}), 4,
     "n_shared_experts", 3),
    (dict(layer_config={2: {"n_routed_experts": 6, "n_expert_groups": 2}}), 4,
     "n_routed_experts", 2),
    (dict(n_heads=6), 4, "n_heads", None),
    ({}, 3, "vocab_size", None),
]  # fmt: skip


@pytest.mark.parametrize("changes, world, field, layer", BAD)
def test_non_divisible_override_is_refused_by_name(changes, world, field, layer):
    args = ModelArgs(**dict(TINY, **changes))
    for build in (
        lambda: check_shardable(args, world),
        lambda: Transformer(args, device="meta", world_size=world),
    ):
        with pytest.raises(ConfigError, match=field) as e:
            build()
        assert (e.value.field, e.value.layer) == (field, layer)
        if layer is not None:
            assert f"in layer {layer}" in str(e.value)


def test_sharded_forward_without_process_group_says_so():
    args = ModelArgs(**TINY)
    model = Transformer(args, device="cpu", world_size=2, rank=0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="rank=2"):
        Transformer(args, device="meta", world_size=2, rank=2)


# ---------------------------------------------------------------------- checkpoint slices
def _write_reference(full: dict, args: ModelArgs, mp_size: int, root: Path) -> None:
    """What DeepSeek's convert.py writes: per-expert keys with global numbers, each expert on one
    rank, embed/head/wq/wq_b/wkv_b/w1/w3 split on dim 0, wo/w2 on dim 1 (scales alike)."""
    split = {"embed": 0, "head": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "w1": 0, "w3": 0}
    split |= {"wo": 1, "w2": 1}
    per_expert = {}
    for k, v in full.items():
        m = re.fullmatch(r"(layers\.(\d+)\.ffn\.experts)\.(w[123])(_scale)?", k)
        if not m:
            per_expert[k] = v
            continue
        for e in range(v.shape[0]):
            per_expert[f"{m[1]}.{e}.{m[3]}.{'scale' if m[4] else 'weight'}"] = v[e]
    for rank in range(mp_size):
        sd = {}
        for k, v in per_expert.items():
            parts = k.split(".")
            if ".experts." in k and "shared" not in k:
                n_local = args.for_layer(int(parts[1])).n_routed_experts // mp_size
                if int(parts[-3]) // n_local != rank:
                    continue
            elif parts[-2] in split:
                d = split[parts[-2]]
                n = v.shape[d] // mp_size
                v = v.narrow(d, rank * n, n)
            sd[k] = v.clone(memory_format=torch.contiguous_format)
        save_file(sd, str(root / f"model{rank}-mp{mp_size}.safetensors"))


@pytest.mark.parametrize(
    "case, dtype, layouts",
    [
        ("overrides", "fp32", [(1, 2), (2, 2), (4, 2), (2, 4)]),  # (files' mp, world_size)
        ("blocks", "fp8", [(1, 2), (2, 2), (2, 1)]),
    ],
)
def test_load_sharded_reads_the_ranks_slices(tmp_path, case, dtype, layouts):
    args = ModelArgs(**(BLOCKS if case == "blocks" else CASES[case]))
    torch.manual_seed(0)
    full = Transformer(args, device="cpu", dtype=dtype).state_dict()
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "full.safetensors"))
    for mp_size, world in layouts:
        if mp_size == 1:
            src = tmp_path / "full.safetensors"
        else:
            src = tmp_path / f"mp{mp_size}"
            if not src.exists():
                src.mkdir()
                _write_reference(full, args, mp_size, src)
        for rank in range(world):
            got = load_sharded(src, args, world, rank)
            want = shard_state_dict(full, args, world, rank)
            assert sorted(got) == sorted(want), (mp_size, world)
            for name in want:
                assert torch.equal(_as_float(got[name]), _as_float(want[name])), name
            model = Transformer(args, device="meta", dtype=dtype, world_size=world, rank=rank)
            model.to_empty(device="cpu")
            model.load_state_dict(got)  # strict: exactly the sharded model's tensors


@pytest.mark.slow
def test_torchrun_cli_prints_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "dsv3", "--config", "tiny", "--device", "cpu", "--batch", "2", "--seq", "8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("sharded over 2 ranks (gloo)") == 1
    assert proc.stdout.count("torch.Size([2, 1024])") == 1
