"""Checkpoints: dsv3 round trips, HF import/export against transformers, the reference
(convert.py) format, and every kind of bad file failing with a clear error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsv3 import presets
from dsv3.checkpoint import (
    CheckpointError,
    args_from_hf_config,
    dsv3_to_hf_state_dict,
    hf_config_from_args,
    hf_to_dsv3_state_dict,
    load,
    load_hf,
    load_reference,
    save,
)
from dsv3.config import ConfigError, ModelArgs
from dsv3.layers import FP8
from dsv3.model import Transformer
from dsv3.names import SPLIT_DIM
from dsv3.params import count_params

from ..hf_oracle import float_state_dict, hf_model_from_dsv3

TOL = 1e-4  # fp32 logits, ours vs transformers


# ---------------------------------------------------------------------- helpers
def tiny(**changes) -> ModelArgs:
    return presets.load("tiny").replace(**changes)


def tiny_mixed() -> ModelArgs:
    """tiny with per-layer overrides: a dense layer wider than one fp8 block, fewer heads,
    other expert counts/widths, a softmax router without bias, no shared experts."""
    return tiny(
        inter_dim=200,
        layer_config={
            "1": {"n_heads": 2, "q_lora_rank": 0},
            "2": {"ffn": "dense", "inter_dim": 136},
            "3": {
                "n_routed_experts": 4,
                "moe_inter_dim": 48,
                "score_func": "softmax",
                "gate_bias": False,
                "n_expert_groups": 1,
                "n_limited_groups": 1,
                "n_shared_experts": 0,
            },
        },
    )


def build(args: ModelArgs, dtype="fp32", seed=0) -> Transformer:
    """A model whose every tensor matters: our init (O(1) logits) plus norms away from 1 and a
    random selection bias, so a swapped or dropped tensor shows in the logits."""
    torch.manual_seed(seed)
    model = Transformer(args, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p, dtype=torch.float32))
            elif name.endswith("gate.bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def tokens(args: ModelArgs, b=2, s=24, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (b, s), generator=g)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        x, y = a[k], b[k]
        if x.dtype == FP8:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), k


def hf_logits(hf, x) -> torch.Tensor:
    with torch.no_grad():
        return hf(x).logits


# ---------------------------------------------------------------------- HF parity
PARITY = {
    "v3-tiny": tiny(),
    "no-q-lora-no-yarn-1-group": tiny(
        q_lora_rank=0, rope_scaling="none", n_expert_groups=1, n_limited_groups=1
    ),
    "v3-mscale-0.707": tiny(mscale=0.707, rope_factor=40.0),
    "v2-softmax-groups": tiny(
        score_func="softmax", gate_bias=False, route_scale=1.0, n_limited_groups=1
    ),
    "v2-softmax-greedy-16B-style": tiny(
        score_func="softmax", gate_bias=False, n_expert_groups=1, q_lora_rank=0, mscale=0.707
    ),
    "naive-attention": tiny(attn_impl="naive"),
}


@pytest.mark.parametrize("name", PARITY)
def test_hf_parity(name):
    args = PARITY[name]
    model = build(args)
    hf = hf_model_from_dsv3(model)
    expected = "deepseek_v2" if args.score_func == "softmax" else "deepseek_v3"
    assert hf.config.model_type == expected
    x = tokens(args)
    diff = (model(x, all_logits=True) - hf_logits(hf, x)).abs().max().item()
    assert diff < TOL, diff


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_load_hf_from_save_pretrained(tmp_path, sharded):
    args = tiny()
    model = build(args)
    hf = hf_model_from_dsv3(model)
    hf.save_pretrained(tmp_path, max_shard_size="200KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    loaded = load_hf(tmp_path)
    assert loaded.dtype_name == "fp32"
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    x = tokens(args)
    diff = (loaded(x, all_logits=True) - hf_logits(hf, x)).abs().max().item()
    assert diff < TOL, diff
    assert loaded.args.rope_scaling == "yarn" and loaded.args.for_layer(1).gate_bias


def test_load_hf_bf16_and_mtp_layers_dropped(tmp_path):
    args = tiny()
    model = build(args)
    hf = hf_model_from_dsv3(model)
    sd = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    sd = dsv3_to_hf_state_dict(
        hf_to_dsv3_state_dict(sd, args), args, fused_experts=False
    )  # per-expert keys, as on disk
    n = args.n_layers
    sd[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(2, 2)  # an MTP module
    sd[f"model.layers.{n}.mlp.experts.0.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(args)))
    loaded = load_hf(tmp_path)
    assert loaded.dtype_name == "bf16"
    ref = {
        k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v
        for k, v in model.state_dict().items()
    }
    ref = {k: v.float() if k.endswith("gate.bias") else v for k, v in ref.items()}
    assert_same_tensors(loaded.state_dict(), ref)


def test_load_hf_rope_interleave_false(tmp_path):
    """HF's other rope layout (rotate_half pairs j, j+R/2) is re-ordered into interleaved pairs."""
    args = tiny()
    hf = hf_model_from_dsv3(build(args))
    hf.config.rope_interleave = False  # the same weights now mean something else to HF
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_interleave"] is False
    loaded = load_hf(tmp_path)
    x = tokens(args)
    diff = (loaded(x, all_logits=True) - hf_logits(hf, x)).abs().max().item()
    assert diff < TOL, diff


