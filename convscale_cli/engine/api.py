"""``pretrain(config)``: the library entry point behind ``convscale pretrain``.

It resolves the config and drives the run engine (:mod:`convscale_cli.engine.trainer`), which claims the run
directory (resuming a run with the same config, refusing a different one), builds the model, optimiser, mesh and
compiled steps, restores the newest readable checkpoint, runs the loop, and writes ``summary.json``. What is
pre-training's own: a run starts fresh, from a trunk's checkpoint (``branch_from``) or from another run's parameters
(``initial_checkpoint``), and may stop at a compute budget or pause at ``stop_step``. Usable from a notebook: pass a
registry to train models registered in code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from convscale_cli.engine.branch import branch_start
from convscale_cli.engine.build import Built
from convscale_cli.engine.config import PretrainConfig
from convscale_cli.engine.header import header
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.resolve import ResolvedRun, resolve, resolved_dict
from convscale_cli.engine.trainer import RunKind, Start, open_run, primary_process, train_run
from convscale_cli.errors import UsageError
from convscale_cli.registry import Registry


def pretrain(config: PretrainConfig, registry: Registry | None = None, *, pipeline: Any = None) -> dict[str, Any]:
    """Pre-train (or resume pre-training) one model and return its ``summary.json`` contents.

    Args:
        config: the run config.
        registry: where models and datasets are looked up (default: the installed plugins).
        pipeline: the input pipeline module (default :mod:`convscale_cli.data`): ``train_loader``, ``eval_loader``,
            ``normalize`` and ``to_global`` as documented there.

    Raises:
        UsageError: bad config, unknown names, a run directory holding another run, an indivisible batch.
        TrainingError: a non-finite loss (exit code 3).
        RunInterrupted: SIGTERM/SIGINT, after saving a checkpoint (exit code 130).
        CheckpointError: a checkpoint save failed (the previous checkpoint is intact).
    """
    config, precision_why, rundir, registry, pipeline = open_run(config, "pretrain", registry, pipeline)
    run = resolve(config, registry)
    initial = functools.partial(_initial_params, config, run, registry) if config.initial_checkpoint else None
    options: dict[str, Any] = {"label_smoothing": run.recipe.label_smoothing}
    if config.grad_accum_steps > 1:
        options["accum_steps"] = config.grad_accum_steps
    if config.ema_decay > 0:
        options["ema_decay"] = config.ema_decay
    kind = RunKind(
        name="pretrain",
        start=functools.partial(_start, config, run, initial),
        step_options=options,
        summary=_summary,
        done=functools.partial(_done, config),
        header=header(run, precision_why, jax.device_count(), jax.default_backend()),
        augment=pipeline.augment_from_dict(run.augment) if run.augment else None,
        holdout=config.holdout,
        accum_steps=config.grad_accum_steps,
        stop_step=config.stop_step,
        keep_steps=config.keep_steps,
    )
    return train_run(run, kind, rundir=rundir, resolved=resolved_dict(run), registry=registry, pipeline=pipeline)


def _done(config: PretrainConfig, previous: dict[str, Any]) -> bool:
    """Whether a rerun has nothing to do: the run finished, or paused at or past ``stop_step``."""
    status = previous.get("status")
    return status == "finished" or (status == "paused" and _paused_past(previous, config.stop_step))


def _paused_past(previous: dict[str, Any], stop_step: int | None) -> bool:
    """Whether a paused run has already reached ``stop_step`` (None: the end, which a paused run has not)."""
    steps = previous.get("steps")
    return stop_step is not None and isinstance(steps, int) and steps >= stop_step


def _initial_params(config: PretrainConfig, run: ResolvedRun, registry: Registry) -> Any:
    """The parameters of ``config.initial_checkpoint``, checked against this run's model and classifier.

    Raises:
        UsageError: the checkpoint holds another architecture or classifier size.
        CheckpointError: it is not a checkpoint, or a tensor does not fit (named).
    """
    from convscale_cli.loading import load

    path = config.initial_checkpoint
    loaded = load(str(path), ema=False, precision="fp32", registry=registry, what="initial_checkpoint")
    if loaded.spec.name != run.arch.name or loaded.num_classes != run.num_classes:
        raise UsageError(
            f"initial_checkpoint {path!r} holds a {loaded.spec.name} with {loaded.num_classes} classes; this run "
            f"trains a {run.arch.name} with {run.num_classes}"
        )
    return loaded.params


def _start(
    config: PretrainConfig,
    run: ResolvedRun,
    initial: Callable[[], Any] | None,
    built: Built,
    ledger: Ledger,
    progress: Progress,
) -> Start:
    """A run without a checkpoint of its own starts from the trunk's branch point (``branch_from``), else from
    ``initial()``'s parameters when given (``initial_checkpoint``), else fresh."""
    if config.branch_from is not None and config.branch_step is not None:
        state, data_state, ledger = branch_start(config, run, built, ledger)
        progress.message(f"branching {config.out} from {config.branch_from} at step {config.branch_step}")
        return Start(state, config.branch_step, data_state, ledger)
    if initial is not None:
        params = initial()
        want = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), built.abstract.params)
        got = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), params)
        if want != got:
            raise UsageError(
                f"initial_checkpoint {config.initial_checkpoint!r} does not fit this run's model (other build "
                "options or resolution-dependent shapes); train from it with matching `model_options`"
            )
        with ledger.timed("compile"):
            state = jax.block_until_ready(built.with_params(params))
        progress.message(f"initialised from {config.initial_checkpoint} (parameters only: a fresh optimizer)")
        return Start(state, 0, None, ledger)
    with ledger.timed("compile"):
        state = jax.block_until_ready(built.fresh_state())
    return Start(state, 0, None, ledger)


def _summary(run: ResolvedRun, ledger: Ledger) -> dict[str, Any]:
    """Pre-training's keys of ``summary.json``: where a trunk paused."""
    config = run.config
    return {"stop_step": config.stop_step} if config.stop_step is not None else {}


__all__ = ["PretrainConfig", "pretrain", "primary_process"]
