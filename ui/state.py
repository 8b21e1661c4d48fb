"""The per-browser-session state kept in `gr.State`: the built model and what it was built from.

A model can be many GiB, so its lifetime is managed explicitly, in three ways together:
- a new build replaces (and frees) the previous model of the same session;
- `gr.State(time_to_live=..., delete_callback=free_session)` frees it after the session has been
  idle that long (Gradio keeps a closed tab's state for 3600 s regardless, so that alone is slow);
- `demo.unload(on_unload)` frees it as soon as the tab closes, found through `LIVE` by the
  session hash (unload handlers receive no state, only the request).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Seconds an idle session's model is kept (refreshed by every build/run).
SESSION_TTL_S = float(os.environ.get("DSV3_SESSION_TTL", 1800))


@dataclass
class Session:
    """What one browser session has built. `model` is None until the first build."""

    model: Any = None  # dsv3.model.Transformer
    config: dict[str, Any] | None = None  # ModelArgs.to_dict() the model was built from
    device: str | None = None  # "cpu", "cuda", "meta"
    dtype: str | None = None  # "fp32", "bf16", "fp8"
    seed: int | None = None
    build_seconds: float = 0.0
    model_bytes: int = 0  # bytes of parameters and buffers
    source: str = ""  # "build" or the imported checkpoint's name
    runs: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)  # for least-recently-used eviction

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def free(self) -> None:
        """Drop the model and give its memory back (CUDA cache included)."""
        was_cuda, held = self.device == "cuda", self.model is not None
        self.model = None
        self.config = None
        self.device = self.dtype = self.seed = None
        self.model_bytes = 0
        self.runs = 0
        if was_cuda or held:
            from dsv3.memory import release_memory

            release_memory()  # gc, CUDA cache, malloc_trim

    def summary(self) -> dict[str, Any]:
        """Plain data about the built model (for the API and the page)."""
        if self.model is None:
            return {"built": False}
        return {
            "built": True,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "source": self.source,
            "build_seconds": round(self.build_seconds, 3),
            "model_bytes": self.model_bytes,
            "n_layers": (self.config or {}).get("n_layers"),
        }


# session hash -> Session, so `demo.unload` can find what a closing tab holds.
LIVE: dict[str, Session] = {}
_LOCK = threading.Lock()


def register(session_hash: str | None, session: Session) -> None:
    if session_hash:
        with _LOCK:
            LIVE[session_hash] = session


def free_session(session: Session | None) -> None:
    """`gr.State` delete_callback: free the model and forget the session."""
    if session is None:
        return
    with _LOCK:
        for key in [k for k, v in LIVE.items() if v is session]:
            del LIVE[key]
    session.free()


def held_bytes(device: str | None = None, exclude: Session | None = None) -> int:
    """Bytes of the models live sessions hold in memory (on `device` when given; meta models
    hold none), leaving out `exclude` (a session about to replace its own model)."""
    with _LOCK:
        live = list(LIVE.values())
    return sum(
        s.model_bytes
        for s in live
        if s.model is not None
        and s is not exclude
        and s.device != "meta"
        and device in (None, s.device)
    )


def evict_lru(device: str, fits: Callable[[], bool], keep: Session | None) -> int:
    """Free other sessions' models on `device`, least recently used first, until `fits()`.

    Model work is serialised (one queue for build/forward/import), so every session but the
    one asking is idle. Returns how many models were freed; their owners are told on their next
    run."""
    freed = 0
    while not fits():
        with _LOCK:
            victims = sorted(
                (
                    s
                    for s in LIVE.values()
                    if s is not keep and s.model is not None and s.device == device
                ),
                key=lambda s: s.last_used,
            )
        if not victims:
            break
        victim = victims[0]
        victim.free()
        victim.notes["evicted"] = (
            "your model was freed to make room for another session's build (the server keeps "
            "the most recently used models); build again"
        )
        freed += 1
    return freed


def release(session_hash: str | None) -> bool:
    """Free what the session `session_hash` holds; True if it held something."""
    with _LOCK:
        session = LIVE.pop(session_hash, None) if session_hash else None
    if session is None:
        return False
    held = session.model is not None
    session.free()
    return held
