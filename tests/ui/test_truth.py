"""What the page says is what happened: stale state is marked, nothing is fixed silently,
messages name the field the user changed, files import as they were exported, figures belong to
the run that made them. Each test is one of the bugs found by trying the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3 import ModelArgs, presets
from ui import fields, messages, runtime
from ui.state import Session
from ui.tabs import configure, estimate, inspect, run
from ui.tabs import files as files_tab

NO_PROGRESS = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def tiny_cfg() -> dict:
    return configure.initial_config()


def _form(cfg: dict, **change) -> dict:
    values, _ = fields.dict_to_form(cfg)
    return {**dict(zip(fields.FORM_FIELDS, values)), **change}


def _built(cfg: dict, seed: int = 0) -> Session:
    s, msg, info = run.build(cfg, "cpu", "fp32", seed, None, progress=NO_PROGRESS)
    assert info["ok"], msg
    return s


# ---------------------------------------------------------------------- one source of truth
def test_invalid_form_marks_estimate_stale_and_build_refuses(tiny_cfg):
    kept, msg, err = configure.form_changed(tiny_cfg, [], **_form(tiny_cfg, dim=-5))
    assert kept is tiny_cfg and "**dim**" in msg and err == msg
    md, *_ = estimate.estimate(kept, "cpu", "fp32", 1, 0, 1, err)
    assert "stale" in md and "last valid config" in md
    s, bmsg, info = run.build(kept, "cpu", "fp32", 0, None, err, progress=NO_PROGRESS)
    assert not info["ok"] and s.model is None and "form has an error" in bmsg and "dim" in bmsg
    assert "(field dim: dim=-5 is out of range" in bmsg  # quoted once, not escaped twice
    md = inspect.rotary(kept, 16, err)[-1]
    assert "stale" in md


def test_model_status_names_what_differs_from_the_form(tiny_cfg):
    s = _built(tiny_cfg)
    assert run.model_status(s, tiny_cfg).startswith("✔ the built model is the config")
    rows = [["1", "n_heads", "8"]]
    cfg, msg, err = configure.form_changed(tiny_cfg, rows, **_form(tiny_cfg))
    status = run.model_status(s, cfg)
    assert "built from an older config: rebuild to apply" in status
    assert "layer 1 n_heads 4 → 8" in status
    _, md, info, *_ = run.forward(s, 1, 4, 0, "", 0)
    assert "ran the model built" in md and "4 layers, dim 64" in md  # which config ran
    assert run.model_status(Session(), cfg) == "No model built yet: press Build."


# ---------------------------------------------------------------------- no silent fixes
@pytest.mark.parametrize(
    "value, words",
    [
        (2.5, "not a whole number"),
        (3.5, "not a whole number"),
        ("abc", "not a whole number"),
        ("1e400", "not a whole number"),
        (10**30, "out of range"),
        (None, "is empty or not a number"),
        (True, "not a whole number"),
    ],
)
def test_integer_fields_refuse_decimals_text_and_overflow(tiny_cfg, value, words):
    kept, msg, err = configure.form_changed(tiny_cfg, [], **_form(tiny_cfg, n_heads=value))
    assert kept is tiny_cfg and "**n_heads**" in msg and words in msg and err
    if words != "is empty or not a number":
        assert "1..1024" in msg  # the allowed range


@pytest.mark.parametrize(
    "kwargs, label",
    [
        (dict(decode_steps=2.5), "decode steps"),
        (dict(token_seed=1.5), "token seed"),
        (dict(token_seed=None), "token seed"),
        (dict(batch="two"), "batch"),
        (dict(seq_len=1e400), "seq length"),
    ],
)
def test_run_fields_refuse_what_they_would_have_rounded(tiny_cfg, kwargs, label):
    s = _built(tiny_cfg)
    args = {**dict(batch=1, seq_len=4, token_seed=0, token_ids="", decode_steps=0), **kwargs}
    _, md, info, *_ = run.forward(s, **args)
    assert not info["ok"] and f"**{label}**" in md and s.runs == 0


def test_seed_and_estimate_messages_use_the_on_screen_label(tiny_cfg):
    _, msg, _ = run.build(tiny_cfg, "cpu", "fp32", None, None, progress=NO_PROGRESS)
    assert "seed is empty" in msg and "None" not in msg
    md, *_ = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 10**6, 1)
    assert "**length**" in md and "**seq_len**" not in md


def test_huge_token_id_is_named_not_overflowed(tiny_cfg):
    s = _built(tiny_cfg)
    _, md, info, *_ = run.forward(s, 1, 4, 0, "1 99999999999999999999999", 0)
    assert "token id 99999999999999999999999 is outside the vocabulary" in md
    assert "Overflow" not in md and "0..1023" in md


def test_layer_error_blames_the_field_the_user_changed(tiny_cfg):
    rows = [["2", "n_routed_experts", "7"]]
    _, msg, _ = configure.form_changed(tiny_cfg, rows, **_form(tiny_cfg))
    assert "field **n_routed_experts**" in msg and "layer **2**" in msg
    # a global change that breaks a rule on another field names the changed field too
    _, msg, _ = configure.form_changed(tiny_cfg, [], **_form(tiny_cfg, n_routed_experts=7))
    assert msg.startswith("⚠ field **n_routed_experts**")


# ---------------------------------------------------------------------- the override table
def test_override_table_refuses_renamed_and_added_columns():
    from dsv3 import ConfigError

    with pytest.raises(ConfigError, match="'dim' is not one of them"):
        fields.parse_overrides(
            {"headers": ["layer", "dim", "value"], "data": [["1", "n_heads", "32"]]}
        )
    with pytest.raises(ConfigError, match="'Header 19' is not one of them"):
        fields.parse_overrides(
            {"headers": ["layer", "field", "value", "Header 19"], "data": [["1", "x", "", ""]]}
        )


# ---------------------------------------------------------------------- files
def test_preset_file_with_no_field_is_refused_and_a_partial_one_says_what_defaulted(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    cfg, msg = configure.import_config(str(empty))
    assert msg.startswith("⚠") and "empty.json sets no ModelArgs field" in msg
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"dim": 128, "n_layers": 3, "n_dense_layers": 1}))
    cfg, msg = configure.import_config(str(part))
    assert cfg["dim"] == 128 and msg.startswith("✔")
    assert "keep their defaults" in msg and "vocab_size" in msg and " dim," not in msg


def test_import_of_the_apps_own_export_gives_the_same_model(tiny_cfg):
    s = _built(tiny_cfg, seed=3)
    path, msg = files_tab.export_weights(s)
    assert path, msg
    tokens = runtime.make_tokens(tiny_cfg["vocab_size"], 1, 8, 0)
    want = s.model(tokens, full=True)
    s2, cfg, msg = files_tab.import_hf([path], "cpu", "fp32", Session())
    assert msg.startswith("✔") and "this app's export" in msg, msg
    assert cfg == s.config
    s2.model.reset_cache()
    assert torch.equal(s2.model(tokens, full=True), want)
    # a config.json beside the export is not read: the message says so, not that it was
    other = Path(path).parent / "config.json"
    other.write_text(json.dumps({"model_type": "kimi_k2"}))
    _, _, msg = files_tab.import_hf([path, str(other)], "cpu", "fp32", Session())
    assert "not used: config.json (the export carries its own config)" in msg, msg
    assert "export: config.json" not in msg
    _, _, msg = files_tab.import_hf([path], "meta", "fp32", Session())
    assert "onto meta" in msg and "the weights were not loaded" in msg


def test_two_exports_uploaded_together_are_named_as_exports(tiny_cfg, tmp_path):
    """Two of this app's exports uploaded at once were answered "w_fp32.safetensors was not
    exported by this app (no dsv3 metadata)"."""
    s = _built(tiny_cfg)
    first, _ = files_tab.export_weights(s)
    second = tmp_path / "second.safetensors"
    second.write_bytes(Path(first).read_bytes())
    _, _, msg = files_tab.import_hf([first, str(second)], "cpu", "fp32", Session())
    assert "are each an export of this app: import one at a time" in msg, msg
    assert "not exported by this app" not in msg
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(plain))
    _, _, msg = files_tab.import_hf([first, str(plain)], "cpu", "fp32", Session())
    assert "is an export of this app: upload it alone" in msg, msg


