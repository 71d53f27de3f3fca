"""Checkpoint file I/O shared by every converter: safetensors reading and writing, export
directories, and abstract params -> shardings.

Reading parses the safetensors format itself (8-byte header length, JSON header, little-endian
data) over a memory map, so headers are inspected without touching data, one tensor is read at
a time, and bfloat16 works. Every tensor is checked as it is read: a damaged file (truncated,
padded, garbled header), a CRC-32 mismatch (our exports record one per tensor in the header) or a
NaN/inf is a ValueError naming the shard file and the tensor.

Writing streams tensors from producers (only one is in memory at a time) into shard files of a
staging directory ``OUT.tmp-XXXX`` that is renamed into place only once complete; a directory
that is not a previous export is never replaced.

This module knows no model: the mapping of tensors to params is in `llada_jax.interop.mapping`
and the per-family tables.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from llada_jax import parallel
from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")
# Shard metadata entry our exports write per tensor: "llada_jax.crc32:<key>" -> 8 hex digits of
# the CRC-32 of the tensor's bytes. Hugging Face checkpoints carry no checksum; when a shard has
# one, reading verifies it, so a payload changed after the export is caught.
CRC32_PREFIX = "llada_jax.crc32:"

# safetensors dtype name -> numpy dtype. Floating dtypes can become weights; the others are read
# (and named in errors) but never converted. Unknown names (float8 variants) count 1 byte.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_READABLE = {**FLOAT_DTYPES, **{name: np.dtype(t) for name, t in (
    ("I64", np.int64), ("I32", np.int32), ("I16", np.int16), ("I8", np.int8),
    ("U64", np.uint64), ("U32", np.uint32), ("U16", np.uint16), ("U8", np.uint8),
    ("BOOL", np.bool_))}}
# Our dtype names (config fields, flags) -> numpy dtype, and numpy dtype -> safetensors name.
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_SAFETENSORS_NAME = {dtype: name for name, dtype in FLOAT_DTYPES.items()}

_FINITE_CHUNK = 1 << 22   # elements per finiteness check (bounds the temporary arrays)


def some(keys: Sequence[str], n: int = 5) -> str:
    """The first `n` keys, quoted, for an error message."""
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors checkpoint (filed under its key by `list_tensors`), as its
    header describes it (no data read)."""

    shard: str
    dtype: str            # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        # An unknown dtype (a float8 variant) counts 1 byte per element.
        return math.prod(self.shape) * _READABLE.get(self.dtype, np.dtype(np.uint8)).itemsize


