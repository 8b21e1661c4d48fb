"""Named model configurations stored as JSON files in `dsv3/presets/`.

A preset file is data, not code:

    {"schema": 1, "name": "tiny", "description": "...", "args": {<ModelArgs fields>}}

`args` is validated by `ModelArgs.from_dict` (fields missing from it take the reference defaults),
so a preset holding only the keys of one of DeepSeek's `inference/configs/*.json` is that config.
Every problem (unknown schema version, unknown key, bad value, malformed JSON, unknown preset name)
raises `ConfigError` naming what is wrong.

    names() -> ["tiny", ...]          tiny first, then by total parameters
    load("small") / load("x.json")   -> ModelArgs
    load_preset(...)                 -> {"name", "description", "args": ModelArgs}
    save(args, "x.json", name=..., description=...)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelArgs
from ..params import count_params

__all__ = [
    "PRESETS_DIR",
    "SCHEMA",
    "from_json",
    "load",
    "load_preset",
    "names",
    "parse",
    "save",
    "to_json",
]

SCHEMA = 1  # version of the file layout this module reads and writes
PRESETS_DIR = Path(__file__).resolve().parent  # the JSON files ship inside the package
_KEYS = ("schema", "name", "description", "args")


def names() -> list[str]:
    """Shipped preset names: "tiny" first, then ordered by total parameter count (small to
    large), ties by name. Files that fail validation are skipped here; `load` reports them."""
    found = []
    for path in sorted(PRESETS_DIR.glob("*.json")):
        try:
            total = count_params(load(path))["total"]
        except ConfigError:
            continue
        found.append((path.stem != "tiny", total, path.stem))
    return [name for *_, name in sorted(found)]


def _resolve(name_or_path: str | os.PathLike) -> Path:
    """A preset name ("tiny") or a path to a JSON file -> the file's path."""
    text = os.fspath(name_or_path)
    path = Path(text)
    # Names are bare words; anything that looks like a path is one.
    if not isinstance(name_or_path, str) or path.suffix == ".json" or "/" in text or os.sep in text:
        if not path.is_file():
            raise ConfigError(f"preset file {text!r} does not exist", field="preset")
        return path
    path = PRESETS_DIR / f"{text}.json"
    if not path.is_file():
        known = ", ".join(names()) or "(none)"
        raise ConfigError(f"unknown preset {text!r}; known presets: {known}", field="preset")
    return path


def parse(text: str, source: str = "preset") -> dict[str, Any]:
    """Validate a preset document -> {"schema", "name", "description", "args": ModelArgs}."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}", field="preset") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a preset", field="preset") from None
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{source} must be a JSON object with keys {', '.join(_KEYS)}; "
            f"got {type(doc).__name__}",
            field="preset",
        )
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"a preset has exactly: {', '.join(_KEYS)}",
            field=str(unknown[0]),
        )
    if "schema" not in doc:
        raise ConfigError(
            f"{source}: missing key 'schema' (a preset document has \"schema\": {SCHEMA})",
            field="schema",
        )
    schema = doc.get("schema")
    if schema != SCHEMA or isinstance(schema, bool):
        raise ConfigError(
            f"{source}: unsupported schema version {schema!r}; this version of dsv3 reads "
            f"schema {SCHEMA}",
            field="schema",
        )
    for key in ("name", "description"):
        if not isinstance(doc.get(key, ""), str):
            raise ConfigError(
                f"{source}: {key} must be a string, got {type(doc[key]).__name__}", field=key
            )
    if "args" not in doc:
        raise ConfigError(f"{source}: missing key 'args' (the ModelArgs fields)", field="args")
    if not isinstance(doc["args"], dict):
        raise ConfigError(
            f"{source}: args must be a JSON object of ModelArgs fields, got "
            f"{type(doc['args']).__name__}",
            field="args",
        )
    try:
        args = ModelArgs.from_dict(doc["args"])
    except ConfigError as e:
        # Keep field/layer for UIs; say which file the bad value came from.
        raise ConfigError(f"{source}: {e}", field=e.field, layer=e.layer) from None
    except TypeError as e:  # e.g. args given as a list: from_dict rejects, but be safe
        raise ConfigError(f"{source}: bad args: {e}", field="args") from None
    return {
        "schema": SCHEMA,
        "name": doc.get("name", ""),
        "description": doc.get("description", ""),
        "args": args,
    }


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset by name or path -> {"schema", "name", "description", "args": ModelArgs}.
    A file without a "name" is named after its file stem."""
    path = _resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"preset {path.name} is not UTF-8 text: {e}", field="preset") from None
    out = parse(text, source=f"preset {path.name}")
    out["name"] = out["name"] or path.stem
    return out


def load(name_or_path: str | os.PathLike) -> ModelArgs:
    """A preset by name ("tiny") or path ("my.json") -> validated ModelArgs."""
    return load_preset(name_or_path)["args"]


def to_json(args: ModelArgs, name: str, description: str = "") -> str:
    """A preset document for `args` (every field written out, layer keys as strings)."""
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
    doc = {"schema": SCHEMA, "name": name, "description": description, "args": args.to_dict()}
    return json.dumps(doc, indent=2) + "\n"


def from_json(text: str) -> ModelArgs:
    """A preset document (text) -> ModelArgs; `ConfigError` on any problem."""
    return parse(text)["args"]


def save(
    args: ModelArgs,
    path: str | os.PathLike,
    name: str | None = None,
    description: str = "",
) -> Path:
    """Write `args` as a preset file (name defaults to the file stem). Written to a temporary
    file first and renamed, so a crash never leaves a half-written preset."""
    path = Path(path)
    text = to_json(args, name if name is not None else path.stem, description)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