def test_wrong_format_errors_name_the_upload_not_a_temp_folder(tiny_cfg, tmp_path):
    from safetensors.torch import save_file

    from dsv3.checkpoint import hf_config_from_args

    s = _built(tiny_cfg)
    st = tmp_path / "weights.safetensors"  # dsv3 names, no metadata, beside an HF config
    save_file({k: v.contiguous() for k, v in s.model.state_dict().items()}, str(st))
    cfgf = tmp_path / "config.json"
    cfgf.write_text(json.dumps(hf_config_from_args(s.model.args)))
    _, _, msg = files_tab.import_hf([str(cfgf), str(st)], "cpu", "fp32", Session())
    assert msg.startswith("⚠") and "dsv3-" not in msg and "tmp" not in msg
    assert "dsv3's own names" in msg
    # one key is never listed as both missing and unexpected
    assert msg.count("embed.weight") <= 1
    _, _, msg = files_tab.import_hf([str(st)], "cpu", "fp32", Session())
    assert "weights.safetensors was not exported by this app" in msg


# ---------------------------------------------------------------------- figures
def test_run_memory_is_this_runs_own(tiny_cfg):
    s = _built(tiny_cfg)
    big = bytearray(300 * 2**20)  # another session's 300 MiB, held before this run
    big[::4096] = b"x" * len(big[::4096])
    _, md, info, *_ = run.forward(s, 1, 4, 0, "", 0)
    del big
    assert info["ok"] and info["peak_bytes"] < 100 * 2**20, info["peak_bytes"]
    assert "this run's peak" in info["peak_kind"] and "process" not in info["peak_kind"]


