"""The DeepSeek-V3 family beyond V3 (issue 14): config.json import (recorded configs, never the
network), YaRN with beta_fast == beta_slow (Kimi K2), ue8m0 fp8 scales (V3.1), and Kimi-K2- and
Moonlight-shaped transformers checkpoints loaded with `load_hf`, compared with transformers.

The configs in tests/dsv3/configs/ are the published config.json files of
moonshotai/Kimi-K2-Instruct, moonshotai/Moonlight-16B-A3B, deepseek-ai/DeepSeek-V3 and
deepseek-ai/DeepSeek-V3.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import ConfigError, ModelArgs, Transformer, args_from_hf_config, load_hf
from dsv3.checkpoint import dsv3_to_hf_state_dict, fetch_hf_config, hf_config, hf_config_from_args
from dsv3.layers import dequantize, quantize_fp8
from dsv3.params import count_params
from dsv3.rotary import correction_range, freqs, yarn_ramp

from ..conftest import TINY

CONFIGS = Path(__file__).parent / "configs"


def _cfg(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


# ---------------------------------------------------------------------- config.json import
def test_kimi_k2_config():
    a = args_from_hf_config(CONFIGS / "kimi-k2-instruct.json")  # a path works too
    assert (a.n_layers, a.dim, a.n_heads, a.n_routed_experts, a.vocab_size) == (
        61,
        7168,
        64,
        384,
        163840,
    )
    assert (a.beta_fast, a.beta_slow, a.rope_theta, a.rope_factor) == (1, 1, 50000.0, 32.0)
    assert a.use_yarn and a.mscale == 1.0 and a.original_seq_len == 4096
    assert a.for_layer(1).gate_bias and a.score_func == "sigmoid" and a.route_scale == 2.827
    assert (a.n_expert_groups, a.n_limited_groups, a.n_mtp_layers) == (1, 1, 0)
    assert a.dtype == "fp8" and a.scale_fmt is None and a.max_seq_len == 131072
    assert count_params(a)["total"] == 1_026_408_232_448


def test_moonlight_config():
    a = args_from_hf_config(_cfg("moonlight-16b-a3b.json"))
    assert a.q_lora_rank == 0 and a.norm_eps == 1e-5 and not a.use_yarn
    assert a.for_layer(1).gate_bias and a.rope_theta == 50000.0 and a.max_seq_len == 8192
    assert a.dtype == "bf16"


def test_deepseek_v3_and_v31_configs():
    v3, v31 = (
        args_from_hf_config(_cfg("deepseek-v3.json")),
        args_from_hf_config(_cfg("deepseek-v3.1.json")),
    )
    assert v3.n_mtp_layers == v31.n_mtp_layers == 1
    assert v3.scale_fmt is None and v31.scale_fmt == "ue8m0"
    assert count_params(v3)["main"] == 671_026_419_200
    assert count_params(v3) == count_params(v31)


def test_text_config_is_unwrapped_and_transformers_5_rope_parameters_read():
    text = _cfg("kimi-k2-instruct.json")
    wrapped = {"model_type": "kimi_k25", "vision_config": {"hidden_size": 8}, "text_config": text}
    assert args_from_hf_config(wrapped) == args_from_hf_config(text)
    v5 = dict(text)
    rope = dict(v5.pop("rope_scaling"), rope_type="yarn", rope_theta=v5.pop("rope_theta"))
    del rope["type"]
    assert args_from_hf_config({**v5, "rope_parameters": rope}) == args_from_hf_config(text)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": "kimi_k2", "architectures": ["KimiLinearForCausalLM"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "compressed-tensors"}}, "quantization_config"),
        ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "e5m2"}}, "quantization_config"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 0.5, "mscale_all_dim": 1.0}}, "mscale"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ],
)  # fmt: skip
def test_what_cannot_be_represented_names_the_key(change, key):
    with pytest.raises(ConfigError) as e:
        args_from_hf_config({**_cfg("kimi-k2-instruct.json"), **change})
    assert e.value.field == key


def test_config_import_is_torch_free():
    code = (
        "import sys, dsv3; a = dsv3.args_from_hf_config(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(a.n_layers)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(CONFIGS / "kimi-k2-instruct.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "61"


def test_fetch_hf_config_offline_and_not_found(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import errors

    calls = []

    def offline(repo_id, filename, token=None):
        calls.append((repo_id, filename, token))
        raise errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(hf_config, "hub_unreachable", lambda: False)  # a connection opens
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with pytest.raises(ConfigError, match="cannot be reached: no internet") as e:
        fetch_hf_config("moonshotai/Kimi-K2-Instruct")
    assert e.value.field == "repo"
    assert calls == [("moonshotai/Kimi-K2-Instruct", "config.json", "hf_secret")]

    def missing(repo_id, filename, token=None):
        cls = errors.RepositoryNotFoundError  # its __init__ wants a real HTTP response
        raise cls.__new__(cls)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(ConfigError, match="was not found"):
        fetch_hf_config("nobody/nothing")

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(_cfg("moonlight-16b-a3b.json")))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(saved))
    assert args_from_hf_config(fetch_hf_config(" moonshotai/Moonlight-16B-A3B ")).dim == 2048
    with pytest.raises(ConfigError, match="repository id"):
        fetch_hf_config("  ")


def test_fetch_hf_config_without_a_route_reads_the_cache_only(monkeypatch, tmp_path):
    """No connection to the Hub's host: one cache-only call (huggingface_hub would otherwise
    retry for ~25 s), a cached config.json still read, an uncached one refused at once."""
    import huggingface_hub
    from huggingface_hub import errors

    calls = []
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(_cfg("moonlight-16b-a3b.json")))

    def cache(repo_id, filename, token=None, **kw):
        calls.append((repo_id, kw))
        if repo_id != "moonshotai/Moonlight-16B-A3B":
            raise errors.LocalEntryNotFoundError("not in the cache")
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache)
    monkeypatch.setattr(hf_config, "hub_unreachable", lambda: True)
    assert args_from_hf_config(fetch_hf_config("moonshotai/Moonlight-16B-A3B")).dim == 2048
    with pytest.raises(ConfigError, match="cannot be reached: no internet"):
        fetch_hf_config("moonshotai/Kimi-K2-Instruct")
    assert [kw for _, kw in calls] == [{"local_files_only": True}] * 2


def test_hub_unreachable_probes_the_endpoint(monkeypatch):
    import socket

    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
              "HF_HUB_OFFLINE"):  # fmt: skip
        monkeypatch.delenv(v, raising=False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert not hf_config.hub_unreachable()
    # the port now closed: connection refused
    assert hf_config.hub_unreachable()
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    assert hf_config.hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy decides
    assert not hf_config.hub_unreachable()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub reads the cache itself
    assert not hf_config.hub_unreachable()


# ---------------------------------------------------------------------- YaRN, fp8 scales
def test_kimi_yarn_matches_transformers_rope_init():
    """beta_fast == beta_slow == 1 (the ramp's guard widens it by 0.001 where it collapses),
    rope_theta 50000, factor 32, mscale 1: the same inverse frequencies and softmax scale as
    transformers' YaRN init."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _cfg("kimi-k2-instruct.json")
    args = args_from_hf_config(cfg)
    cfg.pop("model_type")
    config = transformers.DeepseekV3Config(**cfg)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert attention_factor == 1.0  # mscale == mscale_all_dim: cos/sin unscaled, as ours
    assert torch.allclose(freqs(args), inv_freq.float(), rtol=1e-6, atol=0)
    ramp = yarn_ramp(args)
    assert ((ramp > 0) & (ramp < 1)).any() or (ramp.diff() != 0).any()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    with torch.device("meta"):
        attn = DeepseekV3Attention(config, layer_idx=1)
    assert args.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)


