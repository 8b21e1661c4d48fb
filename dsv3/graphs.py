"""CUDA graphs for `Transformer.forward`: decode steps and small prefills replayed, not launched.

A decode step of a 32-layer model launches ~1,500 kernels; from Python that takes ~40 ms while
the GPU needs ~2-3 ms to read the weights. Replaying a captured graph launches them all at once.

- Decode (one token per row, start_pos > 0): the position is a device tensor (`StaticStep`), so
  one graph per (batch, span) serves every position below its span: span = max(256, the next
  power of two above the position), the keys attention reads (later ones masked). The KV cache
  is static while graphs use it: sized to the span, kept by `reset_cache` (`free_cache`
  releases it), grown only when a position passes its capacity (then the graphs captured on
  the old buffers are dropped and captured again).
- Prefill (start_pos 0, batch x seq_len <= PREFILL_MAX_TOKENS, where launches dominate): one
  graph per (batch, seq_len, all_logits, full), captured on first use and reused.

Each graph is captured on its first use (two eager warm-ups, which also settle the measured
kernel choices, then the capture) and kept in a small LRU. Outputs are cloned, so a later replay
never changes a tensor the caller holds. What the forward leaves on modules for the views (the
router's `last_*` tensors) is restored after each replay to that graph's tensors.

Graphs need a forward with no host sync: bf16 on sm90+ (grouped expert matmuls with device
counts) or fp8 through `dsv3.fp8`'s kernels; no DSA layer (the indexer sizes by position); one
process (no collectives); no forward hooks (they would not fire in a replay). Otherwise, or if a
capture fails, the forward runs eagerly and `note` says why.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import StaticStep

MIN_SPAN = 256  # the least span a decode graph reads (keys)
PREFILL_MAX_TOKENS = 4096  # larger prefills are not launch-bound: eager
MAX_GRAPHS = 8  # graphs kept (least recently used dropped first)
WARMUPS = 2


def span_for(end_pos: int, max_seq_len: int) -> int:
    """The decode span (keys read) for a step whose new token sits at end_pos - 1."""
    return min(max(MIN_SPAN, 1 << (end_pos - 1).bit_length()), max_seq_len)


@dataclass
class Entry:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    versions: tuple[int, ...]  # of the cache buffers the graph writes (`KVCache.version`)
    marks: list[tuple[nn.Module, str, object]] = field(default_factory=list)


class CudaGraphs:
    """The graphs of one model (`Transformer.graphs`). `enabled` turns them off (eager only)."""

    def __init__(self, model: nn.Module):
        self._ref = weakref.ref(model)  # weak: no model <-> graphs cycle keeps memory alive
        self._reason: tuple[str | None] | None = None
        self._modules: list[nn.Module] | None = None
        self._gates: list[nn.Module] | None = None
        self._cache_list: list | None = None
        self._hook_dicts: list[tuple[dict, dict]] | None = None
        self._reserved: tuple[int, ...] | None = None
        self._host_bounds: torch.Tensor | None = None  # pinned: `id_bounds` reads into it
        self.last: Entry | None = None  # the entry replayed last (its marks are in place)
        self.enabled = True
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.note: str | None = None  # why the last forward ran eagerly, if it could not replay
        self.failed: set[str] = set()  # kinds whose capture failed ("decode", "prefill")
        self.replays = 0
        self.captures = 0

    # ------------------------------------------------------------------ eligibility
    @property
    def _model_ref(self) -> nn.Module:
        return self._ref()

    def _mods(self) -> list[nn.Module]:
        if self._modules is None:  # not the model itself: that would be a reference cycle
            self._modules = list(self._model_ref.modules())[1:]
        return self._modules

    def reason(self) -> str | None:
        """Why this model cannot run from graphs at all (None: it can)."""
        if self._reason is None:
            self._reason = (self._why_not(),)
        return self._reason[0]

    def _why_not(self) -> str | None:
        m = self._model_ref
        if m.device.type != "cuda":
            return "CUDA graphs need a CUDA model"
        if m.world_size > 1:
            return "CUDA graphs run one process (no collectives)"
        if any(b.attn.indexer is not None for b in m.layers):
            return "DSA layers size their index by position: eager"
        if m.dtype_name == "fp8":
            from .fp8 import fp8_matmul_ok

            if not fp8_matmul_ok(m.device):
                return "fp8 without a fast fp8 path on this GPU: eager"
            return None
        if m.compute_dtype != torch.bfloat16:
            return (
                f"{m.dtype_name}: the expert dispatch needs the host (grouped matmuls run "
                "sync-free in bf16 only): eager"
            )
        if torch.cuda.get_device_capability(m.device)[0] < 9 and _has_moe(m):
            return "grouped expert matmuls need sm90+: eager"
        return None

    def usable(self) -> bool:
        m = self._model_ref
        if not self.enabled or m.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        if self.reason() is not None:
            return False
        if self._hook_dicts is None:  # the dicts themselves: hooks are added to them in place
            self._hook_dicts = [
                (mod._forward_hooks, mod._forward_pre_hooks) for mod in (m, *self._mods())
            ]
        return not any(a or b for a, b in self._hook_dicts)

    # ------------------------------------------------------------------ cache
    def _caches(self) -> list:
        if self._cache_list is None:
            self._cache_list = [c for b in self._model_ref.layers for c in b.attn.caches]
        return self._cache_list

    def _versions(self) -> tuple[int, ...]:
        """The identity of the cache buffers: graphs captured on them are valid while it holds."""
        return tuple(c.version for c in self._caches())

    def reserve(self, batch: int, span: int) -> None:
        """Caches of at least (batch, span), old contents kept; graphs captured on buffers that
        this replaces are dropped (they would write to freed memory)."""
        cap_b, cap_t = self._caches()[0].capacity
        span = min(span, self._model_ref.args.max_seq_len)
        if batch <= cap_b and span <= cap_t and self._reserved == self._versions():
            return  # every layer was sized together and nothing replaced them since
        before = self._versions()
        self._model_ref.reserve_cache(batch, span)
        self._reserved = self._versions()
        if self._reserved != before:
            self.clear()

    def clear(self) -> None:
        self.entries.clear()
        self.last = None

    # ------------------------------------------------------------------ run
    def decode(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        """Logits (B, vocab) of one decode step from a graph, or None (run eagerly)."""
        if "decode" in self.failed:
            return None
        m = self._model_ref
        B = tokens.shape[0]
        span = span_for(start_pos + 1, m.args.max_seq_len)
        self.reserve(B, span)

        top = m.args.vocab_size - 1  # ids are clamped: `forward` checks them after the replay

        def inputs():
            pos = torch.tensor([start_pos], dtype=torch.long, device=m.device)
            return {"tokens": tokens.long().clamp(0, top), "pos": pos}

        entry = self._entry(("decode", B, span), inputs, lambda i: _step(m, i, span))
        if entry is None:
            return None
        torch.clamp(tokens.long(), 0, top, out=entry.inputs["tokens"])
        entry.inputs["pos"].fill_(start_pos)
        return self._replay(entry)

    def id_bounds(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """-> a function giving [least, greatest] id of `tokens`. On a GPU the reduction and its
        copy to the host are queued now and waited for when it is called, so the work queued in
        between (the step's replay) keeps the GPU busy meanwhile."""
        bounds = torch.stack(torch.aminmax(tokens)).long()
        if not bounds.is_cuda:
            return bounds.tolist
        if self._host_bounds is None:
            self._host_bounds = torch.empty(2, dtype=torch.long, pin_memory=True)
        host = self._host_bounds
        host.copy_(bounds, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(bounds.device))  # the stream the copy went on

        def read() -> list[int]:
            done.synchronize()
            return host.tolist()

        return read

    def prefill(
        self, tokens: torch.Tensor, all_logits: bool, full: bool, force: bool = False
    ) -> torch.Tensor | None:
        """Logits of a prefill from position 0 replayed from a graph, or None (run eagerly).
        `force`: any size (`Transformer.graphed_prefill`), not only launch-bound ones."""
        m = self._model_ref
        B, S = tokens.shape
        if "prefill" in self.failed or (B * S > PREFILL_MAX_TOKENS and not force):
            return None
        # The span a decode after this prefill will read: no reallocation at the first step.
        self.reserve(B, span_for(S + 1, m.args.max_seq_len))
        key = ("prefill", B, S, all_logits, full)
        entry = self._entry(
            key,
            lambda: {"tokens": tokens.clone()},
            lambda i: m._forward(i["tokens"], 0, all_logits, full),
        )
        if entry is None:
            return None
        entry.inputs["tokens"].copy_(tokens)
        return self._replay(entry)

    def _entry(self, key: tuple, inputs, fn) -> Entry | None:
        """The graph for `key` (its kind, shapes and flags; the instrumentation that is on is
        added), captured now from `fn(inputs())` (`inputs` makes its static inputs) if there is
        none on the current cache buffers; None if capturing failed (run eagerly)."""
        key = (*key, self._marks_key())
        entry = self.entries.get(key)
        if entry is not None and entry.versions == self._versions():
            self.entries.move_to_end(key)
            return entry
        self.entries.pop(key, None)
        return self._capture(key[0], key, inputs(), fn)

    def _capture(self, kind: str, key: tuple, inputs: dict, fn) -> Entry | None:
        try:
            graph, out = self._record(fn, inputs)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            self.failed.add(kind)
            self.note = f"{kind} graph capture failed, running eagerly: {type(e).__name__}: {e}"
            self.note = self.note[:300]
            torch.cuda.synchronize(self._model_ref.device)
            return None
        entry = Entry(graph, inputs, out, self._versions(), self._marks())
        self.last = entry
        self.entries[key] = entry
        while len(self.entries) > MAX_GRAPHS:
            self.entries.popitem(last=False)
        self.captures += 1
        return entry

    def _record(self, fn, inputs: dict) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture `fn(inputs)` in a CUDA graph after WARMUPS eager runs on a side stream ->
        (graph, its output tensor)."""
        dev = self._model_ref.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUPS):  # lazy tables, measured kernel choices, autotuning
                fn(inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(inputs)
        return graph, out

    def _replay(self, entry: Entry) -> torch.Tensor:
        entry.graph.replay()
        if self.last is not entry:  # put this graph's instrumentation tensors in place
            for mod, name, value in entry.marks:
                mod.__dict__[name] = value  # plain attributes: skip nn.Module.__setattr__
            self.last = entry
        self.replays += 1
        self.note = None
        return entry.output.clone()

    def _marks(self) -> list[tuple[nn.Module, str, object]]:
        """The instrumentation tensors the captured forward left on modules (graph memory)."""
        return [
            (mod, name, getattr(mod, name))
            for mod in self._mods()
            for name in MARKS
            if isinstance(getattr(mod, name, None), torch.Tensor)
        ]

    def _marks_key(self) -> tuple:
        """What instrumentation is on: a graph captured without it must not serve a run with
        it (and the other way round)."""
        if self._gates is None:
            self._gates = [mod for mod in self._mods() if hasattr(mod, "keep_scores")]
        return tuple(mod.keep_scores for mod in self._gates)


def _step(m, inputs: dict[str, torch.Tensor], span: int) -> torch.Tensor:
    """One decode step at the device position inputs["pos"], reading `span` keys."""
    pos, tokens = inputs["pos"], inputs["tokens"]
    cos_t, sin_t = m._rope_tables(tokens.device)
    cos, sin = cos_t.index_select(0, pos), sin_t.index_select(0, pos)  # (1, Dr/2)
    keys = torch.arange(span, device=tokens.device)
    bias = torch.zeros(span, dtype=m.compute_dtype, device=tokens.device)
    bias.masked_fill_(keys > pos, float("-inf"))
    step = StaticStep(pos, span, bias, torch.complex(cos, sin))
    h = m.embed(tokens)  # (B, 1, D)
    for layer in m.layers:
        h = layer(h, step, cos, sin)
    return m.head(m.norm(h)[:, -1])  # (B, vocab)


MARKS = ("last_counts", "last_weights", "last_indices", "last_scores")


def _has_moe(m: nn.Module) -> bool:
    from .moe import MoE

    return any(isinstance(b.ffn, MoE) for b in m.layers)