def test_fp8_kv_cache_is_labelled_with_the_dtype_it_counts(tiny_cfg):
    md, *_ = estimate.estimate(tiny_cfg, "cpu", "fp8", 1, 0, 1)
    assert "KV cache, bf16 bytes" in md and "KV cache (fp8)" not in md
    md, *_ = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 0, 1)
    assert "KV cache, fp32 bytes" in md


# ---------------------------------------------------------------------- small things
def test_long_decodes_show_first_and_last_ids():
    text = messages.id_list([list(range(496)), list(range(496, 992))])
    assert text.startswith("496 ids per row") and "0, 1, 2, ... 493, 494, 495" in text
    assert "250" not in text and len(text) < 200


def test_user_text_is_escaped(tiny_cfg):
    _, _, msg = configure.save_browser({}, "<b>x</b>", tiny_cfg)
    assert "<b>" not in msg and "\\<b\\>x\\</b\\>" in msg
    _, msg = configure.load_browser({}, "**bold**")
    assert "**bold**" not in msg


def test_rotary_slider_is_bounded_by_the_config_and_reaches_original_seq_len(tiny_cfg):
    out = inspect.rotary_for_config(tiny_cfg, 1024)
    assert out[-1]["maximum"] == tiny_cfg["max_seq_len"] == 512 and out[-1]["value"] == 512
    v3 = presets.load("deepseek-v3-671b")
    top = inspect.rotary_max(v3)
    assert top >= v3.original_seq_len == 4096 and top <= v3.max_seq_len
    md = inspect.rotary(v3.to_dict(), 4096)[-1]
    assert md.startswith("YaRN **on**")
    assert "out of range" in inspect.rotary(tiny_cfg, 513)[-1]


def test_empty_plots_say_what_will_appear():
    from ui.layout import build_demo

    demo = build_demo()
    texts = json.dumps(
        [c.get("props", {}).get("value") for c in demo.config["components"]], default=str
    )
    assert texts.count("press Run forward") >= 3
    ModelArgs()  # the page built without touching a model


def test_every_handler_returns_one_value_per_output():
    """A handler annotated `-> tuple[a, b, ...]` is wired to as many output components: one
    that returns more values than its event has outputs fails in Gradio's postprocessing, in the
    server log only, and the view never updates (the expert load per expert-parallel GPU did,
    on every change and after every run). `gr.api` endpoints return their tuple as one value."""
    import typing

    from ui.layout import build_demo

    demo = build_demo()
    checked, wrong = 0, []
    for bf in demo.fns.values():
        if bf.fn is None or [type(o).__name__ for o in bf.outputs] == ["Api"]:
            continue
        fn = getattr(bf.fn, "__wrapped__", bf.fn)
        try:
            ret = typing.get_type_hints(fn).get("return")
        except (NameError, TypeError):  # hints naming what the module does not import
            continue
        if typing.get_origin(ret) is tuple and Ellipsis not in typing.get_args(ret):
            checked += 1
            if len(typing.get_args(ret)) != len(bf.outputs):
                wrong.append((fn.__qualname__, len(typing.get_args(ret)), len(bf.outputs)))
    assert checked >= 40 and not wrong, wrong


def test_expert_load_per_gpu_says_which_splits_exist(tiny_cfg):
    """A GPU count that splits no layer's experts is refused by name, with the counts that do,
    and the figure on the page stays; a count that splits them draws one column per rank."""
    import gradio as gr

    s = _built(tiny_cfg)
    run.forward(s, 2, 12, 0, "", 0)
    fig, note = inspect.expert_views(s, 2)
    assert note == "" and list(fig.data[0].x) == [0, 1]
    kept, note = inspect.expert_views(s, 3)
    assert isinstance(kept, type(gr.skip()))
    assert "**expert-parallel GPUs**" in note and "allowed: 1, 2, 4, 8" in note


def test_typed_text_in_an_error_is_escaped_once():
    """`x!` typed into a number field reads `'x\\!'` in the Markdown (shown as 'x!'), not
    `'x\\\\!'` (shown as 'x\\!'): the message quotes plain text, `problem` escapes it once."""
    with pytest.raises(Exception) as e:
        messages.whole("x!", "layer", 0, 3)
    md = messages.problem(e.value)
    assert "'x\\!'" in md and "\\\\" not in md


