"""ui.tabs / ui.fields / ui.state / ui.runtime as plain Python: values in, data out.

Bad input must come back as a message naming the field (and layer) while the previous config and
model are kept; figures must carry the numbers dsv3 computed.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from dsv3 import ConfigError, ModelArgs, presets
from dsv3.config import LAYER_FIELDS
from ui import fields, layout, runtime, settings
from ui.state import LIVE, Session, free_session, release
from ui.tabs import configure, estimate, inspect, run
from ui.tabs import files as files_tab

NO_PROGRESS = lambda *a, **k: None  # noqa: E731


def blank_row() -> list[str]:
    return [""] * len(fields.TABLE_COLUMNS)


def row(layer, **over) -> list[list[str]]:
    """The override table's rows for one layer: (layer, field, value) each."""
    return [[str(layer), k, v] for k, v in over.items()]


@pytest.fixture(scope="module")
def tiny_cfg() -> dict:
    return configure.initial_config()


@pytest.fixture(scope="module")
def built(tiny_cfg) -> Session:
    session, msg, info = run.build(tiny_cfg, "cpu", "fp32", 0, None, progress=NO_PROGRESS)
    assert info["ok"], msg
    return session


# ---------------------------------------------------------------------- fields
def test_form_covers_every_model_field_once():
    names = [f.name for f in dataclasses.fields(ModelArgs) if f.name != "layer_config"]
    assert sorted(fields.FORM_FIELDS) == sorted(names)
    assert len(set(fields.FORM_FIELDS)) == len(fields.FORM_FIELDS)
    assert fields.OVERRIDE_COLUMNS == ["layer", *LAYER_FIELDS]


def test_info_texts_carry_the_allowed_range():
    assert "1..1024" in fields.info("n_heads") and "(per-layer)" in fields.info("n_heads")
    assert "> 0" in fields.info("route_scale")
    assert "softmax | sigmoid" in fields.info("score_func")
    assert "auto | true | false" in fields.info("gate_bias")


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_round_trips_through_the_form(name):
    cfg = presets.load(name).to_dict()
    values, rows = fields.dict_to_form(cfg)
    assert fields.form_to_dict(values, rows) == cfg


def test_override_cells_arrive_as_strings_and_are_coerced(tiny_cfg):
    values, _ = fields.dict_to_form(tiny_cfg)
    rows = [
        *row(2, n_heads="8", route_scale="1.5", gate_bias="false", score_func="softmax"),
        *row(" 3 ", ffn="dense", inter_dim="64.0", gate_bias="auto"),
        blank_row(),
        [None] * len(fields.TABLE_COLUMNS),
    ]
    cfg = fields.form_to_dict(values, rows)
    assert cfg["layer_config"] == {
        "2": {"n_heads": 8, "route_scale": 1.5, "gate_bias": False, "score_func": "softmax"},
        "3": {"ffn": "dense", "inter_dim": 64, "gate_bias": None},
    }
    args = ModelArgs.from_dict(cfg)
    assert args.for_layer(2).n_heads == 8 and args.for_layer(3).ffn == "dense"
    # and back to rows: blank = inherit
    back = fields.overrides_to_rows(args.layer_config)
    assert ["2", "n_heads", "8"] in back and ["3", "gate_bias", "auto"] in back
    assert not any(r[:2] == ["2", "inter_dim"] for r in back)
    assert back[-1] == blank_row()
    assert fields.parse_overrides(back) == args.layer_config


