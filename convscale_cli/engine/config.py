"""The pre-training run config: a frozen dataclass filled from ``run.toml``, CLI flags and ``--set`` overrides.

Values left as ``None`` are taken from the architecture's :class:`~convscale_cli.recipe.Recipe` and from the model and
dataset specs when the run is resolved (:mod:`convscale_cli.engine.resolve`). The resolved config is what
``RUN/config.json`` holds and what a restarted command is compared against.

This module is jax-free: the CLI builds the config before importing the engine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from convscale_cli.config import check_seed
from convscale_cli.errors import ConfigError, did_you_mean
from convscale_cli.recipe import Recipe

Precision = Literal["bf16", "fp32"]
LossName = Literal["softmax", "sigmoid"]

# Keys that may change between the invocations of one run without changing what it computes: where and how often it
# writes, how long it may spend, how the devices are laid out. Any other difference refuses to resume.
MUTABLE_KEYS = frozenset(
    {
        "out",
        "force",
        "budget",
        "checkpoint_every",
        "checkpoint_minutes",
        "keep",
        "log_every",
        "eval_every",
        "fsdp",
        "worker_count",
        "coordinator_address",
        "num_processes",
        "process_id",
        "hardware",
        "peak_flops",
        "tensorboard",
        "trackers",
        "progress",
        "stop_step",
        "keep_steps",
    }
)

RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe))


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-training run needs; ``None`` means "the model's recipe / spec default".

    Exactly one duration (``epochs``, ``examples`` or ``steps``) may be given; with none, a FLOP or core-hour
    ``budget`` sets the duration instead (big_vision ``utils.steps``: one function converts, see ``steps.py``).
    """

    # --- what to train -------------------------------------------------------------------------------------------
    model: str = ""  # registry name of the architecture, e.g. "nfnet-f0"
    dataset: str = ""  # registry name of the dataset, e.g. "shapes"
    out: str = ""  # run directory: config.json, metrics.jsonl, checkpoints/, summary.json
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # DatasetSpec.open/info options (root=...)
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra ArchitectureSpec.build options
    # Training augmentation (convscale_cli.data.AugmentConfig fields: min_area, max_area, aspect_ratio, flip, ...);
    # empty: inception crop + flip, the paper's pre-training augmentation (NFNet 2021 A.5).
    augment: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None  # classifier size; default: the dataset's
    # Held-out split carved from train for a dataset that has none (an image folder without val/): this fraction of
    # the train split, a fixed pseudo-random choice (the same on every run), like TFDS's "train[99%:]". 0: none.
    holdout: float = 0.0

    # --- how long (one of these, or a FLOP/core-hour budget) -------------------------------------------------------
    epochs: float | None = None  # passes over the train split; fractional epochs are exact (paper: 0.25 .. 8)
    examples: int | None = None  # training examples seen
    steps: int | None = None  # optimiser steps
    # Compute budget ("2-cpu-hours", "1e15-flops", "0.01-core-hours") in model FLOPs, a device-hour budget converted
    # at the hardware's peak x MFU as `plan` does: the run stops cleanly with status "budget" once the ledger's
    # model FLOPs reach it, and it sets the duration when none is given.
    budget: str | None = None
    # Pause after this step (status "paused", its checkpoint saved): a trunk of a branching sweep, trained only as far
    # as its branches need. Rerunning with a later stop_step, or none, continues it. The schedule is the full run's.
    stop_step: int | None = None
    # Steps whose checkpoints are saved and kept beyond `keep` (a trunk's branch points).
    keep_steps: tuple[int, ...] = ()
    # Start from the checkpoint of step `branch_step` in the run directory `branch_from` (a wsd trunk) instead of a
    # fresh initialisation: the trunk's state, data position and ledger, with this run's own schedule from there on.
    # The two runs' wsd schedules must agree up to that step (same peak and warm-up, neither cooling down yet), so the
    # result equals this run trained from scratch (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training
    # Beyond Fixed Training Durations", §3).
    branch_from: str | None = None
    branch_step: int | None = None

    # --- recipe (None: the architecture's Recipe) ------------------------------------------------------------------
    batch_size: int | None = None  # global batch; default the recipe's base batch (4096 in the paper)
    # Peak learning rate alpha quoted at the recipe's base batch (4096) and scaled linearly: lr = alpha * B / 4096.
    lr: float | None = None
    loss: LossName | None = None  # softmax cross-entropy or sigmoid (multi-label) cross-entropy
    label_smoothing: float | None = None  # softmax only
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other Recipe field, e.g. weight_decay
    stochdepth_rate: float = 0.0  # the JFT pre-training recipe uses no stochastic depth (NFNet 2021 A.5)
    drop_rate: float = 0.0  # nor dropout
    resolution: int | None = None  # training resolution; default the model's (224 in the paper)
    eval_resolution: int | None = None  # held-out resolution; default the model's (256 in the paper)
    # bf16 activations with fp32 params/optimizer (NFNet A.1), or fp32. None: the run's own when resuming, else fp32
    # on CPU (XLA emulates bf16 arithmetic there: slower than fp32) and bf16 on accelerators (default_precision).
    precision: Precision | None = None
    seed: int = 0  # initialisation, data order and dropout
    # Start from the parameters of this run, checkpoint or weights checkpoint (timm's --initial-checkpoint): a fresh
    # optimizer, schedule and step counter. A run that has saved its own checkpoint resumes from that instead.
    initial_checkpoint: str | None = None
    # Gradient accumulation: each step's batch is computed as this many micro-batches whose gradients sum to the
    # batch's, so a batch too large for the devices' memory takes the same update (timm's --grad-accum-steps).
    grad_accum_steps: int = 1
    # Exponential moving average of the parameters, updated every step with the NFNet warm-up
    # min(decay, (1+t)/(10+t)) (NFNet 2021 A.1); 0: none, as in the paper's pre-training (A.5). With one, the run
    # also evaluates the average at the end, and load_model / fine-tuning take it.
    ema_decay: float = 0.0

    # --- evaluation, checkpoints, logging --------------------------------------------------------------------------
    eval_every: int = 0  # held-out eval every N steps (0: only at the end)
    eval_examples: int | None = None  # cap on held-out examples per eval (None: the whole eval split)
    checkpoint_every: int = 1000  # save every N steps (0: only on exit)
    checkpoint_minutes: float = 30.0  # and at least every M minutes of wall time (0: off)
    keep: int = 3  # checkpoints kept (the newest K); older ones are deleted after a newer save completes
    log_every: int = 50  # metrics.jsonl / progress every N steps
    tensorboard: bool = True  # the default tracker: TensorBoard events in RUN/tb (false: off)
    # Experiment trackers besides RUN/metrics.jsonl (always written), by registered name: tensorboard, wandb, mlflow,
    # or a plugin's (the register_trackers hook). None: tensorboard when installed (engine.tracking.choose_trackers).
    trackers: tuple[str, ...] | None = None
    progress: Literal["auto", "rich", "plain", "none"] = "auto"  # Rich on a TTY, plain lines otherwise

    # --- hardware and scale-out ------------------------------------------------------------------------------------
    fsdp: bool = False  # shard params and optimizer state over the data axis (ZeRO-3 style) instead of replicating
    worker_count: int = 0  # grain worker processes for the input pipeline
    hardware: str | None = None  # hardware table key for MFU (default: detected from the devices)
    peak_flops: float | None = None  # per-device peak FLOP/s override (CPU default: CONVSCALE_CPU_PEAK_FLOPS's share)
    coordinator_address: str | None = None  # multi-host: "host:port" of process 0 (auto on TPU pods / SLURM)
    num_processes: int | None = None  # multi-host: number of processes
    process_id: int | None = None  # multi-host: this process's index
    force: bool = False  # start over in a run directory whose config differs

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required, e.g. `model=nfnet-f0`")
        if not self.dataset:
            raise ConfigError("dataset is required, e.g. `dataset=shapes`")
        if not self.out:
            raise ConfigError("out (the run directory) is required, e.g. `out=runs/f0-shapes`")
        check_duration(self)
        _positive(self, "batch_size", "lr", "resolution", "eval_resolution")
        _positive(self, "num_classes")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing = {self.label_smoothing!r} must be in [0, 1)")
        for key in ("stochdepth_rate", "drop_rate"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} = {getattr(self, key)!r} must be in [0, 1)")
        if not 0.0 <= self.holdout <= 0.5:
            raise ConfigError(f"holdout = {self.holdout!r} must be a fraction of the train split in [0, 0.5]")
        if isinstance(self.grad_accum_steps, bool) or self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps = {self.grad_accum_steps!r} must be an integer >= 1")
        check_run_settings(self)
        check_known(self.recipe, RECIPE_FIELDS, "recipe")
        _positive(self, "stop_step", "branch_step")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.keep_steps):
            raise ConfigError(f"keep_steps = {list(self.keep_steps)!r} must hold step numbers >= 1")
        if (self.branch_from is None) != (self.branch_step is None):
            raise ConfigError("branch_from and branch_step go together: the trunk's run directory and its step")


