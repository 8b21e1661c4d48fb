"""The Configure form as data: which ModelArgs field sits in which section, the info text with its
allowed range, and the conversions form values <-> config dict (per-layer overrides included).

Pure functions; values from the page arrive loosely typed (numbers as floats, table cells as
strings) and are coerced here. Errors are `ConfigError`s naming the field and the layer.
"""

from __future__ import annotations

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

from .components import UNREADABLE
from .messages import clip, whole

SECTIONS: dict[str, list[str]] = {
    "Size": ["vocab_size", "dim", "n_layers", "n_dense_layers", "inter_dim", "n_mtp_layers"],
    "Attention (MLA, DSA)": [
        "n_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "attn_impl",
        "attn_kind",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
    ],
    "MoE routing": list(MOE_FIELDS),
    "Rotary / YaRN": list(ROTARY_FIELDS),
    "Runtime": ["max_batch_size", "max_seq_len", "dtype", "scale_fmt", "norm_eps"],
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
    "attn_kind": "mla = dense attention; dsa = V3.2's sparse attention (lightning indexer)",
    "index_n_heads": "DSA indexer heads",
    "index_head_dim": "DSA indexer head width (its key cache per token)",
    "index_topk": "DSA: keys each query attends to",
    "n_mtp_layers": "multi-token-prediction modules after the main model (V3: 1)",
    "norm_eps": "RMSNorm epsilon",
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
    if value is None:  # a browser's number box sends nothing for text it cannot read either
        raise ConfigError(
            f"{name}{where} is empty or not a number; {info(name)}", field=name, layer=layer
        )
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
    if k == "int":
        lo, hi = INT_RANGES[name]
        try:
            return whole(value, name, lo, hi)
        except ConfigError as e:  # the same words, with the layer
            raise ConfigError(f"{e}{where}", field=name, layer=layer) from None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(
            f"{name}={clip(repr(value), 60)}{where} is not a finite number; {info(name)}",
            field=name,
            layer=layer,
        )
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
# The page's override table is long: one row per (layer, field, value), three fixed columns that
# fit a narrow screen with the layer always in sight and no value hidden in a scrolled-off
# column. API clients may also send the wide form: "layer" plus one column per field.
TABLE_COLUMNS: list[str] = ["layer", "field", "value"]
BLANK_ROWS = 4  # empty rows under the overrides, to type new ones into


def _table(table: Any) -> tuple[list[str], list[list[Any]]]:
    """A gr.Dataframe value (pandas, {"headers", "data"}, or a list of rows) -> (column names,
    rows). A bare list of rows is read as the long form."""
    if table is None:
        return list(TABLE_COLUMNS), []
    if hasattr(table, "columns") and hasattr(table, "values"):  # pandas.DataFrame
        return [str(c) for c in table.columns], table.astype(object).values.tolist()
    if isinstance(table, dict):
        headers, data = table.get("headers"), table.get("data")
        if not isinstance(headers, list) or not isinstance(data, list):
            raise ConfigError(
                "the override table must be {'headers': [...], 'data': [[...], ...]}",
                field="layer_config",
            )
        return [str(h) for h in headers], [_row(r) for r in data]
    if isinstance(table, list):
        return list(TABLE_COLUMNS), [_row(r) for r in table]
    raise ConfigError(
        f"the override table must be rows of cells, got {type(table).__name__}",
        field="layer_config",
    )


def _row(r: Any) -> list[Any]:
    if not isinstance(r, (list, tuple)):
        raise ConfigError("each override table row must be a list of cells", field="layer_config")
    return list(r)


def _blank(cell: Any) -> bool:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return True
    return str(cell).strip() == ""


def _layer(cell: Any, n: int) -> int:
    try:
        f = float(str(cell).strip())  # "2" and "2.0" (numeric cells) are layer 2
        if f != int(f):
            raise ValueError
        return int(f)
    except (ValueError, OverflowError):  # "x", "1.5", "inf"
        raise ConfigError(
            f"override row {n}: layer {clip(repr(cell), 40)} is not a layer index",
            field="layer_config",
        ) from None


def parse_overrides(table: Any) -> dict[int, dict[str, Any]]:
    """Override table -> layer_config. Long form (layer, field, value; blank rows skipped; a
    field may appear once per layer) or wide form (layer + one column per field; blank cell =
    inherit). Cells may be strings."""
    headers, rows = _table(table)
    if headers == [UNREADABLE]:
        raise ConfigError(
            "the override table could not be read: send {'headers': ['layer', 'field', "
            "'value'], 'data': [['5', 'n_heads', '32'], ...]}",
            field="layer_config",
        )
    if headers == TABLE_COLUMNS:
        return _parse_long(rows)
    if {"field", "value"} & set(headers):  # the long form, with a column renamed or added
        extra = [h for h in headers if h not in TABLE_COLUMNS] or headers
        raise ConfigError(
            f"the override table has exactly the columns {', '.join(TABLE_COLUMNS)}; column "
            f"{clip(repr(extra[0]), 40)} is not one of them",
            field="layer_config",
        )
    unknown = [h for h in headers if h not in OVERRIDE_COLUMNS]
    if unknown:
        raise ConfigError(
            f"override table column {clip(repr(unknown[0]), 40)} is not a per-layer field; "
            f"columns: {', '.join(TABLE_COLUMNS)} (or layer + the fields: "
            f"{', '.join(LAYER_FIELDS)})",
            field="layer_config",
        )
    if "layer" not in headers:
        raise ConfigError("override table needs a 'layer' column", field="layer_config")
    long = []
    for row in rows:
        cells = dict(zip(headers, row))
        values = [(k, v) for k, v in cells.items() if k != "layer" and not _blank(v)]
        if not values and _blank(cells.get("layer")):
            continue
        long += [[cells.get("layer"), k, v] for k, v in values] or [[cells.get("layer"), "", ""]]
    return _parse_long(long)


def _parse_long(rows: list[list[Any]]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for n, row in enumerate(rows, start=1):
        row = (list(row) + [None] * 3)[:3] if len(row) < 3 else row
        if len(row) != 3:
            raise ConfigError(
                f"override row {n} has {len(row)} cells; the columns are layer, field, value",
                field="layer_config",
            )
        layer_cell, name_cell, value = row
        if all(_blank(c) for c in row):
            continue
        if _blank(layer_cell):
            raise ConfigError(f"override row {n} has no layer index", field="layer_config")
        layer = _layer(layer_cell, n)
        name = "" if _blank(name_cell) else str(name_cell).strip()
        if name not in LAYER_FIELDS:
            raise ConfigError(
                f"override row {n} (layer {layer}): field {clip(repr(name), 40)} is not a "
                f"per-layer field; use one of: {', '.join(LAYER_FIELDS)}",
                field="layer_config",
                layer=layer,
            )
        if _blank(value):
            raise ConfigError(
                f"override row {n}: {name} in layer {layer} has no value (clear the row to "
                f"inherit); {info(name)}",
                field=name,
                layer=layer,
            )
        over = out.setdefault(layer, {})
        if name in over:
            raise ConfigError(
                f"{name} is set twice for layer {layer}; keep one row", field=name, layer=layer
            )
        over[name] = _coerce(name, value, layer)
    return out


def overrides_to_rows(
    layer_config: dict[Any, dict[str, Any]], blank_rows: int = BLANK_ROWS
) -> list[list[str]]:
    """layer_config -> long table rows of strings (layer, field, value), in layer then field
    order, plus empty rows to type into. The blank rows come with the table, not one at a time
    from the server: re-rendering the table while the user edits it can leave the new cells
    refusing to open an editor."""
    rows = []
    for layer, over in sorted(((int(k), v) for k, v in layer_config.items())):
        for name in LAYER_FIELDS:
            if name in over:
                rows.append([str(layer), name, str(to_widget(name, over[name]))])
    rows += [[""] * len(TABLE_COLUMNS) for _ in range(blank_rows)]
    return rows