@pytest.mark.parametrize(
    "rows, field, layer",
    [
        (row(2, n_heads="many"), "n_heads", 2),
        (row(2, n_heads="2.5"), "n_heads", 2),
        (row(1, n_heads="0"), "n_heads", 1),
        (row(3, gate_bias="maybe"), "gate_bias", 3),
        (row(9, n_heads="2"), "layer_config", 9),
        (row("", n_heads="2"), "layer_config", None),
        (row(1, n_heads="2") + row(1, n_heads="8"), "n_heads", 1),
        (row(1, n_heds="2"), "layer_config", 1),
        (row(1, n_heads=""), "n_heads", 1),
        (row(2, n_routed_experts="7"), "n_routed_experts", 2),
    ],
)
def test_bad_overrides_name_field_and_layer(tiny_cfg, rows, field, layer):
    values, _ = fields.dict_to_form(tiny_cfg)
    new, msg, err = configure.form_changed(tiny_cfg, rows, **dict(zip(fields.FORM_FIELDS, values)))
    assert new is tiny_cfg and err == msg  # the last valid config is kept, the error marked
    assert msg.startswith("⚠") and f"**{field}**" in msg
    if layer is not None:
        assert f"layer **{layer}**" in msg


def test_override_table_columns_by_name(tiny_cfg):
    import pandas as pd

    table = pd.DataFrame([["8", "2"], ["", ""]], columns=["n_heads", "layer"])
    assert fields.parse_overrides(table) == {2: {"n_heads": 8}}
    assert fields.parse_overrides({"headers": ["layer", "ffn"], "data": [[3, "dense"]]}) == {
        3: {"ffn": "dense"}
    }
    with pytest.raises(ConfigError, match="'dim' is not a per-layer field"):
        fields.parse_overrides({"headers": ["layer", "dim"], "data": [[1, 8]]})
    with pytest.raises(ConfigError, match="column 'Header 4' is not one of them"):
        fields.parse_overrides(
            {"headers": ["layer", "field", "value", "Header 4"], "data": [[1, "n_heads", 8, 2]]}
        )
    long = {"headers": ["layer", "field", "value"], "data": [["1", "n_heads", "8"]]}
    assert fields.parse_overrides(long) == {1: {"n_heads": 8}}


def test_bad_global_field_keeps_previous_config(tiny_cfg):
    values, rows = fields.dict_to_form(tiny_cfg)
    values[fields.FORM_FIELDS.index("n_dense_layers")] = 99
    new, msg, err = configure.form_changed(tiny_cfg, rows, **dict(zip(fields.FORM_FIELDS, values)))
    assert new is tiny_cfg and "**n_dense_layers**" in msg and err
    values[fields.FORM_FIELDS.index("n_dense_layers")] = None  # a cleared Number
    new, msg, err = configure.form_changed(tiny_cfg, rows, **dict(zip(fields.FORM_FIELDS, values)))
    assert new is tiny_cfg and "is empty" in msg
    values[fields.FORM_FIELDS.index("n_dense_layers")] = 2.0  # Numbers may send floats
    new, msg, err = configure.form_changed(tiny_cfg, rows, **dict(zip(fields.FORM_FIELDS, values)))
    assert new["n_dense_layers"] == 2 and msg.startswith("✔") and err == ""


# ---------------------------------------------------------------------- presets
def test_presets_list_and_load():
    names = configure.list_presets()
    assert names[0] == "tiny" and "deepseek-v3-671b" in names
    cfg, msg = configure.load_preset("deepseek-v3-671b")
    assert cfg["dim"] == 7168 and "671.03B" in msg
    skip, msg = configure.load_preset("nope")
    assert "**preset**" in msg and "choose one of tiny" in msg


def test_config_to_form_fills_every_widget_and_the_table(tiny_cfg):
    out = configure.config_to_form(presets.load("mixed-layers").to_dict())
    assert len(out) == len(fields.FORM_FIELDS) + 3
    assert out[fields.FORM_FIELDS.index("gate_bias")] == "true"
    assert out[fields.FORM_FIELDS.index("scale_fmt")] == "none"
    layers = [r[0] for r in out[-3] if r[0]]
    assert sorted(set(layers), key=int) == ["2", "3", "4", "5", "6", "7"]
    assert out[-3][-fields.BLANK_ROWS :] == [blank_row()] * fields.BLANK_ROWS
    assert "overrides on 6 layers" in out[-2] and out[-1] == ""


