"""The Configure form as data: which ModelArgs field sits in which section, the info text with its
allowed range, and the conversions form values <-> config dict (per-layer overrides included).

Pure functions; values from the page arrive loosely typed (numbers as floats, table cells as
strings) and are coerced here. Errors are `ConfigError`s naming the field and the layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dsv3.config import (
    CHOICES,
    FLOAT_RANGES,
    INT_RANGES,
    LAYER_FIELDS,
    MOE_FIELDS,
    ROTARY_FIELDS,
    ConfigError,
    ModelArgs,
)

SECTIONS: dict[str, list[str]] = {
    "Size": ["vocab_size", "dim", "n_layers", "n_dense_layers", "inter_dim"],
    "Attention (MLA)": [
        "n_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "attn_impl",
    ],
    "MoE routing": list(MOE_FIELDS),
    "Rotary / YaRN": list(ROTARY_FIELDS),
    "Runtime": ["max_batch_size", "max_seq_len", "dtype", "scale_fmt"],
}
# Every ModelArgs field but layer_config, in form order (the order handlers receive values in).
FORM_FIELDS: list[str] = [name for names in SECTIONS.values() for name in names]

DESCRIPTIONS: dict[str, str] = {
    "vocab_size": "vocabulary size (embedding and head rows)",
    "dim": "model width (residual stream)",
    "n_layers": "number of transformer blocks",
    "n_dense_layers": "first layers with a dense MLP instead of MoE",
    "inter_dim": "hidden width of the dense MLP",
    "n_heads": "attention heads",
    "q_lora_rank": "query low-rank width; 0 = plain wq",
    "kv_lora_rank": "compressed key/value width (what absorb caches)",
    "qk_nope_head_dim": "per-head q/k dims without rotary",
    "qk_rope_head_dim": "per-head q/k dims with rotary (even)",
    "v_head_dim": "per-head value dims",
    "attn_impl": "naive caches per-head k/v; absorb caches the latent",
    "moe_inter_dim": "hidden width of each expert",
    "n_routed_experts": "routed experts per MoE layer",
    "n_shared_experts": "always-on shared experts",
    "n_activated_experts": "experts each token is routed to (top-k)",
    "n_expert_groups": "expert groups (divides n_routed_experts)",
    "n_limited_groups": "groups a token may pick experts from",
    "score_func": "router score function",
    "route_scale": "multiplier on routing weights",
    "gate_bias": "router selection bias; auto = only when dim == 7168",
    "rope_scaling": "auto = YaRN when max_seq_len > original_seq_len",
    "original_seq_len": "context length before YaRN extension",
    "rope_theta": "rotary base",
    "rope_factor": "YaRN extension factor",
    "beta_fast": "YaRN: rotations marking the fast end of the ramp",
    "beta_slow": "YaRN: rotations marking the slow end (< beta_fast)",
    "mscale": "YaRN attention temperature coefficient",
    "max_batch_size": "largest batch a forward accepts",
    "max_seq_len": "longest context (rotary tables, cache limit)",
    "dtype": "checkpoint dtype of the reference (build dtype is under Build)",
    "scale_fmt": "fp8 scale format of the reference",
}

GATE_BIAS_CHOICES = ("auto", "true", "false")
OVERRIDE_COLUMNS: list[str] = ["layer", *LAYER_FIELDS]
_NONE_WORDS = {"none", "null", "auto"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def kind(name: str) -> str:
    """'int', 'float' or 'choice': which widget edits the field."""
    if name in CHOICES or name == "gate_bias":
        return "choice"
    if name in INT_RANGES:
        return "int"
    return "float"


def choices(name: str) -> list[str]:
    """Dropdown choices as strings (None shows as 'none'; gate_bias None as 'auto')."""
    if name == "gate_bias":
        return list(GATE_BIAS_CHOICES)
    return ["none" if c is None else str(c) for c in CHOICES[name]]


def info(name: str) -> str:
    """Short description plus the allowed range, from dsv3.config's tables."""
    text = DESCRIPTIONS.get(name, name)
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        text += f"; {lo}..{hi}"
    elif name in FLOAT_RANGES:
        lo, hi, rule = FLOAT_RANGES[name]
        text += f"; {rule}, <= {hi:g}"
    elif kind(name) == "choice":
        text += f"; {' | '.join(choices(name))}"
    if name in LAYER_FIELDS:
        text += " (per-layer)"
    return text


def bounds(name: str) -> tuple[float | None, float | None]:
    if name in INT_RANGES:
        return INT_RANGES[name]
    if name in FLOAT_RANGES:
        lo, hi, _ = FLOAT_RANGES[name]
        return lo, hi
    return None, None


def default_values() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(ModelArgs) if f.name in FORM_FIELDS}


