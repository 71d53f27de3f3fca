"""Where records come from: one source grammar and one registry for every kind of data.

A *source spec* (`config.data.source`, `config.data.eval_source`) names the records:

    synthetic[@train|@eval]    the built-in pre-training corpus (`llada_jax.data.synthetic`);
                               without a split: `train` for training, `eval` for evaluation.
    synthetic_chat[@SPLIT]     the built-in question/answer chat set (`train` or `test`), see
                               `llada_jax.data.synthetic_chat`.
    shapes[@train|@test]       the built-in coloured-shapes image set for LLaDA-V
                               (`llada_jax.data.synthetic_images`), as LLaVA records.
    tfds:NAME[@SPLIT]          a prepared tensorflow-datasets dataset, read through
                               `tfds.data_source` (ArrayRecord, no TensorFlow needed). NAME may
                               carry a config and version (`c4/en:3.1.0`); SPLIT defaults to
                               `train` and may be sliced (`train[:90%]`). The data directory is
                               `config.data.tfds_data_dir` (empty: the tfds default).
    files:GLOB                 local files (`**` recurses). `*.jsonl` / `*.json`: one JSON object
                               per line. Any other file: one text document per line, stored as
                               `{"text": line}`. Blank lines are skipped; every other line is a
                               record, read by random access from an index of line offsets that
                               is built once when the source is opened. With `vision.enabled`,
                               `files:` means `llava:`.
    llava:GLOB                 LLaVA-style image-text records in `*.jsonl` (one per line) or
                               `*.json` (one JSON list, as LLaVA's `llava_v1_5_mix665k.json`, or
                               one record per line); relative image paths are taken from
                               `config.data.image_folder` ('': the directory of the JSON file).
    mix:SPEC=W,SPEC=W,...      a weighted mixture of tfds / files / synthetic_chat sources, e.g.
                               `mix:tfds:c4/en@train=0.7,files:/data/code/*.jsonl=0.3`.

Every record is a dict with the fields of its source plus `schema.ORIGIN`, a string saying where
it came from (`path:line` for files, `tfds:NAME@SPLIT[index]`, `shapes@train[index]`), so a bad
record can be reported precisely. Records are returned as stored; deciding whether a record is
usable is the job of the pipeline (`llada_jax.data.pipeline`) and of conversation encoding
(`llada_jax.data.chat`).

Order (`record_dataset`): text and chat sources form one global stream that hosts read every
n-th element of; the built-in pre-training corpus and image-text sources (`SHARD_FIRST_KINDS`)
give each host a fixed shard first and shuffle within it, as LLaVA's sampler does. Both orders
are kept exactly as they were when the three builders were separate, so batches are unchanged.

This module only reads: it never writes next to the data and never downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import mmap
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from llada_jax.data.llava_format import LLADA_PLAIN, ConversationTemplate
from llada_jax.data.schema import ERROR, ORIGIN
from llada_jax.data.synthetic import SyntheticTextSource
from llada_jax.data.synthetic_chat import SyntheticChatSource
from llada_jax.data.synthetic_images import ShapesDataset

_WHITESPACE_BYTES = (9, 10, 11, 12, 13, 32)
_JSON_TYPE_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
                    type(None): "null"}
_INDEX_CHUNK_BYTES = 1 << 23


# Built-in sets named without ':' and the splits they offer ("" : chosen by the dataset split).
BUILT_IN_SPLITS = {"synthetic": ("train", "eval"), "synthetic_chat": ("train", "test"),
                   "shapes": ("train", "test")}
IMAGE_KINDS = ("shapes", "llava")
# Sharded per host before shuffling (see the module docstring); never part of a mixture.
SHARD_FIRST_KINDS = ("synthetic", "shapes", "llava")
_GRAMMAR = ("'tfds:NAME[@SPLIT]', 'files:GLOB', 'llava:GLOB', 'synthetic[@SPLIT]', "
            "'synthetic_chat[@SPLIT]', 'shapes[@SPLIT]' or 'mix:SPEC=W,...'")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed source: `kind` (synthetic, synthetic_chat, shapes, tfds, files or llava), its
    argument (name or glob), split and weight."""

    kind: str
    argument: str
    split: str = "train"
    weight: float = 1.0