def test_a_new_model_takes_the_old_runs_views_with_it(tiny_cfg):
    """After a build (or free, or import) the run message and the run's figures say the run is
    gone instead of showing the previous model's run as current; a meta run's views say it
    was a meta run, not that nothing ran."""
    s = _built(tiny_cfg)
    run.forward(s, 2, 12, 0, "", 0)
    assert all(isinstance(v, type(gr_skip())) for v in run.run_gone(s))  # its run is current
    s, msg, info = run.build(tiny_cfg, "cpu", "fp32", 1, s, progress=NO_PROGRESS)
    assert info["ok"]
    md, balance, table = run.run_gone(s)
    assert "gone: press Run forward for this one" in md and table.empty
    # freed: no model to run; the message said "press Run forward for this one"
    freed, _ = run.release_model(s)
    md, _, _ = run.run_gone(freed, "a run's message")
    assert "gone: build one, then press Run forward" in md and "this one" not in md
    # the shape trace went too: it kept the freed model's 69 modules under "nothing traced yet"
    table, fig, note = inspect.trace_view(freed, "", "all")
    assert table.empty and "nothing traced yet" in note
    assert "Build a model and press Run forward" in json.dumps(fig.to_dict())
    s, msg, info = run.build(tiny_cfg, "cpu", "fp32", 1, freed, progress=NO_PROGRESS)
    # a page that never ran shows no run message: a build there has no run to call gone
    for shown in ("", None):
        assert all(isinstance(v, type(gr_skip())) for v in run.run_gone(Session(), shown))
    fig, _ = inspect.expert_views(s, 1)
    assert "Press Run forward for the model built" in json.dumps(fig.to_dict())
    m, msg, info = run.build(tiny_cfg, "meta", "fp32", 0, s, progress=NO_PROGRESS)
    run.forward(m, 1, 8, 0, "", 0)
    fig, _ = inspect.expert_views(m, 1)
    assert "meta run" in json.dumps(fig.to_dict())
    assert all("meta run" in json.dumps(f.to_dict()) for f in inspect.run_views(m))


def test_an_import_says_the_preset_line_is_gone():
    build_line, preset, source = files_tab._after_import("✔ imported 387K params")
    assert "import" in build_line and preset["value"] is None and "imported" in source
    assert all(isinstance(v, type(gr_skip())) for v in files_tab._after_import("⚠ refused"))


def gr_skip():
    import gradio as gr

    return gr.skip()


def test_token_ids_of_separators_alone_say_there_are_none():
    with pytest.raises(ValueError, match="hold no ids"):
        runtime.parse_token_ids(";;;")


def test_dsa_index_head_range_is_the_layers(tiny_cfg):
    s = _built({**tiny_cfg, "attn_kind": "dsa", "index_n_heads": 4, "index_head_dim": 16})
    run.forward(s, 1, 12, 0, "", 0)
    for bad in ("-1", "4"):
        _, note = inspect.dsa_view(s, 1, bad)
        assert "**index head**" in note and "allowed: 0..3" in note
    assert "index head 3 alone" in inspect.dsa_view(s, 1, "3")[1]
    # a batch of 2 draws its first sequence: the note says which, of how many
    run.forward(s, 2, 12, 0, "", 0)
    assert "layer 1, sequence 0 of the batch (of 2)" in inspect.dsa_view(s, 1, "")[1]


def test_a_refused_batch_leaves_the_config_views_following_the_config():
    """small (max batch 8) with batch 8, then tiny (max 4): the summary refuses the batch, the
    layer map and per-layer table (which no batch changes) show tiny's 4 layers, not small's 8;
    Compare drops its downloads (another comparison's) and draws both configs' maps."""
    from ui.tabs import compare

    small, tiny = presets.load("small").to_dict(), presets.load("tiny").to_dict()
    md, table, layer_map, _ = estimate.estimate(tiny, "auto", "bf16", 8, 0, 1)
    assert "batch" in md and "max_batch_size=4" in md
    assert len(table) == 4 and "(4 layers)" in layer_map.layout.title.text
    md, md_file, csv_file, map_a, map_b = compare.compare_view(small, tiny, "bf16", 8, 0, 1)
    assert md.startswith("⚠") and md_file["visible"] is False and csv_file["visible"] is False
    assert "(8 layers)" in map_a.layout.title.text and "(4 layers)" in map_b.layout.title.text


def test_an_export_goes_with_the_model_it_came_from(tiny_cfg):
    """After an export the file and message stay while the model does (a refused build keeps
    it); a new model (build, import) or a free clears them: they were the old model's."""
    s = _built(tiny_cfg)
    no_export = "no export of this model yet: press Export to download its weights"
    assert files_tab.weights_follow(s) == (None, no_export)
    path, msg = files_tab.export_weights(s)
    assert msg.startswith("✔") and s.exported == path
    kept = files_tab.weights_follow(s)
    assert all(isinstance(x, dict) and x.get("__type__") == "update" for x in kept)  # skips
    s.free()
    assert files_tab.weights_follow(s) == (None, "")
    # a build and an import each start from free(): the export goes with the old model
    s, _, info = run.build(tiny_cfg, "cpu", "fp32", 0, s, progress=NO_PROGRESS)
    assert info["ok"] and s.exported == ""
    files_tab.export_weights(s)
    s2, _, msg = files_tab.import_hf([path], "cpu", "fp32", s)
    assert msg.startswith("✔") and s2.exported == ""
    meta, _, info = run.build(tiny_cfg, "meta", "fp32", 0, None, progress=NO_PROGRESS)
    assert files_tab.weights_follow(meta) == (None, "")  # nothing to export on meta


