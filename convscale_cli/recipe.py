"""The default training recipe an architecture plugin supplies, consumed by the training engine.

Values are the paper's (Smith et al. 2023 §2) and, where it is silent, those of the NFNet 2021 JFT recipe it defers
to (Brock et al. 2021 §6.2, A.1, A.5; docs/paper-notes.md lists which are which). Every field can be overridden from a
run config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

Optimizer = Literal["sgd", "adamw", "adafactor"]
Loss = Literal["softmax", "sigmoid"]
Schedule = Literal["cosine", "wsd"]
CooldownShape = Literal["linear", "1-sqrt"]


# The regularisers of the NFNet transfer recipe (Brock et al. 2021 A.4-A.5) that fine-tuning uses by default: SAM
# (Foret et al. 2021) with radius 0.05, its ascent step on 20% of each batch, and a parameter EMA of decay 0.9999.
DEFAULT_SAM_RHO = 0.05
DEFAULT_SAM_FRACTION = 0.2
DEFAULT_EMA_DECAY = 0.9999


def peak_learning_rate(alpha: float, batch_size: int, base_batch_size: int) -> float:
    """The paper's convention: alpha is quoted at ``base_batch_size`` (4096) and scaled linearly with the batch."""
    return alpha * batch_size / base_batch_size


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule and loss defaults for one architecture family."""

    optimizer: Optimizer = "sgd"
    # Peak learning rate alpha quoted at `base_batch_size` and scaled linearly with the batch size (the paper's
    # convention: alpha ~ 1.6 at batch 4096 = 0.1 x 4096/256).
    lr: float = 1.6
    base_batch_size: int = 4096
    momentum: float = 0.9  # SGD momentum, or Adam/Adafactor beta1
    nesterov: bool = True
    beta2: float = 0.999  # Adam/Adafactor second-moment decay
    # L2 weight decay added to the gradient (SGD) or decoupled (AdamW); never on gains, biases or skip gains.
    weight_decay: float = 1e-6
    # Adaptive gradient clipping (unit-wise, NFNet 2021 §4): lambda, or None to disable.
    agc_clip: float | None = 0.01
    agc_eps: float = 1e-3
    # Global-norm gradient clipping (ViT recipe), or None.
    grad_clip_norm: float | None = None
    # Linear warm-up as a fraction of the run's steps, then cosine decay to 0.
    warmup_fraction: float = 0.05
    # The warm-up length in steps instead, the same for every run length; None: `warmup_fraction` of the run. A wsd
    # schedule whose warm-up is a fraction of the run differs between budgets from the first step, so runs of several
    # budgets share their constant phase (and a sweep can branch them from one trunk) only with a fixed warm-up, as
    # Hagele et al. (2024, §2) use.
    warmup_steps: int | None = None
    # "cosine" (the paper's) or "wsd": warm-up, constant, then a cooldown to 0 over the last `cooldown_fraction` of
    # the steps, linear or 1-sqrt (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
    # Training Durations", §3): the constant phase is shared by every shorter budget, so a sweep can branch from it.
    schedule: Schedule = "cosine"
    cooldown_fraction: float = 0.2  # wsd only
    cooldown_shape: CooldownShape = "linear"  # wsd only
    loss: Loss = "softmax"
    label_smoothing: float = 0.0
    # Regular expressions over '/'-joined parameter paths (e.g. 'stages/0/0/conv0/kernel').
    no_decay: tuple[str, ...] = (r"(gain|bias|skip_gain|scale)$",)
    agc_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # written so that NaN fails too
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.base_batch_size <= 0:
            raise ValueError(f"base_batch_size must be > 0, got {self.base_batch_size}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be a whole number >= 0 or None, got {self.warmup_steps!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.cooldown_shape not in ("linear", "1-sqrt"):
            raise ValueError(f"cooldown_shape must be linear or 1-sqrt, got {self.cooldown_shape!r}")
        if not 0.0 < self.cooldown_fraction <= 1.0 - self.warmup_fraction:
            raise ValueError(
                f"cooldown_fraction must be in (0, 1 - warmup_fraction = {1.0 - self.warmup_fraction:g}], "
                f"got {self.cooldown_fraction}"
            )
        # Infinite values are refused too: an infinite clipping bound is NaN in the update (inf / inf); None disables.
        if self.agc_clip is not None and not 0 < self.agc_clip < math.inf:
            raise ValueError(f"agc_clip must be a finite number > 0 or None, got {self.agc_clip}")
        if self.grad_clip_norm is not None and not 0 < self.grad_clip_norm < math.inf:
            raise ValueError(f"grad_clip_norm must be a finite number > 0 or None, got {self.grad_clip_norm}")
        if not 0 < self.agc_eps < math.inf:
            raise ValueError(f"agc_eps must be a finite number > 0, got {self.agc_eps}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("momentum", "beta2", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def cooldown_steps(total_steps: int, cooldown_fraction: float) -> int:
    """Steps of a wsd run's cooldown: the last ``cooldown_fraction`` of its ``total_steps``, rounded."""
    return int(round(cooldown_fraction * max(int(total_steps), 1)))


def stable_end(recipe: Recipe, total_steps: int) -> int:
    """The step a wsd run of ``total_steps`` cools down after: its constant phase ends there.

    Two wsd runs with the same peak and warm-up take the same learning rate at every step up to the smaller of their
    stable ends, whatever their lengths, so one can continue (branch) from the other's state at any such step.
    """
    return max(int(total_steps), 1) - cooldown_steps(total_steps, recipe.cooldown_fraction)


SCHEDULE_KEYS = ("schedule", "cooldown_fraction", "cooldown_shape")


def without_default_schedule(record: dict[str, Any]) -> dict[str, Any]:
    """A recipe record as a run saves it: the schedule keys only when the schedule is not the default cosine.

    The cooldown keys mean nothing for cosine, and run directories saved before the schedule was selectable lack
    them, so leaving them out keeps those runs resumable (a resumed run compares its saved config with the new one).
    An unset ``warmup_steps`` is left out for the same reason.
    """
    if record.get("warmup_steps", 0) is None:
        record = {k: v for k, v in record.items() if k != "warmup_steps"}
    if record.get("schedule", "cosine") != "cosine":
        return record
    return {k: v for k, v in record.items() if k not in SCHEDULE_KEYS}