def parse_source_spec(spec: str, field: str = "data.source") -> list[SourceSpec]:
    """A source spec -> its components (one unless `mix:`); ValueError naming `config.{field}`."""
    def fail(message: str) -> None:
        raise ValueError(f"config.{field}: {message}")

    if not isinstance(spec, str) or not spec:
        fail(f"expected a source spec such as {_GRAMMAR}, found {spec!r}")
    if spec.startswith("mix:"):
        parts = [p for p in spec[len("mix:"):].split(",") if p.strip()]
        if not parts:
            fail(f"'mix:' needs at least one SPEC=WEIGHT, found {spec!r}")
        components = []
        for part in parts:
            inner, sep, weight_text = part.strip().rpartition("=")
            if not sep:
                fail(f"mixture component {part!r} must be SPEC=WEIGHT (e.g. "
                     f"files:/data/*.jsonl=0.3)")
            try:
                weight = float(weight_text)
            except ValueError:
                fail(f"weight of mixture component {part!r} must be a number, found "
                     f"{weight_text!r}")
            if not weight > 0:
                fail(f"weight of mixture component {part!r} must be positive, found {weight}")
            if inner.startswith("mix:"):
                fail(f"mixtures cannot be nested, found {part!r}")
            (single,) = parse_source_spec(inner, field)
            if single.kind in SHARD_FIRST_KINDS:
                fail(f"a mixture takes tfds, files and synthetic_chat sources, found {part!r}")
            components.append(dataclasses.replace(single, weight=weight))
        return components
    kind, sep, argument = spec.partition(":")
    if kind == "tfds" and sep and argument:
        name, at, split = argument.partition("@")
        if not name or (at and not split):
            fail(f"expected 'tfds:NAME[@SPLIT]', found {spec!r}")
        return [SourceSpec("tfds", name, split or "train")]
    if kind in ("files", "llava") and sep and argument:
        return [SourceSpec(kind, argument, "")]
    name, at, split = spec.partition("@")
    if name in BUILT_IN_SPLITS and not sep:
        if at and split not in BUILT_IN_SPLITS[name]:
            fail(f"{name} splits are {' and '.join(map(repr, BUILT_IN_SPLITS[name]))}, "
                 f"found {split!r}")
        return [SourceSpec(name, "", split or ("" if name == "synthetic" else "train"))]
    fail(f"expected {_GRAMMAR}, found {spec!r}")


def parse_image_source_spec(spec: str, field: str = "data.source") -> SourceSpec:
    """A source of image-text records (`vision.enabled`): shapes, llava:, or files: read as
    llava:; ValueError naming `config.{field}` for anything else."""
    try:
        (parsed,) = parse_source_spec(spec, field)
    except ValueError:  # not a source spec, or a mixture of several
        parsed = None
    if parsed and parsed.kind in (*IMAGE_KINDS, "files"):
        return dataclasses.replace(parsed, kind=parsed.kind.replace("files", "llava"))
    raise ValueError(f"config.{field}: expected an image-text source with vision.enabled: "
                     f"'shapes', 'shapes@test', 'files:GLOB' or 'llava:GLOB' (LLaVA JSON/JSONL), "
                     f"found {spec!r}")


