"""Safetensors read and write, one tensor at a time.

Job: read any one tensor of a (sharded, indexed) safetensors checkpoint without touching
the others, and write a sharded checkpoint tensor by tensor.

Contract:
    TensorIndex(model_dir)          name -> TensorInfo (file, dtype, shape, byte range), headers only
    index.read(name) -> np.ndarray  exactly that tensor's bytes, in its stored dtype
    write_sharded(out_dir, specs, fetch, max_shard_bytes) -> list of file names

The format is an 8-byte little-endian header length, a JSON header, then raw bytes, so
it is parsed here directly: nothing but the requested bytes is read, bfloat16 arrives
as an ml_dtypes array (the `numpy` loader of the safetensors package rejects it), and no
code from the directory ever runs.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # the safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: TensorInfo(path, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0], base + h["data_offsets"][1])
        for name, h in header.items()
    }


class TensorIndex:
    """Every tensor of a model directory: from its index file, or its single safetensors file."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors files (only safetensors weights are read)")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            self.tensors.update(read_header(model_dir / name))

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        out = np.empty(info.shape, DTYPES[info.dtype])
        with open(info.file, "rb") as f:
            f.seek(info.start)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards, size = [[]], 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_file(path: Path, specs: list[TensorSpec], fetch: Callable[[str], np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
        header[spec.name] = {
            "dtype": _NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for spec in specs:
            array = np.ascontiguousarray(fetch(spec.name), dtype=spec.dtype)
            if array.shape != spec.shape:
                raise ValueError(f"{spec.name}: produced shape {array.shape}, declared {spec.shape}")
            f.write(array.tobytes())


def write_sharded(
    out_dir: str | Path, specs: Iterable[TensorSpec], fetch: Callable[[str], np.ndarray], max_shard_bytes: int
) -> list[str]:
    """Writes model-0000N-of-0000M.safetensors (fetching one tensor at a time) and the index."""
    out_dir = Path(out_dir)
    specs = list(specs)
    shards = _shards(specs, max_shard_bytes)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(out_dir / name, shard, fetch)
        names.append(name)
        weight_map.update({spec.name: name for spec in shard})
    total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
