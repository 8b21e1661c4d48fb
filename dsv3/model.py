"""The DeepSeek-V3 transformer: blocks built from per-layer resolved args, one init.

Build path: modules are constructed on the meta device, moved with `to_empty` to the target
device, and `init_weights()` fills them there (no CPU copy on the way to CUDA; a `meta` model
is never allocated at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .attention import MLA
from .config import ConfigError, LayerArgs, ModelArgs
from .dist.comm import ParallelEmbedding, ParallelHead, all_reduce, resolve_world
from .dist.plan import check_shardable, local_index, local_sizes, split_widths
from .graphs import CudaGraphs
from .layers import (
    DTYPES,
    FP8,
    MLP,
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    compute_dtype,
    dequantize,
    quantize_fp8,
)
from .memory import keep_freed_memory
from .moe import MoE
from .rotary import precompute_freqs_cis

__all__ = [
    "Block",
    "MTPBlock",
    "Transformer",
    "dequantize",
    "init_block",
    "init_globals",
    "quantize_fp8",
    "resolve_dtype",
]


def resolve_dtype(dtype: torch.dtype | str | None) -> tuple[str, torch.dtype, torch.dtype]:
    """-> (name, weight dtype of Linear layers, dtype of everything else and of activations)."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    if isinstance(dtype, str):
        key = {"float32": "fp32", "bfloat16": "bf16", "float8_e4m3fn": "fp8"}.get(dtype, dtype)
        if key not in DTYPES:
            raise ConfigError(
                f"dtype={dtype!r} is not supported; choose one of fp32, bf16, fp8", field="dtype"
            )
        dtype = DTYPES[key]
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ConfigError(
            f"dtype={dtype} is not supported; choose one of fp32, bf16, fp8", field="dtype"
        )
    return names[dtype], dtype, compute_dtype(dtype)


