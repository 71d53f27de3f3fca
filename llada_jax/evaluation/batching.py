"""Request batching: sort by length, group into fixed-shape buckets, pad the last batch.

Every distinct array shape is one XLA compilation, so requests are grouped by a bucket key made
of their lengths rounded up to a multiple (`round_up`); inside a bucket they are cut into batches
of at most a fixed number of rows, a short last one padded (to the next power of two,
`padded_size`) by repeating its final request (its outputs are dropped). Sorting by length
first keeps the padding small. Pure Python; no model work.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` (positive: the model arguments are checked) that is
    >= max(n, 1)."""
    return max(multiple, -(-n // multiple) * multiple)


def bucketed_batches(items: Sequence[Item], bucket_of: Callable[[Item], Hashable],
                     length_of: Callable[[Item], int], batch_size: int
                     ) -> list[tuple[Hashable, list[int]]]:
    """Batches of item indices, [(bucket key, indices)], each with 1..batch_size indices.

    Items are sorted by `length_of` (longest first, so the slowest compile and any
    out-of-memory happen at once), grouped by `bucket_of` and cut into `batch_size` chunks
    (positive: the model arguments are checked).
    """
    order = sorted(range(len(items)), key=lambda i: -length_of(items[i]))
    groups: dict[Hashable, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_of(items[i]), []).append(i)
    return [(key, indices[start:start + batch_size])
            for key, indices in groups.items() for start in range(0, len(indices), batch_size)]


def padded_size(n: int, batch_size: int, multiple: int = 1) -> int:
    """Rows a batch of `n` requests is padded to: the next power of two, rounded up to
    `multiple` (the mesh's batch axes), at most `batch_size`. A few shapes per bucket instead
    of one, but a short last batch no longer computes a full batch of padding."""
    power = 1 << max(n - 1, 0).bit_length()
    return min(batch_size, round_up(power, multiple))
