"""Cutting a rank's stream of loader batches into the step's micro-batches, without dropping a sample.

    queue = SampleQueue(loader, skip=saved.get("data_skip", 0))     # loader built from saved["data"]
    micro = [queue.take(n) for n in split.micro_sizes(split.counts(step)[rank])]
    saved = queue.state_dict()       # {"data": loader state, "data_skip": samples of its next batch used}

With an uneven split (:class:`pipeline.train.gradcache.BatchSplit`: 65,536 over 24 ranks) a rank's share of a
step is no multiple of the loader's batch, so a step can end inside a loader batch. The rest of that batch
opens the next step: every sample the loader yields is trained on, once, in order. The resume position is
the loader's state *before* that batch plus the number of its samples already used; a resumed run re-reads
the batch (the loader's exact resume) and skips them, so it takes the very samples the uninterrupted run
takes. When the split is even every take is one whole loader batch, the skip is always 0 and the saved
state is the loader's own, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, Any]


def batch_size(batch: Batch) -> int:
    return int(batch["image"].shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every per-sample field (tensors along dim 0, lists)."""
    if start == 0 and stop == batch_size(batch):
        return batch
    return {k: v[start:stop] for k, v in batch.items()}


def concat_batches(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    out: Batch = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            raise TypeError(f"batch field {key!r}: cannot concatenate {type(first).__name__}")
    return out


class SampleQueue:
    """Takes exact sample counts from a loader's batches, carrying a batch's rest over to the next take."""

    def __init__(self, loader: Any, skip: int = 0) -> None:
        self.loader = loader
        self._skip = skip
        self._batches: Iterator[Batch] | None = None
        self._pending: Batch | None = None
        self._offset = 0
        self._before: dict[str, Any] | None = None

    def start(self, batches: Iterator[Batch]) -> None:
        """Read from ``batches`` (``iter(loader)``, built by the caller under its own RNG guard)."""
        self._batches = batches

    def take(self, count: int) -> Batch:
        """The next ``count`` samples as one batch (StopIteration when the loader ends)."""
        assert self._batches is not None, "SampleQueue.start(iter(loader)) first"
        parts = []
        while count > 0:
            if self._pending is None:
                before = self.loader.state_dict()
                self._pending, self._before = next(self._batches), before
                self._offset, self._skip = self._skip, 0
                if self._offset >= batch_size(self._pending):
                    raise ValueError(
                        f"data_skip: {self._offset} samples to skip, but the batch has {batch_size(self._pending)}"
                    )
            size = batch_size(self._pending)
            n = min(count, size - self._offset)
            parts.append(slice_batch(self._pending, self._offset, self._offset + n))
            self._offset += n
            count -= n
            if self._offset == size:
                self._pending = None
        return concat_batches(parts)

    def state_dict(self) -> dict[str, Any]:
        """``data``: the loader state to resume from; ``data_skip``: samples of its next batch already used."""
        if self._pending is None:  # (a skip not yet applied is still owed to the next batch)
            return {"data": self.loader.state_dict(), "data_skip": self._skip}
        return {"data": self._before, "data_skip": self._offset}
