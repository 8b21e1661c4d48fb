"""The Triton kernels themselves (dsv3.fused, and dsv3.fp8's weight-only fp8 kernel), run on
the CPU by Triton's interpreter (TRITON_INTERPRET=1) against their torch twins and the
dequantised product: the comparisons benchmarks/gpu_check.py makes on a GPU (`check_fused`,
`check_fp8_kernels`, on smaller shapes). Runs where Triton is installed (requirements-dev pins it);
the interpreter setting must be made before Triton and dsv3's kernels are imported, so the
checks run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (requirements-dev pins it)")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import json
import triton.runtime.interpreter as interp

# Triton 3.6's interpreter turns a one-element array into an index with int(array), which
# numpy 2 refuses (`range` over a runtime int argument); index its only element instead.
_patch = getattr(interp, "_patch_lang_tensor", None)


def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


if _patch is not None:
    interp._patch_lang_tensor = _patch_lang_tensor

import torch
import benchmarks.gpu_check as gc
from dsv3 import ModelArgs, Transformer

gc.DEV = "cpu"
args = ModelArgs(**gc.TINY)
torch.manual_seed(0)
cpu = Transformer(args, device="cpu")
rows = gc.check_fused(args, cpu)
# the fp8 weight-only kernel, dense and grouped (dsv3.fp8), on shapes the interpreter runs fast
small = ((1, 256, 384), (3, 200, 300), (20, 128, 256))
rows += gc.check_fp8_kernels(args, cpu, linears=small, experts=(8, 256, 128, 2, (3, 24)))
print(json.dumps(rows))
"""


def test_triton_kernels_match_their_twins_in_the_interpreter():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    names = [name for name, _, _ in rows]
    assert sum(n.startswith("fused router") for n in names) == 4
    assert sum(n.startswith("router logits kernel") for n in names) == 2
    assert sum(n.startswith("bf16 Linear kernel") for n in names) == 3
    assert sum(n.startswith("SwiGLU MLP kernel") for n in names) == 4
    assert sum(n.startswith("RMSNorm kernel") for n in names) == 4
    assert sum(n.startswith("pairs sorted and combined") for n in names) == 2
    assert sum(n.startswith("experts' sorted dispatch") for n in names) == 2
    assert sum("fused MoE" in n for n in names) == 5
    assert sum("decode step" in n for n in names) == 3
    assert sum("prefill latent step" in n for n in names) == 3
    assert sum("attention core" in n for n in names) == 4
    assert sum(n.startswith("fp8 linear") for n in names) == 3
    # both up-projection forms with fp8 weights, the fused one with 16-bit weights
    assert sum(n.startswith("fp8 grouped experts (fused") for n in names) == 2
    assert sum(n.startswith("fp8 grouped experts (separate") for n in names) == 2
    assert sum(n.startswith("bf16 grouped experts (fused") for n in names) == 2
    assert sum(n.startswith("expert row-block layout kernel") for n in names) == 4
    bad = [(name, got) for name, got, ok in rows if not ok]
    assert not bad, bad
    assert all("used True" in got for name, got, _ in rows if "fused MoE" in name)
