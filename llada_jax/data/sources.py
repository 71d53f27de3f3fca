"""Where training records come from: tfds ArrayRecord datasets, local text/JSONL files, mixtures.

A *source spec* (`config.data.source`) names the records:

    tfds:NAME[@SPLIT]          a prepared tensorflow-datasets dataset, read through
                               `tfds.data_source` (ArrayRecord, no TensorFlow needed). NAME may
                               carry a config and version (`c4/en:3.1.0`); SPLIT defaults to
                               `train` and may be sliced (`train[:90%]`). The data directory is
                               `config.data.tfds_data_dir` (empty: the tfds default).
    files:GLOB                 local files (`**` recurses). `*.jsonl` / `*.json`: one JSON object
                               per line. Any other file: one text document per line, stored as
                               `{"text": line}`. Blank lines are skipped; every other line is a
                               record, read by random access from an index of line offsets that
                               is built once when the source is opened.
    synthetic_chat[@SPLIT]     the built-in question/answer chat set (`train` or `test`), see
                               `llada_jax.data.synthetic_chat`.
    mix:SPEC=W,SPEC=W,...      a weighted mixture of the sources above, e.g.
                               `mix:tfds:c4/en@train=0.7,files:/data/code/*.jsonl=0.3`.

Every record is a dict with the fields of its source plus `_origin`, a string saying where it
came from (`path:line` for files, `tfds:NAME@SPLIT[index]`), so a bad record can be reported
precisely. Records are returned as stored; deciding whether a record is usable is the job of the
pipeline (`llada_jax.data.pipeline`) and chat rendering (`llada_jax.data.chat`).

This module only reads: it never writes next to the data and never downloads.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

ORIGIN = "_origin"     # record field: where the record came from
ERROR = "_error"       # record field: why the record could not be read (malformed JSON, ...)

_WHITESPACE_BYTES = (9, 10, 11, 12, 13, 32)
_JSON_TYPE_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
                    type(None): "null"}
_INDEX_CHUNK_BYTES = 1 << 23


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed source: `kind` in {tfds, files, synthetic_chat}, its argument, split, weight."""

    kind: str
    argument: str
    split: str = "train"
    weight: float = 1.0


def parse_source_spec(spec: str) -> list[SourceSpec]:
    """`config.data.source` -> its components (one unless `mix:`); ValueError if malformed."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"config.data.source: expected a source spec such as 'tfds:NAME@SPLIT', "
                         f"'files:GLOB', 'synthetic_chat' or 'mix:SPEC=W,...', found {spec!r}")
    if spec.startswith("mix:"):
        parts = [p for p in spec[len("mix:"):].split(",") if p.strip()]
        if not parts:
            raise ValueError(f"config.data.source: 'mix:' needs at least one SPEC=WEIGHT, "
                             f"found {spec!r}")
        components = []
        for part in parts:
            inner, sep, weight_text = part.strip().rpartition("=")
            if not sep:
                raise ValueError(f"config.data.source: mixture component {part!r} must be "
                                 f"SPEC=WEIGHT (e.g. files:/data/*.jsonl=0.3)")
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"config.data.source: weight of mixture component {part!r} "
                                 f"must be a number, found {weight_text!r}") from None
            if not weight > 0:
                raise ValueError(f"config.data.source: weight of mixture component {part!r} "
                                 f"must be positive, found {weight}")
            if inner.startswith("mix:"):
                raise ValueError(f"config.data.source: mixtures cannot be nested, found {part!r}")
            (single,) = parse_source_spec(inner)
            components.append(dataclasses.replace(single, weight=weight))
        return components
    kind, sep, argument = spec.partition(":")
    if kind == "tfds" and sep and argument:
        name, at, split = argument.partition("@")
        if not name or (at and not split):
            raise ValueError(f"config.data.source: expected 'tfds:NAME[@SPLIT]', found {spec!r}")
        return [SourceSpec("tfds", name, split or "train")]
    if kind == "files" and sep and argument:
        return [SourceSpec("files", argument, "")]
    name, at, split = spec.partition("@")
    if name == "synthetic_chat" and not sep:
        split = split or "train"
        if split not in ("train", "test"):
            raise ValueError(f"config.data.source: synthetic_chat splits are 'train' and "
                             f"'test', found {split!r}")
        return [SourceSpec("synthetic_chat", "", split)]
    raise ValueError(f"config.data.source: expected 'tfds:NAME[@SPLIT]', 'files:GLOB', "
                     f"'synthetic_chat[@SPLIT]' or 'mix:SPEC=W,...', found {spec!r}")


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, line_numbers) of the non-blank lines of a file (byte offsets, 1-based lines).

    Works in chunks so that a file of any size is indexed with bounded memory: the running count
    of non-whitespace bytes at every newline tells which lines are blank without a Python loop
    over lines.
    """
    size = os.path.getsize(path)
    if size == 0:
        empty = np.zeros((0,), np.int64)
        return empty, empty, empty
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
    previous = np.concatenate([[0], counts[:-1]])
    keep = counts > previous
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
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"config.data.source: no files match 'files:{pattern}'")
        self.paths = paths
        starts, ends, lines, file_ids = [], [], [], []
        for file_id, path in enumerate(paths):
            s, e, n = _index_lines(path)
            starts.append(s)
            ends.append(e)
            lines.append(n)
            file_ids.append(np.full(s.shape, file_id, np.int32))
        self._starts = np.concatenate(starts)
        self._ends = np.concatenate(ends)
        self._line_numbers = np.concatenate(lines)
        self._file_ids = np.concatenate(file_ids)
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
        descriptor = self._descriptors.get(file_id)
        if descriptor is None:
            with self._open_lock:
                descriptor = self._descriptors.get(file_id)
                if descriptor is None:
                    descriptor = os.open(self.paths[file_id], os.O_RDONLY)
                    self._descriptors[file_id] = descriptor
        return os.pread(descriptor, end - start, start)  # pread: no shared file position

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
        if not isinstance(record, dict):
            return {ORIGIN: origin, ERROR: f"expected a JSON object, found a JSON "
                    f"{_JSON_TYPE_NAMES.get(type(record), type(record).__name__)}"}
        record[ORIGIN] = origin
        return record

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
        keep = np.ones((len(self),), bool)
        keep[np.asarray(indices, np.int64)] = False
        copy = FileLinesSource.__new__(FileLinesSource)
        copy.__setstate__(self.__getstate__())
        for name in ("_starts", "_ends", "_line_numbers", "_file_ids"):
            setattr(copy, name, getattr(self, name)[keep])
        return copy

    def __del__(self) -> None:
        for descriptor in getattr(self, "_descriptors", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass


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
        record = self._source[index]
        out = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in record.items()}
        out[ORIGIN] = f"tfds:{self.name}@{self.split}[{index}]"
        return out