# ---------------------------------------------------------------------- estimate and rotary
def test_estimate_tiny(tiny_cfg):
    md, table, layer_map, params = estimate.estimate(tiny_cfg, "cpu", "fp32", 2, 64, 1)
    assert "parameters" in md and "active" in md and "per token" in md
    assert "fits" in md and "naive" in md and "absorb (configured)" in md
    assert len(table) == tiny_cfg["n_layers"] and "params" in table.columns
    assert layer_map.layout.height and params.layout.height


def test_estimate_671b_is_fast_and_reports_per_gpu():
    cfg, _ = configure.load_preset("deepseek-v3-671b")
    t0 = time.perf_counter()
    md, table, *_ = estimate.estimate(cfg, "cpu", "bf16", 1, 4096, 8)
    assert time.perf_counter() - t0 < 3.0
    assert "main model **671,026,419,200**" in md
    assert "per GPU with 8 GPUs" in md and "does not fit" in md
    assert len(table) == 61 + 1  # its 61 layers and the MTP module


def test_estimate_bad_input_is_a_message(tiny_cfg):
    md, *rest = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 10**6, 1)
    assert md.startswith("⚠") and "max_seq_len" in md
    md, *rest = estimate.estimate({**tiny_cfg, "dim": 0}, "cpu", "fp32", 1, 0, 1)
    assert "**dim**" in md


def test_rotary_handler(tiny_cfg):
    freqs, tables, cos, sin, md = inspect.rotary(tiny_cfg, 16)
    assert {t.name for t in freqs.data} >= {"plain rotary", "ramp"}
    assert any(t.name.startswith("YaRN") for t in freqs.data if t.name)
    assert len(cos) == 16 and list(cos.columns)[0] == "pos"
    assert np.allclose(tables.data[0].z[0], 1.0)  # cos at position 0
    assert "mscale" in md and "softmax scale" in md and "YaRN **on**" in md


# ---------------------------------------------------------------------- build and run
def test_build_reports_progress_time_and_memory(tiny_cfg):
    calls = []
    session, msg, info = run.build(
        tiny_cfg, "cpu", "fp32", 1, None, progress=lambda p, **k: calls.append(p)
    )
    assert info["ok"] and info["built"] and info["model_bytes"] > 0
    assert calls[-1] == (tiny_cfg["n_layers"], tiny_cfg["n_layers"])
    assert " s**" in msg and "MiB" in msg
    session.free()
    assert session.model is None


def test_forward_and_every_figure_has_the_data(built, tiny_cfg):
    out = run.forward(built, 2, 12, 0, "", 2)
    session, md, info, trace_df, trace_fig, heat, balance, balance_df = out
    assert info["ok"], md
    assert info["output_shape"] == [2, tiny_cfg["vocab_size"]]
    assert info["prefill_tokens_per_s"] > 0 and info["decode_steps"] == 2
    assert len(info["generated"]) == 2 and len(info["generated"][0]) == 2
    assert "tokens/s" in md and "peak memory" in md
    # heatmap z == the routing counts of the prefill, one row per MoE layer
    counts = [r["counts"] for r in info["routing"]]
    assert len(counts) == tiny_cfg["n_layers"] - tiny_cfg["n_dense_layers"]
    # the expert load is relative to uniform (tokens x top-k / experts); the dense layer 0 is
    # an empty row
    z = np.asarray(heat.data[0].z, dtype=float)
    assert np.isnan(z[0]).all()
    uniform = 2 * 12 * tiny_cfg["n_activated_experts"] / tiny_cfg["n_routed_experts"]
    assert np.allclose(z[1:] * uniform, counts)
    assert all(sum(c) == 2 * 12 * tiny_cfg["n_activated_experts"] for c in counts)
    assert len(balance_df) == len(counts)
    assert len(trace_df) == info["trace_len"] and trace_df.iloc[-1]["shape"] == "[2, 1024]"
    assert sum(len(t.x) for t in trace_fig.data) == len(trace_df)


