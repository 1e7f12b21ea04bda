"""Turning a :class:`PretrainConfig` into a fully resolved run: specs looked up, recipe merged, duration in steps.

Everything that is ``None`` in the config gets its value here, from the architecture's recipe and the model and
dataset specs, and :func:`resolved_dict` is what ``RUN/config.json`` holds. jax-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, get_args

from convscale_cli.budget import Budget, get_hardware, parse_budget, train_flops
from convscale_cli.config import check_options, from_dict, to_dict
from convscale_cli.data import Normalization
from convscale_cli.data.augment import DEFAULT_EVAL_CROP_FRACTION, augment_from_dict
from convscale_cli.engine.config import Precision, PretrainConfig
from convscale_cli.engine.steps import Duration, resolve_duration
from convscale_cli.errors import UsageError
from convscale_cli.recipe import Recipe, peak_learning_rate, stable_end, without_default_schedule
from convscale_cli.registry import MAX_NUM_CLASSES, ArchitectureSpec, DatasetInfo, DatasetSpec, Registry

PRECISIONS = get_args(Precision)
C = TypeVar("C", bound="RunSettings")


class RunSettings(Protocol):
    """The settings of a run config that the engine reads: :class:`PretrainConfig` and ``FinetuneConfig`` both have
    them, with the same meaning and validation (:func:`~convscale_cli.engine.config.check_run_settings`). Both are
    frozen dataclasses."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def out(self) -> str: ...
    @property
    def force(self) -> bool: ...
    @property
    def seed(self) -> int: ...
    @property
    def precision(self) -> Precision | None: ...
    @property
    def fsdp(self) -> bool: ...
    @property
    def ema_decay(self) -> float: ...
    @property
    def data_options(self) -> dict[str, Any]: ...
    @property
    def eval_examples(self) -> int | None: ...
    @property
    def eval_every(self) -> int: ...
    @property
    def checkpoint_every(self) -> int: ...
    @property
    def checkpoint_minutes(self) -> float: ...
    @property
    def keep(self) -> int: ...
    @property
    def log_every(self) -> int: ...
    @property
    def tensorboard(self) -> bool: ...
    @property
    def trackers(self) -> tuple[str, ...] | None: ...
    @property
    def progress(self) -> str: ...
    @property
    def worker_count(self) -> int: ...
    @property
    def hardware(self) -> str | None: ...
    @property
    def peak_flops(self) -> float | None: ...
    @property
    def coordinator_address(self) -> str | None: ...
    @property
    def num_processes(self) -> int | None: ...
    @property
    def process_id(self) -> int | None: ...
    @property
    def budget(self) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A resolved run as the engine reads it, whatever its kind: pre-training's :class:`ResolvedRun` and
    fine-tuning's ``FinetuneRun`` add their config and what only they resolve.

    Attributes:
        config: the settings the engine reads (a :class:`RunSettings`).
        arch: the architecture spec.
        data: the dataset spec.
        info: the dataset's info under the config's data options.
        recipe: the architecture's recipe with the run's overrides applied.
        build_options: ``ArchitectureSpec.build`` options besides the classifier size and dtype.
        batch_size: global batch size.
        peak_lr: the peak learning rate, alpha scaled to the batch (:func:`convscale_cli.recipe.peak_learning_rate`).
        resolution: training resolution.
        eval_resolution: held-out resolution.
        num_classes: classifier size.
        duration: steps / examples / epochs.
        macs_per_image: forward MACs of one image at the training resolution.
        budget: the parsed compute budget at which the run stops, or None.
        eval_crop: central fraction of each held-out image evaluated.
        normalization: the input normalisation the steps apply (the architecture's, or that of the parameters the
            run starts from).
    """

    config: RunSettings
    arch: ArchitectureSpec
    data: DatasetSpec
    info: DatasetInfo
    recipe: Recipe
    build_options: dict[str, Any]
    batch_size: int
    peak_lr: float
    resolution: int
    eval_resolution: int
    num_classes: int
    duration: Duration
    macs_per_image: int
    budget: Budget | None
    eval_crop: float
    normalization: Normalization

    @property
    def flops_per_example(self) -> float:
        """Training FLOPs of one example (:func:`convscale_cli.budget.train_flops`)."""
        return train_flops(self.macs_per_image)


@dataclasses.dataclass(frozen=True)
class ResolvedRun(RunSpec):
    """A pre-training run with every default filled in (the attributes of :class:`RunSpec`, and these).

    Attributes:
        config: the config as given.
        augment: training augmentation, the dataset's defaults updated with the config's ``augment``.
    """

    config: PretrainConfig
    augment: dict[str, Any]


def _recipe(base: Recipe, config: PretrainConfig) -> Recipe:
    merged = {**to_dict(base), **config.recipe}
    for key in ("lr", "loss", "label_smoothing"):
        if getattr(config, key) is not None:
            merged[key] = getattr(config, key)
    recipe = from_dict(Recipe, merged, prefix="recipe.")
    if recipe.loss == "sigmoid" and recipe.label_smoothing:
        raise UsageError(f"label smoothing {recipe.label_smoothing} applies to the softmax loss only, not sigmoid")
    return recipe


def holdout_indices(train_size: int, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of a train split with ``fraction`` of it held out (at least one example).

    The held-out examples are the first of a fixed shuffle (``random.Random(0)``), so every run, and every process,
    holds out the same ones, spread over the classes however the split is ordered.
    """
    import random

    order = list(range(train_size))
    random.Random(0).shuffle(order)
    held = sorted(order[: max(1, round(fraction * train_size))])
    taken = set(held)
    return [i for i in range(train_size) if i not in taken], held