def test_an_override_a_dense_layer_cannot_use_is_noted_and_changes_nothing(tiny_cfg):
    s = _built(tiny_cfg)
    cfg = {**tiny_cfg, "layer_config": {0: {"n_routed_experts": 6}}}  # layer 0: dense
    note = "note: layer 0 is dense: n_routed_experts has no effect there"
    assert note in configure.valid_line(cfg)
    assert run.model_status(s, cfg).startswith("✔")  # the same model: no rebuild asked


def test_a_cross_field_layer_error_names_the_field_that_breaks_it(tiny_cfg):
    """Layer 3 with 16 experts, then top-32 there: n_activated_experts is out of its range
    (1..16), named first; an expert count set below the inherited top-k names that count."""
    from dsv3 import ConfigError

    args = ModelArgs.from_dict(tiny_cfg)
    with pytest.raises(ConfigError) as e:
        args.replace(layer_config={3: {"n_routed_experts": 16, "n_activated_experts": 32}})
    assert (e.value.field, e.value.layer) == ("n_activated_experts", 3)
    assert str(e.value).endswith("in layer 3; allowed: 1..16")
    with pytest.raises(ConfigError) as e:
        args.replace(layer_config={3: {"n_routed_experts": 1}})
    assert e.value.field == "n_routed_experts" and f"allowed: {args.n_activated_experts}.." in str(
        e.value
    )


def test_the_mtp_module_is_said_to_be_built_but_not_run(tiny_cfg):
    cfg = {**tiny_cfg, "n_mtp_layers": 1}
    s = _built(cfg)
    r = runtime.run(s.model, runtime.make_tokens(cfg["vocab_size"], 1, 8, 0), 2)
    md = run.run_markdown(r)
    assert "MTP module (1 layer) is built but not run" in md
    assert "holding this run's 1 x 10 positions" in md
    summary = estimate.estimate(cfg, "auto", "fp32", 1, 0, 1)[0]
    assert "embedding lookup and MTP module not counted" in summary


def test_the_memory_sum_names_every_term(tiny_cfg):
    """ "weights + activations + KV = total" once read "+ KV =" with no figure."""
    from dsv3 import estimate as estimate_model
    from dsv3.params import human_bytes

    md = estimate.estimate(tiny_cfg, "cpu", "fp32", 2, 64, 1)[0]
    e = estimate_model(ModelArgs.from_dict(tiny_cfg), "fp32", 2, 64)
    kv = human_bytes(e["kv_model_bytes"])
    assert f"+ KV {kv} ({tiny_cfg['attn_impl']}) = **{human_bytes(e['total_bytes'])}**" in md


@pytest.mark.parametrize("length", [4096, 16384])
def test_the_speed_table_memory_is_the_estimates_per_gpu_figure(length):
    """The speed table held memory for at most 4096 tokens and without activations, so a
    length of 16384 showed 162.75 GiB per GPU there and 168.36 GiB in the Estimate."""
    cfg = presets.load("deepseek-v3.2-exp").to_dict()
    md = estimate.estimate(cfg, "cuda", "bf16", 1, length, 8)[0]
    per_gpu = md.split("per GPU with 8 GPUs: **")[1].split("**")[0]
    head, table = estimate.speed(cfg, "bf16", 1, length)
    assert f"prefill of **1 x {length}** tokens" in head
    eight = table[table["GPUs"] == 8]
    assert set(eight["memory per GPU"]) == {per_gpu}


def test_a_split_the_model_cannot_take_shows_no_per_gpu_fit(tiny_cfg):
    """ "✔ fits ... per GPU" stood next to "✘ does not split over 3 GPUs"."""
    md = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 0, 3)[0]
    assert "✘ does not split over 3 GPUs: vocab_size=1024" in md
    assert "per GPU with 3 GPUs: none, the model does not split that way" in md
    assert "per GPU on" not in md and md.count("✔ fits") == 1  # the whole build's line only
    two = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 0, 2)[0]
    assert "per GPU with 2 GPUs: **" in two and "does not split" not in two


def test_the_speed_table_fits_no_split_the_model_cannot_take(tiny_cfg):
    """Tiny's 8-GPU rows said "yes, 935.78 KiB" while the Estimate says its 4 heads do not
    split over 8; each note showed once per GPU count; its prefill read 0.0 ms."""
    head, table = estimate.speed(tiny_cfg, "fp8", 1, 0)
    eight, one = table[table["GPUs"] == 8], table[table["GPUs"] == 1]
    assert set(eight["fits"]) == {"no: does not split"} and set(one["fits"]) == {"yes"}
    assert head.count("✘ 8 GPUs: n_heads=4") == 1
    assert head.count("A100 80GB has no fp8") == 1
    assert (table["prefill (ms)"] > 0).all()