class Block(nn.Module):
    """Pre-norm attention + feed-forward (a dense MLP or an MoE, as `la.ffn` says).

    Over `world_size` ranks (dsv3.parallel) this rank holds n_heads/N heads, width/N of the MLPs
    and E/N routed experts; attention and feed-forward outputs are partial sums, all-reduced.
    `moe_impl` and `absorbed_prefill`: see `Transformer`."""

    def __init__(
        self,
        la: LayerArgs,
        max_seq_len: int,
        wdtype,
        dtype,
        device=None,
        world_size=1,
        rank=0,
        moe_impl: str = "auto",
        absorbed_prefill: bool = False,
    ):
        super().__init__()
        self.layer_id = la.layer_id
        self.world_size = world_size
        la_local = local_sizes(la, world_size)
        self.attn = MLA(la_local, max_seq_len, wdtype, device, absorbed_prefill=absorbed_prefill)
        if la.ffn == "dense":
            self.ffn = MLP(la.dim, la.inter_dim // world_size, dtype=wdtype, device=device)
        else:
            self.ffn = MoE(la, wdtype, device, world_size, rank, impl=moe_impl)
        self.attn_norm = RMSNorm(la.dim, la.norm_eps, dtype=dtype, device=device)
        self.ffn_norm = RMSNorm(la.dim, la.norm_eps, dtype=dtype, device=device)

    def forward(
        self, x, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); with `last_only`, (B, 1, D) of the last position (the KV
        cache still takes all S positions)."""
        n = self.world_size
        a = all_reduce(self.attn(self.attn_norm(x), start_pos, cos, sin, last_only), n)
        h, x = self.ffn_norm(a, residual=x[:, -1:] if last_only else x)  # the add and the norm
        return x + all_reduce(self.ffn(h), n)


class SharedHead(nn.Module):
    """The MTP module's own output norm (`shared_head.norm` in the released weights); the head
    itself is the main model's."""

    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.norm = RMSNorm(dim, eps, dtype=dtype, device=device)


class MTPBlock(Block):
    """One multi-token-prediction module (DeepSeek-V3 paper, section 2.2; layer 61 of the
    released V3 weights). For position i, with h_i the previous depth's hidden state (depth 1:
    the main model's, after its final norm, as vLLM and SGLang feed it) and x_{i+1} the next
    token:

        h'_i = eh_proj(concat(enorm(embed(x_{i+1})), hnorm(h_i)))    2*dim -> dim, no bias
        h''  = Block(h')                                             one MoE transformer block
        logits for x_{i+2} = head(shared_head.norm(h''))             head shared with the model

    Order and names follow the released weights and the inference engines that load them
    (vLLM and SGLang `deepseek_mtp`/`deepseek_nextn`): `enorm` normalises the embedding, `hnorm`
    the hidden state, and the embedding comes first in the concatenation. The paper writes the
    same product as M [RMSNorm(h); RMSNorm(Emb)], the other order; what matters for loading is
    the column order of `eh_proj`, the weights'. `eh_proj` stays in the compute dtype in fp8
    builds (unquantised in the released checkpoint, like the head)."""

    def __init__(self, la: LayerArgs, max_seq_len: int, wdtype, dtype, device=None, *a, **kw):
        super().__init__(la, max_seq_len, wdtype, dtype, device, *a, **kw)
        self.enorm = RMSNorm(la.dim, la.norm_eps, dtype=dtype, device=device)
        self.hnorm = RMSNorm(la.dim, la.norm_eps, dtype=dtype, device=device)
        self.eh_proj = Linear(2 * la.dim, la.dim, dtype=dtype, device=device)
        self.shared_head = SharedHead(la.dim, la.norm_eps, dtype=dtype, device=device)

    def forward(self, h, emb, start_pos: int, cos: torch.Tensor, sin: torch.Tensor):
        """h (B, S, D) hidden states at positions i, emb (B, S, D) embeddings of tokens i+1 ->
        (B, S, D) this depth's normed hidden states (the head turns them into logits for
        tokens i+2; the next depth takes them as its h)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # (B, S, D)
        return self.shared_head.norm(super().forward(x, start_pos, cos, sin))


class Transformer(nn.Module):
    """DeepSeek-V3 style decoder. `Transformer(args, device=None, dtype=None)`:

    device: anything torch accepts; "meta" builds shapes only (no memory, no init).
    dtype: torch.float32 / torch.bfloat16 / "fp32" / "bf16" / "fp8" / None (torch's default).
        "fp8" stores every Linear weight as float8_e4m3fn with float32 128x128 block scales and
        computes in bfloat16; embedding, norms, router and head stay bfloat16 (as the reference).
    progress: optional callback(layers_done, n_layers) during initialisation.
    world_size, rank: tensor/expert parallel layout (dsv3.parallel); default: the initialised
        torch.distributed process group's, else one process. Meta builds take any layout.
    moe_impl: the routed experts' dispatch, "auto" (by device and load, see `dsv3.moe.dispatch`)
        or "loop" / "grouped" / "padded" / "padded-one" / "gathered" (same numbers; for tests
        and benchmarks).
    absorbed_prefill: with the "absorb" cache, run multi-token inputs through the absorbed
        attention too (same numbers; see `dsv3.attention`). Both are per model, never global.
    """

    def __init__(
        self,
        args: ModelArgs,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        progress: Callable[[int, int], None] | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        moe_impl: str = "auto",
        absorbed_prefill: bool = False,
    ):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        self.args = args
        self.dtype_name, wdtype, dtype = resolve_dtype(dtype)
        self.world_size, self.rank = ws, r = resolve_world(world_size, rank)
        check_shardable(args, ws, self.dtype_name)
        self.compute_dtype = dtype
        device = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            if ws == 1:
                self.embed = Embedding(args.vocab_size, args.dim, dtype=dtype)
            else:
                self.embed = ParallelEmbedding(args.vocab_size, args.dim, ws, r, dtype=dtype)
            opts = dict(moe_impl=moe_impl, absorbed_prefill=absorbed_prefill)
            self.layers = nn.ModuleList(
                Block(args.for_layer(i), args.max_seq_len, wdtype, dtype, None, ws, r, **opts)
                for i in range(args.n_layers)
            )
            # The MTP modules, keyed by their layer number in checkpoints (61 for V3); empty
            # (no tensors) when n_mtp_layers is 0. Not run by the main forward.
            self.mtp = nn.ModuleDict(
                {
                    str(la.layer_id): MTPBlock(
                        la, args.max_seq_len, wdtype, dtype, None, ws, r, **opts
                    )
                    for la in args.mtp_layers()
                }
            )
            self.norm = RMSNorm(args.dim, args.norm_eps, dtype=dtype)
            if ws == 1:
                self.head = Linear(args.dim, args.vocab_size, dtype=dtype)
            else:
                self.head = ParallelHead(args.dim, args.vocab_size, ws, dtype=dtype)
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled = (0, 0)  # (batch, positions) held by the KV caches
        # CUDA graphs for decode steps and small prefills (dsv3/graphs.py); `graphs.enabled =
        # False` runs every forward eagerly.
        self.graphs = CudaGraphs(self)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights(progress)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Transformer:
        """`nn.Module.to_empty` with `torch.empty(shape)` for every tensor: `torch.empty_like` of
        a meta tensor runs a Python reference that imports sympy (a pause on the first build in
        a process; benchmarks/run.py times builds). Contiguous, as the meta tensors, except the
        routed experts' stacks on CPU, which `GroupedExperts` lays out in-major
        (`moe.expert_layout`).
        Every build and load comes through here: on CPU it also sets the allocator up so that
        forwards do not page-fault their activations in again (dsv3.memory)."""
        dev = torch.device(device) if device is not None else torch.get_default_device()
        if dev.type == "cpu":
            keep_freed_memory()
        return self._apply(
            lambda t: torch.empty(t.shape, dtype=t.dtype, device=dev), recurse=recurse
        )

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The single place where weights get values (seeded by torch's global RNG).

        | tensor                                   | init                          |
        |------------------------------------------|-------------------------------|
        | embed.weight                             | normal(0, 1)                  |
        | every Linear / expert weight (out, in)   | normal(0, 1/sqrt(in))         |
        | attn.wo, ffn.w2, experts.w2 (residual)   | normal(0, 1/sqrt(in * 2L))    |
        | ffn.gate.weight                          | normal(0, 1/sqrt(dim))        |
        | ffn.gate.bias (selection bias)           | zeros                         |
        | RMSNorm weights                          | ones                          |
        | attn.indexer.k_norm (LayerNorm, DSA)     | weight ones, bias zeros       |
        | fp8 weights + scale                      | the above, block-quantised    |
        | mtp.N (MTP modules: a block, eh_proj,    | as a block; eh_proj as a      |
        |   enorm/hnorm/shared_head.norm)          |   Linear, norms ones          |

        fp8 scales are powers of two when `args.scale_fmt` is "ue8m0".
        Variance-preserving widths keep activations O(1) through depth, the residual branches are
        shrunk by the depth so the stream does not blow up, and the head gives O(1) logits. A
        gate init with unit-variance logits spreads tokens over many experts.
        A sharded model (world_size > 1) gets the slices of these values (dsv3.parallel).
        """
        n = len(self.layers)
        resid = 1.0 / math.sqrt(2 * n)
        if self.world_size > 1:
            self._init_sharded(resid, progress)
            self.reset_cache()
            return
        fmt = self.args.scale_fmt
        init_globals(self)
        for i, block in enumerate(self.layers):
            init_block(block, resid, fmt)
            if progress is not None:
                progress(i + 1, n)
        for block in self.mtp.values():
            init_block(block, resid, fmt)
        self.reset_cache()

    @torch.no_grad()
    def _init_sharded(self, resid: float, progress=None) -> None:
        """Give a sharded model the values of the single-process model built from the same
        seed: each full-size module (embedding/norm/head, then one block at a time) is built and
        initialised exactly as `init_weights` does it, and this rank keeps its slices
        (`dsv3.dist.plan.local_index`). Peak extra memory is one full block."""
        args, device = self.args, self.device
        full = Transformer(args, device="meta", dtype=self.dtype_name, world_size=1)
        targets = self.state_dict()
        widths = split_widths(args)

        def take(prefix: str, module: nn.Module) -> None:
            for key, t in module.state_dict().items():
                name = prefix + key
                index = local_index(name, tuple(t.shape), args, self.world_size, self.rank, widths)
                local = t[index] if index else t
                if targets[name].shape != local.shape:
                    raise RuntimeError(
                        f"{name}: shard {list(local.shape)} vs model {list(targets[name].shape)}"
                    )
                targets[name].copy_(local)
            module.to_empty(device="meta")  # free the full-size copy

        tops = (full.embed, full.norm, full.head)
        for m in tops:
            m.to_empty(device=device)
        init_globals(full)
        for prefix, m in zip(("embed.", "norm.", "head."), tops):
            take(prefix, m)
        n = len(full.layers)
        for i, block in enumerate(full.layers):
            block.to_empty(device=device)
            init_block(block, resid, args.scale_fmt)
            take(f"layers.{i}.", block)
            if progress is not None:
                progress(i + 1, n)
        for key, block in full.mtp.items():
            block.to_empty(device=device)
            init_block(block, resid, args.scale_fmt)
            take(f"mtp.{key}.", block)

    # ------------------------------------------------------------------ forward
    def reset_cache(self) -> None:
        """Forget every layer's KV cache: freed and reallocated by the next forward, except
        while CUDA graphs use it (a static cache: its buffers stay, the next forward overwrites
        them; `free_cache` releases them)."""
        if self.graphs.entries:
            self._filled = (0, 0)
            return
        self.free_cache()

    def free_cache(self) -> None:
        """Free every KV cache, and the CUDA graphs captured on them."""
        self.graphs.clear()
        for block in (*self.layers, *self.mtp.values()):
            for cache in block.attn.caches:
                cache.clear()
        self._filled = (0, 0)

    def reserve_cache(self, batch: int, seq_len: int) -> None:
        """Pre-size the KV caches for `batch` x `seq_len` so decoding never reallocates."""
        like = torch.empty(0, dtype=self.compute_dtype, device=self.device)
        for block in self.layers:
            for cache in block.attn.caches:
                cache.ensure(batch, min(seq_len, self.args.max_seq_len), like, keep=True)

    def dequantize_once(self) -> int:
        """Make now the bf16 copy of every fp8 weight of the main model that a GPU without an
        fp8 path multiplies by (`Linear.dense_weight`, the experts' `_dense`), rather than on
        the first forward, so that a build is refused or fails when they do not fit, not a run
        later. Kept until the weights change (a load makes them again on use; an MTP module's
        are made when `forward(mtp=True)` first runs it). -> their bytes
        (`params.dense_copy_bytes`); 0 for a model that is not fp8."""
        from .moe import GroupedExperts

        dtype, kept = self.compute_dtype, 0
        for m in self.layers.modules():  # what a plain forward runs (no MTP module)
            if isinstance(m, Linear) and m.scale is not None:
                kept += m.dense_weight(dtype).nbytes
            elif isinstance(m, GroupedExperts) and m.w1.dtype == FP8:
                kept += sum(m._dense(name, dtype).nbytes for name in ("w1", "w2", "w3"))
        return kept

    def cache_bytes(self, batch: int | None = None, positions: int = 0) -> int:
        """Bytes the KV caches hold allocated (grown ahead while decoding, or reserved for CUDA
        graphs), or with `batch` the bytes of that many sequences' first `positions`."""
        blocks = (*self.layers, *self.mtp.values())
        caches = [c for block in blocks for c in block.attn.caches]
        if batch is None:
            return sum(c.nbytes() for c in caches)
        used = 0
        for c in caches:
            b, t = c.capacity  # (0, 0) while empty
            if b and t:
                used += c.nbytes() // (b * t) * min(batch, b) * min(positions, t)
        return used

    def _rotary(self, device: torch.device, start_pos: int, seqlen: int):
        """(cos, sin) for positions start_pos..start_pos+seqlen-1, float32."""
        cos, sin = self._rope_tables(device)
        return cos[start_pos : start_pos + seqlen], sin[start_pos : start_pos + seqlen]

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of every position (max_seq_len, Dr/2), cached per device so that dtype
        casts of the model never touch them."""
        if device not in self._rope:
            self._rope[device] = precompute_freqs_cis(self.args, device=device)
        return self._rope[device]

    def _check_input(self, tokens: torch.Tensor, start_pos: int, ids: bool = True) -> None:
        """Shape, batch, positions and cache checks; with `ids`, the token ids' range too (on a
        GPU that reads the ids back, a device sync)."""
        a = self.args
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ConfigError("tokens must be a 2-D tensor (batch, seq_len)", field="tokens")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"tokens must be integers, got {tokens.dtype}", field="tokens")
        B, S = tokens.shape
        if B == 0 or S == 0:
            raise ConfigError(
                f"empty input: batch={B}, seq_len={S}; both must be >= 1", field="tokens"
            )
        if B > a.max_batch_size:
            raise ConfigError(
                f"batch={B} exceeds max_batch_size={a.max_batch_size}; allowed: 1..{a.max_batch_size}",
                field="max_batch_size",
            )
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ConfigError(f"start_pos={start_pos!r} must be an integer >= 0", field="start_pos")
        if start_pos + S > a.max_seq_len:
            raise ConfigError(
                f"start_pos + seq_len = {start_pos + S} exceeds max_seq_len={a.max_seq_len}",
                field="max_seq_len",
            )
        if start_pos > 0:
            fb, ft = self._filled
            if B > fb or start_pos > ft:
                raise ConfigError(
                    f"start_pos={start_pos} with batch={B} needs a KV cache holding positions "
                    f"0..{start_pos - 1} for that batch (cache holds batch {fb} x {ft}); "
                    f"run a forward from start_pos=0 first",
                    field="start_pos",
                )
        if ids:
            self._check_ids_of(tokens)

    def _check_ids_of(self, tokens: torch.Tensor) -> None:
        if tokens.device.type != "meta":
            self._check_ids(*torch.stack(torch.aminmax(tokens)).tolist())  # one sync, not two

    def _check_ids(self, lo: int, hi: int) -> None:
        """The least and greatest token id of an input against the vocabulary."""
        if lo < 0 or hi >= self.args.vocab_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"token id {bad} is outside the vocabulary; allowed: 0..{self.args.vocab_size - 1}",
                field="tokens",
            )

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        all_logits: bool = False,
        full: bool = False,
        mtp: bool = False,
    ):
        """tokens (B, S) -> logits (B, vocab) of the last position, or (B, S, vocab) with
        `all_logits`. Positions start at `start_pos`; the KV cache must hold 0..start_pos-1.

        `mtp=True` (a model with n_mtp_layers > 0, from start_pos 0, S >= 2) returns
        (logits, mtp_logits): mtp_logits[k-1] is depth k's (B, S-k, vocab), whose row i predicts
        token i+k+1 from the hidden state of position i and tokens i+1..i+k (depth 1: token
        t+2 from position t; see `MTPBlock`).

        For last-position logits the last layer computes only what they need: keys and values of
        every position (the cache gets them all, so decoding continues exactly), queries,
        attention output and feed-forward of the last position alone (almost 1/n_layers of the
        work: the last layer still projects and caches every position's keys and values).
        `full=True` runs every layer on every position, for instrumentation that reads the last
        layer's routing or module outputs (dsv3.stats, the app)."""
        self._check_input(tokens, start_pos, ids=False)
        B, S = tokens.shape
        if mtp:
            self._check_mtp(S, start_pos)
        graphs = not mtp and self.graphs.usable()  # CUDA: replay a captured graph (graphs.py)
        # A decode step's graph replays ids clamped into the vocabulary, and their range is
        # read back after the replay is queued: on a GPU reading them waits for the ids (the
        # last step's output), so checking first would leave the GPU idle for all of this
        # call's host work. A step that fails the check wrote only its own cache position.
        deferred = graphs and S == 1 and start_pos > 0
        if not deferred:
            self._check_ids_of(tokens)
        tokens = tokens.to(self.device)
        out = None
        if deferred:
            bounds = self.graphs.id_bounds(tokens)
            out = self.graphs.decode(tokens, start_pos)
            try:
                self._check_ids(*bounds())
            except ConfigError:
                if out is not None:  # replayed: its position now holds the clamped ids' keys
                    fb, ft = self._filled
                    self._filled = (fb, min(ft, start_pos))
                raise
        elif graphs and start_pos == 0:
            out = self.graphs.prefill(tokens, all_logits, full)
        if out is None:
            out = self._forward(tokens, start_pos, all_logits, full, mtp)
            self.graphs.last = None  # the modules' instrumentation is this forward's now
        self._filled = (B, start_pos + S)
        return out

    def _check_mtp(self, seq_len: int, start_pos: int) -> None:
        if not len(self.mtp):
            raise ConfigError("this model has no MTP module (n_mtp_layers=0)", field="n_mtp_layers")
        if start_pos != 0 or seq_len <= len(self.mtp):
            raise ConfigError(
                f"mtp=True runs on a whole sequence from start_pos 0 with more than "
                f"n_mtp_layers={len(self.mtp)} tokens (got start_pos={start_pos}, "
                f"seq_len={seq_len})",
                field="start_pos",
            )

    def _forward(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        all_logits: bool,
        full: bool = False,
        mtp: bool = False,
    ):
        """The forward without input checks or bookkeeping (no host syncs on CUDA, so it can be
        captured in a CUDA graph: see `graphed_prefill`)."""
        cos, sin = self._rotary(tokens.device, start_pos, tokens.shape[1])
        h = self.embed(tokens)  # (B, S, D)
        prune = not (all_logits or full or mtp) and tokens.shape[1] > 1
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, cos, sin, last_only=prune and i == last)
        h = self.norm(h)
        logits = self.head(h if all_logits else h[:, -1])  # (B, S, V) or (B, V)
        if not mtp:
            return logits
        mtp_logits = []
        for k, block in enumerate(self.mtp.values(), start=1):
            # depth k: positions 0..S-k-1 with tokens k..S-1 (the hidden state of position i
            # meets the embedding of token i+k), predicting tokens k+1..S
            n = tokens.shape[1] - k
            h = block(h[:, :n], self.embed(tokens[:, k:]), 0, cos[:n], sin[:n])  # (B, n, D)
            mtp_logits.append(self.head(h))
        return logits, mtp_logits

    @torch.inference_mode()
    def graphed_prefill(self, batch: int, seq_len: int, all_logits: bool = False):
        """A CUDA-graph replay of the prefill of (batch, seq_len) tokens from position 0, of any
        size (`forward` replays graphs by itself for prefills up to
        `dsv3.graphs.PREFILL_MAX_TOKENS` tokens). Captured now; returns `run(tokens) -> logits`
        (every layer on every position, as `full=True`). The graph lives in `self.graphs`,
        which captures it again if the KV cache is reallocated. CUDA only."""
        if self.device.type != "cuda":
            raise ConfigError("graphed_prefill needs a model on CUDA", field="device")
        why = self.graphs.reason()
        if why is not None:
            raise ConfigError(f"this model's forward cannot be captured: {why}", field="dtype")
        static = torch.zeros(batch, seq_len, dtype=torch.long, device=self.device)
        self._check_input(static, 0)

        def run(tokens: torch.Tensor) -> torch.Tensor:
            self._check_input(tokens, 0)
            if tuple(tokens.shape) != (batch, seq_len):
                raise ConfigError(
                    f"this graph runs tokens of shape ({batch}, {seq_len}), got "
                    f"{tuple(tokens.shape)}",
                    field="tokens",
                )
            with torch.inference_mode():
                out = self.graphs.prefill(tokens.to(self.device), all_logits, True, force=True)
            if out is None:
                raise ConfigError(
                    f"this model's forward cannot be captured in a CUDA graph: {self.graphs.note}",
                    field="dtype",
                )
            self._filled = (batch, seq_len)
            return out

        self.reset_cache()
        run(static)  # capture now: a model that cannot be captured says so here
        return run


def init_globals(model) -> None:
    """Embedding, final norm and head of `model` (anything with those three attributes)."""
    model.embed.weight.normal_(0.0, 1.0)
    model.norm.weight.fill_(1.0)
    _init_linear(model.head, 1.0)


def init_block(block: Block, resid: float, scale_fmt: str | None = None) -> None:
    """One block's weights, as the table in `Transformer.init_weights` says (`scale_fmt`: that
    of fp8 scales, `ModelArgs.scale_fmt`)."""
    for name, mod in block.named_modules():
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, LayerNorm):
            mod.weight.fill_(1.0)
            mod.bias.zero_()
        elif isinstance(mod, Linear):
            _init_linear(mod, resid if name.endswith(("wo", "w2")) else 1.0, scale_fmt)
    ffn = block.ffn
    if isinstance(ffn, MoE):
        ffn.gate.weight.normal_(0.0, 1.0 / math.sqrt(ffn.dim))
        if ffn.gate.bias is not None:
            ffn.gate.bias.zero_()
        ex = ffn.experts
        for name in ("w1", "w2", "w3"):
            w = getattr(ex, name)
            std = (resid if name == "w2" else 1.0) / math.sqrt(w.shape[-1])
            if w.dtype == FP8:
                for e in range(ex.n_experts):  # one expert at a time bounds temp memory
                    t = torch.empty(w.shape[1:], device=w.device).normal_(0, std)
                    q, s = quantize_fp8(t, scale_fmt)
                    w[e].copy_(q)
                    getattr(ex, f"{name}_scale")[e].copy_(s)
            else:
                normal_stack_(w, std)


