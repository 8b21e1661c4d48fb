"""transformers as an independent oracle: the same weights in HF's DeepSeek model.

`hf_model_from_dsv3(model)` builds a float32, eval-mode transformers model whose config and
weights come from dsv3's one translation table (`dsv3.checkpoint`), so parity tests compare our
forward with transformers' on identical weights.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dsv3.checkpoint import dsv3_to_hf_state_dict, hf_config_from_args
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


def hf_config(model: Transformer):
    """The transformers config object for `model.args` (eager attention: the plain math)."""
    cfg = dict(hf_config_from_args(model.args))
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    return config


def hf_model_from_dsv3(model: Transformer) -> PreTrainedModel:
    """A float32, eval transformers DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for softmax
    routing) holding `model`'s weights (fp8 dequantised), copied via dsv3's translation table."""
    config = hf_config(model)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = dsv3_to_hf_state_dict(float_state_dict(model), model.args, fused_experts=True)
    result = hf.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return hf.eval()
