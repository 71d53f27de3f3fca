"""Bad records: the pre-scan of local files, the `data.bad_records` policy and the skip counts.

Local files (`files:`) are pre-scanned when the dataset is built, before any batch: every line
is decoded (UTF-8), parsed (a JSON object for `.jsonl`/`.json`) and checked for the field the
objective needs (`data.messages_field` with valid roles and contents, or a non-empty
`data.text_field`). The scan costs one JSON parse per record, about as long as building the
line index that opening the files takes anyway (52.7 MB of chat JSONL, 60k records: index
17.9 s, scan 14.6 s on a 2-core box shared by 18 busy processes; an idle core is several times
faster). In exchange a bad line is reported before the first compile, as one line, instead of
inside grain's threads or worker processes after the first batches. Files larger in total than
`PRESCAN_MAX_BYTES` (1 GiB) are not pre-scanned (a log line says so); their records are
checked as they are read, with the same messages. What only tokenization can tell (a
conversation too long for `train.seq_len`) is always found as the record is read.

* `config.data.bad_records = 'error'` raises `BadRecordError` naming the record (`path:line:
  problem`; for the pre-scan, the first bad line of the files), also from grain's worker
  processes.
* `'skip'`: the pre-scan drops bad lines from the index and logs ONE warning with their count by
  kind and the first few `path:line`s; records found bad later are logged one by one (the first
  `LOGGED_SKIPS`, then at every power of two) with the running count. `skipped_summary()`
  gives the totals (per process: with worker processes every worker counts its own skips).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from llada_jax.data.schema import ERROR, ORIGIN, BadRecordError
from llada_jax.data.sources import FileLinesSource, SourceSpec

# Local files up to this total size are pre-scanned for bad records before training.
PRESCAN_MAX_BYTES = 1 << 30
# Records skipped at read time: each of the first LOGGED_SKIPS is logged, then powers of two.
LOGGED_SKIPS = 20
# Pre-scan warning: how many bad lines it names.
NAMED_BAD_LINES = 3

_SKIPPED: collections.Counter = collections.Counter()
# Pre-scan results by (files, sizes, mtimes, check): the eval set is rebuilt at every evaluation
# and must not be re-scanned (nor its skips re-counted) each time.
_SCANNED: dict[tuple, tuple[list[int], list[BadRecordError]]] = {}


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def skipped_summary() -> str:
    """One line with the number of bad records skipped in this process, by kind ('' if none)."""
    total = sum(_SKIPPED.values())
    if not total:
        return ""
    return (f"{total} bad record(s) skipped (config.data.bad_records='skip'): "
            f"{_counts_text(_SKIPPED)}")


class RowBuilder:
    """A record -> row transform of the pipeline: `row(record[, rng])` (the function given, or
    a subclass's method) may raise BadRecordError, which `self.bad_records` ('error' | 'skip')
    raises or turns into None."""

    def __init__(self, row: Callable[..., dict[str, Any]], bad_records: str) -> None:
        self.row, self.bad_records = row, bad_records

    def __call__(self, record: dict[str, Any], *rng: Any) -> dict[str, Any] | None:
        try:
            return self.row(record, *rng)
        except BadRecordError as error:
            if self.bad_records == "error":
                raise
            _SKIPPED[error.kind] += 1
            total = sum(_SKIPPED.values())
            if total <= LOGGED_SKIPS or total & (total - 1) == 0:  # the first ones, then 2**k
                logging.warning("skipping bad record %d (config.data.bad_records='skip'; so far in "
                                "process %d: %s): %s", total, os.getpid(), _counts_text(_SKIPPED),
                                error)
            return None


def check_document(record: dict[str, Any], text_field: str) -> str:
    """The record's text; BadRecordError if unreadable, missing, not a string or empty."""
    origin = str(record.get(ORIGIN, ""))
    if ERROR in record:
        raise BadRecordError(origin, str(record[ERROR]), "unreadable")
    text = record.get(text_field)
    if not isinstance(text, str):
        raise BadRecordError(origin, f"expected a string in field {text_field!r} "
                                  f"(config.data.text_field), found "
                                  f"{type(text).__name__ if text is not None else 'no such field'}")
    if not text.strip():
        raise BadRecordError(origin, "empty document", "empty")
    return text


def prescan(spec: SourceSpec, source: Any, check: Callable[[dict[str, Any]], Any],
            policy: str) -> Any:
    """Checks every record of a local-files source before training (see the module docstring).

    Returns the source (policy 'error': unchanged, or raises the first bad record's
    BadRecordError), or a copy without its bad lines (policy 'skip'). Other sources, and files
    larger in total than `PRESCAN_MAX_BYTES`, are returned unchecked.
    """
    if not isinstance(source, FileLinesSource):
        return source
    if source.total_bytes > PRESCAN_MAX_BYTES:
        logging.info("data: files:%s holds %.1f GB, more than the pre-scan limit of %.1f GB; "
                     "its records are checked as they are read", spec.argument,
                     source.total_bytes / 1e9, PRESCAN_MAX_BYTES / 1e9)
        return source
    stats = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in source.paths)
    key = (tuple(source.paths), stats, repr(check), policy)
    if key not in _SCANNED:
        bad_indices, errors = [], []
        for index, record in source.iter_records():
            try:
                check(record)
            except BadRecordError as error:
                bad_indices.append(index)
                errors.append(error)
                if policy == "error":
                    break
        _SCANNED[key] = (bad_indices, errors)
        if errors and policy == "skip":  # logged and counted once, however often rebuilt
            counts = collections.Counter(error.kind for error in errors)
            _SKIPPED.update(counts)
            named = "; ".join(str(error) for error in errors[:NAMED_BAD_LINES])
            more = (f"; and {len(errors) - NAMED_BAD_LINES} more"
                    if len(errors) > NAMED_BAD_LINES else "")
            logging.warning("data: skipping %d bad record(s) of %d in files:%s "
                            "(config.data.bad_records='skip'; %s): %s%s", len(errors),
                            len(source), spec.argument, _counts_text(counts), named, more)
    bad_indices, errors = _SCANNED[key]
    if errors and policy == "error":
        raise errors[0]
    if len(errors) == len(source):  # every build of this source, not just the first
        raise ValueError(f"config.data.source: every one of the {len(source)} records of "
                         f"files:{spec.argument} is bad; first: {errors[0]}")
    return source.without(bad_indices) if errors else source