def resolve_sizes(config: Any, arch: ArchitectureSpec, info: DatasetInfo, dataset: str) -> tuple[int, int, int]:
    """``(resolution, eval_resolution, num_classes)`` of a run: the config's ``resolution``, ``eval_resolution`` and
    ``num_classes``, else the model's and the dataset's; checked against both.

    Raises:
        UsageError: a resolution the model refuses, a classifier smaller than the dataset's label set.
    """
    resolution = config.resolution or arch.train_resolution
    eval_resolution = config.eval_resolution or arch.eval_resolution
    arch.check_resolution(resolution)
    arch.check_resolution(eval_resolution)
    num_classes = config.num_classes or info.num_classes
    check_num_classes(num_classes, info, dataset)
    return resolution, eval_resolution, num_classes


def check_num_classes(num_classes: int, info: DatasetInfo, dataset: str) -> None:
    """Refuse a classifier smaller than the dataset's label set (or past :data:`MAX_NUM_CLASSES`).

    ``one_hot`` of a label at or past the classifier's size is all zeros, so those examples would train silently to
    loss 0 with zero gradients; a larger classifier only carries unused logits.

    Raises:
        UsageError: ``num_classes`` is below the dataset's class count.
    """
    if num_classes > MAX_NUM_CLASSES:
        raise UsageError(f"num_classes {num_classes} is over the limit of {MAX_NUM_CLASSES} classes")
    if num_classes < info.num_classes:
        raise UsageError(
            f"num_classes {num_classes} is smaller than dataset {dataset!r}'s {info.num_classes} classes (labels "
            f"0..{info.num_classes - 1}); use num_classes >= {info.num_classes} or leave it unset"
        )


# The build keywords a run sets itself (docs/plugins.md, "build: the exact calls"), and where each is given. A model
# option of the same name would reach ``build`` twice.
RUN_BUILD_ARGUMENTS = {
    "num_classes": "`num_classes=N`",
    "dtype": "`precision=bf16|fp32`",
    "drop_rate": "`drop_rate=P`",
    "stochdepth_rate": "`stochdepth_rate=P`",
}


def check_model_options(arch: ArchitectureSpec, options: dict[str, Any]) -> None:
    """Refuse model options the spec does not declare, that name a build argument the run passes itself, or whose
    value is not of the declared default's type.

    Checked before the run directory is claimed, as the data options are, so the plugin's ``build`` never sees them.

    Raises:
        UsageError: a run setting given as a model option (naming where it is set).
        UnknownNameError: an option not in ``arch.options`` (with close matches).
        ConfigError: a value of another type than its default's (``resolution = "abc"``).
    """
    for key in options:
        if key in RUN_BUILD_ARGUMENTS:
            raise UsageError(
                f"model option {key!r} is set by the run, not as a model option: use {RUN_BUILD_ARGUMENTS[key]} "
                f"instead of model_options.{key}"
            )
    declared = {k: v for k, v in arch.options.items() if k not in RUN_BUILD_ARGUMENTS}
    check_options(f"{arch.name} model option", options, declared)


