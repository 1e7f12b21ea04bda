"""Turning a :class:`FinetuneConfig` into a fully resolved fine-tuning run (the counterpart of the engine's resolve).

The architecture comes from the checkpoint ``--from`` names (``--model`` only checks it); the recipe is the
architecture's with the fine-tuning overrides; the duration is counted in augmented samples, so repeated augmentation
keeps the compute of a run fixed and makes fewer passes over the data (Smith et al. 2023, footnote 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from convscale_cli.budget import get_hardware, train_flops
from convscale_cli.config import check_options, from_dict, to_dict
from convscale_cli.data.augment import DEFAULT_EVAL_CROP_FRACTION, AugmentConfig
from convscale_cli.engine.header import run_header
from convscale_cli.engine.resolve import RunSpec, resolve_budget, resolve_sizes, resolved_layout, sized_fields
from convscale_cli.engine.steps import resolve_duration
from convscale_cli.errors import UsageError
from convscale_cli.finetune.backbone import Pretrained, locate
from convscale_cli.finetune.config import DEFAULT_BATCH_SIZE, FINETUNE_LR_FRACTION, FinetuneConfig
from convscale_cli.recipe import Recipe, without_default_schedule
from convscale_cli.registry import Registry


@dataclasses.dataclass(frozen=True)
class FinetuneRun(RunSpec):
    """A fine-tuning run with every default filled in (the attributes of
    :class:`~convscale_cli.engine.resolve.RunSpec`, and these).

    Attributes:
        config: the config as given.
        pretrained: the located checkpoint.
        augment: the host-side and on-device augmentation (the dataset's defaults updated with the config's).

    Its ``arch`` is the checkpoint's architecture; ``build_options`` are the checkpoint's, plus stochastic depth and
    dropout; ``budget`` counts the SAM ascent pass (:func:`finetune_flops`); ``eval_crop`` is the config's, else the
    dataset's, else 0.875.
    """

    config: FinetuneConfig
    pretrained: Pretrained
    augment: AugmentConfig

    @property
    def flops_per_example(self) -> float:
        """Training FLOPs of one example: see :func:`finetune_flops`."""
        return finetune_flops(self.macs_per_image, self.config)


def finetune_flops(macs_per_image: int, config: FinetuneConfig) -> float:
    """Training FLOPs of one fine-tuning example (:func:`convscale_cli.budget.train_flops`), plus the SAM ascent pass
    over ``sam_fraction`` of the batch (Foret et al. 2021: one more forward and backward pass on those rows)."""
    sam = config.sam_fraction if config.sam_rho > 0 else 0.0
    return train_flops(macs_per_image) * (1.0 + sam)


def _recipe(base: Recipe, config: FinetuneConfig) -> Recipe:
    merged = {**to_dict(base), "weight_decay": config.weight_decay, "lr": base.lr * FINETUNE_LR_FRACTION}
    merged.update(config.recipe)
    if config.lr is not None:
        merged["lr"] = config.lr
    if config.loss is not None:
        merged["loss"] = config.loss
    # Label smoothing is applied to the targets with MixUp/CutMix on device (one place), never twice.
    merged["label_smoothing"] = config.label_smoothing
    recipe = from_dict(Recipe, merged, prefix="recipe.")
    if recipe.loss == "sigmoid" and recipe.label_smoothing:
        raise UsageError(f"label smoothing {recipe.label_smoothing} applies to the softmax loss only, not sigmoid")
    return recipe


def resolve(config: FinetuneConfig, registry: Registry) -> FinetuneRun:
    """Locate the checkpoint, look up the model and dataset and fill in every default.

    Raises:
        CheckpointError: ``--from`` is not a usable checkpoint.
        UsageError: ``--model`` differs from the checkpoint's architecture, a resolution the model refuses, an
            unknown dataset or option, a duration under one example, a budget that buys no step.
    """
    pre = locate(config.pretrained)
    arch = registry.architecture(pre.architecture)
    if config.model is not None and registry.architecture(config.model).name != arch.name:
        raise UsageError(
            f"`pretrained` {config.pretrained!r} holds a {arch.name} checkpoint, not `model={config.model}`"
        )
    data = registry.dataset(config.dataset)
    check_options(f"{data.name} data option", config.data_options, data.options)
    info = data.info(**config.data_options)
    if not info.split_sizes.get("eval"):
        raise UsageError(f"dataset {data.name!r} has no held-out 'eval' split to evaluate on")
    recipe = _recipe(arch.recipe, config)
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE
    resolution, eval_resolution, num_classes = resolve_sizes(config, arch, info, data.name)
    layers, magnitude = config.randaugment
    augment = from_dict(
        AugmentConfig,
        {
            **data.augment,
            **config.augment,
            "randaugment_layers": layers,
            "randaugment_magnitude": magnitude,
            "mixup_alpha": config.mixup,
            "cutmix_alpha": config.cutmix,
            "label_smoothing": config.label_smoothing,
            "repeats": config.repeat_aug,
        },
        prefix="augment.",
    )
    if config.hardware is not None:
        get_hardware(config.hardware)  # before the run directory is claimed
    macs = int(arch.count(resolution, num_classes).macs)
    budget, budget_flops = resolve_budget(config, batch_size, finetune_flops(macs, config), arch.name)
    duration = resolve_duration(
        train_size=int(info.split_sizes.get("train", 0)),
        batch_size=batch_size,
        epochs=config.epochs,
        examples=config.examples,
        steps=config.steps,
        budget_flops=budget_flops,
        flops_per_example=finetune_flops(macs, config),
    )
    return FinetuneRun(
        config=config,
        pretrained=pre,
        arch=arch,
        data=data,
        info=info,
        recipe=recipe,
        augment=augment,
        build_options={**pre.options, "stochdepth_rate": config.stochdepth_rate, "drop_rate": config.drop_rate},
        **sized_fields(recipe, batch_size, (resolution, eval_resolution, num_classes), macs, duration, budget),
        eval_crop=config.eval_crop_fraction or data.eval_crop or DEFAULT_EVAL_CROP_FRACTION,
        # The backbone's parameters were trained on inputs normalised this way; from-scratch baselines share it so
        # that the two runs of a comparison see the same inputs.
        normalization=pre.normalization,
    )


def resolved_dict(run: FinetuneRun) -> dict[str, Any]:
    """The resolved config as plain JSON (what ``RUN/config.json`` holds and a rerun is compared against)."""
    return resolved_layout(
        run,
        kind="finetune",
        model=run.arch.name,
        pretrained_checkpoint={"path": str(run.pretrained.params_dir), "step": run.pretrained.step},
        recipe=without_default_schedule(to_dict(run.recipe)),
        augment=to_dict(run.augment),
        eval_crop_fraction=run.eval_crop,
        model_options=run.build_options,
    )


def header(run: FinetuneRun, precision_why: str, devices: int | None, backend: str | None) -> str:
    """What is about to run, printed before anything compiles (:func:`~convscale_cli.engine.header.run_header`)."""
    config = run.config
    train_size = int(run.info.split_sizes.get("train", 0))
    source = "a random initialisation" if config.scratch else str(run.pretrained.path)
    title = (
        f"finetune {run.arch.name} from {source} on {run.data.name} ({train_size} training examples) -> {config.out}"
    )
    notes = f"; SAM rho {config.sam_rho:g} on {config.sam_fraction:g} of each batch" if config.sam_rho > 0 else ""
    if config.ema_decay > 0:
        notes += f"; EMA {config.ema_decay:g}"
    return run_header(run, title, notes, precision_why, devices, backend)


__all__ = ["FinetuneRun", "header", "resolve", "resolved_dict"]
