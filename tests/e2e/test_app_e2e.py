"""End to end through HTTP: the real app launched in-process, driven with gradio_client.

tiny preset -> estimate -> build -> forward -> every figure comes back with data; the 671B preset
on meta gives shapes; a bad preset upload gives a clear error and the session keeps working.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

PUBLIC = {"presets", "preset", "estimate", "build", "forward", "rotary", "import_config"}


@pytest.fixture
def client(url) -> Client:
    return Client(url, verbose=False)  # one client = one session (its own gr.State)


def traces(plot: dict) -> list[dict]:
    """A gr.Plot value from the API -> the plotly traces."""
    assert plot["type"] == "plotly"
    return json.loads(plot["plot"])["data"]


def layout(plot: dict) -> dict:
    return json.loads(plot["plot"])["layout"]


def array(v):
    """Plotly JSON arrays may be typed ({"dtype", "bdata", "shape"}); -> numpy."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if isinstance(shape, str):  # plotly writes "3, 8"
            shape = [int(n) for n in shape.split(",")]
        return a.reshape(shape) if shape else a
    return np.asarray(v, dtype=float)


def test_api_names(client):
    names = {n.lstrip("/") for n in client.view_api(return_format="dict")["named_endpoints"]}
    assert PUBLIC <= names
    assert not any(n.startswith("_step") for n in names)


def test_tiny_estimate_build_forward_rotary(client):
    names = client.predict(api_name="/presets")
    assert names[0] == "tiny"
    cfg, msg = client.predict("tiny", api_name="/preset")
    assert cfg["n_layers"] == 4 and "tiny" in msg

    md, table, layer_map, params = client.predict(cfg, "cpu", "fp32", 1, 0, 1, api_name="/estimate")
    assert "387,416 parameters" in md and "fits" in md
    assert len(table["data"]) == 4
    assert traces(layer_map)[0]["y"] and layout(layer_map)["height"]
    assert sum(array(t["y"]).sum() for t in traces(params) if t.get("orientation") != "h") > 0

    msg, info = client.predict(cfg, "cpu", "fp32", 0, api_name="/build")
    assert info["ok"] and info["device"] == "cpu", msg

    md, info, trace_df, trace_fig, heat, balance, balance_df = client.predict(
        2, 16, 0, "", 2, api_name="/forward"
    )
    assert info["ok"], md
    assert info["output_shape"] == [2, 1024] and info["decode_steps"] == 2
    # how the forwards ran: on this CPU machine eagerly (a CUDA server says "CUDA graphs ..."),
    # the server's first run of these shapes measuring its kernel choices (dsv3.tuning)
    assert info["prefill_how"].startswith("eager") and "tokens/s** (eager" in md
    z = array(traces(heat)[0]["z"])  # load over the uniform share; the dense layer 0 is empty
    uniform = [r["n_tokens"] * r["topk"] / r["n_experts"] for r in info["routing"]]
    rel = [[c / u for c in r["counts"]] for r, u in zip(info["routing"], uniform)]
    assert np.allclose(z[1:], rel) and np.isnan(z[0]).all()
    assert len(trace_df["data"]) == info["trace_len"]
    assert sum(len(t["x"]) for t in traces(trace_fig)) == info["trace_len"]
    assert {t.get("yaxis") for t in traces(balance)} >= {"y", "y2", "y3"}  # one metric an axis
    assert len(balance_df["data"]) == 3
    for fig in (heat, balance, trace_fig):
        assert layout(fig)["height"]

    path, msg = client.predict(api_name="/export_weights")
    assert path and path.endswith(".safetensors") and "MiB" in msg, msg

    freqs, tables, cos, sin, md = client.predict(cfg, 32, api_name="/rotary")
    names = {t.get("name") for t in traces(freqs)}
    assert "plain rotary" in names and any(n and n.startswith("YaRN") for n in names)
    assert len(cos["data"]) == 32 and "mscale" in md
    assert [t["name"] for t in traces(tables)] == ["cos", "sin"]


def test_671b_on_meta_gives_shapes(client):
    cfg, _ = client.predict("deepseek-v3-671b", api_name="/preset")
    md, *_ = client.predict(cfg, "cpu", "bf16", 1, 4096, 8, api_name="/estimate")
    assert "main model **671,026,419,200**" in md and "per GPU with 8 GPUs" in md
    msg, info = client.predict(cfg, "cpu", "bf16", 0, api_name="/build")
    assert not info["ok"] and "Not built" in msg and "meta" in msg  # refused, not attempted
    msg, info = client.predict(cfg, "meta", "bf16", 0, api_name="/build")
    assert info["ok"] and info["device"] == "meta", msg
    md, info, trace_df, trace_fig, heat, *_ = client.predict(1, 4, 0, "", 0, api_name="/forward")
    assert info["meta"] and info["output_shape"] == [1, 129280]
    assert trace_df["data"][-1][-1] == "[1, 129280]"
    assert traces(trace_fig)


def test_config_from_form_by_field_name(client):
    cfg, _ = client.predict("tiny", api_name="/preset")
    rows = {"headers": ["layer", "n_heads"], "data": [["2", "8"]]}
    new, msg = client.predict(cfg, rows, dim=128, api_name="/config_from_form")
    assert new["dim"] == 128 and new["layer_config"] == {"2": {"n_heads": 8}}, msg
    kept, msg = client.predict(new, rows, n_layers=0, api_name="/config_from_form")
    assert kept == new and "**n_layers**" in msg


def test_bad_preset_upload_then_session_still_works(client, tmp_path):
    cfg, _ = client.predict("tiny", api_name="/preset")
    client.predict(cfg, "cpu", "fp32", 0, api_name="/build")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "name": "bad", "args": {**cfg, "n_heads": 0}}))
    kept, msg = client.predict(handle_file(str(bad)), api_name="/import_config")
    assert "**n_heads**" in msg and "bad.json" in msg and "Traceback" not in msg
    bad.write_text("not json at all")
    _, msg = client.predict(handle_file(str(bad)), api_name="/import_config")
    assert "not valid JSON" in msg
    md, info, *_ = client.predict(1, 8, 0, "", 0, api_name="/forward")
    assert info["ok"] and info["output_shape"] == [1, 1024], md
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg))
    new, msg = client.predict(handle_file(str(good)), api_name="/import_config")
    assert new == cfg and msg.startswith("✔")
