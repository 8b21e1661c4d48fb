"""Presets: every shipped file loads, its analytic count matches a meta build, the reference
configs are exact, and bad files fail with ConfigError naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3 import presets
from dsv3.config import ConfigError, ModelArgs
from dsv3.model import Transformer
from dsv3.params import count_params

# The main model's (MTP modules excluded), as DEEPSEEK_V3_NOTES.md and issue 14 give them.
REFERENCE_TOTALS = {
    "deepseek-v3-671b": 671_026_419_200,
    "kimi-k2": 1_026_408_232_448,
    "moonlight-16b-a3b": 15_960_110_208,
    "deepseek-v3.1": 671_026_419_200,
    "deepseek-v2-236b": 235_741_434_880,
    "deepseek-v2-lite-16b": 15_706_484_224,
    "deepseek-v3.2-exp": 671_877_944_064,  # V3 + the DSA indexer on 61 layers
}
SHIPPED = {"tiny", "small", "mixed-layers", "seed-demo", *REFERENCE_TOTALS}
V3_MTP = 11_610_068_224  # DeepSeek-V3's MTP module (layer 61) without its embedding/head copies


def meta_numel(args: ModelArgs) -> int:
    """Sum of numel over a meta build's parameters: fp8 scales are buffers, so not counted."""
    model = Transformer(args, device="meta")
    return sum(p.numel() for p in model.parameters())


def test_names_tiny_first_then_by_size():
    names = presets.names()
    assert set(names) == SHIPPED
    assert names[0] == "tiny"
    totals = [count_params(presets.load(n))["total"] for n in names]
    assert totals == sorted(totals)


@pytest.mark.parametrize("name", presets.names())
def test_preset_loads_and_count_matches_meta_build(name):
    doc = presets.load_preset(name)
    assert doc["name"] == name and doc["description"]
    args = doc["args"]
    assert isinstance(args, ModelArgs)
    assert count_params(args)["total"] == meta_numel(args)


@pytest.mark.parametrize("name,total", sorted(REFERENCE_TOTALS.items()))
def test_reference_presets_exact(name, total):
    args = presets.load(name)
    c = count_params(args)
    assert c["main"] == total and c["total"] == total + c["mtp"]


def test_v3_counts_main_plus_mtp_and_the_checkpoint():
    from dsv3.params import estimate

    for name in ("deepseek-v3-671b", "deepseek-v3.1"):
        args = presets.load(name)
        c = count_params(args)
        assert c["mtp"] == V3_MTP and c["total"] == 671_026_419_200 + V3_MTP
        assert c["active"] == 36_625_618_432  # the main forward's; MTP is a training/draft head
        copies = 2 * args.vocab_size * args.dim  # layer 61 repeats embed_tokens and the head
        assert estimate(args)["checkpoint_params"] == c["total"] + copies == 684_489_845_504


# The family's published configs (tests/dsv3/configs/) give the presets exactly.
CONFIG_OF_PRESET = {
    "kimi-k2": "kimi-k2-instruct.json",
    "moonlight-16b-a3b": "moonlight-16b-a3b.json",
    "deepseek-v3.1": "deepseek-v3.1.json",
    "deepseek-v3-671b": "deepseek-v3.json",
    "deepseek-v3.2-exp": "deepseek-v3.2-exp.json",
}


@pytest.mark.parametrize("name", sorted(CONFIG_OF_PRESET))
def test_presets_count_as_their_published_configs(name):
    from pathlib import Path

    from dsv3 import args_from_hf_config

    path = Path(__file__).parent / "configs" / CONFIG_OF_PRESET[name]
    ours, theirs = presets.load(name), args_from_hf_config(path)
    assert count_params(ours) == count_params(theirs)
    for f in ("n_layers", "dim", "vocab_size", "rope_theta", "norm_eps", "scale_fmt", "dtype"):
        assert getattr(ours, f) == getattr(theirs, f), f
    assert ours.for_layer(ours.n_layers - 1) == theirs.for_layer(theirs.n_layers - 1)
    assert ours.use_yarn == theirs.use_yarn