def test_load_hf_fp8(tmp_path):
    args = tiny_mixed().replace(layer_config={}, inter_dim=200)
    model = build(args, dtype="fp8")
    sd = dsv3_to_hf_state_dict(model.state_dict(), args, fused_experts=False)
    assert any(k.endswith("experts.3.up_proj.weight_scale_inv") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    cfg = hf_config_from_args(args)
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path)
    assert loaded.dtype_name == "fp8" and loaded.args.dtype == "fp8"
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    as_fp32 = load_hf(tmp_path, dtype="fp32")  # dequantised on load
    assert_same_tensors(as_fp32.state_dict(), float_state_dict(model))


@pytest.mark.parametrize("fused", [True, False])
def test_state_dict_translation_round_trip(fused):
    args = tiny()
    model = build(args)
    sd = model.state_dict()
    hf_sd = dsv3_to_hf_state_dict(sd, args, fused_experts=fused)
    key = "model.layers.1.mlp.experts." + ("gate_up_proj" if fused else "7.up_proj.weight")
    assert key in hf_sd
    assert_same_tensors(hf_to_dsv3_state_dict(hf_sd, args), sd)


# ---------------------------------------------------------------------- HF config mapping
V3_HUB = {  # DeepSeek-V3's published config.json (legacy rope_scaling + rope_theta keys)
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
V2_LITE_HUB = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
}


@pytest.mark.parametrize(
    "hub,preset", [(V3_HUB, "deepseek-v3-671b"), (V2_LITE_HUB, "deepseek-v2-lite-16b")]
)
def test_hub_configs_map_to_reference_presets(hub, preset):
    args = args_from_hf_config(hub)
    ref = presets.load(preset)
    assert count_params(args)["total"] == count_params(ref)["total"]
    # Same layers (HF's YaRN settings and the explicit bias switch resolve to the same values).
    for i in range(args.n_layers):
        assert args.for_layer(i) == ref.for_layer(i)
    assert args.use_yarn and args.dtype == ref.dtype and args.max_seq_len == 163840


def test_rope_parameters_and_legacy_keys_agree():
    new = dict(V3_HUB)
    new["rope_parameters"] = {
        **{k: v for k, v in V3_HUB["rope_scaling"].items() if k != "type"},
        "rope_type": "yarn",
        "rope_theta": 10000.0,
    }
    del new["rope_scaling"], new["rope_theta"]
    assert args_from_hf_config(new) == args_from_hf_config(V3_HUB)


@pytest.mark.parametrize(
    "args", [tiny(), tiny(rope_scaling="none", q_lora_rank=0), tiny(mscale=0.0)]
)
def test_hf_config_round_trip(args):
    back = args_from_hf_config(hf_config_from_args(args))
    assert back.layers() == args.layers() and back.use_yarn == args.use_yarn


