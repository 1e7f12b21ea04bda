"""The one place a training duration becomes a number of steps (big_vision ``utils.steps``).

A duration is exactly one of epochs, examples, steps or a compute budget. Everything downstream (the data loader's
``num_examples``, the cosine schedule's length, the ledger's ETA) reads the :class:`Duration` this returns, so a
0.25-epoch run (the paper's smallest budget) means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import math

from convscale_cli.errors import UsageError

MAX_STEPS = 2**31 - 1  # optax and the train state count steps in int32


@dataclasses.dataclass(frozen=True)
class Duration:
    """A resolved training length.

    Attributes:
        steps: optimiser steps; the last one may hold a padded, partially masked batch.
        examples: real training examples seen over the whole run (``<= steps * batch_size``).
        epochs: ``examples / train_size``, for reports and the paper's x axes.
    """

    steps: int
    examples: int
    epochs: float


def resolve_duration(
    *,
    train_size: int,
    batch_size: int,
    epochs: float | None = None,
    examples: int | None = None,
    steps: int | None = None,
    budget_flops: float | None = None,
    flops_per_example: float | None = None,
) -> Duration:
    """Convert exactly one of epochs / examples / steps / FLOP budget into a :class:`Duration`.

    Args:
        train_size: examples in one pass over the training split.
        batch_size: global batch size.
        epochs: passes over the training split (may be fractional: 0.25 epochs is exactly ``round(N / 4)``
            examples).
        examples: training examples.
        steps: optimiser steps of ``batch_size`` examples each.
        budget_flops: model-FLOP budget (``6 x MACs x examples``, :func:`convscale_cli.budget.train_flops`); the run
            takes as many whole examples as fit.
        flops_per_example: training FLOPs of one example, required with ``budget_flops``.

    Raises:
        UsageError: none or several durations given, or one that yields no training step.
    """
    given = {k: v for k, v in (("epochs", epochs), ("examples", examples), ("steps", steps)) if v is not None}
    if budget_flops is not None and not given:
        given["budget"] = budget_flops
    if len(given) != 1:
        raise UsageError(
            f"give exactly one duration (epochs, examples, steps or a compute budget), got {sorted(given) or 'none'}"
        )
    if train_size <= 0:
        raise UsageError(f"the training split is empty ({train_size} examples)")
    if batch_size <= 0:
        raise UsageError(f"batch size {batch_size} must be > 0")
    if epochs is not None:
        if not (math.isfinite(epochs) and epochs > 0):
            raise UsageError(f"epochs {epochs!r} must be > 0")
        n = round(epochs * train_size)
    elif examples is not None:
        if examples <= 0:
            raise UsageError(f"examples {examples!r} must be > 0")
        n = int(examples)
    elif steps is not None:
        if steps <= 0:
            raise UsageError(f"steps {steps!r} must be > 0")
        n = int(steps) * batch_size
    else:
        if not flops_per_example or flops_per_example <= 0:
            raise UsageError("a FLOP budget needs the model's training FLOPs per example")
        n = int(budget_flops // flops_per_example)  # type: ignore[operator]
    name, value = next(iter(given.items()))
    if n < 1:
        raise UsageError(f"the duration {name}={value!r} is < 1 example")
    total = math.ceil(n / batch_size)
    if total > MAX_STEPS:
        raise UsageError(
            f"the duration {name}={value!r} is {total} steps at batch {batch_size}; the optimiser's step counter is a "
            f"32-bit integer, so a run has at most {MAX_STEPS} steps"
        )
    return Duration(steps=total, examples=n, epochs=n / train_size)
