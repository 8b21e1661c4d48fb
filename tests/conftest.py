"""Shared fixtures: small configs that exercise every feature and build in milliseconds, and the
real app launched once in this process for the tests that drive it over HTTP or in a browser."""

from __future__ import annotations

import socket

import pytest
import torch

from dsv3 import ModelArgs, Transformer

# A tiny config with every feature on: q LoRA, sigmoid routing with groups and the gate bias,
# YaRN (max_seq_len > original_seq_len), a dense first layer, shared experts.
TINY = dict(
    vocab_size=512,
    dim=64,
    inter_dim=96,
    moe_inter_dim=32,
    n_layers=4,
    n_dense_layers=1,
    n_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_activated_experts=2,
    n_expert_groups=4,
    n_limited_groups=2,
    score_func="sigmoid",
    route_scale=2.5,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_seq_len=256,
    original_seq_len=64,
    rope_factor=8,
    mscale=0.7,
    gate_bias=True,
    max_batch_size=4,
)


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs(**TINY)


@pytest.fixture
def tiny_model(tiny_args) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_args, device="cpu", dtype=torch.float32)


def clone_model(model: Transformer, args: ModelArgs, dtype=None, **options) -> Transformer:
    """A model of `args` holding `model`'s weights (for comparing implementations); `options`
    go to `Transformer` (moe_impl, absorbed_prefill)."""
    other = Transformer(args, device="meta", dtype=dtype or model.dtype_name, **options)
    other.to_empty(device="cpu")
    other.load_state_dict(model.state_dict())
    other.reset_cache()
    return other


# ---------------------------------------------------------------------- the app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def url():
    import torch

    import app  # building the page must neither launch it nor touch CUDA
    from ui.layout import launch_kwargs

    assert not app.demo.is_running and not torch.cuda.is_initialized()
    port = free_port()
    app.demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.demo.close()