def read_header(path: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """(tensor entries, offset of the data, ``__metadata__``) of a safetensors file, after
    checking that the header describes exactly the bytes the file holds."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"shard file {path} is damaged: not a safetensors file (shorter "
                             f"than its header)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(min(header_len, 100 << 20)))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"shard file {path} is damaged: not a safetensors header "
                             f"({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = os.path.getsize(path) - 8 - header_len
    covered = max((info["data_offsets"][1] for info in header.values()), default=0)
    if covered != data_size:   # truncated, or bytes appended: the payload is not what it was
        raise ValueError(f"shard file {path} is damaged: its header describes {covered} bytes "
                         f"of tensor data, the file holds {data_size}")
    for name, info in header.items():
        dtype = _READABLE.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is not None and end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"shard file {path} is damaged: tensor {name!r} has "
                             f"{end - begin} bytes for shape {info['shape']} of {info['dtype']}")
    return header, 8 + header_len, metadata


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def list_tensors(hf_dir: str) -> dict[str, StoredTensor]:
    """Key -> StoredTensor for every tensor of a safetensors checkpoint (sharded or single)."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    by_shard: dict[str, list[str]] = {SINGLE_FILE: []}   # no keys listed: all of the file's
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
        by_shard = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
    elif not os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "no such directory"
        raise FileNotFoundError(f"{hf_dir}: expected {INDEX_FILE} or {SINGLE_FILE} (only "
                                f"safetensors checkpoints are supported), found {found}")
    tensors = {}
    for shard, keys in by_shard.items():
        path = os.path.join(hf_dir, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard file {path} is missing; {INDEX_FILE} lists "
                                    f"{len(keys)} tensor(s) in it, e.g. {keys[0]!r}")
        header, _, _ = read_header(path)
        for key in (keys or sorted(header)):
            if key not in header:
                raise ValueError(f"tensor {key!r}: {INDEX_FILE} says it is in {shard}, "
                                 f"but that file does not contain it")
            tensors[key] = StoredTensor(shard, header[key]["dtype"],
                                        tuple(int(s) for s in header[key]["shape"]))
    return tensors


def tensor_crc32(array: np.ndarray) -> str:
    """The CRC-32 of a tensor's (little-endian, C-order) bytes, as 8 hex digits."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(data.data) & 0xFFFFFFFF:08x}"


def check_tensor(array: np.ndarray, key: str, path: str, crc32: str | None = None) -> None:
    """Refuses a tensor whose bytes do not match the recorded checksum or that holds NaN/inf.

    Every message names the shard file and the tensor, so a damaged file is found at once.
    """
    if crc32 is not None and tensor_crc32(array) != crc32:
        raise ValueError(f"shard file {path}: tensor {key!r} is corrupted (CRC-32 "
                         f"{tensor_crc32(array)} does not match the {crc32} recorded at export)")
    if np.dtype(array.dtype) not in _SAFETENSORS_NAME:   # integers, bools: nothing to check
        return
    # NaN and inf are the floats whose exponent bits are all ones (the bits of inf): an integer
    # test on the raw bits is several times faster than np.isfinite (much more so for bfloat16).
    uint = np.dtype(f"u{array.dtype.itemsize}")
    mask = np.array(np.inf, array.dtype).view(uint)
    flat = np.ascontiguousarray(array).reshape(-1)
    bits = flat.view(uint)
    for start in range(0, flat.size, _FINITE_CHUNK):
        bad = (bits[start:start + _FINITE_CHUNK] & mask) == mask
        if bad.any():
            first = start + int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(first, array.shape))
            raise ValueError(f"shard file {path}: tensor {key!r} holds a non-finite value "
                             f"({float(flat[first])} at index {list(index)}); the file is "
                             f"damaged or the model diverged")


class ShardReader:
    """Reads checked tensors one at a time from the shard files of one directory.

    Files are memory-mapped on first use; `close` unmaps them (pages read so far would
    otherwise stay in the resident set, file-backed but counted all the same).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._files: dict[str, tuple[dict, dict, np.memmap]] = {}

    def read(self, key: str, shard: str) -> np.ndarray:
        """Tensor `key` of file `shard`, after its checksum (if recorded) and finiteness."""
        path = os.path.join(self.directory, shard)
        if shard not in self._files:
            header, offset, metadata = read_header(path)   # again: it may have changed
            self._files[shard] = header, metadata, np.memmap(path, np.uint8, "r", offset=offset)
        header, metadata, data = self._files[shard]
        info = header[key]
        if info["dtype"] not in _READABLE:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _READABLE[info["dtype"]].newbyteorder("<")
        array = np.array(data[begin:end].view(dtype).reshape(info["shape"]))
        check_tensor(array, key, path, metadata.get(CRC32_PREFIX + key))
        return array

    def close(self) -> None:
        self._files.clear()


# ----------------------------------------------------------------------------------------------
# Writing.


# One tensor of an export: (key, dtype, shape, producer called when its turn comes).
PlannedTensor = tuple[str, np.dtype, tuple[int, ...], Callable[[], np.ndarray]]


def write_safetensors(path: str | None, tensors: Sequence[PlannedTensor]) -> None:
    """Streams tensors into one safetensors file, calling each producer only when its turn comes.

    The header (names, dtypes, shapes, offsets) is known from the shapes alone, so only one
    tensor is ever held in memory. The header's metadata is ``format: pt`` (as in Hugging Face's
    files) and each tensor's CRC-32 (`CRC32_PREFIX` + name): written as placeholders of the same
    width first, filled in once the data is written, so import can detect a payload changed
    later. `path=None` runs the producers without writing (other processes of a multi-host
    export, which must join the same collectives).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is big-endian")
    meta = {"format": "pt", **{CRC32_PREFIX + name: "0" * 8 for name, *_ in tensors}}
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_NAME[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size

    def header_blob() -> bytes:
        blob = json.dumps(header, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)   # the data starts 8-byte aligned

    blob = header_blob()
    with open(path if path is not None else os.devnull, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in tensors:
            array = np.ascontiguousarray(produce())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: produced {array.dtype}{list(array.shape)}, "
                                 f"planned {np.dtype(dtype)}{list(shape)}")
            meta[CRC32_PREFIX + name] = tensor_crc32(array)
            f.write(array.reshape(-1).view(np.uint8).data)
        if path is not None:
            final = header_blob()
            if len(final) != len(blob):   # cannot happen: the checksums have a fixed width
                raise RuntimeError(f"{path}: the header changed size while being completed")
            f.seek(8)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())   # a full disk shows up here, not after the rename


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int
                ) -> list[tuple[str, list[PlannedTensor]]]:
    """Greedy split of tensors, in order, into ``model-0000n-of-0000N.safetensors`` shards of at
    most `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        num_bytes = math.prod(tensor[2]) * np.dtype(tensor[1]).itemsize
        if groups[-1] and size + num_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += num_bytes
    return [(f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors", group)
            for n, group in enumerate(groups)]


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    directory: str
    num_tensors: int
    num_bytes: int
    num_shards: int


def write_export(out_dir: str, shards: Sequence[tuple[str, Sequence[PlannedTensor]]],
                 json_files: Mapping[str, Any], *, tokenizer_dir: str | None = None,
                 code_dir: str | None = None, overwrite: bool = False) -> ExportSummary:
    """Writes a whole checkpoint directory once: the shards, their index, `json_files`
    (name -> value), the tokenizer files of `tokenizer_dir` and the ``*.py`` files of `code_dir`.

    Everything goes into ``OUT.tmp-XXXX``, renamed to `out_dir` at the end; on error (a full
    disk included) the temporary directory is removed, so a directory named `out_dir` is always
    complete. An existing `out_dir` must pass `check_replaceable`. In a multi-process run every
    process must call this (the producers may run collectives); process 0 writes.
    """
    out_dir = os.path.abspath(out_dir)
    check_replaceable(out_dir, overwrite)
    for source in (tokenizer_dir, code_dir):
        if source is not None and not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: no such directory")
    writer = jax.process_index() == 0
    parent = os.path.dirname(out_dir)
    tmp = None
    if writer:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        weight_map, total = {}, 0
        for name, tensors in shards:
            write_safetensors(os.path.join(tmp, name) if writer else None, tensors)
            weight_map.update({key: name for key, *_ in tensors})
            total += sum(math.prod(shape) * np.dtype(dtype).itemsize
                         for _, dtype, shape, _ in tensors)
        if writer:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            for name, value in {INDEX_FILE: index, **json_files}.items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(value, f, indent=2)
                    f.write("\n")
            _copy_extras(tmp, tokenizer_dir, code_dir)
            replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(out_dir, len(weight_map), total, len(shards))


def _copy_extras(tmp: str, tokenizer_dir: str | None, code_dir: str | None) -> None:
    if tokenizer_dir is not None:
        copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
        if not copied:
            raise FileNotFoundError(f"{tokenizer_dir}: none of the tokenizer files "
                                    f"{TOKENIZER_FILES} found")
        for f in copied:
            shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    if code_dir is not None:
        for f in sorted(os.listdir(code_dir)):
            if f.endswith(".py"):
                shutil.copy2(os.path.join(code_dir, f), os.path.join(tmp, f))


# What an export writes into its directory; `--overwrite` replaces a directory only when it
# holds nothing else (a previous export), never unrelated files.
_EXPORT_FILE_PATTERNS = ("model-*.safetensors", SINGLE_FILE, INDEX_FILE, "config.json",
                         "generation_config.json", *TOKENIZER_FILES, "*.py")


def check_replaceable(out_dir: str, overwrite: bool) -> None:
    """Refuses an `out_dir` an export must not replace, before anything is written.

    A missing or empty directory is fine. A non-empty one needs `overwrite` and must be a
    previous export: config.json, safetensors weights, and only files an export writes.
    """
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite / overwrite=True to "
                              f"replace a previous export)")
    unrelated = [e for e in entries if not (
        os.path.isfile(os.path.join(out_dir, e))
        and any(fnmatch.fnmatchcase(e, p) for p in _EXPORT_FILE_PATTERNS))]
    is_export = "config.json" in entries and (INDEX_FILE in entries or SINGLE_FILE in entries)
    if unrelated or not is_export:
        why = (f"it holds files an export does not write: {some(unrelated)}" if unrelated
               else "it has no config.json and safetensors index")
        raise FileExistsError(f"refusing to overwrite {out_dir}: it is not a previous export "
                              f"({why}); choose another output directory")


def replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished `tmp` to `out_dir` (rename is atomic within one filesystem).

    An existing `out_dir` was checked by `check_replaceable` (empty, or a previous export): it
    is moved aside, the new directory renamed in, and only then the old one deleted.
    """
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-",
                           dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Placement: abstract params -> shardings, host arrays -> devices.


def param_shardings(boxed: Any, mesh: Mesh | None = None, rules: Iterable | None = None) -> Any:
    """The target sharding of every parameter of `boxed` (abstract params in their logical
    partitioning boxes): the logical specs mapped by `rules` (default: the project's table) on
    `mesh`, or the first local device without a mesh."""
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, nn.unbox(boxed))
    rules = tuple(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules)
    return parallel.logical_to_sharding(boxed, mesh, rules)


def place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto `sharding`; every device (of every process) gets just its slice."""
    array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return array.block_until_ready()


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process: a replicated one from this host's copy, any
    other gathered from every host (then every process must call this)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)   # every host holds it all
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