def test_forward_with_typed_token_ids(built):
    _, md, info, *_ = run.forward(built, 1, 1, 0, "1 2 3; 4 5 6", 0)
    assert info["ok"] and info["input_shape"] == [2, 3]
    _, md, info, *rest = run.forward(built, 1, 1, 0, "1 2 99999", 0)
    assert not info["ok"] and "**token ids**" in md and "vocabulary" in md
    assert all(r is not None for r in rest)


def test_forward_errors_are_messages(built, tiny_cfg):
    _, md, info, *_ = run.forward(built, 99, 4, 0, "", 0)
    assert not info["ok"] and "max_batch_size" in md
    _, md, info, *_ = run.forward(Session(), 1, 4, 0, "", 0)
    assert not info["ok"] and "Build" in md


def test_build_refused_before_allocating_keeps_previous_model(built, tiny_cfg, monkeypatch):
    model = built.model
    monkeypatch.setenv("DSV3_MEMORY_LIMIT", "1KiB")
    session, msg, info = run.build(tiny_cfg, "cpu", "fp32", 0, built, progress=NO_PROGRESS)
    assert not info["ok"] and session.model is model
    assert "Not built" in msg and "fp8" in msg and "meta" in msg and "previous model is kept" in msg


def test_bad_config_build_keeps_previous_model(built):
    model = built.model
    session, msg, info = run.build({"dim": -1}, "cpu", "fp32", 0, built, progress=NO_PROGRESS)
    assert session.model is model and "**dim**" in msg and not info["ok"]


def test_671b_on_meta_gives_shapes():
    cfg, _ = configure.load_preset("deepseek-v3-671b")
    session, msg, info = run.build(cfg, "meta", "bf16", 0, None, progress=NO_PROGRESS)
    assert info["ok"] and info["device"] == "meta"
    out = run.forward(session, 1, 4, 0, "", 0)
    assert out[2]["meta"] and out[2]["output_shape"] == [1, 129280]
    assert "shapes only" in out[1]
    assert out[3].iloc[-1]["shape"] == "[1, 129280]"
    assert len(out[4].data) > 0


def test_build_registers_session_for_unload(tiny_cfg):
    class Req:
        session_hash = "abc"

    session, _, info = run.build(
        tiny_cfg, "meta", "fp32", 0, None, request=Req(), progress=NO_PROGRESS
    )
    assert LIVE["abc"] is session
    layout.on_unload(Req())
    assert "abc" not in LIVE and session.model is None
    assert release("abc") is False


def test_state_delete_callback_frees(tiny_cfg):
    session, _, _ = run.build(tiny_cfg, "meta", "fp32", 0, None, progress=NO_PROGRESS)
    free_session(session)
    assert session.model is None and session.summary() == {"built": False}
    free_session(None)


# ---------------------------------------------------------------------- browser, files
def test_browser_save_load_delete(tiny_cfg):
    store, dd, msg = configure.save_browser({}, "mine", tiny_cfg)
    assert store == {"mine": tiny_cfg} and dd["value"] == "mine"
    json.dumps(store)  # plain JSON-safe data
    cfg, msg = configure.load_browser(store, "mine")
    assert cfg == tiny_cfg
    assert configure.not_a_preset(msg)["value"] is None  # the preset name no longer applies
    _, _, msg = configure.save_browser(store, "  ", tiny_cfg)
    assert msg.startswith("⚠")
    store2, dd, msg = configure.delete_browser(store, "mine")
    assert store2 == {} and dd["choices"] == []
    # with two saved, a delete chooses neither: a second click deletes nothing
    two, _, _ = configure.save_browser({"wide": tiny_cfg}, "mine", tiny_cfg)
    left, dd, msg = configure.delete_browser(two, "mine")
    assert left == {"wide": tiny_cfg} and dd["value"] is None and dd["choices"] == ["wide"]
    _, _, msg = configure.delete_browser(left, dd["value"])
    assert msg == "⚠ choose a saved config first"
    assert configure.load_browser(left, None)[1] == "⚠ choose a saved config first"