def matching_files(pattern: str) -> list[str]:
    """The files a `files:` / `llava:` glob matches (`**` recurses), sorted; FileNotFoundError
    if none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"config.data.source: no files match 'files:{pattern}'")
    return paths


def _as_record(value: Any, origin: str) -> dict[str, Any]:
    """A parsed JSON value as the record of `origin` (a new dict), or the error record of a
    value that is not a JSON object."""
    if not isinstance(value, dict):
        return {ORIGIN: origin, ERROR: f"expected a JSON object, found a JSON "
                f"{_JSON_TYPE_NAMES.get(type(value), type(value).__name__)}"}
    return {**value, ORIGIN: origin}


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, line_numbers) of the non-blank lines of a file (byte offsets, 1-based lines).

    Works in chunks so that a file of any size is indexed with bounded memory: the running count
    of non-whitespace bytes at every newline tells which lines are blank without a Python loop
    over lines.
    """
    size = os.path.getsize(path)
    if size == 0:
        return (np.zeros((0,), np.int64),) * 3
    data = np.memmap(path, dtype=np.uint8, mode="r")
    is_content = np.ones((256,), bool)
    is_content[list(_WHITESPACE_BYTES)] = False
    newline_positions, content_counts = [], []
    running = 0
    for offset in range(0, size, _INDEX_CHUNK_BYTES):
        chunk = np.asarray(data[offset:offset + _INDEX_CHUNK_BYTES])
        cumulative = np.cumsum(is_content[chunk], dtype=np.int64) + running
        newlines = np.flatnonzero(chunk == ord("\n"))
        newline_positions.append(newlines + offset)
        content_counts.append(cumulative[newlines])
        running = int(cumulative[-1])
    if data[size - 1] != ord("\n"):  # last line without a trailing newline
        newline_positions.append(np.array([size]))
        content_counts.append(np.array([running]))
    del data
    ends = np.concatenate(newline_positions).astype(np.int64)
    counts = np.concatenate(content_counts).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = counts > np.concatenate([[0], counts[:-1]])  # more content than at the last newline
    line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
    return starts[keep], ends[keep], line_numbers


