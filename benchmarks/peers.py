"""The peers dsv3 is measured and tested against, built from dsv3's own args and weights.

`build_hf` is the one transformers builder: the benchmark's peer (sdpa attention, grouped-matmul
experts) and the tests' oracle (`tests/hf_oracle.py`: eager attention, float32) both call it.
`build_reference` imports DeepSeek-V3's `inference/model.py` from a directory outside this
repository. transformers is imported only when a model is built.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

from dsv3 import ModelArgs, Transformer
from dsv3.checkpoint import dsv3_to_hf_state_dict, hf_config_from_args


def hf_config(args: ModelArgs, attn_implementation: str | None = None):
    """transformers' config object for `args`, from dsv3's translation (`hf_config_from_args`:
    DeepseekV3Config, DeepseekV2Config for softmax routing, DeepseekV32Config for DSA)."""
    from transformers import AutoConfig

    cfg = dict(hf_config_from_args(args))
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **cfg)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def build_hf(
    source: Transformer | ModelArgs,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    experts_implementation: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
):
    """transformers' DeepSeek model (eval mode) for a dsv3 model or its args.

    Given a `Transformer`, its weights (or `state_dict`, dsv3 names) are copied in through dsv3's
    name table, strictly: every key on both sides. Given `ModelArgs`, the model keeps
    transformers' init (on `device="meta"`: no memory, for parameter counts).
    `experts_implementation=None` leaves transformers' choice; the one it resolved is on
    `hf.config._experts_implementation`."""
    from transformers import AutoModelForCausalLM

    args = source.args if isinstance(source, Transformer) else source
    config = hf_config(args)
    kwargs = {"attn_implementation": attn_implementation, "dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, **kwargs)
    if isinstance(source, Transformer):
        sd = source.state_dict() if state_dict is None else state_dict
        sd = dsv3_to_hf_state_dict(sd, args, fused_experts=True)
        missing, unexpected = hf.load_state_dict(sd, strict=True)
        assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


def reference_dir(cli: str | None) -> Path | None:
    d = cli or os.environ.get("DSV3_REFERENCE_DIR")
    if not d:
        return None
    p = Path(d)
    if (p / "inference" / "model.py").is_file():
        p = p / "inference"
    return p if (p / "model.py").is_file() else None


def build_reference(model: Transformer, ref_dir: Path):
    """The reference Transformer (bf16 path, absorb attention) in float32 with `model`'s weights.

    Its globals are set as its Transformer sets them; `Linear.dtype` is bf16 there, so the built
    model is cast to float32 (its complex rotary buffer is not floating point and stays intact).
    Its Gate has a selection bias only at dim 7168: one is added (zeros, as ours) so both use the
    same top-2 group rule."""
    if "kernel" not in sys.modules:
        stub = types.ModuleType("kernel")  # the bf16 path never calls these
        stub.act_quant = stub.weight_dequant = stub.fp8_gemm = None
        sys.modules["kernel"] = stub
    spec = importlib.util.spec_from_file_location("deepseek_reference_model", ref_dir / "model.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ref.attn_impl = "absorb"
    ref.gemm_impl = "bf16"
    a = model.args
    fields = {k: getattr(a, k) for k in ref.ModelArgs.__dataclass_fields__ if hasattr(a, k)}
    rm = ref.Transformer(ref.ModelArgs(**fields)).float()
    ref.Linear.dtype = torch.float32
    for layer in rm.layers:
        if isinstance(layer.ffn, ref.MoE) and layer.ffn.gate.bias is None:
            layer.ffn.gate.bias = torch.nn.Parameter(torch.zeros(a.n_routed_experts))
    sd = {}
    for k, v in model.state_dict().items():
        if ".ffn.experts.w" in k:  # stacked (E, out, in) -> per-expert reference keys
            for e in range(v.shape[0]):
                sd[k.replace("experts.w", f"experts.{e}.w") + ".weight"] = v[e]
        else:
            sd[k] = v
    rm.load_state_dict(sd, strict=True)
    return rm.eval()
