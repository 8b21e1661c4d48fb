"""The server's memory policy with three sessions over the API: a request that cannot fit even
with every idle model freed frees nobody; one that fits once the oldest idle model is freed
frees that one only."""

from __future__ import annotations

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402


@pytest.fixture
def three(url, monkeypatch):
    """Sessions A (tiny fp32, built first), B (tiny bf16) and C, under a server cap of 2.2x a
    tiny fp32 model: A + B fit, A + B + another tiny fp32 do not."""
    from ui import settings, state

    a, b, c = (Client(url, verbose=False) for _ in range(3))
    cfg, _ = a.predict("tiny", api_name="/preset")
    monkeypatch.setattr(settings, "SERVER_MEMORY", None)
    state.LIVE.clear()  # sessions of other tests: not part of this server's story
    msg, info = a.predict(cfg, "cpu", "fp32", 0, api_name="/build")
    assert info["ok"], msg
    tiny = info["model_bytes"]
    monkeypatch.setattr(settings, "SERVER_MEMORY", int(tiny * 2.2))
    msg, info = b.predict(cfg, "cpu", "bf16", 0, api_name="/build")
    assert info["ok"] and "freed" not in msg, msg
    yield a, b, c, cfg
    state.LIVE.clear()


def _held(client: Client) -> int | None:
    return client.predict(api_name="/session")["model_id"]


def test_a_request_too_big_for_everyone_frees_nobody(three):
    a, b, c, _ = three
    ids = _held(a), _held(b)
    big, _ = c.predict("small", api_name="/preset")  # 117M params: over the cap on its own
    msg, info = c.predict(big, "cpu", "fp32", 0, api_name="/build")
    assert not info["ok"] and "Not built" in msg and "no other session's model freed" in msg
    assert (_held(a), _held(b)) == ids  # both models are still there
    md, run, *_ = a.predict(1, 4, 0, "", 0, api_name="/forward")
    assert run["ok"], md


def test_a_request_that_fits_after_one_eviction_frees_only_the_oldest(three):
    a, b, c, cfg = three
    kept = _held(b)
    msg, info = c.predict(cfg, "cpu", "fp32", 1, api_name="/build")
    assert info["ok"] and "freed 1 idle session model" in msg, msg
    assert _held(a) is None and _held(b) == kept  # A was the least recently used
    md, run, *_ = a.predict(1, 4, 0, "", 0, api_name="/forward")
    assert not run["ok"] and "freed to make room" in md and "build again" in md
    md, run, *_ = b.predict(1, 4, 0, "", 0, api_name="/forward")
    assert run["ok"], md