def test_the_index_head_box_answers_without_enter():
    """A head typed into Inspect > DSA and left (Tab or a click elsewhere) changed nothing:
    the box listened to Enter alone, while the layer box follows every change."""
    import app

    cfg = app.demo.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
    triggers = [
        {(ids.get(i), ev) for i, ev in dep["targets"]}
        for dep in cfg["dependencies"]
        if any(ids.get(i) == "dsa-head" for i, _ in dep["targets"])
    ]
    assert {("dsa-head", "submit"), ("dsa-head", "blur"), ("dsa-layer", "change")} in triggers


def test_fp8_on_cpu_counts_its_dequantised_weights():
    """fp8 weights are dequantised for each call on CPU: a user saw the small preset's run take
    208 MiB where the estimate said 10 MiB of activations and KV (123-159 MiB here before
    `dequantize` broadcast its scales, 74 after: the 40 MiB of dequantised experts counted)."""
    from dsv3 import estimate as estimate_model
    from dsv3.params import human_bytes

    cfg = presets.load("small").to_dict()
    e = estimate_model(ModelArgs.from_dict(cfg), "fp8", 4, 136)
    assert e["dequant_bytes"] > 4 * e["activation_bytes"]
    md = estimate.estimate(cfg, "cpu", "fp8", 4, 136, 1)[0]
    term = f"+ fp8 weights dequantised per call on CPU {human_bytes(e['dequant_bytes'])}"
    assert term in md and human_bytes(e["total_bytes"] + e["dequant_bytes"]) in md
    for device, dtype in (("meta", "fp8"), ("cpu", "bf16")):
        assert "dequantised per call" not in estimate.estimate(cfg, device, dtype, 4, 136, 1)[0]


def test_the_architecture_shapes_follow_typed_token_ids(tiny_cfg):
    """After a run of typed ids (2 x 8) the view still said "batch 2 x seq 16 (the Run
    inputs)": the boxes a typed run does not read."""
    fig, note = inspect.architecture_view(tiny_cfg, "as configured", 2, 16, "", "1 2 3; 4 5 6")
    assert "batch 2 x seq 3 (the typed token ids)" in note
    _, note = inspect.architecture_view(tiny_cfg, "as configured", 2, 16, "", "")
    assert "batch 2 x seq 16 (the Run tab's batch and length)" in note
    for refused in ("1 2; 3", "1 2; ,", "a b c", "1 99999"):  # as a run would refuse them
        _, note = inspect.architecture_view(tiny_cfg, "as configured", 2, 16, "", refused)
        assert "batch 2 x seq 16 (the Run tab's batch and length)" in note


def test_a_rebuild_budget_names_the_model_it_replaces(tiny_cfg):
    """The budget of a rebuild counted the session's own model as "that freeing idle models
    would return": it is the model the build replaces, and no idle model is freed."""
    from ui import state

    s = _built(tiny_cfg)
    ok, reason = state.fits(1024, "cpu", s)
    assert ok and "that this session's model, which the new one replaces, holds" in reason
    assert "idle models" not in reason
    ok, reason = state.fits(1024, "cpu", None)
    assert ok and "replaces" not in reason
    s2, msg, _ = run.build(tiny_cfg, "cpu", "fp32", 0, s, progress=NO_PROGRESS)
    assert "idle models" not in msg


def test_a_build_refused_for_its_inputs_says_the_model_is_kept(tiny_cfg):
    s = _built(tiny_cfg)
    s2, msg, info = run.build(tiny_cfg, "cpu", "fp32", -1, s, progress=NO_PROGRESS)
    assert not info["ok"] and "field **seed**" in msg and "the previous model is kept" in msg
    assert s2.model is s.model
    fresh, msg, _ = run.build(tiny_cfg, "cpu", "fp32", -1, None, progress=NO_PROGRESS)
    assert "kept" not in msg


def test_views_waiting_for_a_run_know_a_model_is_built(tiny_cfg):
    """After a (re)build the expert load said "Build a model and press Run forward"."""
    s = _built(tiny_cfg)
    fig, _ = inspect.expert_views(s, 1)
    assert "Press Run forward for the model built" in json.dumps(fig.to_dict(), default=str)
    fig, _ = inspect.expert_views(None, 1)
    assert "Build a model and press Run forward" in json.dumps(fig.to_dict(), default=str)