def normal_stack_(w: torch.Tensor, std: float) -> None:
    """`w.normal_(0, std)` for a stack (E, out, in) in any layout, with the values a contiguous
    one gets from the same seed: an in-major CPU stack (`moe.expert_layout`) is filled one
    expert at a time through a contiguous temporary where that draws the same numbers (CPU
    normal_ fills float32 in blocks of 16, so whole-block experts continue one stream), else
    through a temporary the size of the stack."""
    if w.is_contiguous():
        w.normal_(0.0, std)
        return
    per = w[0].numel()
    if w.device.type == "cpu" and w.dtype == torch.float32 and per % 16 == 0:
        t = torch.empty(w.shape[1:], dtype=w.dtype)
        for e in range(w.shape[0]):
            w[e].copy_(t.normal_(0.0, std))
        return
    w.copy_(torch.empty(w.shape, dtype=w.dtype, device=w.device).normal_(0.0, std))


def _init_linear(mod: Linear, gain: float, scale_fmt: str | None = None) -> None:
    std = gain / math.sqrt(mod.in_features)
    if mod.weight.dtype == FP8:
        t = torch.empty(mod.weight.shape, device=mod.weight.device).normal_(0, std)
        q, s = quantize_fp8(t, scale_fmt)
        mod.weight.copy_(q)
        mod.scale.copy_(s)
    else:
        mod.weight.normal_(0.0, std)
    if mod.bias is not None:
        mod.bias.zero_()
