"""Sessions under load: isolation, freeing, eviction of idle models, concurrent clients."""

from __future__ import annotations

import pytest

from ui import settings, state
from ui.state import Session
from ui.tabs import configure, run


def _build(session: Session, seed: int, preset: str = "tiny") -> tuple[Session, str, dict]:
    cfg, _ = configure.load_preset(preset)
    return run.build(cfg, "cpu", "fp32", seed, session, None, progress=lambda *a, **k: None)


class _Req:
    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def test_server_budget_evicts_least_recently_used_idle_model(monkeypatch):
    one = _build(Session(), 0)[0].model_bytes
    monkeypatch.setattr(settings, "SERVER_MEMORY", int(one * 2.5))  # room for two tiny models
    state.LIVE.clear()
    a, b, c = Session(), Session(), Session()
    for s, name, seed in ((a, "a", 1), (b, "b", 2), (c, "c", 3)):
        cfg, _ = configure.load_preset("tiny")
        s, msg, info = run.build(
            cfg, "cpu", "fp32", seed, s, request=_Req(name), progress=lambda *a, **k: None
        )
        assert info["ok"], msg
        if name == "b":
            # a is used again after b was built: b is now the least recently used
            assert run.forward(a, 1, 4, 0, "", 0)[2]["ok"]
    assert a.model is not None and c.model is not None
    assert b.model is None and "freed to make room" in b.notes["evicted"]
    msg = run.forward(b, 1, 4, 0, "", 0)[1]
    assert "freed to make room" in msg and "build again" in msg
    assert state.held_bytes() <= int(one * 2.5)
    state.LIVE.clear()


def test_refused_build_keeps_previous_model(monkeypatch):
    s, _, info = _build(Session(), 0)
    model = s.model
    monkeypatch.setenv("DSV3_MEMORY_LIMIT", "1KiB")
    s, msg, info = _build(s, 1, "small")
    assert not info["ok"] and "Not built" in msg and "previous model is kept" in msg
    assert s.model is model


def test_release_endpoint_frees():
    s, _, _ = _build(Session(), 0)
    s, msg = run.release_model(s)
    assert s.model is None and "freed" in msg
    assert run.release_model(s)[1] == "nothing to free"


@pytest.mark.slow
def test_concurrent_clients_are_isolated_and_memory_returns():
    """A small version of benchmarks/load.py: 4 concurrent sessions, own seeds, own models."""
    pytest.importorskip("gradio_client")
    from benchmarks.load import run, table

    r = run(sessions=4, presets=("tiny",), forwards=2)
    print(table(r))
    assert not r["failures"], r["failures"]
    assert r["sessions_stable"] and r["sessions_distinct"]
    assert r["rss_end_ratio"] <= 1.10