def test_config_download_upload_round_trip(tiny_cfg):
    update, msg = configure.export_config(tiny_cfg, "my preset")
    path = update["value"]
    assert path.endswith("my-preset.json") and update["visible"]
    cfg, msg = configure.import_config(path)
    assert cfg == tiny_cfg and "imported" in msg


def test_bad_upload_messages(tmp_path, tiny_cfg):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "name": "x", "args": {**tiny_cfg, "n_heads": 0}}))
    cfg, msg = configure.import_config(str(bad))
    assert "**n_heads**" in msg and "bad.json" in msg
    bad.write_text("{not json")
    _, msg = configure.import_config(str(bad))
    assert "not valid JSON" in msg
    bad.write_text(json.dumps({"hidden_size": 10}))
    _, msg = configure.import_config(str(bad))
    assert "**hidden_size**" in msg
    bad.write_bytes(b"\xff\xfe\x00")
    _, msg = configure.import_config(str(bad))
    assert "UTF-8" in msg


def test_export_weights_limits(built, monkeypatch):
    monkeypatch.setattr(settings, "EXPORT_LIMIT", 10)
    path, msg = files_tab.export_weights(built)
    assert path is None and "export limit" in msg
    path, msg = files_tab.export_weights(Session())
    assert path is None and "Build" in msg


def test_export_weights_writes_safetensors(built):
    pytest.importorskip("dsv3.checkpoint")
    path, msg = files_tab.export_weights(built)
    assert path and path.endswith(".safetensors"), msg
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert "embed.weight" in f.keys()


def test_parse_token_ids():
    assert runtime.parse_token_ids("") is None
    assert runtime.parse_token_ids("1, 2 3").tolist() == [[1, 2, 3]]
    assert runtime.parse_token_ids("1 2\n3 4").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="same length"):
        runtime.parse_token_ids("1 2; 3")
    with pytest.raises(ValueError, match="whole numbers"):
        runtime.parse_token_ids("a b")


