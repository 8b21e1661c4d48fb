"""Config-only import in the app (an HF config.json uploaded, pasted or read from the Hub by
repo id: never the network in tests) and Compare (A pinned vs B the form, /compare)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3 import ConfigError, count_params, presets
from ui.tabs import compare, configure

CONFIGS = Path(__file__).resolve().parents[1] / "dsv3" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_uploaded_hf_config_fills_the_form(name):
    cfg, msg = configure.import_config(str(CONFIGS / name))
    assert msg.startswith("✔") and name in msg, msg
    assert "keep their defaults" not in msg  # an HF config says everything
    values, rows = __import__("ui.fields", fromlist=["x"]).dict_to_form(cfg)
    assert values  # it goes through the form like any config


def test_kimi_k2_from_a_pasted_config_is_counted_exactly():
    text = (CONFIGS / "kimi-k2-instruct.json").read_text()
    cfg, msg = configure.hf_config(text)
    assert msg.startswith("✔") and "no weights loaded" in msg, msg
    args = presets.load("kimi-k2")
    assert count_params(configure.args_of(cfg))["main"] == count_params(args)["main"]
    assert count_params(args)["main"] == 1_026_408_232_448


def test_hub_repo_id_reads_config_json_only(monkeypatch):
    from dsv3.checkpoint import hf_config as hc

    asked = []

    def fake_fetch(repo_id, token=None):
        asked.append(repo_id)
        return json.loads((CONFIGS / "moonlight-16b-a3b.json").read_text())

    monkeypatch.setattr(hc, "fetch_hf_config", fake_fetch)
    cfg, msg = configure.hf_config("  moonshotai/Moonlight-16B-A3B ")
    assert asked == ["moonshotai/Moonlight-16B-A3B"] and msg.startswith("✔"), msg
    assert cfg["n_routed_experts"] == 64 and cfg["q_lora_rank"] == 0


def test_hub_offline_is_a_clear_message(monkeypatch):
    from dsv3.checkpoint import hf_config as hc

    def offline(repo_id, token=None):
        raise ConfigError(
            f"Hub repository {repo_id!r} cannot be reached: no internet", field="repo"
        )

    monkeypatch.setattr(hc, "fetch_hf_config", offline)
    kept, msg = configure.hf_config("deepseek-ai/DeepSeek-V3")
    assert msg.startswith("⚠") and "no internet" in msg
    for text, words in [("", "give a Hub repository id"), ("not a repo", "neither"),
                        ("{nope", "not valid JSON"), ('{"dim": 3}', "not a Hugging Face config")]:  # fmt: skip
        _, msg = configure.hf_config(text)
        assert msg.startswith("⚠") and words in msg, (text, msg)


def test_compare_pinned_a_with_the_form_b():
    a, _ = configure.load_preset("deepseek-v3-671b")
    b = {**a, "layer_config": {"5": {"n_heads": 32}}}
    pinned, msg = compare.pin(a)
    assert msg.startswith("✔ pinned A")
    md, md_file, csv_file, map_a, map_b = compare.compare_view(pinned, b, "fp8", 1, 4096, 8)
    assert "layer 5 n_heads 128 -> 32" in md and "H200" in md
    assert Path(md_file["value"]).read_text() in md
    assert "change,layer 5,n_heads,,128,32" in Path(csv_file["value"]).read_text()
    assert "A (pinned)" in map_a.layout.title.text and "B (the form)" in map_b.layout.title.text
    assert compare.compare_view(None, b)[0] == compare.HINT
    _, msg = compare.pin(a, "⚠ field dim")
    assert msg.startswith("⚠")


def test_compare_endpoint(url):
    from gradio_client import Client

    c = Client(url, verbose=False)
    a, _ = c.predict("tiny", api_name="/preset")
    b = {**a, "dim": 128}
    md, result = c.predict(a, b, "bf16", 1, 0, 1, api_name="/compare")
    assert result["ok"] and [ch["field"] for ch in result["changes"]][0] == "dim"
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["total parameters"]["b"] > rows["total parameters"]["a"]
    md, result = c.predict(a, {"dim": -1}, "bf16", 1, 0, 1, api_name="/compare")
    assert not result["ok"] and "**dim**" in md


def test_a_cuda_run_is_set_against_its_roofline_floor(monkeypatch):
    """After a run on CUDA the page says what fraction of the floor it reached (here with the
    H200's spec sheet in place of the probe: this machine has no GPU)."""
    from dsv3.roofline import GPUS
    from ui.tabs import estimate, run

    monkeypatch.setattr(estimate, "this_gpu", lambda: GPUS["H200"])
    args = presets.load("seed-demo")
    r = {"input_shape": [2, 128], "prefill_seconds": 0.0216, "decode_steps": 8}
    r["decode_seconds"] = 0.32
    fl = run._floor(args, "bf16", r)
    assert 0.2 < fl["prefill_fraction"] < 1 and 0 < fl["decode_fraction"] < 1
    assert fl["prefill_floor_s"] * 1e3 == pytest.approx(0.0216 * 1e3 * fl["prefill_fraction"])


def test_an_hf_config_that_leaves_shapes_out_says_which_take_defaults(tmp_path):
    """A near-empty deepseek_v3 config is V3 671B (transformers' defaults): the status names
    the keys that came from there; a byte-order mark does not stop an upload."""
    cfg, msg = configure.hf_config('{"model_type": "deepseek_v3", "hidden_size": 7168}')
    assert msg.startswith("✔") and "take transformers' defaults: vocab_size" in msg
    assert "hidden_size," not in msg.split("defaults:")[1]
    bom = tmp_path / "config.json"
    bom.write_text('{"model_type": "deepseek_v3", "num_hidden_layers": 4}', encoding="utf-8-sig")
    cfg, msg = configure.import_config(str(bom))
    assert msg.startswith("✔") and cfg["n_layers"] == 4 and "vocab_size" in msg


def test_a_preset_document_with_bad_args_says_so():
    for text, words in [('{"args": "nope"}', "missing key 'schema'"),
                        ('{"schema": 1, "args": "nope"}', "args must be a JSON object")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            presets.parse(text)