# ---------------------------------------------------------------------- coercion
def _coerce(name: str, value: Any, layer: int | None = None) -> Any:
    """A loosely typed value from the page -> the field's Python type (None stays 'blank')."""
    where = "" if layer is None else f" in layer {layer}"
    if isinstance(value, float) and math.isnan(value):
        value = None
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            value = None
    if value is None:
        raise ConfigError(f"{name}{where} is empty; {info(name)}", field=name, layer=layer)
    k = kind(name)
    if name == "gate_bias":
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in _NONE_WORDS:
            return None
        if word in _BOOL_WORDS:
            return _BOOL_WORDS[word]
        raise ConfigError(
            f"gate_bias={value!r}{where}: use true, false or auto", field=name, layer=layer
        )
    if k == "choice":
        text = str(value)
        if text.lower() == "none" and None in CHOICES[name]:
            return None
        return text  # ModelArgs checks membership and names the choices
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}={value!r}{where} is not a number; {info(name)}", field=name, layer=layer
        ) from None
    if k == "int":
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(
                f"{name}={value!r}{where} must be a whole number; {info(name)}",
                field=name,
                layer=layer,
            )
        return int(number)
    return number


def to_widget(name: str, value: Any) -> Any:
    """A config value -> what its widget shows."""
    if name == "gate_bias":
        return "auto" if value is None else str(bool(value)).lower()
    if kind(name) == "choice":
        return "none" if value is None else str(value)
    return value


def form_to_dict(values: list[Any] | tuple[Any, ...], override_rows: Any) -> dict[str, Any]:
    """Form widget values (FORM_FIELDS order) + override table -> a ModelArgs dict (validated)."""
    if len(values) != len(FORM_FIELDS):
        raise ConfigError(f"expected {len(FORM_FIELDS)} field values, got {len(values)}")
    d = {name: _coerce(name, v) for name, v in zip(FORM_FIELDS, values)}
    d["layer_config"] = parse_overrides(override_rows)
    return ModelArgs.from_dict(d).to_dict()


def dict_to_form(cfg: dict[str, Any]) -> tuple[list[Any], list[list[str]]]:
    """A config dict -> (widget values in FORM_FIELDS order, override table rows)."""
    args = ModelArgs.from_dict(cfg)
    values = [to_widget(name, getattr(args, name)) for name in FORM_FIELDS]
    return values, overrides_to_rows(args.layer_config)


# ---------------------------------------------------------------------- per-layer overrides
def _table(table: Any) -> tuple[list[str], list[list[Any]]]:
    """A gr.Dataframe value (pandas, {"headers", "data"}, or a list of rows in OVERRIDE_COLUMNS
    order) -> (column names, rows)."""
    if table is None:
        return list(OVERRIDE_COLUMNS), []
    if hasattr(table, "columns") and hasattr(table, "values"):  # pandas.DataFrame
        return [str(c) for c in table.columns], table.astype(object).values.tolist()
    if isinstance(table, dict):
        headers = table.get("headers") or list(OVERRIDE_COLUMNS)
        return [str(h) for h in headers], [list(r) for r in table.get("data") or []]
    return list(OVERRIDE_COLUMNS), [list(r) for r in table]


def _blank(cell: Any) -> bool:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return True
    return str(cell).strip() == ""


def parse_overrides(table: Any) -> dict[int, dict[str, Any]]:
    """Override table (columns by name: "layer" + LAYER_FIELDS; blank cell = inherit) ->
    layer_config. Blank rows are skipped; a row with values needs a layer index. Cells may be
    strings."""
    headers, rows = _table(table)
    unknown = [h for h in headers if h not in OVERRIDE_COLUMNS]
    if unknown:
        raise ConfigError(
            f"override table column {unknown[0]!r} is not a per-layer field; columns: "
            f"{', '.join(OVERRIDE_COLUMNS)}",
            field=unknown[0],
        )
    if "layer" not in headers:
        raise ConfigError("override table needs a 'layer' column", field="layer_config")
    out: dict[int, dict[str, Any]] = {}
    for n, row in enumerate(rows, start=1):
        cells = dict(zip(headers, row))
        if all(_blank(c) for c in cells.values()):
            continue
        if _blank(cells.get("layer")):
            raise ConfigError(
                f"override row {n} has values but no layer index", field="layer_config"
            )
        try:
            f = float(str(cells["layer"]).strip())  # "2" and "2.0" (numeric cells) are layer 2
            if f != int(f):
                raise ValueError
            layer = int(f)
        except (ValueError, OverflowError):  # "x", "1.5", "inf"
            raise ConfigError(
                f"override row {n}: layer {cells['layer']!r} is not a layer index",
                field="layer_config",
            ) from None
        if layer in out:
            raise ConfigError(
                f"layer {layer} has two override rows; merge them",
                field="layer_config",
                layer=layer,
            )
        out[layer] = {
            name: _coerce(name, cell, layer)
            for name, cell in cells.items()
            if name != "layer" and not _blank(cell)
        }
    return out


BLANK_ROWS = 3  # empty rows under the overrides, to type new layers into


def overrides_to_rows(
    layer_config: dict[Any, dict[str, Any]], blank_rows: int = BLANK_ROWS
) -> list[list[str]]:
    """layer_config -> table rows of strings (blank = inherit), plus empty rows to type into.
    The blank rows come with the table, not one at a time from the server: re-rendering the
    table while the user edits it can leave the new cells refusing to open an editor."""
    rows = []
    for layer, over in sorted(((int(k), v) for k, v in layer_config.items())):
        row = [str(layer)]
        for name in OVERRIDE_COLUMNS[1:]:
            if name not in over:
                row.append("")
            else:
                row.append(str(to_widget(name, over[name])))
        rows.append(row)
    rows += [[""] * len(OVERRIDE_COLUMNS) for _ in range(blank_rows)]
    return rows