def test_equal_betas_collapsed_range_uses_the_guard():
    # qk_rope_head_dim 8 and a short original context put both ends at pair 0.
    args = ModelArgs(
        qk_rope_head_dim=8,
        original_seq_len=4,
        max_seq_len=64,
        beta_fast=1,
        beta_slow=1,
        rope_scaling="yarn",
    )
    low, high = correction_range(args)
    assert low == high == 0
    ramp = yarn_ramp(args)
    assert torch.isfinite(ramp).all() and ramp[0] == 0 and (ramp[1:] == 1).all()
    with pytest.raises(ConfigError, match="beta_slow"):
        ModelArgs(beta_fast=1, beta_slow=2, rope_scaling="yarn")


def test_ue8m0_scales_are_powers_of_two():
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.logspace(-3, 1, 260)
    q, s = quantize_fp8(w, "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    plain_q, plain_s = quantize_fp8(w)
    assert (s >= plain_s).all() and (s < 2 * plain_s).all()  # rounded up, never clipped
    assert (dequantize(q, s, torch.float32) - w).abs().max() <= w.abs().max() / 8
    # A V3.1-shaped fp8 build initialises with them.
    args = ModelArgs(**{**TINY, "dtype": "fp8", "scale_fmt": "ue8m0"})
    model = Transformer(args, device="cpu", dtype="fp8")
    scales = [t for k, t in model.state_dict().items() if k.endswith("scale")]
    assert scales and all(torch.equal(torch.exp2(torch.log2(t).round()), t) for t in scales)


def test_fp8_load_quantises_with_the_models_scale_fmt(tmp_path):
    from safetensors.torch import save_file

    args = ModelArgs(**{**TINY, "scale_fmt": "ue8m0"})
    torch.manual_seed(0)
    model = Transformer(args, device="cpu", dtype="fp32")
    sd = dsv3_to_hf_state_dict(model.state_dict(), args, fused_experts=False)
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = hf_config_from_args(args)
    cfg["quantization_config"] = {"quant_method": "fp8", "scale_fmt": "ue8m0"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf(tmp_path, dtype="fp8")
    assert loaded.args.scale_fmt == "ue8m0"
    scales = [t for k, t in loaded.state_dict().items() if k.endswith("scale")]
    assert scales and all(torch.equal(torch.exp2(torch.log2(t).round()), t) for t in scales)


# ---------------------------------------------------------------------- Kimi / Moonlight parity
TINY_HF = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, norm_topk_prob=True,
    scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu", attention_bias=False,
    tie_word_embeddings=False, num_nextn_predict_layers=0,
)  # fmt: skip
SHAPED = {
    # Kimi K2: one group, 1 shared expert, route_scale 2.827, YaRN x32 with betas 1/1, theta 5e4
    "kimi-k2": {
        **TINY_HF, "model_type": "kimi_k2", "q_lora_rank": 32, "n_shared_experts": 1,
        "routed_scaling_factor": 2.827, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096},
    },
    # Moonlight: no q LoRA, 2 shared experts, route_scale 2.446, plain rope theta 5e4, eps 1e-5
    "moonlight": {
        **TINY_HF, "model_type": "deepseek_v3", "q_lora_rank": None, "n_shared_experts": 2,
        "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
        "max_position_embeddings": 8192, "rope_scaling": None,
    },
}  # fmt: skip


