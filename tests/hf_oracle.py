"""transformers as an independent oracle: the same weights in HF's DeepSeek model.

`hf_model_from_dsv3(model)` builds a float32, eval-mode transformers model whose config and
weights come from dsv3's one translation table (`dsv3.checkpoint`), so parity tests compare our
forward with transformers' on identical weights. The builder is the benchmark's
(`benchmarks.peers.build_hf`), with eager attention: the plain math.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from benchmarks.peers import build_hf
from dsv3.layers import FP8, dequantize
from dsv3.model import Transformer


def float_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model`'s state dict in float32, fp8 weights dequantised (scales dropped)."""
    sd = model.state_dict()
    out = {}
    for name, t in sd.items():
        if name.endswith("scale") and t.dtype == torch.float32:
            continue
        if t.dtype == FP8:
            scale = sd[
                name[: -len("weight")] + "scale" if name.endswith(".weight") else name + "_scale"
            ]
            t = dequantize(t, scale, torch.float32)
        out[name] = t.detach().to(device="cpu", dtype=torch.float32)
    return out


def hf_model_from_dsv3(model: Transformer) -> PreTrainedModel:
    """A float32, eval transformers DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for softmax
    routing, DeepseekV32ForCausalLM for DSA) holding `model`'s weights (fp8 dequantised), eager
    attention."""
    return build_hf(model, attn_implementation="eager", state_dict=float_state_dict(model))


def hf_param_count(hf: PreTrainedModel) -> int:
    """transformers' parameter count as dsv3 counts it: HF keeps the router's selection bias as a
    buffer, dsv3 as a parameter."""
    n = sum(p.numel() for p in hf.parameters())
    return n + sum(
        b.numel() for k, b in hf.named_buffers() if k.endswith("e_score_correction_bias")
    )


@torch.no_grad()
def decode_diff(ours: Transformer, hf: PreTrainedModel, tok: torch.Tensor, start: int, cache=None):
    """The largest |dsv3 - transformers| logit over single-token decode steps at positions
    start .. tok.shape[1] - 1, each model on its own KV cache. Without `cache` (transformers'
    cache after `start` tokens, ours already filled alike) both first prefill tok[:, :start]."""
    if cache is None:
        cache = hf(tok[:, :start], use_cache=True).past_key_values
        ours(tok[:, :start])
    worst = 0.0
    for pos in range(start, tok.shape[1]):
        step = hf(tok[:, pos : pos + 1], past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        mine = ours(tok[:, pos : pos + 1], start_pos=pos)
        worst = max(worst, (mine - step.logits[:, -1]).abs().max().item())
    return worst