@pytest.mark.parametrize("name", ["kimi-k2", "moonlight-16b-a3b", "deepseek-v3.1"])
def test_new_presets_count_as_transformers_meta_builds(name):
    """transformers' DeepseekV3ForCausalLM built on meta from the preset's HF config has the
    same parameter count (router biases included; transformers builds no MTP module, so it is
    the main model's)."""
    pytest.importorskip("transformers")
    from benchmarks.peers import build_hf

    from ..hf_oracle import hf_param_count

    args = presets.load(name)
    hf = build_hf(args, device="meta")
    assert hf_param_count(hf) == count_params(args)["main"] == REFERENCE_TOTALS[name]


def test_reference_preset_details():
    lite = presets.load("deepseek-v2-lite-16b")
    assert lite.mscale == 0.707 and lite.q_lora_rank == 0 and lite.score_func == "softmax"
    v3 = presets.load("deepseek-v3-671b")
    assert v3.dtype == "fp8" and v3.for_layer(3).gate_bias and v3.n_dense_layers == 3
    assert v3.max_seq_len == 16384 and v3.use_yarn  # reference defaults: 16384 > 4096


def test_seed_demo():
    args = presets.load("seed-demo")
    assert count_params(args)["total"] == 19_733_301_248
    assert args.for_layer(5).n_heads == 32 and args.for_layer(10).moe_inter_dim == 4096


def test_mixed_layers_really_mixes():
    args = presets.load("mixed-layers")
    kinds = [la.ffn for la in args.layers()]
    assert "dense" in kinds[1:] and kinds.count("moe") >= 3
    assert len({la.n_heads for la in args.layers()}) > 1
    assert len({la.n_routed_experts for la in args.layers() if la.ffn == "moe"}) > 1
    assert len({la.moe_inter_dim for la in args.layers() if la.ffn == "moe"}) > 1
    assert 10e6 <= count_params(args)["total"] <= 60e6


def test_small_is_a_moe_benchmark_size():
    args = presets.load("small")
    assert 50e6 <= count_params(args)["total"] <= 150e6
    la = args.for_layer(args.n_layers - 1)
    assert la.n_routed_experts >= 32 and la.n_activated_experts == 4 and la.n_expert_groups > 1


def test_tiny_runs_fast_with_yarn():
    args = presets.load("tiny")
    assert args.use_yarn
    torch.manual_seed(0)
    model = Transformer(args, dtype="fp32")
    logits = model(torch.randint(0, args.vocab_size, (1, 16)))
    assert logits.shape == (1, args.vocab_size) and torch.isfinite(logits).all()


def test_save_load_round_trip(tmp_path):
    args = presets.load("mixed-layers")
    path = presets.save(args, tmp_path / "mine.json", description="copy")
    doc = presets.load_preset(path)
    assert doc["args"] == args and doc["name"] == "mine" and doc["description"] == "copy"
    assert presets.load(str(path)) == args
    text = presets.to_json(args, "x", "y")
    assert presets.from_json(text) == args
    assert json.loads(text)["args"]["layer_config"].keys() == {str(k) for k in args.layer_config}


def _doc(**changes):
    doc = json.loads(presets.to_json(presets.load("tiny"), "t", ""))
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "doc,field,text",
    [
        (_doc(schema=99), "schema", "99"),
        (_doc(colour="red"), "colour", "colour"),
        (_doc(args={**_doc()["args"], "dimm": 64}), "dimm", "dimm"),
        (_doc(args={**_doc()["args"], "n_heads": 0}), "n_heads", "n_heads"),
        (_doc(args={**_doc()["args"], "score_func": "relu"}), "score_func", "relu"),
        (_doc(args={**_doc()["args"], "layer_config": {"1": {"dim": 8}}}), "dim", "dim"),
    ],
)
def test_bad_preset_names_the_problem(tmp_path, doc, field, text):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        presets.load(path)
    assert e.value.field == field and text in str(e.value)
    with pytest.raises(ConfigError):
        presets.from_json(json.dumps(doc))


def test_malformed_json_and_unknown_name(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": 1, "args": {')
    with pytest.raises(ConfigError, match="not valid JSON"):
        presets.load(path)
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
        presets.load("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        presets.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="JSON object"):
        presets.from_json("[1, 2]")