def test_a_meta_run_also_says_the_mtp_module_is_not_run(tiny_cfg):
    cfg = {**tiny_cfg, "n_mtp_layers": 1}
    s, msg, info = run.build(cfg, "meta", "bf16", 0, None, progress=NO_PROGRESS)
    assert info["ok"], msg
    r = runtime.run(s.model, runtime.make_tokens(cfg["vocab_size"], 1, 8, 0), 2)
    md = run.run_markdown(r)
    assert "meta run" in md and "MTP module (1 layer) is built but not run" in md


def test_pinning_text_that_is_not_json_names_the_field():
    from ui.tabs import compare

    _, msg = compare.pin("{bad")
    assert "field **config**" in msg and "not valid JSON" in msg


def test_a_long_shape_trace_points_to_its_filters():
    s = Session()
    trace = [{"name": f"layers.{i}.attn", "type": "MLA", "layer": i, "shape": [1, 4, 8]}
             for i in range(300)]  # fmt: skip
    s.last_run = {"trace": trace, "n_layers": 300}
    _, _, note = inspect.trace_view(s, "", "all")
    assert note == "300 of 300 modules; filter by layer or type above to read them"
    _, _, note = inspect.trace_view(s, "3", "all")
    assert note == "1 of 300 modules"
    _, _, note = inspect.trace_view(s, "", " MLA ")
    assert note.startswith("300 of 300")
    # a type the trace does not hold read "0 of 300 modules", without the types there are
    _, _, note = inspect.trace_view(s, "", "Nonsense")
    assert "module type='Nonsense': choose one of all, MLA" in note


@pytest.mark.parametrize("override", [{}, {0: {"attn_impl": "naive"}}])
def test_the_kv_figure_is_the_built_models_cache_with_per_layer_paths(tiny_cfg, override):
    """A layer overriding attn_impl keeps its own cache layout: the estimate counted every
    layer in the config's (40,960 B where the model held 71,680)."""
    from dsv3 import Transformer
    from dsv3 import estimate as estimate_model
    from dsv3.params import human_bytes

    args = ModelArgs.from_dict({**tiny_cfg, "layer_config": override})
    e = estimate_model(args, "fp32", 1, 64)
    m = Transformer(args, dtype="fp32")
    m(torch.randint(0, args.vocab_size, (1, 64)))
    assert e["kv_model_bytes"] == m.cache_bytes(1, 64)
    assert e["kv_impl"] == ("mixed" if override else args.attn_impl)
    md = estimate.estimate(args.to_dict(), "cpu", "fp32", 1, 64, 1)[0]
    assert f"+ KV {human_bytes(e['kv_model_bytes'])} ({e['kv_impl']})" in md


def test_a_run_of_a_model_without_moe_layers_says_so(tiny_cfg):
    """After a run of an all-dense model the expert load said to press Run forward."""
    cfg = {**tiny_cfg, "n_dense_layers": tiny_cfg["n_layers"]}
    s = _built(cfg)
    run.forward(s, 1, 8, 0, "", 0)
    fig, _ = inspect.expert_views(s, 1)
    assert "has no MoE layer" in json.dumps(fig.to_dict(), default=str)
    zero = Session(source="zerogpu")  # builds at Run: nothing to build first
    fig, _ = inspect.expert_views(zero, 1)
    assert "Press Run forward for the model built" in json.dumps(fig.to_dict(), default=str)


# ---------------------------------------------------------------------- fp8 without an fp8 path
def _memory_line(md: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("Memory"))


def test_estimate_counts_fp8_copies_on_a_gpu_without_an_fp8_path(monkeypatch):
    """On a GPU without an fp8 path (an A100) an fp8 build keeps bf16 copies of its weights:
    the Estimate's memory sum names and adds them there; elsewhere it says what they would
    cost on such a GPU, which a plan for other GPUs needs."""
    from dsv3 import estimate as estimate_model
    from dsv3.params import human_bytes

    cfg, _ = configure.load_preset("small")
    args = ModelArgs.from_dict(cfg)
    e = estimate_model(args, dtype="fp8", batch=1, seq_len=args.max_seq_len)
    dense = human_bytes(e["dense_copy_bytes"])
    md, *_ = estimate.estimate(cfg, "cuda", "fp8", 1, 0, 1)  # no GPU here: could be an H200
    assert "dequantised to bf16" not in _memory_line(md)
    assert f"an fp8 build also keeps bf16 copies of these weights: + {dense}" in md
    monkeypatch.setattr(runtime, "fp8_path", lambda: False)  # this server's GPU: an A100
    md, *_ = estimate.estimate(cfg, "cuda", "fp8", 1, 0, 1)
    work = human_bytes(e["dense_work_bytes"])
    total = human_bytes(e["total_bytes"] + e["dense_copy_bytes"] + e["dense_work_bytes"])
    line = _memory_line(md)
    assert "fp8 weights dequantised to bf16 copies, kept (this GPU has no fp8 path" in line
    assert (
        f"{dense} + one matrix's float32 working copy while they are made {work} = **{total}**"
        in line
    )
    assert "also keeps bf16 copies" not in md
    md, *_ = estimate.estimate(cfg, "cuda", "bf16", 1, 0, 1)
    assert "copies" not in md


