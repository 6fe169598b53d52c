"""Read a Hugging Face checkpoint one tensor at a time, without torch (convert time).

The graph builder (`edge/graph_builder.py`) needs each weight once, in float32, and then never again.
Loading the whole model first would hold a 7B checkpoint twice over (bf16 on disk is 15 GB, float32 in
memory 30 GB): more than an edge-class host has. So only the safetensors headers are read up front, and
each tensor is read from its file on request (a plain read, not a memory map, so what was read is not
left counted in the process's resident memory) and widened to float32 in numpy. A linear weight is
widened as it is transposed, tile by tile, straight into the quantizer's (in, out) array
(`read_transposed`), and the embedding table is converted in row chunks (`read_as`): no whole float32
copy of a bf16 tensor is made. Peak memory is then about the largest tensor (the LM head), not the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# read_transposed's square: a tile pair (2 x 256 KiB in float32) stays in a core's L2
TILE = 256
ROW_CHUNK_BYTES = 64 << 20  # read_as: float32 bytes widened at a time


class CheckpointError(Exception):
    """The weights cannot be read as the graph builder needs them; the message says which and why."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the file, after the header
    end: int


class Checkpoint:
    """name → float32 array, read lazily from every `*.safetensors` file of a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._entries: dict[str, _Entry] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weights (the streaming converter reads only those)")
        for path in files:
            self._index(path)

    def _index(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            self._entries[name] = _Entry(path, entry["dtype"], tuple(entry["shape"]), 8 + size + start, 8 + size + end)

    def check(self, required: list[str]) -> None:
        """Every `required` tensor is there and every file is as long as its header says: a truncated
        download is refused before anything is built, not halfway through."""
        missing = [name for name in required if name not in self._entries]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.folder}: the weights have no {', '.join(missing[:3])}{more}")
        ends: dict[Path, int] = {}
        for entry in self._entries.values():
            ends[entry.path] = max(ends.get(entry.path, 0), entry.end)
        for path, end in sorted(ends.items()):
            if path.stat().st_size < end:
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, its header needs {end}: truncated")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def dtype(self) -> str:
        """The dtype most of the weights are stored in (e.g. "BF16"): what the source model is."""
        counts: dict[str, int] = {}
        for entry in self._entries.values():
            counts[entry.dtype] = counts.get(entry.dtype, 0) + 1
        return max(counts, key=lambda k: counts[k])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def float32(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (bf16 is the top half of a float32: shift it up)."""
        values, bf16 = self._stored(name)
        if bf16:  # one pass, one new array (no uint32 copy to shift afterwards)
            return np.left_shift(values, 16, out=np.empty(values.shape, np.uint32), dtype=np.uint32).view(np.float32)
        return values.astype(np.float32, copy=values.dtype != np.float32)

    def read_as(self, name: str, dtype: np.dtype) -> np.ndarray:
        """The tensor as a new `dtype` array (float32 or float16), widened a chunk of rows at a time."""
        values, bf16 = self._stored(name)
        if not bf16:
            return values.astype(dtype, copy=values.dtype != dtype)
        out = np.empty(values.shape, dtype)
        step = max(1, ROW_CHUNK_BYTES // (4 * max(1, values[:1].size)))
        for start in range(0, len(values), step):
            chunk = values[start:start + step]
            out[start:start + step] = np.left_shift(chunk, 16, dtype=np.uint32).view(np.float32)
        return out

    def read_transposed(self, name: str, out: np.ndarray) -> None:
        """out[:] = the (rows, cols) tensor transposed, in float32: `out` is (cols, rows) float32, e.g. a
        column slice of a larger array."""
        values, bf16 = self._stored(name)
        transpose_into(values, out, bf16=bf16)

    def _stored(self, name: str) -> tuple[np.ndarray, bool]:
        """The tensor's values as stored (bf16 as its uint16 bits), read into a new array; and whether bf16."""
        entry = self._entry(name)
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{entry.path}: {name} is {entry.dtype}; only F32, F16 and BF16 weights are read")
        raw = np.empty(entry.end - entry.start, dtype=np.uint8)
        with open(entry.path, "rb") as f:
            f.seek(entry.start)
            if f.readinto(memoryview(raw)) != raw.size:
                raise CheckpointError(f"{entry.path}: {name} is cut short (the file is truncated)")
        return raw.view(_DTYPES[entry.dtype]).reshape(entry.shape), entry.dtype == "BF16"

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: the weights have no tensor {name!r}") from None

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can release a checkpoint explicitly."""


def transpose_into(source: np.ndarray, out: np.ndarray, bf16: bool = False) -> None:
    """out[:] = source.T in float32, tile by tile (`bf16`: `source` holds bfloat16 bits as uint16, widened
    per tile). numpy's copy of a transposed view walks one side with a stride of a whole row; square
    tiles keep both sides in cache (2.2-4.4x faster on a 7B's weights, e.g. its gate_up in 0.20 instead
    of 0.81 s: benchmarks/bench_transpose.py), and widening per tile makes no float32 copy of the source."""
    rows, cols = source.shape
    bits = out.view(np.uint32) if bf16 else None
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            tile = source[i:i + TILE, j:j + TILE].T
            if bits is not None:
                np.left_shift(tile, 16, out=bits[j:j + TILE, i:i + TILE], dtype=np.uint32)
            else:
                out[j:j + TILE, i:i + TILE] = tile