def _hf_checkpoint(folder, model):
    from safetensors.torch import save_file

    from dsv3.checkpoint import dsv3_to_hf_state_dict, hf_config_from_args

    (folder / "config.json").write_text(json.dumps(hf_config_from_args(model.args)))
    sd = dsv3_to_hf_state_dict(model.state_dict(), model.args, fused_experts=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return [str(folder / "config.json"), str(folder / "model.safetensors")]


def test_import_hf_checkpoint(tmp_path, built):
    files = _hf_checkpoint(tmp_path, built.model)
    session, cfg, msg = files_tab.import_hf(files, "cpu", "fp32", Session())
    assert msg.startswith("✔"), msg
    assert "config.json" in session.source and cfg["dim"] == built.config["dim"]
    a = session.model.state_dict()["layers.1.ffn.experts.w1"]
    b = built.model.state_dict()["layers.1.ffn.experts.w1"]
    assert a.equal(b)
    _, md, info, *_ = run.forward(session, 1, 4, 0, "", 0)
    assert info["ok"], md


def test_import_hf_refusals(tmp_path, built, monkeypatch):
    files = _hf_checkpoint(tmp_path, built.model)
    session = Session()
    _, _, msg = files_tab.import_hf(files[:1], "cpu", "fp32", session)
    assert "config.json with its .safetensors" in msg
    monkeypatch.setattr(settings, "IMPORT_LIMIT", 100)
    _, _, msg = files_tab.import_hf(files, "cpu", "fp32", session)
    assert "import limit" in msg and session.model is None
    monkeypatch.setattr(settings, "IMPORT_LIMIT", 1 << 30)
    monkeypatch.setenv("DSV3_MEMORY_LIMIT", "1KiB")
    _, _, msg = files_tab.import_hf(files, "cpu", "fp32", session)
    assert "nothing allocated" in msg and session.model is None
    monkeypatch.delenv("DSV3_MEMORY_LIMIT")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    _, _, msg = files_tab.import_hf(files, "cpu", "fp32", session)
    assert msg.startswith("⚠") and session.model is None


def test_build_and_run_in_one_call_returns_plain_data(tiny_cfg):
    """The ZeroGPU path: build + run + trace in one call, only plain CPU data back."""
    tokens = runtime.make_tokens(tiny_cfg["vocab_size"], 1, 8, 0)
    out = runtime.build_and_run(tiny_cfg, "cpu", "bf16", 0, tokens, 2)
    assert out["run"]["output_shape"] == [1, tiny_cfg["vocab_size"]]
    assert len(out["run"]["routing"]) == 3 and out["trace"][-1]["shape"] == [1, 1024]
    json.dumps(out, default=float)  # nothing but plain data


def test_launch_kwargs_theme_css_and_optional_login(monkeypatch):
    from ui.layout import launch_kwargs

    monkeypatch.setattr(settings, "AUTH", None)
    kw = launch_kwargs()
    assert kw["theme"] is not None and kw["css"] and "auth" not in kw
    monkeypatch.setattr(settings, "AUTH", ("ann", "se:cret"))
    assert launch_kwargs()["auth"] == ("ann", "se:cret")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_cuda_is_a_message(tiny_cfg):
    session, msg, info = run.build(tiny_cfg, "cuda", "bf16", 0, None, progress=NO_PROGRESS)
    assert not info["ok"] and "**device**" in msg and session.model is None


# ---------------------------------------------------------------------- review findings
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(batch=None), "batch"),
        (dict(seq_len=""), "seq length"),
        (dict(decode_steps=None), "decode steps"),
        (dict(decode_steps=-2), "decode steps"),
        (dict(token_seed=1.5), "token seed"),
        (dict(seq_len=500, decode_steps=100), "seq length"),
        (dict(token_ids="99999999999999999999"), None),
    ],
)
def test_empty_or_negative_run_fields_are_messages(built, kwargs, field):
    args = {**dict(batch=1, seq_len=4, token_seed=0, token_ids="", decode_steps=0), **kwargs}
    _, md, info, *_ = run.forward(built, **args)
    assert not info["ok"] and md.startswith("⚠") and "Traceback" not in md
    if field:
        assert f"**{field}**" in md


def test_meta_run_applies_the_same_checks(tiny_cfg):
    s, msg, info = run.build(tiny_cfg, "meta", "bf16", 0, None, progress=NO_PROGRESS)
    assert info["ok"] and s.model_bytes == 0  # meta holds no memory
    _, md, info, *_ = run.forward(s, 1, 1, 0, "1 2 4096", 0)
    assert not info["ok"] and "**token ids**" in md
    _, md, info, *_ = run.forward(s, 2, 510, 0, "", 5)
    assert not info["ok"] and "max_seq_len" in md


@pytest.mark.parametrize("seed", [None, "", -1, "x", 2**53, 9007199254740993.0])
def test_bad_seed_keeps_previous_model(built, tiny_cfg, seed):
    model = built.model
    s, msg, info = run.build(tiny_cfg, "cpu", "fp32", seed, built, progress=NO_PROGRESS)
    assert not info["ok"] and "**seed**" in msg and s.model is model


def test_largest_seed_a_browser_sends_unchanged_builds(tiny_cfg):
    """2**53 - 1 is the largest whole number a browser's number box sends as typed; past it
    the refusal says why."""
    _, msg, info = run.build(tiny_cfg, "cpu", "fp32", 2**53, None, progress=NO_PROGRESS)
    assert not info["ok"] and "allowed: 0..9007199254740991 (a browser sends" in msg
    s, msg, info = run.build(tiny_cfg, "cpu", "fp32", 2**53 - 1, None, progress=NO_PROGRESS)
    assert info["ok"] and s.seed == 2**53 - 1