def open_source(spec: SourceSpec, *, tfds_data_dir: str = "",
                synthetic_size: int = 20000) -> Any:
    """A random-access data source (`len`, `[]`) of records for one parsed component."""
    if spec.kind == "tfds":
        return TfdsSource(spec.argument, spec.split, tfds_data_dir)
    if spec.kind == "files":
        return FileLinesSource(spec.argument)
    if spec.kind == "synthetic_chat":
        from llada_jax.data.synthetic_chat import SyntheticChatSource

        return SyntheticChatSource(spec.split, synthetic_size)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def record_dataset(components: Sequence[SourceSpec], *, tfds_data_dir: str = "",
                   synthetic_size: int = 20000, process_index: int = 0, process_count: int = 1,
                   shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                   screen: Callable[[SourceSpec, Any], Any] | None = None) -> grain.MapDataset:
    """The records this host reads, in order, as a grain MapDataset.

    Every host builds the same global stream: each component shuffled (a fresh permutation every
    epoch) and repeated (`num_epochs=None`: forever), several components mixed with their
    weights by `grain.MapDataset.mix` (each repeats on its own, so a small source is revisited
    more often instead of ending the mixture). Host `i` of `n` then reads elements i, i+n, i+2n,
    ... of that stream: the hosts' records are disjoint and together they are the whole stream,
    and a global batch draws from the whole shuffled epoch rather than from n fixed shards.

    `screen(spec, source) -> source`, if given, sees every opened source first (the pipeline's
    pre-scan for bad records, which may return the source without them).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    datasets = []
    for i, spec in enumerate(components):
        source = open_source(spec, tfds_data_dir=tfds_data_dir, synthetic_size=synthetic_size)
        if screen is not None:
            source = screen(spec, source)
        records = grain.MapDataset.source(source)
        if len(records) < process_count:
            raise ValueError(f"config.data.source: {spec.kind}:{spec.argument or spec.split} has "
                             f"{len(records)} records, fewer than the {process_count} hosts")
        if shuffle:
            # Distinct seeds per component so that two copies of one source mix independently.
            records = records.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
        datasets.append(records.repeat(num_epochs))
    stream = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
        datasets, weights=[c.weight for c in components])
    return stream[process_index::process_count]