def _hub(**changes):
    cfg = json.loads(json.dumps(V3_HUB))
    for k, v in changes.items():
        if k.startswith("rope_"):
            cfg["rope_scaling"][k[5:]] = v
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize(
    "cfg,text",
    [
        (_hub(rope_mscale=0.5), "attention_factor"),
        (_hub(rope_mscale_all_dim=None, rope_mscale=None), "attention_factor"),
        (_hub(rope_attention_factor=1.5), "attention_factor"),
        (_hub(rope_type="linear"), "linear"),
        (_hub(norm_topk_prob=False), "norm_topk_prob"),
        (_hub(scoring_func="softmax"), "sigmoid"),
        (_hub(moe_layer_freq=2), "moe_layer_freq"),
        (_hub(hidden_act="gelu"), "hidden_act"),
        (_hub(attention_bias=True), "attention_bias"),
        (_hub(model_type="llama"), "model_type"),
        ({**V2_LITE_HUB, "norm_topk_prob": True}, "norm_topk_prob"),
        (_hub(num_attention_heads=0), "num_attention_heads"),
    ],
)
def test_unrepresentable_hf_configs(cfg, text):
    with pytest.raises(ConfigError, match=text):
        args_from_hf_config(cfg)


@pytest.mark.parametrize(
    "args,text",
    [
        (tiny_mixed(), "layer"),
        (tiny(gate_bias=False), "top-2"),
        (tiny(score_func="softmax", gate_bias=True), "softmax"),
    ],
)
def test_hf_cannot_express(args, text):
    with pytest.raises(ConfigError, match=text):
        hf_config_from_args(args)


# ---------------------------------------------------------------------- dsv3 format
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_save_load_bit_identical(tmp_path, dtype):
    args = tiny_mixed()
    model = build(args, dtype=dtype)
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert loaded.args == args and loaded.dtype_name == dtype
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    if dtype == "fp8":
        assert any(k.endswith("w1_scale") for k in loaded.state_dict())
    x = tokens(args, s=12)
    assert torch.equal(loaded(x), model(x))


def test_load_in_another_dtype(tmp_path):
    args = tiny_mixed()
    fp8 = build(args, dtype="fp8")
    as_fp32 = load(save(fp8, tmp_path / "a.safetensors"), dtype="fp32")
    assert as_fp32.dtype_name == "fp32"
    assert_same_tensors(as_fp32.state_dict(), float_state_dict(fp8))
    fp32 = build(args)
    quantised = load(save(fp32, tmp_path / "b.safetensors"), dtype="fp8")
    assert quantised.state_dict()["layers.2.ffn.w1.scale"].shape == (2, 1)  # 136 rows: 2 blocks
    x = tokens(args, s=8)
    assert (quantised(x).float() - fp32(x)).abs().max() < 0.5  # fp8 is coarse, not wrong


# ---------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, model) of a saved tiny fp32 model."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model = build(tiny())
    return save(model, path), model


def _resave(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd, meta = edit(sd, meta) or (sd, meta)
    save_file(sd, str(dst), metadata=meta)
    return dst


def test_truncated_file(tmp_path, saved):
    data = saved[0].read_bytes()
    for cut in (len(data) - 100, 50, 4):
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
            load(bad)


def test_wrong_shape(tmp_path, saved):
    def edit(sd, meta):
        sd["layers.1.attn.wkv_b.weight"] = torch.zeros(3, 3)
        sd["layers.1.ffn.experts.w1"] = sd["layers.1.ffn.experts.w1"][:, :-1].contiguous()

    with pytest.raises(CheckpointError) as e:
        load(_resave(saved[0], tmp_path / "s.safetensors", edit))
    msg = str(e.value)
    assert "2 mis-shaped" in msg and "layers.1.attn.wkv_b.weight" in msg and "[3, 3]" in msg
    assert "layers.1.ffn.experts.w1" in e.value.mismatched[0] + e.value.mismatched[1]


def test_missing_and_unexpected(tmp_path, saved):
    def edit(sd, meta):
        del sd["norm.weight"], sd["layers.2.ffn.gate.bias"]
        sd["layers.0.attn.extra.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError) as e:
        load(_resave(saved[0], tmp_path / "m.safetensors", edit))
    assert sorted(e.value.missing) == ["layers.2.ffn.gate.bias", "norm.weight"]
    assert e.value.unexpected == ["layers.0.attn.extra.weight"]
    assert "2 missing" in str(e.value) and "1 unexpected" in str(e.value)


def test_config_failing_validation(tmp_path, saved):
    def edit(sd, meta):
        args = json.loads(meta["dsv3.args"])
        args["n_activated_experts"] = 99
        meta["dsv3.args"] = json.dumps(args)

    with pytest.raises(ConfigError, match="n_activated_experts=99"):
        load(_resave(saved[0], tmp_path / "c.safetensors", edit))


def test_not_a_dsv3_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="load_hf"):
        load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load(tmp_path / "junk.safetensors")


class _Trap:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "renamed.safetensors"])
def test_pickles_are_never_unpickled(tmp_path, name):
    sentinel = tmp_path / "unpickled"
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"embed.weight": _Trap(sentinel)}, f)
    with pytest.raises(CheckpointError, match="pickle"):
        load(path)
    torch.save({"w": _Trap(sentinel)}, tmp_path / "zip.safetensors")  # torch.save's zip format
    with pytest.raises(CheckpointError, match="pickle"):
        load(tmp_path / "zip.safetensors")
    assert not sentinel.exists()


