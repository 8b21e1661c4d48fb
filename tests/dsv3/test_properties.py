"""Property-based: any config either raises ConfigError naming a field, or builds (meta) with an
exact analytic count and, when small, runs a finite forward on CPU. Nothing else escapes."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dsv3 import ConfigError, ModelArgs, Transformer, count_params
from dsv3.config import GLOBAL_ONLY, LAYER_FIELDS

from ..conftest import TINY

EXAMPLES = int(os.environ.get("DSV3_HYPOTHESIS_EXAMPLES", "500"))

# Values a user (or a JSON file) might type into any field: plausible, edge and wrong.
junk = st.one_of(
    st.integers(-3, 3),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "8", "sigmoid", "softmax", "yarn", "none", "auto", "naive", "absorb",
                     "dense", "moe", "bf16", "fp8", "ue8m0", "1e3"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 4), max_size=2),
)  # fmt: skip
small_int = st.integers(1, 24)
plausible = {
    "n_heads": small_int, "q_lora_rank": st.integers(0, 24), "kv_lora_rank": small_int,
    "qk_nope_head_dim": st.integers(0, 16), "v_head_dim": small_int, "inter_dim": small_int,
    "moe_inter_dim": small_int, "n_routed_experts": st.integers(1, 16),
    "n_shared_experts": st.integers(0, 3), "n_activated_experts": st.integers(1, 6),
    "n_expert_groups": st.integers(1, 8), "n_limited_groups": st.integers(1, 8),
    "score_func": st.sampled_from(["softmax", "sigmoid"]), "route_scale": st.floats(0.1, 4),
    "gate_bias": st.sampled_from([None, True, False]),
    "attn_impl": st.sampled_from(["naive", "absorb"]), "ffn": st.sampled_from(["dense", "moe"]),
    "dim": st.integers(1, 48), "vocab_size": st.integers(1, 300), "n_layers": st.integers(1, 5),
    "n_dense_layers": st.integers(0, 5), "qk_rope_head_dim": st.sampled_from([2, 4, 6, 8, 3]),
    "max_seq_len": st.integers(1, 64), "original_seq_len": st.integers(1, 64),
    "rope_factor": st.floats(1, 50), "rope_theta": st.floats(2, 1e5), "mscale": st.floats(0, 2),
    "beta_fast": st.integers(1, 64), "beta_slow": st.integers(1, 64),
    "rope_scaling": st.sampled_from(["auto", "yarn", "none"]), "max_batch_size": st.integers(1, 4),
}  # fmt: skip
field_names = sorted(set(plausible) | set(GLOBAL_ONLY) | set(LAYER_FIELDS))


@st.composite
def value_for(draw, name):
    if name in plausible and draw(st.integers(0, 3)):
        return draw(plausible[name])
    return draw(junk)


@st.composite
def configs(draw):
    base = dict(TINY)
    if draw(st.integers(0, 4)) == 0:  # sometimes fall back to a default (often a large one)
        base.pop(draw(st.sampled_from(sorted(TINY))))
    base.update(max_seq_len=64, original_seq_len=32)
    for name in draw(st.lists(st.sampled_from(field_names), max_size=3)):
        base[name] = draw(value_for(name))
    if draw(st.booleans()):
        layer_config = {}
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.one_of(st.integers(-1, 6), st.sampled_from(["0", "1", " 2", "x", "3.0"])))
            names = draw(st.lists(st.sampled_from(field_names + ["bogus"]), max_size=3))
            layer_config[key] = {n: draw(value_for(n)) for n in names}
        if draw(st.integers(0, 9)) == 0:
            layer_config = draw(junk)
        base["layer_config"] = layer_config
    if draw(st.integers(0, 19)) == 0:
        base[draw(st.sampled_from(["unknown_field", "layers"]))] = 1
    return base


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_any_config_is_an_error_naming_a_field_or_a_working_model(cfg, seed):
    try:
        args = ModelArgs.from_dict(cfg)
    except ConfigError as e:
        assert e.field, f"ConfigError without a field: {e}"
        assert e.field in str(e), f"field {e.field!r} not named in: {e}"
        event("ConfigError")
        return
    # Valid: a meta build with the exact analytic count ...
    meta = Transformer(args, device="meta")
    assert count_params(args)["total"] == sum(p.numel() for p in meta.parameters())
    event("valid")
    # ... and, when small, a finite CPU forward (prefill + one decode step).
    if count_params(args)["total"] < 2_000_000:
        torch.manual_seed(seed)
        model = Transformer(args, device="cpu")
        S = min(args.max_seq_len, 6)
        tok = torch.randint(0, args.vocab_size, (min(args.max_batch_size, 2), S))
        out = model(tok, all_logits=True)
        assert out.shape == (tok.shape[0], S, args.vocab_size)
        assert out.isfinite().all()
        event("built and ran on CPU")
        if args.max_seq_len > S:
            step = model(tok[:, :1], start_pos=S)
            assert step.isfinite().all()
