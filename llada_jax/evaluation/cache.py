"""A resumable on-disk cache of finished evaluation requests (JSON lines keyed by request hash).

Every line is ``{"key": <sha256 hex>, "value": <JSON result>}``. The key hashes the request kind,
its arguments and a fingerprint of everything that changes a result (checkpoint, Monte Carlo and
sampler settings, seed), so a cache written under other settings is never reused by mistake.
Lines are appended and flushed as soon as a batch finishes: after an interruption the next run
reads them back and computes only what is missing. A torn last line (the process was killed
while writing it) is ignored.

This module knows nothing about models; it stores JSON values.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def request_key(kind: str, args: Any, fingerprint: str) -> str:
    """sha256 hex of (kind, args, fingerprint); `args` must be JSON-serialisable."""
    text = json.dumps([kind, args, fingerprint], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RequestCache:
    """Finished results by request key, read from and appended to a JSONL file (or memory only
    when `path` is None)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._values: dict[str, Any] = {}
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cache file {path}: its directory {directory} does not exist")
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._values[entry["key"]] = entry["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                # Only a torn final line is expected (a killed writer); anything else means the
                # file is not a cache of this program.
                if number == len(lines):
                    continue
                raise ValueError(f"{path}:{number}: not a cache line "
                                 f"(expected {{'key': ..., 'value': ...}})") from None

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> Any:
        """The stored result, or None when `key` has none."""
        return self._values.get(key)

    def put_many(self, items: list[tuple[str, Any]]) -> None:
        """Stores results and, with a path, appends and flushes them at once."""
        self._values.update(items)
        if self.path is None or not items:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for key, value in items:
                f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