def test_hf_dir_problems(tmp_path):
    args = tiny()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(args)))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({}, f)
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf(tmp_path)
    sd = dsv3_to_hf_state_dict(build(args).state_dict(), args, fused_experts=False)
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    sd["model.layers.0.mlp.surprise.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    assert e.value.missing == ["layers.2.ffn.experts.w2 (expert 5 of 8)"]
    assert e.value.unexpected == ["model.layers.0.mlp.surprise.weight"]
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        load_hf(tmp_path)


# ---------------------------------------------------------------------- reference format
def to_reference(model: Transformer, mp: int) -> list[dict[str, torch.Tensor]]:
    """What DeepSeek's convert.py writes: reference names, per-expert keys, tensors split over
    `mp` ranks along SPLIT_DIM, rank r holding experts [r*E/mp, (r+1)*E/mp)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name, t in model.state_dict().items():
        if ".ffn.experts." in name:
            prefix, w = name.rsplit(".", 1)
            w, kind = (w[:-6], "scale") if w.endswith("_scale") else (w, "weight")
            n_local = t.shape[0] // mp
            for e in range(t.shape[0]):
                shards[e // n_local][f"{prefix}.{e}.{w}.{kind}"] = t[e].clone(
                    memory_format=torch.contiguous_format
                )
            continue
        module = name.split(".")[-2]
        dim = SPLIT_DIM.get(module)
        for r in range(mp):
            if dim is None or mp == 1:
                shards[r][name] = t.clone()
            else:
                n = t.shape[dim] // mp
                shards[r][name] = t.narrow(dim, r * n, n).contiguous()
    return shards


@pytest.mark.parametrize("mp,dtype", [(1, "fp32"), (2, "fp32"), (1, "fp8")])
def test_load_reference(tmp_path, mp, dtype):
    args = tiny()
    model = build(args, dtype=dtype)
    for r, shard in enumerate(to_reference(model, mp)):
        save_file(shard, str(tmp_path / f"model{r}-mp{mp}.safetensors"))
    loaded = load_reference(tmp_path, args, dtype=dtype)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    if mp == 1:  # a single file works too, and dtype None reads it off the file
        single = load_reference(tmp_path / "model0-mp1.safetensors", args)
        assert single.dtype_name == ("fp8" if dtype == "fp8" else "bf16")


def test_reference_problems(tmp_path):
    args = tiny()
    shards = to_reference(build(args), 2)
    save_file(shards[0], str(tmp_path / "model0-mp2.safetensors"))
    with pytest.raises(CheckpointError, match=r"shard\(s\) \[1\] are missing"):
        load_reference(tmp_path, args)
    del shards[1]["layers.3.ffn.experts.7.w1.weight"]
    save_file(shards[1], str(tmp_path / "model1-mp2.safetensors"))
    with pytest.raises(CheckpointError, match="layers.3.ffn.experts.w1"):
        load_reference(tmp_path, args)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_reference(tmp_path, tiny(dim=32, layer_config={}))
    shards[1]["layers.3.ffn.experts.7.w1.weight"] = shards[0]["layers.3.ffn.experts.0.w1.weight"]
    save_file(shards[1], str(tmp_path / "model1-mp2.safetensors"))
    load_reference(tmp_path, args)  # whole again
    with pytest.raises(CheckpointError, match="block"):  # 48-row shards of one 128-row block
        load_reference(tmp_path, args, dtype="fp8")
