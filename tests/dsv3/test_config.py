"""ModelArgs: reference fields and defaults, per-layer resolution, validation, JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dsv3 import ConfigError, ModelArgs
from dsv3.config import GLOBAL_ONLY, LAYER_FIELDS

# The reference ModelArgs (DeepSeek-V3 inference/model.py): names and defaults.
REFERENCE_DEFAULTS = dict(
    max_batch_size=8, max_seq_len=16384, dtype="bf16", scale_fmt=None, vocab_size=102400,
    dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16,
    n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
    n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096,
    rope_theta=10000.0, rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0,
)  # fmt: skip


def test_reference_fields_and_defaults():
    a = ModelArgs()
    for name, value in REFERENCE_DEFAULTS.items():
        assert getattr(a, name) == value, name
    extra = {f.name for f in dataclasses.fields(a)} - set(REFERENCE_DEFAULTS)
    ours = {"rope_scaling", "gate_bias", "attn_impl", "layer_config", "norm_eps", "n_mtp_layers"}
    assert ours <= extra


def test_seed_demo_overrides_resolve():
    a = ModelArgs(
        n_layers=32, dim=2048, layer_config={5: {"n_heads": 32}, 10: {"moe_inter_dim": 4096}}
    )
    assert a.for_layer(5).n_heads == 32 and a.for_layer(4).n_heads == 16
    assert a.for_layer(10).moe_inter_dim == 4096 and a.for_layer(10).ffn == "moe"
    assert a.for_layer(11).moe_inter_dim == 1408
    assert a.for_layer(0).ffn == "dense" and a.for_layer(1).ffn == "moe"


def test_string_keys_and_ffn_override():
    a = ModelArgs(n_layers=6, layer_config={"3": {"ffn": "dense"}, "0": {"ffn": "moe"}})
    assert [la.ffn for la in a.layers()] == ["moe", "moe", "moe", "dense", "moe", "moe"]
    assert set(a.layer_config) == {0, 3}


def test_json_round_trip():
    a = ModelArgs(
        n_layers=4,
        gate_bias=True,
        rope_scaling="yarn",
        layer_config={1: {"n_heads": 8, "score_func": "sigmoid", "gate_bias": False}},
    )
    text = json.dumps(a.to_dict())
    b = ModelArgs.from_dict(json.loads(text))
    assert b == a
    assert ModelArgs.from_json(a.to_json()) == a


def test_rope_scaling_rule():
    assert ModelArgs(max_seq_len=8192, original_seq_len=4096).use_yarn
    assert not ModelArgs(max_seq_len=4096, original_seq_len=4096).use_yarn
    assert ModelArgs(max_seq_len=4096, original_seq_len=4096, rope_scaling="yarn").use_yarn
    assert not ModelArgs(rope_scaling="none").use_yarn
    plain = ModelArgs(rope_scaling="none").for_layer(0).softmax_scale
    assert plain == pytest.approx(192**-0.5)
    m = 0.1 * 1.0 * __import__("math").log(40) + 1
    assert ModelArgs().for_layer(0).softmax_scale == pytest.approx(192**-0.5 * m * m)


def test_gate_bias_rule():
    assert not ModelArgs().for_layer(1).gate_bias
    assert ModelArgs(dim=7168, n_layers=2).for_layer(1).gate_bias
    assert ModelArgs(gate_bias=True, n_layers=2).for_layer(1).gate_bias
    a = ModelArgs(n_layers=3, gate_bias=True, layer_config={2: {"gate_bias": False}})
    assert [la.gate_bias for la in a.layers()] == [True, True, False]


@pytest.mark.parametrize(
    "kwargs, field, layer",
    [
        (dict(dim=0), "dim", None),
        (dict(dim="64"), "dim", None),
        (dict(n_heads=True), "n_heads", None),
        (dict(score_func="relu"), "score_func", None),
        (dict(rope_scaling="linear"), "rope_scaling", None),
        (dict(attn_impl="flash"), "attn_impl", None),
        (dict(route_scale=float("nan")), "route_scale", None),
        (dict(route_scale=0), "route_scale", None),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim", None),
        (dict(n_activated_experts=65), "n_activated_experts", None),
        (dict(n_expert_groups=3), "n_expert_groups", None),
        (dict(n_expert_groups=8, n_limited_groups=9), "n_limited_groups", None),
        (
            dict(n_expert_groups=8, n_limited_groups=1, n_activated_experts=9),
            "n_limited_groups",
            None,
        ),
        (
            dict(n_routed_experts=8, n_expert_groups=8, n_activated_experts=1, gate_bias=True),
            "n_expert_groups",
            None,
        ),
        (dict(n_dense_layers=28), "n_dense_layers", None),
        (dict(gate_bias="yes"), "gate_bias", None),
        (dict(layer_config={3: {"n_routed_experts": 4}}), "n_routed_experts", 3),
        (dict(layer_config={3: {"n_heads": 0}}), "n_heads", 3),
        (dict(layer_config={3: {"n_heads": 2.5}}), "n_heads", 3),
        (dict(layer_config={3: {"ffn": "sparse"}}), "ffn", 3),
        (dict(layer_config={3: {"dim": 1024}}), "dim", 3),
        (dict(layer_config={3: {"qk_rope_head_dim": 32}}), "qk_rope_head_dim", 3),
        (dict(layer_config={3: {"rope_factor": 2}}), "rope_factor", 3),
        (dict(layer_config={3: {"heads": 8}}), "heads", 3),
        (dict(layer_config={27: {"n_heads": 8}}), "layer_config", 27),
        (dict(layer_config={"x": {"n_heads": 8}}), "layer_config", None),
        (dict(layer_config={3: 8}), "layer_config", 3),
        (dict(layer_config=[1, 2]), "layer_config", None),
        (dict(layer_config={5: {"n_expert_groups": 5}}), "n_expert_groups", 5),
    ],
)
def test_invalid_config_names_field(kwargs, field, layer):
    with pytest.raises(ConfigError) as e:
        ModelArgs(**kwargs)
    assert e.value.field == field
    assert e.value.layer == layer
    assert field in str(e.value)
    if layer is not None:
        assert f"layer {layer}" in str(e.value)


def test_from_dict_unknown_key():
    with pytest.raises(ConfigError, match="n_hedas"):
        ModelArgs.from_dict({"n_hedas": 4})


def test_every_global_only_field_is_refused_per_layer():
    for name in GLOBAL_ONLY:
        with pytest.raises(ConfigError, match=name):
            ModelArgs(n_layers=2, layer_config={1: {name: getattr(ModelArgs(), name)}})
    assert "n_heads" in LAYER_FIELDS and "ffn" in LAYER_FIELDS


def test_for_layer_out_of_range():
    with pytest.raises(ConfigError, match="out of range"):
        ModelArgs(n_layers=2).for_layer(2)
