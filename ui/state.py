"""The per-browser-session state kept in `gr.State`: the built model and what it was built from.

A model can be many GiB, so its lifetime is managed explicitly, in three ways together:
- a new build replaces (and frees) the previous model of the same session;
- `gr.State(time_to_live=..., delete_callback=free_session)` frees it after the session has been
  idle that long (Gradio keeps a closed tab's state for 3600 s regardless, so that alone is slow);
- `demo.unload(on_unload)` frees it as soon as the tab closes, found through `LIVE` by the
  session hash (unload handlers receive no state, only the request).
"""

from __future__ import annotations

import gc
import os
import threading
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

    def free(self) -> None:
        """Drop the model and give its memory back (CUDA cache included)."""
        was_cuda = self.device == "cuda"
        self.model = None
        self.config = None
        self.device = self.dtype = self.seed = None
        self.model_bytes = 0
        self.runs = 0
        gc.collect()
        if was_cuda:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

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


def release(session_hash: str | None) -> bool:
    """Free what the session `session_hash` holds; True if it held something."""
    with _LOCK:
        session = LIVE.pop(session_hash, None) if session_hash else None
    if session is None:
        return False
    held = session.model is not None
    session.free()
    return held
