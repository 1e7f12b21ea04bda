"""The training and held-out sources of a run, and the held-out batch size.

Both pre-training and fine-tuning read their data through these: the dataset's ``train`` split (less a held-out
share when the dataset has no ``eval`` split), its ``eval`` split capped at ``eval_examples``, and the smallest
evaluation batch that holds the held-out set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convscale_cli.engine.resolve import holdout_indices
from convscale_cli.registry import DatasetSpec


class Prefix:
    """The first ``n`` examples of a random-access source (``eval_examples``)."""

    def __init__(self, source: Any, n: int) -> None:
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


class Subset:
    """The examples of a random-access source at ``indices`` (a held-out split carved from train, ``holdout``)."""

    def __init__(self, source: Any, indices: list[int]) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[self.indices[index]]


def open_sources(
    data: DatasetSpec, options: dict[str, Any], *, holdout: float = 0.0, eval_examples: int | None = None
) -> tuple[Any, Any]:
    """``(train, held_out)`` random-access sources of ``data`` opened with ``options``.

    Args:
        data: the dataset spec.
        options: its data options.
        holdout: the fraction of ``train`` held out instead of the ``eval`` split (0: the ``eval`` split).
        eval_examples: at most this many held-out examples (None: all).
    """
    train = data.open("train", **options)
    if holdout:
        kept, held = holdout_indices(len(train), holdout)
        train, held_out = Subset(train, kept), Subset(train, held)
    else:
        held_out = data.open("eval", **options)
    if eval_examples is not None:
        held_out = Prefix(held_out, eval_examples)
    return train, held_out


def eval_batch_size(batch_size: int, eval_size: int, devices: int, processes: int) -> int:
    """The held-out batch: the smallest multiple of the device (and process) count that holds the whole held-out
    set, capped at the training batch, so a small held-out set is never padded up to a 4096 batch."""
    unit = devices * processes // np.gcd(devices, processes)
    return min(batch_size, max(unit, -(-eval_size // unit) * unit))


__all__ = ["Prefix", "Subset", "eval_batch_size", "open_sources"]
