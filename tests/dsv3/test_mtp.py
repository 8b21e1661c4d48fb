"""The multi-token-prediction module (DeepSeek-V3 paper, section 2.2; layer 61 of the released
weights): an independent implementation of the paper's equations, written here with
transformers' decoder layer as the block, against `model(tokens, mtp=True)`; counts; and
load_hf / load_reference round trips with the MTP layer in the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dsv3 import ConfigError, ModelArgs, Transformer, load_hf, load_reference
from dsv3.checkpoint import dsv3_to_hf_state_dict, hf_config_from_args
from dsv3.names import from_mtp
from dsv3.params import count_params, estimate, tensor_specs

from ..conftest import TINY
from ..hf_oracle import hf_model_from_dsv3

MTP = {**TINY, "n_mtp_layers": 1}


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**MTP, **changes}), device="cpu", dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms, so that swapping enorm and hnorm shows
        for name, t in model.state_dict().items():
            if name.endswith(("norm.weight", "enorm.weight", "hnorm.weight")):
                t.copy_(1 + 0.5 * torch.randn(t.shape))
    return model


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_logits_match_the_papers_equations():
    """h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] (the released weights' column order),
    h''_{1:T-1} = TRM(h'_{1:T-1}), P_{i+2} = OutHead(RMSNorm(h''_i)); TRM is transformers'
    DeepseekV3DecoderLayer holding the MTP block's weights, h the main model's last hidden
    states (after its final norm) from transformers' model."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    model = _model()
    args, n = model.args, model.args.n_layers
    sd = model.state_dict()
    main = Transformer(args.replace(n_mtp_layers=0), device="meta", dtype=torch.float32)
    main.to_empty(device="cpu")
    main.load_state_dict({k: v for k, v in sd.items() if not k.startswith("mtp.")})
    main.reset_cache()
    hf = hf_model_from_dsv3(main)  # the main model in transformers
    layer = DeepseekV3DecoderLayer(hf.config, layer_idx=n - 1).float().eval()  # an MoE layer
    hf_sd = dsv3_to_hf_state_dict(sd, args)
    prefix = f"model.layers.{n}."
    own = ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens.")
    block = {
        k[len(prefix) :]: v
        for k, v in hf_sd.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(own)
    }
    layer.load_state_dict(block, strict=True)

    tok = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    S, eps = tok.shape[1], args.norm_eps
    with torch.no_grad():
        h = hf.model(tok).last_hidden_state  # (B, S, D), after the final norm
        emb = hf.model.embed_tokens(tok[:, 1:])  # tokens t+1
        x = torch.cat(
            [
                _rms(emb, sd[f"mtp.{n}.enorm.weight"], eps),
                _rms(h[:, :-1], sd[f"mtp.{n}.hnorm.weight"], eps),
            ],
            dim=-1,
        )
        x = x @ sd[f"mtp.{n}.eh_proj.weight"].T  # (B, S-1, D)
        pos = torch.arange(S - 1)[None]
        mask = torch.full((S - 1, S - 1), float("-inf")).triu(1)[None, None]
        x = layer(
            x,
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=hf.model.rotary_emb(x, pos),
        )
        want = hf.lm_head(_rms(x, sd[f"mtp.{n}.shared_head.norm.weight"], eps))  # (B, S-1, V)
    logits, (got,) = model(tok, mtp=True)
    assert got.shape == (2, S - 1, args.vocab_size) and want.abs().max() > 1.0
    diff = (got - want).abs().max().item()
    print(f"MTP: max |dsv3 - paper's equations| = {diff:.2e}")
    assert diff <= 1e-4
    assert torch.allclose(logits, hf(tok).logits[:, -1], atol=1e-4, rtol=0)


def test_mtp_depths_and_input_checks():
    model = _model(n_mtp_layers=2)
    tok = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    logits, (d1, d2) = model(tok, mtp=True, all_logits=True)
    assert logits.shape == (1, 10, 512) and d1.shape == (1, 9, 512) and d2.shape == (1, 8, 512)
    with pytest.raises(ConfigError, match="start_pos 0"):
        model(tok[:, :2], start_pos=10, mtp=True)
    with pytest.raises(ConfigError, match="no MTP module"):
        _model(n_mtp_layers=0)(tok, mtp=True)
    # the main forward ignores the MTP modules
    assert torch.allclose(model(tok), logits[:, -1], atol=1e-5, rtol=0)


def test_counts_main_plus_mtp_and_meta_build():
    args = ModelArgs(**MTP)
    c = count_params(args)
    main = count_params(args.replace(n_mtp_layers=0))
    D = args.dim
    block = sum(r["total"] for r in main["layers"] if r["ffn"] == "moe") // (args.n_layers - 1)
    assert c["main"] == main["total"] and c["active"] == main["active"]
    assert c["mtp"] == block + 2 * D * D + 3 * D  # block, eh_proj, enorm/hnorm/shared norm
    meta = Transformer(args, device="meta")
    assert c["total"] == sum(p.numel() for p in meta.parameters())
    assert [t.name for t in tensor_specs(args)] == list(meta.state_dict().keys())


def test_estimate_flops_leave_the_mtp_module_out():
    """The forward the app runs predicts the next token only: an MTP module adds parameters
    and weights but no FLOPs (its norms once lowered the FLOPs per token)."""
    args = ModelArgs(**MTP)
    e, main = estimate(args, "fp32", 2, 32), estimate(args.replace(n_mtp_layers=0), "fp32", 2, 32)
    assert e["flops_per_token"] == main["flops_per_token"] > 0
    assert e["flops_forward"] == main["flops_forward"]
    assert e["weight_bytes"] > main["weight_bytes"]


def test_dequant_bytes_is_the_largest_per_call_working_set():
    """fp8 on CPU dequantises per call: one Linear (float32 copy + bf16 result, 6 bytes per
    element) or one layer's three expert stacks (2 bytes each + 4 for the last); the MTP
    module is not run, so its weights do not count."""
    from dsv3.params import dequant_bytes

    args = ModelArgs(**MTP)
    meta = Transformer(args, device="meta", dtype="fp8")
    want = 0
    for name, p in meta.named_parameters():
        if p.dtype != torch.float8_e4m3fn or name.startswith("mtp."):
            continue
        if p.dim() == 3:
            if name.endswith("w1"):  # w1, w2, w3 of one layer: the same numel each here
                want = max(want, 2 * 3 * p.numel() + 4 * p.numel())
        else:
            want = max(want, 6 * p.numel())
    assert dequant_bytes(args) == want > 0
    assert estimate(args, "fp8")["dequant_bytes"] == want
    assert estimate(args, "bf16")["dequant_bytes"] == 0


def test_load_hf_round_trip_with_the_mtp_layer(tmp_path):
    model = _model()
    args, n = model.args, model.args.n_layers
    sd = dsv3_to_hf_state_dict(model.state_dict(), args, fused_experts=False)  # as on disk
    # the released layout: the MTP layer repeats the embedding and the head
    assert torch.equal(sd[f"model.layers.{n}.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(sd[f"model.layers.{n}.shared_head.head.weight"], sd["lm_head.weight"])
    assert f"model.layers.{n}.eh_proj.weight" in sd
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = hf_config_from_args(args)
    assert cfg["num_nextn_predict_layers"] == 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path)
    assert loaded.args.n_mtp_layers == 1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    tok = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(tok, mtp=True)[1][0], model(tok, mtp=True)[1][0])

    # transformers' save_pretrained drops the MTP layer: such a checkpoint loads without it
    save_file(
        {k: v for k, v in sd.items() if not k.startswith(f"model.layers.{n}.")},
        str(tmp_path / "model.safetensors"),
    )
    assert load_hf(tmp_path).args.n_mtp_layers == 0


def test_load_reference_reads_the_mtp_layer(tmp_path):
    from .test_checkpoint import to_reference

    model = _model()
    for r, shard in enumerate(to_reference(model, 2)):
        shard = {from_mtp(k): v for k, v in shard.items()}  # mtp.4.x -> layers.4.x, as on disk
        save_file(shard, str(tmp_path / f"model{r}-mp2.safetensors"))
    loaded = load_reference(tmp_path, model.args, dtype="fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_sharded_init_includes_the_mtp_module(dtype):
    from dsv3.dist.shard import shard_state_dict

    args = ModelArgs(**{**MTP, "dim": 128, "moe_inter_dim": 128, "inter_dim": 256})
    torch.manual_seed(0)
    full = Transformer(args, device="cpu", dtype=dtype).state_dict()
    assert any(k.startswith("mtp.") for k in full)
    for rank in range(2):
        torch.manual_seed(0)
        model = Transformer(args, device="cpu", dtype=dtype, world_size=2, rank=rank)
        got, want = model.state_dict(), shard_state_dict(full, args, 2, rank)
        assert list(got) == list(want)
        for name in got:
            assert torch.equal(got[name].float(), want[name].float()), name
