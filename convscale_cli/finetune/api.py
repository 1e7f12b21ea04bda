"""``finetune(config)``: the library entry point behind ``convscale finetune``.

It resolves the config and drives the same run engine as pre-training (:mod:`convscale_cli.engine.trainer`): the run
directory (a rerun of the same command resumes), the mesh (replicated or FSDP, one process or several), the step,
checkpoints, ledger, evaluation and summary are the engine's. What is fine-tuning's own: a run without a checkpoint
of its own starts from the pre-trained backbone with a new classifier (or, with ``scratch``, from a random
initialisation of the same architecture); the step runs with SAM and on-device MixUp/CutMix switched on
(:func:`~convscale_cli.engine.step.train_step`); and the summary records the transfer recipe and, under ``pretrain``,
the pre-training cost it builds on, both in TPU-v4 core-hours (Smith et al. 2023 §3: an F7+ costs ~110k core-hours
to pre-train and ~1.6k to fine-tune).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import jax

from convscale_cli.engine.build import Built
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.trainer import RunKind, Start, open_run, train_run
from convscale_cli.finetune.backbone import load_params
from convscale_cli.finetune.config import FinetuneConfig
from convscale_cli.finetune.resolve import FinetuneRun, header, resolve, resolved_dict
from convscale_cli.registry import Registry


def finetune(
    config: FinetuneConfig, registry: Registry | None = None, *, pipeline: ModuleType | None = None
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) a pre-trained model and return its ``summary.json`` contents.

    Args:
        config: the run config.
        registry: where models and datasets are looked up (default: the installed plugins).
        pipeline: the input pipeline module (default :mod:`convscale_cli.data`).

    Raises:
        CheckpointError: ``--from`` is not a usable checkpoint, or a tensor does not match the model (named).
        UsageError: bad config, ``--model`` mismatch, a resolution the model refuses, a run directory holding
            another run, an indivisible batch.
        TrainingError: a non-finite loss (exit code 3).
        RunInterrupted: SIGTERM/SIGINT, after saving a checkpoint (exit code 130).
    """
    config, precision_why, rundir, registry, pipeline = open_run(config, "finetune", registry, pipeline)
    run = resolve(config, registry)
    kind = RunKind(
        name="finetune",
        start=functools.partial(_start, run),
        step_options={
            "sam_rho": config.sam_rho,
            "sam_fraction": config.sam_fraction,
            "num_shards": jax.device_count(),  # the mesh's size: the ascent rows stay on their devices
            "ema_decay": config.ema_decay,
            "mixup_alpha": config.mixup,
            "cutmix_alpha": config.cutmix,
            "label_smoothing": config.label_smoothing,
        },
        summary=_summary,
        done=lambda previous: previous.get("status") == "finished",
        header=header(run, precision_why, jax.device_count(), jax.default_backend()),
        augment=run.augment,
    )
    return train_run(run, kind, rundir=rundir, resolved=resolved_dict(run), registry=registry, pipeline=pipeline)


def _start(run: FinetuneRun, built: Built, ledger: Ledger, progress: Progress) -> Start:
    """The pre-trained backbone with a new classifier drawn from the initialiser's key, or (``scratch``) the
    architecture's own random initialisation."""
    with ledger.timed("compile"):
        if run.config.scratch:
            state = built.fresh_state()
        else:
            params = load_params(
                run.pretrained,
                run.arch,
                num_classes=run.num_classes,
                options=run.build_options,
                resolution=run.resolution,
                rng=built.init_key,
            )
            state = built.with_params(params)
        jax.block_until_ready(state)
    if run.config.scratch:
        progress.message(
            f"training {run.arch.name} from a random initialisation (the --scratch baseline of {run.pretrained.path})"
        )
    else:
        progress.message(
            f"fine-tuning {run.arch.name} from {run.pretrained.path} with a new {run.num_classes}-way classifier"
        )
    return Start(state, 0, None, ledger)


def _summary(run: FinetuneRun, ledger: Ledger) -> dict[str, Any]:
    """Fine-tuning's keys of ``summary.json``: the transfer recipe, and the pre-training run it builds on."""
    config = run.config
    return {
        # ``epochs`` counts augmented samples per training example (what the compute scales with); passes over the
        # data are fewer by the repeated-augmentation multiplicity.
        "passes": run.duration.epochs / config.repeat_aug,
        "sam": {"rho": config.sam_rho, "fraction": config.sam_fraction},
        "ema_decay": config.ema_decay,
        "repeat_aug": config.repeat_aug,
        "init": "scratch" if config.scratch else "pretrained",
        "pretrain": run.pretrained.describe(scratch=config.scratch),
    }


__all__ = ["FinetuneConfig", "finetune"]
