"""The validated reader: safetensors files only, every header checked (and truncation
detected) before any tensor is read; pickles are refused by name and by their bytes, never
unpickled. Every load (dsv3's own, HF, the reference's per-rank files, sharded) reads through
`Source`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..dist.plan import reference_files

__all__ = ["CheckpointError", "Source", "checkpoint_files", "hf_files", "read_header"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model. `missing`, `unexpected` and
    `mismatched` hold the offending tensor names (all of them; the message shows a few)."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ):
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def read_header(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete safetensors file and return its JSON header. Never
    unpickles: pickles and anything else are rejected by their bytes, before torch sees them."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: PyTorch pickle checkpoints ({path.suffix}) are not read: unpickling can "
            f"run arbitrary code. Convert it to .safetensors with a trusted tool first."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        if len(head) < 9 or head[8:9] != b"{" or n > _MAX_HEADER:
            # Not safetensors (whose JSON header follows an 8-byte length). Say what it is.
            # A pickle opens with PROTO (0x80) and its protocol 2..5; torch.save's zip with PK.
            # (0x80 alone also begins a safetensors header length of 128 + 256k bytes.)
            pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            if pickle or head[:4] == b"PK\x03\x04":
                raise CheckpointError(
                    f"{path.name}: this is a PyTorch pickle (torch.save) file, not safetensors; "
                    f"it is not loaded because unpickling can run arbitrary code"
                )
            raise CheckpointError(f"{path.name}: not a safetensors file ({size} bytes, no header)")
        f.seek(8)
        if 8 + n > size:
            raise CheckpointError(
                f"{path.name}: truncated safetensors file: the header needs {n} bytes, the file "
                f"holds {size - 8}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not an object)")
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for {name!r}") from None
        want = _DTYPE_BYTES.get(dtype)
        if want is not None and stop - start != want * math.prod(shape):
            raise CheckpointError(
                f"{path.name}: corrupt header: {name!r} {dtype}{shape} spans {stop - start} bytes"
            )
        end = max(end, stop)
    if end > data:
        raise CheckpointError(
            f"{path.name}: truncated safetensors file: tensors need {end} bytes of data, the file "
            f"holds {data}"
        )
    return header


class Source:
    """THE validated reader: tensors by name from safetensors files (or a dict), read one at a
    time, every file's header checked first (`read_header`).
    `prefixes` namespaces each file's names (reference shards repeat names across ranks)."""

    def __init__(self, files: Iterable[Path] = (), prefixes: Iterable[str] | None = None):
        self._stack = ExitStack()
        self._handles: dict[str, tuple[Any, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        files = list(files)
        prefixes = list(prefixes) if prefixes is not None else [""] * len(files)
        try:
            for path, prefix in zip(files, prefixes):
                header = read_header(path)
                self.metadata.update(header.get("__metadata__") or {})
                try:
                    handle = self._stack.enter_context(safe_open(path, framework="pt"))
                except Exception as e:  # the library's own checks: report them as ours
                    raise CheckpointError(f"{path.name}: cannot open as safetensors: {e}") from None
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    key = prefix + name
                    if key in self._handles:
                        raise CheckpointError(f"tensor {name!r} appears in two files ({path.name})")
                    self._handles[key] = (handle, name)
                    self._shapes[key] = tuple(info["shape"])
                    self._dtypes[key] = info["dtype"]
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_dict(cls, sd: dict[str, torch.Tensor]) -> Source:
        src = cls()
        src._tensors = sd
        src._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        src._dtypes = {k: str(v.dtype) for k, v in sd.items()}
        return src

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str, index: tuple = ()) -> torch.Tensor:
        """Tensor `name`, or only its part `index` (slices): a sliced read touches only the
        bytes of that part."""
        if hasattr(self, "_tensors"):
            t = self._tensors[name]
            return t[index] if index else t
        handle, real = self._handles[name]
        try:
            return handle.get_slice(real)[index] if index else handle.get_tensor(real)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {real!r}: {e}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hf_files(root: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (index, single file, or any)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f:
                raise CheckpointError(f"{index.name}: shard name {f!r} is not a plain file name")
            if not (root / f).is_file():
                raise CheckpointError(f"{index.name} lists {f}, which is missing")
        return [root / f for f in files]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: only PyTorch pickle weights ({', '.join(pickles[:3])}); they are not read "
            f"because unpickling can run arbitrary code. Use a .safetensors checkpoint."
        )
    raise CheckpointError(f"{root}: no .safetensors weights found")


def checkpoint_files(path: Path, per_rank: bool = False) -> tuple[list[Path], int | None]:
    """(files, mp): DeepSeek convert.py's per-rank files `model{rank}-mp{N}.safetensors` of a
    directory in rank order with N, else (unless `per_rank`) every *.safetensors file of the
    directory with mp None (full tensors). A file path gives ([path], None)."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        found = reference_files(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if found is not None:
        return found
    files = [] if per_rank else sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    extra = f" (found pickles {', '.join(pickles[:3])}, which are never read)" if pickles else ""
    what = "model{rank}-mp{N}.safetensors" if per_rank else ".safetensors"
    raise CheckpointError(f"{path}: no {what} files{extra}")