def default_precision(backend: str, saved: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """The precision of a run that names none, and why, in words for the run's header.

    A run being resumed keeps the precision its ``config.json`` records. Otherwise: fp32 on CPU, where XLA emulates
    bf16 arithmetic by converting to fp32 and back (slower than fp32, not faster); bf16 activations with fp32
    parameters on GPUs and TPUs, the paper's setting (NFNet 2021, appendix A.1).

    Args:
        backend: ``jax.default_backend()`` (``cpu``, ``gpu``, ``tpu``, ...).
        saved: the resolved config of the run in the output directory, if there is one.
    """
    if saved is not None and saved.get("precision") in PRECISIONS:
        return str(saved["precision"]), "that of the run being resumed"
    if backend == "cpu":
        return "fp32", "default on CPU, where bf16 is emulated; --precision bf16 to override"
    return "bf16", f"default on {backend.upper()}; --precision fp32 for exactness"


def with_precision(config: C, backend: str, saved: Mapping[str, Any] | None) -> tuple[C, str]:
    """``config`` (a pre-training or fine-tuning config) with its precision filled in (:func:`default_precision`)
    and the reason, ``"given"`` when it names one."""
    if config.precision is not None:
        return config, "given"
    precision, why = default_precision(backend, saved)
    return dataclasses.replace(config, precision=precision), why


def resolve_budget(
    config: RunSettings, batch_size: int, flops_per_example: float, model: str
) -> tuple[Budget | None, float | None]:
    """``(budget, budget_flops)``: the run's parsed compute budget, and the FLOPs it sets the duration to when no
    epochs, examples or steps are given (None when one is: the budget only stops the run early).

    Raises:
        UsageError: a budget that cannot pay for one optimiser step, naming what it buys, what one step costs and
            the smallest budget that buys one.
    """
    if config.budget is None:
        return None, None
    budget = parse_budget(config.budget)
    _check_budget_buys_a_step(budget, batch_size, flops_per_example, model)
    sets_duration = all(getattr(config, k) is None for k in ("epochs", "examples", "steps"))
    return budget, budget.to_flops() if sets_duration else None


def _check_budget_buys_a_step(budget: Budget, batch_size: int, flops_per_example: float, model: str) -> None:
    step = batch_size * flops_per_example
    if budget.to_flops() < step:
        need = budget.from_flops(step)
        raise UsageError(
            f"budget {budget.text or budget} buys {budget.to_flops():.3g} model FLOPs, less than one step of batch "
            f"{batch_size} of {model} ({step:.3g} FLOPs); give at least {need:.3g} {budget.unit_label} or a smaller "
            "`batch_size`"
        )


def resolve(config: PretrainConfig, registry: Registry) -> ResolvedRun:
    """Look up the model and dataset and fill in every default.

    Raises:
        UnknownNameError: unknown model or dataset (with close matches).
        UsageError: an impossible combination (resolution the model refuses, a duration under one example, ...).
    """
    arch = registry.architecture(config.model)
    check_model_options(arch, config.model_options)
    data = registry.dataset(config.dataset)
    check_options(f"{data.name} data option", config.data_options, data.options)
    info = data.info(**config.data_options)
    recipe = _recipe(arch.recipe, config)
    batch_size = config.batch_size or recipe.base_batch_size
    resolution, eval_resolution, num_classes = resolve_sizes(config, arch, info, data.name)
    train_size = int(info.split_sizes.get("train", 0))
    # The recipe's default batch may pad a small dataset; a batch asked for that exceeds the whole split is a mistake.
    if config.batch_size is not None and train_size and batch_size > train_size:
        raise UsageError(
            f"batch size {batch_size} is larger than dataset {data.name!r}'s {train_size} training examples; "
            f"use `batch_size={train_size}` or less"
        )
    if config.holdout:
        if info.split_sizes.get("eval"):
            raise UsageError(
                f"dataset {data.name!r} already has a held-out 'eval' split ({info.split_sizes['eval']} examples); "
                "holdout carves one from train only for a dataset without one"
            )
        held = len(holdout_indices(train_size, config.holdout)[1])
        train_size -= held
        info = dataclasses.replace(info, split_sizes={**info.split_sizes, "train": train_size, "eval": held})
    if "eval" not in info.split_sizes or not info.split_sizes["eval"]:
        raise UsageError(
            f"dataset {data.name!r} has no held-out 'eval' split to evaluate on; carve one from train with "
            "`holdout=0.01` (1% of it, the same examples on every run)"
        )
    macs = int(arch.count(resolution, num_classes).macs)
    # Checked here, before the run directory is claimed (they are used only once training starts).
    augment = {**data.augment, **config.augment}
    augment_from_dict(augment)
    if config.hardware is not None:
        get_hardware(config.hardware)
    budget, budget_flops = resolve_budget(config, batch_size, train_flops(macs), arch.name)
    duration = resolve_duration(
        train_size=train_size,
        batch_size=batch_size,
        epochs=config.epochs,
        examples=config.examples,
        steps=config.steps,
        budget_flops=budget_flops,
        flops_per_example=train_flops(macs),
    )
    _check_schedule(config, recipe, duration)
    return ResolvedRun(
        config=config,
        arch=arch,
        data=data,
        info=info,
        recipe=recipe,
        build_options={
            "stochdepth_rate": config.stochdepth_rate,
            "drop_rate": config.drop_rate,
            **config.model_options,
        },
        **sized_fields(recipe, batch_size, (resolution, eval_resolution, num_classes), macs, duration, budget),
        augment=augment,
        eval_crop=data.eval_crop or DEFAULT_EVAL_CROP_FRACTION,
        normalization=_normalization(config, arch),
    )


def sized_fields(
    recipe: Recipe,
    batch_size: int,
    sizes: tuple[int, int, int],
    macs: int,
    duration: Duration,
    budget: Budget | None,
) -> dict[str, Any]:
    """The :class:`RunSpec` fields every run kind derives alike: batch and peak lr (the recipe's alpha scaled to the
    batch), resolutions and classes (``sizes``, as :func:`resolve_sizes` returns them), MACs, duration and budget."""
    resolution, eval_resolution, num_classes = sizes
    return {
        "batch_size": batch_size,
        "peak_lr": peak_learning_rate(recipe.lr, batch_size, recipe.base_batch_size),
        "resolution": resolution,
        "eval_resolution": eval_resolution,
        "num_classes": num_classes,
        "duration": duration,
        "macs_per_image": macs,
        "budget": budget,
    }


def _normalization(config: PretrainConfig, arch: ArchitectureSpec) -> Normalization:
    """The architecture's input normalisation, or that of the parameters ``initial_checkpoint`` names (they were
    trained with it)."""
    if config.initial_checkpoint is None:
        return arch.normalization
    from convscale_cli.finetune.backbone import locate

    return locate(config.initial_checkpoint, what="initial_checkpoint").normalization


def _check_schedule(config: PretrainConfig, recipe: Recipe, duration: Duration) -> None:
    """Refuse a fixed warm-up longer than the run allows, and a branch point its schedule cannot share.

    Raises:
        UsageError: naming the step numbers involved.
    """
    wsd = recipe.schedule == "wsd"
    stable = stable_end(recipe, duration.steps) if wsd else duration.steps
    if recipe.warmup_steps is not None and recipe.warmup_steps > stable:
        where = f"the cooldown starts after step {stable}" if wsd else f"the run has {stable} steps"
        raise UsageError(f"recipe.warmup_steps = {recipe.warmup_steps} is too long: {where}")
    if config.branch_step is None:
        return
    if not wsd:
        raise UsageError(
            f"branch_from needs the wsd schedule (recipe.schedule = 'wsd'), not {recipe.schedule}: a {recipe.schedule} "
            "run's learning rate depends on its length from the first step, so it cannot continue another run"
        )
    if stable >= duration.steps:
        raise UsageError(
            f"this {duration.steps}-step run has no cooldown step to branch into (cooldown_fraction "
            f"{recipe.cooldown_fraction:g} of {duration.steps} steps rounds to 0): train it without branch_from"
        )
    if config.branch_step > stable:
        raise UsageError(
            f"branch_step {config.branch_step} is past this run's constant phase, which ends at step {stable} of "
            f"{duration.steps}: a branch starts at or before its own cooldown"
        )
    if config.stop_step is not None:
        raise UsageError("a branch runs to its end: stop_step applies to trunks, not with branch_from")
    if Path(config.branch_from or "").expanduser().absolute() == Path(config.out).expanduser().absolute():
        raise UsageError(f"branch_from {config.branch_from!r} is this run's own directory: name the trunk's")


def resolved_dict(run: ResolvedRun) -> dict[str, Any]:
    """The resolved config as plain JSON: the given config with every default replaced by its value.

    ``lr``, ``loss`` and ``label_smoothing`` stay top-level (the recipe block holds the other recipe fields), and
    values computed from the rest sit under ``derived``, so a changed flag is named once when a run is compared.
    """
    recipe = {k: v for k, v in to_dict(run.recipe).items() if k not in ("lr", "loss", "label_smoothing")}
    return resolved_layout(
        run,
        label_smoothing=run.recipe.label_smoothing,
        recipe=without_default_schedule(recipe),
        augment=run.augment,
        eval_crop=run.eval_crop,
    )


def resolved_layout(run: RunSpec, **own: Any) -> dict[str, Any]:
    """The resolved config of any kind of run as plain JSON (what ``RUN/config.json`` holds and a rerun is compared
    against): the given config, the values every run resolves (batch, lr, loss, resolutions, classes), the kind's
    own resolved values ``own``, and under ``derived`` the values computed from the rest (total steps and examples,
    peak lr, MACs), which only name a difference that no given value explains (:meth:`RunDir.prepare`)."""
    out = to_dict(run.config)
    out.update(
        batch_size=run.batch_size,
        lr=run.recipe.lr,
        loss=run.recipe.loss,
        resolution=run.resolution,
        eval_resolution=run.eval_resolution,
        num_classes=run.num_classes,
        normalization=run.normalization.to_json(),
        **own,
        derived={
            "total_steps": run.duration.steps,
            "total_examples": run.duration.examples,
            "peak_lr": run.peak_lr,
            "macs_per_image": run.macs_per_image,
        },
    )
    return out
