"""The compute ledger: what a run has spent, in examples, FLOPs, device-seconds and TPU-v4 core-hours.

Smith et al. (2023) put every run on an axis of TPU-v4 core-hours estimated from steps per second (footnote 2;
docs/paper-notes.md). The ledger keeps both sides of that conversion: the analytic model FLOPs (``6 x MACs x examples``)
and XLA's own count, the measured device-seconds per activity, and the MFU they imply against the hardware table of
:mod:`convscale_cli.budget`. It is saved in every checkpoint, so a resumed run keeps counting (big_vision ``Chrono``),
and the time lost to a crash (device-seconds since the last checkpoint) is charged on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

from convscale_cli.budget import Budget, flops_to_core_hours

# ``loader_startup``: the wait for an input pipeline's first batch (``--workers`` processes starting, the first decode),
# charged apart so that train and eval time (and img/s, MFU) measure the steps alone.
CATEGORIES = ("train", "eval", "compile", "checkpoint", "lost", "loader_startup")


@dataclasses.dataclass
class Ledger:
    """Running totals of one run (global across processes and devices).

    Attributes:
        steps: optimiser steps taken.
        examples: real (unpadded) training examples seen.
        flops_per_example: analytic training FLOPs of one example at the training resolution (6 x MACs).
        xla_flops_per_step: FLOPs of one compiled training step as XLA's cost analysis reports it, for all devices.
        device_seconds: wall seconds x devices spent per activity (train, eval, compile, checkpoint, lost,
            loader_startup).
        num_devices: devices the run currently uses.
        hardware: hardware table key (``cpu``, ``tpu-v4``, ``h100``, ...).
        peak_flops: dense peak FLOP/s of one device used for the MFU.
        trunk: for a run branched from a trunk (a wsd sweep's shared constant phase), the trunk's ledger at the
            branch point with its ``run`` and ``step``. The counters above include it, so they are what the run
            would have spent trained from scratch (its compute on a scaling law's axis); the run's own share is the
            difference, and a study's total counts each trunk once.
    """

    steps: int = 0
    examples: int = 0
    flops_per_example: float = 0.0
    xla_flops_per_step: float = 0.0
    device_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    num_devices: int = 1
    hardware: str = "cpu"
    peak_flops: float = 0.0
    trunk: dict[str, Any] | None = None

    @property
    def train_flops(self) -> float:
        """Analytic model FLOPs spent on training: 6 x MACs x examples."""
        return self.flops_per_example * self.examples

    @property
    def xla_flops(self) -> float:
        """XLA-reported FLOPs of the training steps taken (padding included)."""
        return self.xla_flops_per_step * self.steps

    @property
    def core_hours(self) -> float:
        """The paper's axis: TPU-v4 core-hours these training FLOPs take at the calibrated utilisation."""
        return flops_to_core_hours(self.train_flops)

    @property
    def total_device_seconds(self) -> float:
        """Every device-second the run has spent, lost time included."""
        return sum(self.device_seconds.values())

    @property
    def img_per_sec_per_device(self) -> float:
        """Training throughput per device (examples per train device-second)."""
        seconds = self.device_seconds["train"]
        return self.examples / seconds if seconds > 0 else 0.0

    @property
    def mfu(self) -> float:
        """Model-FLOP utilisation of the training steps against the hardware's dense peak."""
        denom = self.device_seconds["train"] * self.peak_flops
        return self.train_flops / denom if denom > 0 else 0.0

    def add_steps(self, steps: int, examples: int) -> None:
        """Count ``steps`` optimiser steps that saw ``examples`` real examples."""
        self.steps += int(steps)
        self.examples += int(examples)

    def charge(self, category: str, wall_seconds: float) -> None:
        """Charge ``wall_seconds`` of every device of the run to ``category``."""
        self.device_seconds[category] += float(wall_seconds) * self.num_devices

    @contextlib.contextmanager
    def timed(self, category: str) -> Iterator[None]:
        """Charge the wall time of the ``with`` body to ``category`` (the body must block on its device work)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.charge(category, time.perf_counter() - start)

    def spent(self, budget: Budget) -> float:
        """The part of ``budget`` used so far, in its own unit.

        Every budget is counted in model FLOPs (6 x MACs x examples, the paper's axis): a device-hour budget is the
        FLOPs those hours buy at the hardware's peak and calibrated utilisation, the same conversion ``plan`` makes.
        Measured device time (compilation, evaluation, a slow machine) is reported in the ledger but never spends a
        budget, so a run stops at the same step on any machine and a budget means what ``plan`` said it buys.
        """
        return budget.from_flops(self.train_flops)

    def to_dict(self) -> dict[str, Any]:
        """What checkpoints hold (plain JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored, missing categories start at 0).

        Raises:
            ValueError: ``data`` is not a ledger: a field of the wrong type, a negative count, a non-finite number.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a ledger is a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        seconds = values.get("device_seconds", {})
        checks = {
            "steps": _count(values.get("steps", 0)),
            "examples": _count(values.get("examples", 0)),
            "num_devices": _count(values.get("num_devices", 1)) and values.get("num_devices", 1) > 0,
            "flops_per_example": _amount(values.get("flops_per_example", 0.0)),
            "xla_flops_per_step": _amount(values.get("xla_flops_per_step", 0.0)),
            "peak_flops": _amount(values.get("peak_flops", 0.0)),
            "hardware": isinstance(values.get("hardware", ""), str),
            "device_seconds": isinstance(seconds, dict)
            and all(isinstance(k, str) and _amount(v) for k, v in seconds.items()),
            "trunk": values.get("trunk") is None or isinstance(values.get("trunk"), dict),
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"ledger field {bad[0]} is {values[bad[0]]!r}")
        ledger = cls(**values)
        ledger.device_seconds = {**dict.fromkeys(CATEGORIES, 0.0), **{k: float(v) for k, v in seconds.items()}}
        return ledger

    def summary(self) -> dict[str, Any]:
        """The ``ledger`` block of ``summary.json``."""
        return {
            "steps": self.steps,
            "examples": self.examples,
            "train_flops": self.train_flops,
            "xla_flops": self.xla_flops,
            "core_hours": self.core_hours,
            "device_seconds": dict(self.device_seconds),
            "img_per_sec_per_device": self.img_per_sec_per_device,
            "mfu": self.mfu,
            "hardware": self.hardware,
            "peak_flops_per_device": self.peak_flops,
            "num_devices": self.num_devices,
            **self.trunk_summary(),
            "host_peak_memory_bytes": host_peak_memory(),
        }

    def branch(self, run: str, step: int) -> None:
        """Mark these counters (restored from a trunk's checkpoint of ``step``) as the trunk's share of this run."""
        self.trunk = {
            "run": str(run),
            "step": int(step),
            "steps": self.steps,
            "examples": self.examples,
            "train_flops": self.train_flops,
            "core_hours": self.core_hours,
            "device_seconds": self.total_device_seconds,
        }

    def trunk_summary(self) -> dict[str, Any]:
        """The ``trunk_*`` fields of the summary's ledger block (none for a run trained from scratch)."""
        if not self.trunk:
            return {}
        return {f"trunk_{key}": value for key, value in self.trunk.items()}


def lost_seconds(live: dict[str, Any] | None, saved: dict[str, Any]) -> float:
    """Device-seconds spent after the restored checkpoint (ledger ``saved``) by the run that died, read from its last
    heartbeat ``live``; 0 when there is none, or one of another schema (that only loses the estimate, never the
    resume)."""
    try:
        spent = sum(Ledger.from_dict(live).device_seconds.values()) if live else 0.0
    except ValueError:
        return 0.0
    kept = sum(Ledger.from_dict(saved).device_seconds.values())
    return max(0.0, spent - kept)


def reset_host_peak_memory() -> None:
    """Start this process's peak-memory count afresh, so :func:`host_peak_memory` reads the run that starts now.

    Linux resets the high-water mark of the resident set when ``5`` is written to ``/proc/self/clear_refs``; elsewhere
    (or where /proc is read-only) the figure stays the process's peak since it started, which in a sweep includes
    the runs before.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def host_peak_memory() -> int:
    """Peak resident memory of this process in bytes (Linux ``VmHWM``, else ``getrusage``'s ``ru_maxrss``).

    The host side of a run: the input pipeline's worker processes, when there are any, are not counted.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _amount(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled computation from XLA's cost analysis (0.0 when the backend reports none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0) or 0.0)
