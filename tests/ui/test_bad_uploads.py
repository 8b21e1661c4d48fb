"""Bad uploads never harm what a session has: each gives one clear message, nothing is unpickled,
and the built model and config stay as they were."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from dsv3.checkpoint import dsv3_to_hf_state_dict, hf_config_from_args
from ui.state import Session
from ui.tabs import configure, run
from ui.tabs import files as files_tab


@pytest.fixture
def session() -> Session:
    cfg = configure.initial_config()
    s, msg, info = run.build(cfg, "cpu", "fp32", 0, None, progress=lambda *a, **k: None)
    assert info["ok"], msg
    return s


def _write_hf(folder, model, mutate=None):
    (folder / "config.json").write_text(json.dumps(hf_config_from_args(model.args)))
    sd = dsv3_to_hf_state_dict(model.state_dict(), model.args, fused_experts=False)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if mutate:
        mutate(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return [str(folder / "config.json"), str(folder / "model.safetensors")]


def _drop_one(sd):
    sd.pop(next(k for k in sd if "kv_b_proj" in k))


def _reshape_one(sd):
    k = next(k for k in sd if "o_proj" in k)
    sd[k] = sd[k][:, :-1].contiguous()


def _extra_one(sd):
    sd["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2, 2)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("pickle renamed", "safetensors"),
        ("torch.save renamed", "safetensors"),
        ("corrupt header", "header"),
        ("truncated", "safetensors"),
        ("missing tensor", "missing"),
        ("wrong shape", "shape"),
        ("unexpected tensor", "unexpected"),
        ("bad config json", "JSON"),
    ],
)
def test_bad_hf_upload_is_a_message_and_harms_nothing(tmp_path, session, monkeypatch, case, expect):
    model_before, cfg_before = session.model, dict(session.config)
    tok = torch.randint(0, model_before.args.vocab_size, (1, 6))
    logits_before = model_before(tok)
    mutate = {"missing tensor": _drop_one, "wrong shape": _reshape_one,
              "unexpected tensor": _extra_one}.get(case)  # fmt: skip
    files = _write_hf(tmp_path, model_before, mutate)
    st = tmp_path / "model.safetensors"
    if case == "pickle renamed":
        st.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "torch.save renamed":
        torch.save({"w": torch.zeros(3)}, st)
    elif case == "corrupt header":
        st.write_bytes(struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [1' + b" " * 8)
    elif case == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif case == "bad config json":
        (tmp_path / "config.json").write_text("{nope")

    def no_unpickling(*a, **k):
        raise AssertionError("something tried to unpickle an upload")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    s, cfg, msg = files_tab.import_hf(files, "cpu", "fp32", session)
    assert msg.startswith("⚠") and expect.lower() in msg.lower(), msg
    assert "Traceback" not in msg
    assert s.model is model_before and s.config == cfg_before  # nothing lost
    torch.testing.assert_close(s.model(tok), logits_before, rtol=0, atol=0)