@pytest.mark.parametrize("batch, length, gpus", [(-1, 0, 1), (1, -5, 1), (0, 0, 1), (1, 0, 0)])
def test_estimate_rejects_nonpositive_sizes(tiny_cfg, batch, length, gpus):
    md, *_ = estimate.estimate(tiny_cfg, "cpu", "fp32", batch, length, gpus)
    assert md.startswith("⚠") and "out of range" in md


def test_estimate_says_when_gpus_cannot_split_the_model():
    cfg, _ = configure.load_preset("deepseek-v3-671b")
    md, *_ = estimate.estimate(cfg, "cpu", "fp8", 1, 4096, 32)
    assert "does not split over 32 GPUs" in md and "inter_dim" in md
    md, *_ = estimate.estimate(cfg, "cpu", "fp8", 1, 4096, 8)
    assert "does not split" not in md


@pytest.mark.parametrize("cell", ["inf", "1.5", "x"])
def test_override_layer_index_must_be_whole(tiny_cfg, cell):
    rows = {"headers": ["layer", "n_heads"], "data": [[cell, "2"]]}
    values, _ = fields.dict_to_form(tiny_cfg)
    kept, msg, _ = configure.form_changed(tiny_cfg, rows, **dict(zip(fields.FORM_FIELDS, values)))
    assert kept == tiny_cfg and "not a layer index" in msg and msg.startswith("⚠")


def test_server_budget_ignores_meta_models_and_own_model(monkeypatch, tiny_cfg):
    from ui import state

    state.LIVE.clear()
    one = run.build(tiny_cfg, "cpu", "fp32", 0, None, progress=NO_PROGRESS)[0].model_bytes
    monkeypatch.setattr(settings, "SERVER_MEMORY", int(one * 1.5))
    big, _ = configure.load_preset("deepseek-v3-671b")
    meta = run.build(big, "meta", "bf16", 0, Session(), request=_Req("m"), progress=NO_PROGRESS)[0]
    assert meta.model is not None
    s, msg, info = run.build(
        tiny_cfg, "cpu", "fp32", 1, Session(), request=_Req("a"), progress=NO_PROGRESS
    )
    assert info["ok"], msg  # the meta model holds no memory
    s, msg, info = run.build(tiny_cfg, "cpu", "fp32", 2, s, request=_Req("a"), progress=NO_PROGRESS)
    assert info["ok"], msg  # its own model is replaced, not counted
    state.LIVE.clear()


class _Req:
    def __init__(self, session_hash: str):
        self.session_hash = session_hash


@pytest.mark.parametrize("multiple", [True, False])
def test_an_upload_of_the_wrong_type_names_the_field_and_types(tmp_path, multiple):
    """Gradio refused a .bin upload with "Invalid file type ..." (no field) and printed a
    traceback to the server's log for it."""
    import gradio as gr
    from gradio.data_classes import FileData, ListFiles

    from ui.components import guard_files

    bad = tmp_path / "x.bin"
    bad.write_bytes(b"abc")
    comp = (gr.File(file_count="multiple", file_types=[".json", ".safetensors"]) if multiple
            else gr.UploadButton("up", file_types=[".json"]))  # fmt: skip
    guard_files(comp, "checkpoint")
    one = FileData(path=str(bad), orig_name="x.bin")
    with pytest.raises(gr.Error) as e:
        comp.preprocess(ListFiles(root=[one]) if multiple else one)
    allowed = ".json, .safetensors" if multiple else ".json"
    assert e.value.message == (
        f"field checkpoint: x.bin: not an allowed file type; allowed: {allowed}; nothing was "
        "imported"
    )
    assert e.value.print_exception is False