class FileLinesSource:
    """Random access to the non-blank lines of local files matched by a glob.

    `*.jsonl` / `*.json` lines are parsed as JSON objects; a line that is not a JSON object
    becomes `{"_error": reason}` (reported by the pipeline, which knows the bad-records policy).
    Other files give `{"text": line}`. Every record carries `_origin = "path:line"`. Picklable
    (file handles are reopened lazily in each process), so it works with grain's worker processes.
    """

    def __init__(self, pattern: str) -> None:
        self.paths = paths = matching_files(pattern)
        indexed = [_index_lines(path) for path in paths]  # (starts, ends, line numbers) per file
        self._starts, self._ends, self._line_numbers = (
            np.concatenate(column) for column in zip(*indexed, strict=True))
        self._file_ids = np.concatenate([np.full(starts.shape, file_id, np.int32)
                                         for file_id, (starts, _, _) in enumerate(indexed)])
        self._is_json = [p.endswith((".jsonl", ".json")) for p in paths]
        self.total_bytes = sum(os.path.getsize(p) for p in paths)
        self._descriptors: dict[int, int] = {}
        self._open_lock = threading.Lock()  # grain reads records from several threads
        if len(self._starts) == 0:
            raise ValueError(f"config.data.source: the files matching 'files:{pattern}' "
                             f"({len(paths)} file(s)) contain no non-blank line")

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_descriptors"], state["_open_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._descriptors = {}
        self._open_lock = threading.Lock()

    def _read(self, file_id: int, start: int, end: int) -> bytes:
        with self._open_lock:  # one descriptor per file, whichever thread reads it first
            if file_id not in self._descriptors:
                self._descriptors[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
        return os.pread(self._descriptors[file_id], end - start, start)  # no shared position

    def _record(self, file_id: int, line_number: int, raw: bytes) -> dict[str, Any]:
        """One line's record, or `{"_error": reason}` for a line that cannot be one."""
        origin = f"{self.paths[file_id]}:{line_number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            return {ORIGIN: origin, ERROR: f"not valid UTF-8 ({e})"}
        if line_number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not self._is_json[file_id]:
            return {"text": line, ORIGIN: origin}
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (" (files: reads one JSON object per line; this looks like a file holding one "
                    "JSON list)" if line.strip() in ("[", "[{") else "")
            return {ORIGIN: origin, ERROR: f"malformed JSON ({e}){hint}"}
        return _as_record(record, origin)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)
        file_id = int(self._file_ids[index])
        raw = self._read(file_id, int(self._starts[index]), int(self._ends[index]))
        return self._record(file_id, int(self._line_numbers[index]), raw)

    def iter_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, record) of every record in index order, read sequentially (for pre-scans)."""
        for file_id, path in enumerate(self.paths):
            (indices,) = np.nonzero(self._file_ids == file_id)
            if not len(indices):
                continue
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for index in indices.tolist():
                    raw = data[int(self._starts[index]):int(self._ends[index])]
                    yield index, self._record(file_id, int(self._line_numbers[index]), raw)

    def without(self, indices: Sequence[int]) -> FileLinesSource:
        """A copy of this source without the records at `indices` (e.g. bad lines)."""
        keep = ~np.isin(np.arange(len(self)), indices)
        copy = FileLinesSource.__new__(FileLinesSource)
        copy.__setstate__(self.__getstate__())
        for name in ("_starts", "_ends", "_line_numbers", "_file_ids"):
            setattr(copy, name, getattr(self, name)[keep])
        return copy

    def __del__(self) -> None:
        for descriptor in getattr(self, "_descriptors", {}).values():
            with contextlib.suppress(OSError):
                os.close(descriptor)


class TfdsSource:
    """A prepared tfds dataset split, read by random access through `tfds.data_source`.

    Needs the dataset's ArrayRecord files (prepared with `file_format='array_record'`, e.g.
    `tfds build --file_format=array_record`), never TensorFlow. Byte strings (tfds `Text`
    features) are decoded to `str`.
    """

    def __init__(self, name: str, split: str, data_dir: str | None) -> None:
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                            download=False)
        except Exception as e:  # tfds raises several types; all mean "not there as asked"
            where = data_dir or "the default tfds data directory"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"config.data.source: cannot open 'tfds:{name}@{split}' in {where}: "
                f"{first_line}. Prepare it first with file_format='array_record'.") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)
        return {**{k: (v.decode("utf-8") if isinstance(v, bytes) else v)
                   for k, v in self._source[index].items()},
                ORIGIN: f"tfds:{self.name}@{self.split}[{index}]"}


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """What opening a source may need beyond its spec (the `data`, `train`, `vision` fields)."""

    tfds_data_dir: str = ""
    synthetic_size: int = 20000
    seed: int = 0                   # the built-in pre-training corpus and shapes draw with it
    image_size: int = 32            # shapes
    image_task: str = "question"    # shapes: 'question' (stage 2) or 'caption' (stage 1)
    image_folder: str = ""          # llava: where relative image paths point ('': the file's)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> SourceOptions:
        plain = ConversationTemplate.from_config(config).format == LLADA_PLAIN
        return cls(config.data.tfds_data_dir, config.data.synthetic_size, config.train.seed,
                   config.vision.image_size, "caption" if plain else "question",
                   config.data.image_folder)


def open_source(spec: SourceSpec, options: SourceOptions | None = None, *,
                default_split: str = "train", **option_overrides: Any) -> Any:
    """A random-access data source (`len`, `[]`) of records for one parsed component.

    `default_split` is the split of a `synthetic` spec without one (the dataset's split).
    """
    options = dataclasses.replace(options or SourceOptions(), **option_overrides)
    if spec.kind == "tfds":
        return TfdsSource(spec.argument, spec.split, options.tfds_data_dir)
    if spec.kind == "files":
        return FileLinesSource(spec.argument)
    if spec.kind == "llava":
        return LlavaFilesSource(spec.argument, options.image_folder)
    if spec.kind == "synthetic":
        return SyntheticTextSource(options.synthetic_size, seed=options.seed,
                                   split=spec.split or default_split)
    if spec.kind == "synthetic_chat":
        return SyntheticChatSource(spec.split, options.synthetic_size)
    if spec.kind == "shapes":
        size = (max(options.synthetic_size // 10, 1) if spec.split == "test"
                else options.synthetic_size)
        return ShapesDataset(options.image_size, size, spec.split, options.seed,
                             options.image_task)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def record_dataset(components: Sequence[SourceSpec], options: SourceOptions | None = None, *,
                   process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                   seed: int = 0, num_epochs: int | None = None,
                   screen: Callable[[SourceSpec, Any], Any] | None = None,
                   default_split: str = "train", **option_overrides: Any) -> grain.MapDataset:
    """The records this host reads, in order, as a grain MapDataset.

    Text and chat sources: every host builds the same global stream: each component shuffled
    (a fresh permutation every epoch) and repeated (`num_epochs=None`: forever), several
    components mixed with their weights by `grain.MapDataset.mix` (each repeats on its own, so
    a small source is revisited more often instead of ending the mixture). Host `i` of `n` then
    reads elements i, i+n, i+2n, ... of that stream: the hosts' records are disjoint and together
    they are the whole stream, and a global batch draws from the whole shuffled epoch rather
    than from n fixed shards. `SHARD_FIRST_KINDS` (one component): host `i` takes records i,
    i+n, ... first, then shuffles and repeats them.

    `screen(spec, source) -> source`, if given, sees every opened source first (the pipeline's
    pre-scan for bad records, which may return the source without them).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    datasets = []
    for i, spec in enumerate(components):
        source = open_source(spec, options, default_split=default_split, **option_overrides)
        if screen is not None:
            source = screen(spec, source)
        records = grain.MapDataset.source(source)
        if len(records) < process_count:
            raise ValueError(f"config.data.source: {spec.kind}:{spec.argument or spec.split} has "
                             f"{len(records)} records, fewer than the {process_count} hosts")
        shard_first = spec.kind in SHARD_FIRST_KINDS
        if shard_first:
            records = records[process_index::process_count]
        if shuffle:
            # Distinct seeds per component so that two copies of one source mix independently.
            records = records.shuffle(seed=seed if shard_first else (seed * 1_000_003 + i) % 2**32)
        datasets.append(records.repeat(num_epochs))
        if shard_first:
            return datasets[0]
    stream = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
        datasets, weights=[c.weight for c in components])
    return stream[process_index::process_count]


