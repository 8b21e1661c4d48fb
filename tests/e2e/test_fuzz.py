"""Fuzzing every public endpoint over HTTP: wrong types, None, NaN, ±inf, huge ints, long
strings, nested JSON, missing files. Every call must come back as an answer (a message naming
what was wrong), never an exception, and after every refused call the session must hold the same
model built from the same config."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from ui.components import NOT_A_FILE  # noqa: E402

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    # JSON carries no NaN/inf numbers: a client sends them as text
    st.sampled_from([0.5, 2.5, -1.0, 1e300, -1e300, 0, -1, 2**63, 1e-300]),
    st.text(max_size=30),
    st.sampled_from(
        ["", " ", "abc", "1e400", "2.5", "NaN", "inf", "-Infinity", "<b>x</b>", "x" * 5000, "4"]
    ),
    st.recursive(
        st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=8,
    ),
)


def config_junk(valid: dict) -> st.SearchStrategy:
    """Configs: junk, or the valid tiny config with one field made junk (or one extra key)."""
    keys = sorted(valid)
    one_bad = st.tuples(st.sampled_from(keys + ["nope", "layer_config"]), JUNK).map(
        lambda kv: {**valid, kv[0]: kv[1]}
    )
    return st.one_of(JUNK, one_bad)


# Endpoints that read or change the session (the others only list things); their parameters
# come from the app's own API description.
ENDPOINTS = [
    "/preset",
    "/estimate",
    "/speed",
    "/rotary",
    "/config_from_form",
    "/build",
    "/forward",
    "/browser_save",
    "/browser_load",
    "/browser_delete",
    "/export_config",
    "/import_config",
    "/export_weights",
    "/import_hf",
]
WITH_CONFIG = {"/estimate", "/speed", "/rotary", "/build", "/browser_save", "/export_config"}
FILES = {"/import_config", "/import_hf"}


@pytest.fixture(scope="module")
def fuzz_client(url):
    c = Client(url, verbose=False)
    cfg, _ = c.predict("tiny", api_name="/preset")
    msg, info = c.predict(cfg, "cpu", "fp32", 0, api_name="/build")
    assert info["ok"], msg
    api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(ENDPOINTS) <= set(api)
    arity = {n: len(api[n]["parameters"]) for n in ENDPOINTS}
    return _Fuzz(c, cfg, arity, [c.predict(api_name="/session")])


class _Fuzz(tuple):
    """(client, config, arity, [the session as last seen]) with a short repr for hypothesis'
    reports."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return "<fuzz client>"


def _status(result) -> str:
    """The endpoint's status line: its first string output."""
    items = result if isinstance(result, (list, tuple)) else [result]
    return next((x for x in items if isinstance(x, str) and x[:1] in "✔⚠✘n"), "")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_endpoint_answers_junk_with_a_message(fuzz_client, data):
    client, cfg, arity, seen = fuzz_client
    before = seen[0]
    name = data.draw(st.sampled_from(ENDPOINTS))
    args = [data.draw(JUNK) for _ in range(arity[name])]
    if name in WITH_CONFIG or name == "/config_from_form":
        args[0] = data.draw(config_junk(cfg))
    if name in FILES:  # a missing or unreadable file
        args[0] = data.draw(st.sampled_from([None, [], "nope.json", {"path": "/nonexistent"}]))
    if name == "/forward":
        args[3] = data.draw(st.one_of(st.text(max_size=40), JUNK))
    try:
        result = client.predict(*args, api_name=name)
    except Exception as e:  # an error event instead of an answer: only "not a file" may be one
        if name in FILES and NOT_A_FILE in str(e):
            result = ["⚠ " + str(e)]
        else:
            pytest.fail(f"{name}{tuple(args)!r:.300} raised {type(e).__name__}: {e}")
    status = _status(result)
    assert "Traceback" not in str(result)[:20000]
    after = client.predict(api_name="/session")
    if not status.startswith("✔"):
        assert after["model_id"] == before["model_id"], (name, args, status)
        assert after["config"] == before["config"], (name, args, status)
    elif after["model_id"] != before["model_id"]:  # a valid build: restore the tiny model
        client.predict(cfg, "cpu", "fp32", 0, api_name="/build")
        after = client.predict(api_name="/session")
    seen[0] = after