def check_duration(config: Any) -> None:
    """Validate a run's duration, the same for pre-training and fine-tuning: at most one of ``epochs``, ``examples``
    and ``steps``, and a compute ``budget`` that sets the duration when it stands alone and stops the run early when
    one of them is given.

    Raises:
        ConfigError: no duration, several, or one that is not a finite number > 0.
        UsageError: a budget :func:`convscale_cli.budget.parse_budget` cannot read (here, not after compiling).
    """
    given = [k for k in ("epochs", "examples", "steps") if getattr(config, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"give one duration, not {' and '.join(given)}: choose epochs, examples or steps")
    if not given and config.budget is None:
        raise ConfigError("no duration: give epochs, examples, steps or a FLOP/core-hour budget")
    _positive(config, "epochs", "examples", "steps")
    if config.budget is not None:
        from convscale_cli.budget import parse_budget

        parse_budget(config.budget)


def check_run_settings(config: Any) -> None:
    """Validate the settings every run config shares (:class:`~convscale_cli.engine.resolve.RunSettings`): one set
    of rules, and one wording, for pre-training and fine-tuning.

    Raises:
        ConfigError: naming the setting, its value and what it must be.
    """
    _positive(config, "eval_examples", "peak_flops", "num_processes")
    for key in ("eval_every", "checkpoint_every", "worker_count"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} = {getattr(config, key)!r} must be >= 0")
    if not (math.isfinite(config.checkpoint_minutes) and config.checkpoint_minutes >= 0):
        raise ConfigError(f"checkpoint_minutes = {config.checkpoint_minutes!r} must be a finite number >= 0 (0: off)")
    for key in ("keep", "log_every"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} = {getattr(config, key)!r} must be >= 1")
    if not 0.0 <= config.ema_decay < 1.0:  # NaN-safe: NaN fails both comparisons
        raise ConfigError(f"ema_decay = {config.ema_decay!r} must be in [0, 1) (0: no EMA)")
    if config.process_id is not None and config.process_id < 0:
        raise ConfigError(f"process_id = {config.process_id!r} must be >= 0")
    check_seed(config.seed)


def check_known(values: dict[str, Any], fields: frozenset[str], prefix: str) -> None:
    """Refuse a key of the ``prefix`` table (``recipe``, ``augment``) that is not one of ``fields``.

    Raises:
        ConfigError: the first unknown key, with the closest known one.
    """
    unknown = sorted(set(values) - fields)
    if unknown:
        hint = did_you_mean(unknown[0], fields, prefix=prefix + ".")
        hint = f"; {hint}" if hint else ""
        raise ConfigError(f"unknown config key {prefix + '.' + unknown[0]!r}{hint}")


def _positive(config: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if value is None:
            continue
        if not math.isfinite(value):  # NaN fails every comparison and inf passes "> 0": neither is a setting
            raise ConfigError(f"{key} = {value!r} must be a finite number > 0")
        if not value > 0:
            raise ConfigError(f"{key} = {value!r} must be > 0")