def test_build_message_names_the_fp8_copies():
    info = {"seconds": 1.0, "model_bytes": 2**20, "dense_kept_bytes": 3 * 2**20}
    msg = run._built_message(ModelArgs(), "cuda", "fp8", info, "fits")
    assert "1.00 MiB + the fp8 weights kept dequantised to bf16, 3.00 MiB (this GPU has no" in msg


def test_fp8_is_not_offered_as_smaller_where_it_keeps_copies(monkeypatch):
    """On a GPU without an fp8 path fp8 holds its weights and bf16 copies (3 bytes per weight
    against bf16's 2): a refused build does not suggest it there, and what a build, import or
    another session's model holds counts the copies."""
    from dsv3 import estimate as estimate_model
    from ui import state

    args = ModelArgs.from_dict(configure.initial_config())
    monkeypatch.setattr(state, "fits", lambda *a, **k: (True, ""))  # no GPU to ask here
    monkeypatch.setattr(runtime, "fp8_path", lambda: True)  # an H200
    assert "dtype fp8" in run._suggest(args, "cuda", "fp32", None)
    monkeypatch.setattr(runtime, "fp8_path", lambda: False)  # an A100
    assert "dtype fp8" not in run._suggest(args, "cuda", "fp32", None)
    e = estimate_model(args, dtype="fp8", batch=1, seq_len=1)
    held = e["weight_bytes"] + e["dense_copy_bytes"] + e["dense_work_bytes"]
    assert estimate.weights_held(e, "cuda") == held and estimate.weights_held(e, "cpu") < held
    s = Session(model=object(), device="cuda", model_bytes=100, copy_bytes=200)
    monkeypatch.setitem(state.LIVE, "other", s)
    assert state.held_bytes("cuda") == 300 and s.held == 300


@pytest.mark.parametrize(
    "batch, seq, words",
    [
        (0, 4, "batch=0 is out of range; allowed: 1..4"),
        (5, 4, "batch=5 is out of range; allowed: 1..4"),
        (1, 0, "seq length=0 is out of range; allowed: 1..512"),
        ("abc", 4, "batch='abc' is not a whole number; allowed: 1..4"),
        (None, 4, "batch is empty or not a number; enter a whole number 1..4"),
    ],
)
def test_batch_and_length_errors_give_the_whole_range(tiny_cfg, batch, seq, words):
    """batch=0 said "allowed: >= 1" where batch=5 said "1..4"; seq length 0 gave no upper end."""
    s = _built(tiny_cfg)
    _, md, *_ = run.forward(s, batch, seq, 0, "", 0)
    assert words in md and s.model is not None
    est = estimate.estimate(tiny_cfg, "cpu", "fp32", batch if seq else 1, 0, 1)[0]
    if seq:
        assert words.replace("seq length", "length") in est


def test_the_config_line_follows_form_edits(tiny_cfg):
    """A download refused for the form's error kept "the form has an error" after the error
    was fixed; after an edit the line still read "✔ preset tiny"."""
    _, refused = configure.export_config(tiny_cfg, "", "dim=2.5 is not a whole number")
    assert "the form has an error" in refused
    assert configure.after_edit(refused, "dim=2.5 ...") is not None  # still broken: kept
    assert isinstance(configure.after_edit(refused, "dim=2.5 ..."), type(gr_skip()))
    assert configure.after_edit(refused, "") == configure.FIXED
    line = configure.after_edit("✔ preset **tiny**", "")
    assert line == "✔ preset **tiny**; the form was edited since"
    assert isinstance(configure.after_edit(line, ""), type(gr_skip()))  # said once
    import app

    cfg = app.demo.get_config_file()
    fns = [d.get("api_name") or "" for d in cfg["dependencies"]]
    assert any("after_edit" in str(f) for f in fns) or any(
        getattr(b.fn, "__name__", "") == "after_edit" for b in app.demo.fns.values()
    )


def test_the_per_layer_table_has_the_mtp_module(tiny_cfg):
    """With n_mtp_layers 2 the per-layer table listed layers 0-3 only: 160,528 of the
    parameters the summary counts had no row."""
    from dsv3 import count_params

    cfg = {**tiny_cfg, "n_mtp_layers": 2}
    _, table, *_ = estimate.estimate(cfg, "cpu", "fp32", 1, 0, 1)
    last = table.iloc[-1]
    assert last["layer"] == "MTP (2 layers, not run)"
    assert last["params"] == count_params(ModelArgs.from_dict(cfg))["mtp"] == 160_528
    _, plain, *_ = estimate.estimate(tiny_cfg, "cpu", "fp32", 1, 0, 1)
    assert (
        len(plain) == tiny_cfg["n_layers"]
        and not plain["layer"].astype(str).str.startswith("MTP").any()
    )
