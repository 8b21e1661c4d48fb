"""Rotary position embedding: plain and YaRN frequency tables (applied in `dsv3.attention`).

The reference rotates *interleaved pairs* (dims 2j, 2j+1 form one complex number) of the last
`qk_rope_head_dim` dims of q and of the shared k_pe. Tables are computed in float32 and kept as
(cos, sin) real tensors rather than one complex buffer, so `Module.to(dtype)` cannot drop the
imaginary part (a reference pitfall).
"""

from __future__ import annotations

import math

import torch

from .config import ModelArgs, yarn_mscale


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The (fractional) pair index whose wavelength fits `n_rotations` times into `seq_len`."""
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def correction_range(args: ModelArgs) -> tuple[int, int]:
    """Pair indices [low, high] between which YaRN blends extrapolation and interpolation."""
    dim, base, orig = args.qk_rope_head_dim, args.rope_theta, args.original_seq_len
    low = math.floor(_correction_dim(args.beta_fast, dim, base, orig))
    high = math.ceil(_correction_dim(args.beta_slow, dim, base, orig))
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(args: ModelArgs) -> torch.Tensor:
    """Per pair: 0 = keep the original frequency (high frequencies), 1 = divide it by the factor."""
    low, high = correction_range(args)
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    pairs = torch.arange(args.qk_rope_head_dim // 2, dtype=torch.float32)
    return ((pairs - low) / (high - low)).clamp(0, 1)


def base_freqs(args: ModelArgs) -> torch.Tensor:
    """theta**(-2j/d) for each pair j: the plain rotary frequencies (radians per position)."""
    d = args.qk_rope_head_dim
    return 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def yarn_freqs(args: ModelArgs) -> torch.Tensor:
    """YaRN frequencies: `freqs/factor*ramp + freqs*(1-ramp)` (the reference's `smooth` = 1-ramp)."""
    freqs = base_freqs(args)
    ramp = yarn_ramp(args)
    return freqs / args.rope_factor * ramp + freqs * (1 - ramp)


def freqs(args: ModelArgs) -> torch.Tensor:
    """The frequencies the model uses: YaRN when `args.use_yarn`, plain otherwise."""
    return yarn_freqs(args) if args.use_yarn else base_freqs(args)


def mscale(args: ModelArgs) -> float:
    """YaRN's attention temperature factor; the softmax scale is multiplied by its square."""
    if not args.use_yarn:
        return 1.0
    return yarn_mscale(args.rope_factor, args.mscale)


def precompute_freqs_cis(
    args: ModelArgs, seqlen: int | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seqlen, qk_rope_head_dim // 2) float32, for positions 0..seqlen-1."""
    seqlen = args.max_seq_len if seqlen is None else seqlen
    f = freqs(args).to(device)
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32, device=device), f)
    return angles.cos(), angles.sin()


def rotary_info(args: ModelArgs, n_positions: int | None = None, max_pairs: int = 64) -> dict:
    """Plain data describing the rotary tables, for plots: frequencies and wavelengths with and
    without YaRN, the correction range and ramp, the attention scale, and cos/sin tables."""
    n_positions = min(args.max_seq_len, 256) if n_positions is None else n_positions
    fb, fy = base_freqs(args), yarn_freqs(args)
    low, high = correction_range(args)
    cos, sin = precompute_freqs_cis(args, n_positions)
    pairs = list(range(args.qk_rope_head_dim // 2))[:max_pairs]
    plain = args.replace(rope_scaling="none") if args.use_yarn else args
    cos_b, sin_b = precompute_freqs_cis(plain, n_positions)
    return {
        "use_yarn": args.use_yarn,
        "rope_factor": float(args.rope_factor),
        "original_seq_len": args.original_seq_len,
        "max_seq_len": args.max_seq_len,
        "dims": pairs,
        "freqs_base": fb.tolist(),
        "freqs_yarn": fy.tolist(),
        "wavelength_base": (2 * math.pi / fb).tolist(),
        "wavelength_yarn": (2 * math.pi / fy).tolist(),
        "low": low,
        "high": high,
        "ramp": yarn_ramp(args).tolist(),
        "mscale": mscale(args),
        "softmax_scale": args.softmax_scale,
        "positions": list(range(n_positions)),
        "cos": cos[:, : len(pairs)].tolist(),
        "sin": sin[:, : len(pairs)].tolist(),
        "cos_base": cos_b[:, : len(pairs)].tolist(),
        "sin_base": sin_b[:, : len(pairs)].tolist(),
    }