def _checkpoint(name: str, path: Path):
    """A tiny `save_pretrained` checkpoint of transformers' DeepseekV3ForCausalLM with `name`'s
    settings (weights: dsv3's init, which gives O(1) logits, plus random router biases and norm
    weights), its config.json as the family writes it; -> the transformers model."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(SHAPED[name])
    args = args_from_hf_config(cfg)
    torch.manual_seed(0)
    ours = Transformer(args, device="cpu", dtype=torch.float32)
    hf_cfg = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.DeepseekV3Config(**hf_cfg)
    config._attn_implementation = "eager"
    hf = transformers.DeepseekV3ForCausalLM(config).float().eval()
    hf.load_state_dict(dsv3_to_hf_state_dict(ours.state_dict(), args), strict=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, t in hf.state_dict().items():
            if key.endswith("e_score_correction_bias"):  # the bias must change the selection
                t.copy_(torch.rand(t.shape, generator=g) * 0.2)
            elif key.endswith("layernorm.weight") or key == "model.norm.weight":
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
    hf.save_pretrained(path, safe_serialization=True)
    saved = json.loads((path / "config.json").read_text())
    saved["model_type"] = cfg["model_type"]  # kimi_k2, as Kimi's own config.json says
    (path / "config.json").write_text(json.dumps(saved))
    return hf


@pytest.mark.parametrize("name", list(SHAPED))
def test_load_hf_family_checkpoint_matches_transformers(name, tmp_path):
    hf = _checkpoint(name, tmp_path)
    ours = load_hf(tmp_path, dtype="fp32")
    assert ours.args.n_mtp_layers == 0
    assert ours.layers[0].attn_norm.eps == SHAPED[name]["rms_norm_eps"] == ours.norm.eps
    tok = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tok).logits
    got = ours(tok, all_logits=True)
    assert ref.abs().max() > 1.0
    diff = (got - ref).abs().max().item()
    print(f"{name}: all positions max |dsv3 - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    # decode steps against transformers' cache
    from ..hf_oracle import decode_diff

    ours.reset_cache()
    worst = decode_diff(ours, hf, tok, 32)
    print(f"{name}: decode max diff {worst:.2e}")
    assert worst <= 1e-4
