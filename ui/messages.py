"""What the page says: status lines, the checks of loosely typed inputs, and escaping.

Every value from the page or an API client arrives loosely typed (None, "", "2.5", 2.0, True,
"abc", a list...). `whole` reads a whole number or raises a ConfigError naming the field by its
on-screen label, the value and the allowed range: nothing is rounded or clamped silently.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dsv3 import ConfigError, ModelArgs

# What a run view shows before any run, and after a run on meta (shapes, no values).
BEFORE_RUN = "Build a model and press Run forward: this shows the run's {}"
BUILT_NOT_RUN = "Press Run forward for the model built: this shows the run's {}"
NO_ROUTING = "the last run's model has no MoE layer: no {} to show"
KEPT = "the previous model is kept"
META_RUN = "meta run: shapes only, no {} (build on cpu or cuda to see it)"
# Markdown and HTML characters a user's text must not bring into a status line.
_SPECIAL = re.compile(r"([\\`*\[\]<>&#|~!])")


def clip(text: Any, limit: int = 200) -> str:
    """User text cut to `limit` characters, as error messages quote it: plain text, which
    `problem` escapes once when it shows the message (escaped here too, it showed `x\\!`)."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text


def lit(text: Any, limit: int = 200) -> str:
    """User text (file names, preset names, typed values) as literal Markdown, cut to `limit`."""
    return _SPECIAL.sub(r"\\\1", clip(text, limit))


def plain(markdown: Any) -> str:
    """A status line back to its text (no marker, no bold, no escapes), to quote it inside
    another message without escaping it twice."""
    text = str(markdown).lstrip("⚠✘✔ ").replace("**", "")
    return re.sub(r"\\(.)", r"\1", text)


def ok(text: str) -> str:
    return f"✔ {text}"


def problem(e: Exception) -> str:
    """A ConfigError/ValueError as one Markdown line naming the field and the layer."""
    where = []
    if getattr(e, "field", None):
        where.append(f"field **{lit(e.field)}**")
    if getattr(e, "layer", None) is not None:
        where.append(f"layer **{e.layer}**")
    prefix = f"{', '.join(where)}: " if where else ""
    return f"⚠ {prefix}{lit(e, 600)}"


def _allowed(lo: int, hi: int | None) -> str:
    return f"{lo}..{hi}" if hi is not None else f">= {lo}"


def whole(value: Any, label: str, lo: int, hi: int | None = None, why: str = "") -> int:
    """A whole number in lo..hi from a loosely typed input, else a ConfigError with `label`.
    Refuses decimals (2.5, never rounded), text, booleans, NaN/inf and anything out of range
    (`why`, when given, follows the allowed range in that message)."""
    allowed = _allowed(lo, hi)
    if value is None or (isinstance(value, str) and not value.strip()):
        # a browser's number box sends no value for text it cannot read, as for an empty box
        raise ConfigError(
            f"{label} is empty or not a number; enter a whole number {allowed}", field=label
        )
    n: int | None = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float):
        n = int(value) if math.isfinite(value) and value == int(value) else None
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            n = int(text)
        else:
            try:
                f = float(text)
            except ValueError:
                f = math.nan
            n = int(f) if math.isfinite(f) and f == int(f) else None
    if n is None:
        raise ConfigError(
            f"{label}={clip(repr(value), 60)} is not a whole number; allowed: {allowed}",
            field=label,
        )
    if n < lo or (hi is not None and n > hi):
        why = f" ({why})" if why else ""
        raise ConfigError(f"{label}={n} is out of range; allowed: {allowed}{why}", field=label)
    return n


def choice(value: Any, label: str, options: list[str]) -> str:
    """One of `options`, else a ConfigError listing them."""
    if not isinstance(value, str) or value not in options:
        raise ConfigError(
            f"{label}={clip(repr(value), 60)}: choose one of {', '.join(options)}", field=label
        )
    return value


def args_of(cfg: Any) -> ModelArgs:
    """The config hub's value (a dict, or JSON text from an API client) -> ModelArgs."""
    if isinstance(cfg, str):
        return ModelArgs.from_json(cfg)
    if not cfg:
        raise ConfigError("no valid configuration yet: pick a preset", field="config")
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"the config must be a JSON object of ModelArgs fields, got {type(cfg).__name__}",
            field="config",
        )
    return ModelArgs.from_dict(cfg)


def id_list(rows: list[list[int]], keep: int = 3) -> str:
    """Generated ids per batch row, long rows shortened to first/last ids and a count."""
    out = []
    for row in rows[:4]:
        if len(row) <= 2 * keep:
            out.append(str(row))
        else:
            out.append(
                f"[{', '.join(map(str, row[:keep]))}, ... {', '.join(map(str, row[-keep:]))}]"
            )
    more = f" (+{len(rows) - 4} rows)" if len(rows) > 4 else ""
    n = len(rows[0]) if rows else 0
    return f"{n} ids per row: {'; '.join(out)}{more}"


def config_line(cfg: dict[str, Any]) -> str:
    """'4 layers, dim 64, overrides on 1 layer' for a config dict."""
    n_over = len(cfg.get("layer_config") or {})
    extra = f", overrides on {n_over} layer{'s' if n_over > 1 else ''}" if n_over else ""
    return f"{cfg.get('n_layers')} layers, dim {cfg.get('dim')}{extra}"
