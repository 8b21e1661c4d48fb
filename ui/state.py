"""Per-session state and the server's memory policy: what each browser session holds, and who
may take memory from whom.

A model can be many GiB, so its lifetime is managed explicitly, in three ways together:
- a new build or import replaces (and frees) the previous model of the same session;
- `gr.State(time_to_live=..., delete_callback=free_session)` frees it after the session has been
  idle that long (Gradio keeps a closed tab's state for 3600 s regardless, so that alone is slow);
- `demo.unload(on_unload)` frees it as soon as the tab closes, found through `LIVE` by the
  session hash (unload handlers receive no state, only the request).

The policy (`make_room`): a request that does not fit may free other sessions' *idle* models,
oldest first, but only when freeing them makes it fit; a request that would not fit even with
every idle model freed is refused and frees nobody.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dsv3 import memory
from dsv3.params import human_bytes

from . import settings

EVICTED_NOTE = (
    "your model was freed to make room for another session's build (the server keeps the most "
    "recently used models); build again"
)


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
    copy_bytes: int = 0  # bf16 copies of fp8 weights kept on a GPU without an fp8 path
    source: str = ""  # "build", "zerogpu" or what was imported
    built_at: str = ""  # wall-clock time of the build, shown beside runs
    runs: int = 0
    last_run: dict[str, Any] = field(default_factory=dict)  # the views' data of the last run
    exported: str = ""  # the file the last export of this model wrote
    notes: dict[str, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)  # for oldest-first eviction
    busy: int = 0  # requests of this session in progress: never evicted meanwhile

    @property
    def held(self) -> int:
        """Bytes the session's model holds on its device: weights and any kept copies."""
        return self.model_bytes + self.copy_bytes

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @contextmanager
    def in_use(self):
        """Mark the session busy (not evictable) while a request works with its model."""
        self.busy += 1
        try:
            yield self
        finally:
            self.busy -= 1
            self.touch()

    def free(self) -> None:
        """Drop the model and give its memory back (CUDA cache included)."""
        was_cuda, held = self.device == "cuda", self.model is not None
        self.model = None
        self.config = None
        self.device = self.dtype = self.seed = None
        self.model_bytes = self.copy_bytes = 0
        self.runs = 0
        self.last_run = {}
        self.exported = ""
        self.source = self.built_at = ""
        if was_cuda or held:
            memory.release_memory()  # gc, CUDA cache, malloc_trim

    def summary(self) -> dict[str, Any]:
        """Plain data about the built model (for the API and the page)."""
        if self.model is None and self.source != "zerogpu":
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


def held_bytes(device: str | None = None, exclude: Session | None = None) -> int:
    """Bytes of the models live sessions hold (on `device` when given; meta models hold none),
    leaving out `exclude` (a session about to replace its own model)."""
    with _LOCK:
        live = list(LIVE.values())
    return sum(
        s.held
        for s in live
        if s.model is not None
        and s is not exclude
        and s.device != "meta"
        and device in (None, s.device)
    )


def _idle_victims(device: str, keep: Session | None) -> list[Session]:
    """Other sessions' idle models on `device`, least recently used first."""
    with _LOCK:
        live = list(LIVE.values())
    return sorted(
        (
            s
            for s in live
            if s is not keep
            and s.model is not None
            and s.device == device
            and s.busy == 0
            and s.held > 0
        ),
        key=lambda s: s.last_used,
    )


def fits(nbytes: float, device: str, session: Session | None, freed: int = 0) -> tuple[bool, str]:
    """Whether `nbytes` more fit on `device` for `session`, were `freed` bytes of other models
    dropped first: the device's budget (dsv3.memory) and the server-wide cap on what all
    sessions' models hold together (DSV3_SERVER_MEMORY). `session`'s own model does not count:
    a new build or import replaces it (its bytes count as freed on the device)."""
    if device == "meta":
        return True, "meta device: nothing is allocated"
    own = session.held if session is not None and session.device == device else 0
    note = memory.FREED_NOTE
    if own and freed:  # this session's model, which a build or import replaces, and others'
        note = (
            f"that this session's model ({human_bytes(own)}, replaced) and freeing idle models "
            f"({human_bytes(freed)}) would return"
        )
    elif own:
        note = "that this session's model, which the new one replaces, holds"
    ok, reason = memory.check_fits(nbytes, device, freed=freed + own, freed_note=note)
    cap = settings.SERVER_MEMORY
    if ok and cap is not None:
        held = held_bytes(exclude=session) - freed
        if held + nbytes > cap:
            return False, (
                f"needs {human_bytes(nbytes)} but the sessions' models already hold "
                f"{human_bytes(held)} of the server's {human_bytes(cap)} (DSV3_SERVER_MEMORY)"
            )
    return ok, reason


def make_room(nbytes: float, device: str, session: Session | None) -> tuple[bool, str, int]:
    """-> (fits, reason, how many idle models were freed).

    Frees other sessions' idle models, oldest first, only when that makes the request fit: a
    request that does not fit even with every idle model freed frees nobody. Model work is
    serialised (one queue for build, run and import), so the models of other sessions are
    idle unless marked busy."""
    ok, reason = fits(nbytes, device, session)
    if ok:
        return True, reason, 0
    victims = _idle_victims(device, session)
    if not victims or not fits(nbytes, device, session, sum(v.held for v in victims))[0]:
        return False, reason, 0  # even freeing every idle model would not help: free nobody
    needed, freed = [], 0
    for v in victims:  # the shortest oldest-first prefix that makes it fit
        needed.append(v)
        freed += v.held
        if fits(nbytes, device, session, freed)[0]:
            break
    for v in needed:
        v.free()
        v.notes["evicted"] = EVICTED_NOTE
    ok, reason = fits(nbytes, device, session)
    return ok, reason, len(needed)
