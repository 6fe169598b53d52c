"""A safetensors checkpoint read tensor by tensor, slice by slice, with plain file reads.

Why not `safetensors.safe_open`: it maps whole files, and every page a rank touches counts in its
resident memory while the file is open; here a rank reads exactly the bytes of the tensors (and the
rows of fused expert tensors) it keeps, straight into their final buffers, so its peak memory while
loading is its shard. The index (`model.safetensors.index.json`) and the files' headers are checked
before anything is read: a missing shard, an unreadable header or a truncated file is one error
naming the file. Importing this module needs no torch (the daemon checks a folder before it starts
any rank); reading does.

FP8 checkpoints (DeepSeek-V3/R1's official layout): a linear's weight `X.weight` is F8_E4M3 and
`X.weight_scale_inv` holds one float32 multiplier per 128 × 128 block, shape (⌈N/128⌉, ⌈K/128⌉) for a
weight (N, K). `check_dtypes` checks every pair before a rank starts; the 8-bit loaders
(`dsnode.central.eight_bit_load`) read them; a plain read of an FP8 tensor is refused, since its
values mean nothing without their scales.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dsnode.hfconfig import ModelFolderError

INDEX_NAME = "model.safetensors.index.json"
HEADER_LIMIT = 100 * 2**20  # a header longer than this is not a safetensors header
LOADABLE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = ("F32", "BF16", "F16")
FP8_BLOCK = 128


class CheckpointError(ModelFolderError):
    """A checkpoint that cannot be loaded; the message names the file or the tensor."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute, in `file`
    nbytes: int

    def row_bytes(self) -> int:
        """Bytes of one index along dim 0."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


class Checkpoint:
    """The tensors of a model folder: name → where its bytes are."""

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], source: Path) -> None:
        self.folder = folder
        self.entries = entries
        self.source = source  # the index file, or the single .safetensors file
        self._files: dict[Path, BinaryIO] = {}

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.exists():
            return cls(folder, _entries_from_index(index), index)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files (and no {INDEX_NAME})")
        entries: dict[str, TensorEntry] = {}
        for file in files:
            entries.update(read_header(file))
        return cls(folder, entries, files[0] if len(files) == 1 else folder)

    def check_dtypes(self) -> None:
        """Refuse a tensor of a dtype no loader here converts, and an FP8 weight whose block scales
        are missing or do not fit its shape; the message names the tensor."""
        for entry in self.entries.values():
            if entry.dtype == FP8:
                self._check_scales(entry)
            elif entry.dtype not in LOADABLE_DTYPES:
                raise CheckpointError(_unloadable(entry))

    @property
    def has_fp8(self) -> bool:
        return any(entry.dtype == FP8 for entry in self.entries.values())

    def is_fp8(self, name: str) -> bool:
        return self.entry(name).dtype == FP8

    def _check_scales(self, entry: TensorEntry) -> None:
        if len(entry.shape) != 2:
            raise CheckpointError(f"{entry.file}: FP8 tensor {entry.name!r} has shape {list(entry.shape)}; "
                                  "dsnode reads FP8 weights of linears (2-D) only")
        scale = self.entries.get(entry.name + SCALE_SUFFIX)
        if scale is None:
            raise CheckpointError(f"{entry.file}: FP8 tensor {entry.name!r} has no "
                                  f"{entry.name + SCALE_SUFFIX!r} (one scale per 128 x 128 block) "
                                  "in the checkpoint")
        want = fp8_scale_shape(entry.shape)
        if scale.shape != want or scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name!r} is {scale.dtype} {list(scale.shape)}, "
                f"but its FP8 weight {entry.name!r} {list(entry.shape)} needs float scales of shape "
                f"{list(want)} (one per {FP8_BLOCK} x {FP8_BLOCK} block)")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: no tensor {name!r} in the checkpoint") from None

    def read_into(self, name: str, out: Any, rows: range | None = None) -> None:
        """Fill the torch tensor `out` with tensor `name` (or its `rows` along dim 0), converting the
        dtype if the file's differs."""
        entry = self.entry(name)
        shape = entry.shape if rows is None else (len(rows), *entry.shape[1:])
        if tuple(out.shape) != shape:
            raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}; "
                                  f"the model's config.json wants {list(out.shape)}")
        offset, nbytes = entry.offset, entry.nbytes
        if rows is not None:
            offset, nbytes = offset + rows.start * entry.row_bytes(), len(rows) * entry.row_bytes()
        target = out if _torch_dtype(entry) == out.dtype and out.is_contiguous() else out.new_empty(
            shape, dtype=_torch_dtype(entry))
        self._read_bytes(entry, offset, nbytes, target)
        if target is not out:
            out.copy_(target)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_bytes(self, entry: TensorEntry, offset: int, nbytes: int, target: Any) -> None:
        import torch

        handle = self._files.get(entry.file)
        if handle is None:
            handle = self._files[entry.file] = open(entry.file, "rb", buffering=0)
        view = memoryview(target.view(-1).view(torch.uint8).numpy())  # bytes of `target`, no copy
        handle.seek(offset)
        got = 0
        while got < nbytes:
            n = handle.readinto(view[got:nbytes])
            if not n:
                raise CheckpointError(f"{entry.file}: ends inside tensor {entry.name!r} (truncated?)")
            got += n


def _torch_dtype(entry: TensorEntry) -> Any:
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, FP8: torch.float8_e4m3fn}
    if entry.dtype not in dtypes:
        raise CheckpointError(_unloadable(entry))
    return dtypes[entry.dtype]


def _unloadable(entry: TensorEntry) -> str:
    return (f"{entry.file}: tensor {entry.name!r} is {entry.dtype}; dsnode loads F32/F16/BF16 checkpoints, "
            f"and {FP8} (e4m3) weights with 128 x 128 block scales")


def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The `weight_scale_inv` shape of an FP8 weight: one per 128 x 128 block of its last two dims."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))


def _entries_from_index(index: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(str(file), []).append(name)
    entries: dict[str, TensorEntry] = {}
    for file, names in sorted(by_file.items()):
        path = index.parent / file
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named by {index.name} for {len(names)} tensors, "
                                  f"e.g. {names[0]!r})")
        header = read_header(path)
        absent = [n for n in names if n not in header]
        if absent:
            raise CheckpointError(f"{path}: no tensor {absent[0]!r}, which {index.name} says it holds")
        entries.update({n: header[n] for n in names})
    return entries


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file holds, checked against the file's size."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > HEADER_LIMIT:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from None
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entry = TensorEntry(name, path, info["dtype"], tuple(info["shape"]), start + begin, end - begin)
        if entry.offset + entry.nbytes > size:
            raise CheckpointError(f"{path}: ends inside tensor {name!r} (truncated: {size} bytes)")
        entries[name] = entry
    return entries