# --- image-text records (LLaDA-V) ---------------------------------------------------------------
class LlavaFilesSource:
    """LLaVA-style records from `*.json` / `*.jsonl` files, image paths made absolute.

    A `.json` file whose first non-blank character is `[` is one JSON list (read whole, as
    LLaVA does; each record remembers the line it starts on, so errors name `file:line`); any
    other file is read line by line (`FileLinesSource`).
    """

    def __init__(self, pattern: str, image_folder: str = "") -> None:
        self.image_folder = image_folder
        # (path, list of (line, record) or a line source)
        self._parts = [(path, read_json_list(path) if path.endswith(".json")
                        and _starts_with_bracket(path) else FileLinesSource(path))
                       for path in matching_files(pattern)]
        self._offsets = np.cumsum([0] + [len(records) for _, records in self._parts])
        if self._offsets[-1] == 0:
            raise ValueError(f"config.data.source: the files matching 'files:{pattern}' hold "
                             f"no record")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        path, records = self._parts[part]
        local = index - int(self._offsets[part])
        if isinstance(records, list):
            line, record = records[local]
            record = _as_record(record, f"{path}:{line}")   # a copy: the list stays as read
        else:
            record = records[local]
        folder = self.image_folder or os.path.dirname(os.path.abspath(path))
        value = record.get("image")
        if isinstance(value, str):
            record["image"] = os.path.join(folder, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            record["image"] = [os.path.join(folder, v) for v in value]
        return record


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_json_list(path: str) -> list[tuple[int, Any]]:
    """The elements of a file holding one JSON list, each with the (1-based) line it starts on.

    Raises ValueError `config.data.source: FILE:LINE: ...` for bytes that are not UTF-8, JSON
    that does not parse, or a document that is not one list.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"config.data.source: {path}:{line}: not UTF-8 text ({e.reason} at "
                         f"byte {e.start})") from None
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    line, counted = 1, 0

    def fail(at: int, reason: str) -> None:
        raise ValueError(f"config.data.source: {path}:{text.count(chr(10), 0, at) + 1}: "
                         f"{reason}")

    at = _WHITESPACE.match(text, 0).end()
    if text[at:at + 1] != "[":
        fail(at, "expected a JSON list of records")
    at = _WHITESPACE.match(text, at + 1).end()
    if text[at:at + 1] == "]":
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            fail(e.pos, f"not valid JSON ({e.msg})")
        line += text.count("\n", counted, at)
        counted = at
        records.append((line, value))
        at = _WHITESPACE.match(text, end).end()
        if text[at:at + 1] == ",":
            at = _WHITESPACE.match(text, at + 1).end()
        elif text[at:at + 1] == "]":
            if text[_WHITESPACE.match(text, at + 1).end():]:
                fail(at + 1, "unexpected data after the closing ']' of the list")
            return records
        else:
            fail(at, "not valid JSON (expected ',' or ']' after a record)")
