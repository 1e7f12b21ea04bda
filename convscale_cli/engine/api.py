"""``pretrain(config)``: the library entry point behind ``convscale pretrain``.

It resolves the config, claims the run directory (resuming a run with the same config, refusing a different one),
builds the model, optimiser, mesh and compiled steps, restores the newest readable checkpoint, runs the loop, and
writes ``summary.json``. Usable from a notebook: pass a registry to train models registered in code.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from convscale_cli import interrupts
from convscale_cli.engine import loop
from convscale_cli.engine.branch import branch_start
from convscale_cli.engine.build import Built, build, compile_steps, host_batch, make_evaluate
from convscale_cli.engine.cache import enable_compilation_cache
from convscale_cli.engine.checkpoint import Checkpoints, CheckpointWarning
from convscale_cli.engine.config import PretrainConfig
from convscale_cli.engine.hardware import device_peak
from convscale_cli.engine.ledger import Ledger, lost_seconds, reset_host_peak_memory, xla_flops
from convscale_cli.engine.mesh import init_distributed
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.resolve import (
    ResolvedRun,
    header,
    resolve,
    resolved_dict,
    with_precision,
)
from convscale_cli.engine.rundir import MetricsLog, RunDir
from convscale_cli.engine.sources import eval_batch_size, open_sources
from convscale_cli.engine.summary import versions
from convscale_cli.engine.tracking import choose_trackers, open_trackers
from convscale_cli.errors import RunInterrupted, UsageError
from convscale_cli.registry import Registry, TrackerSpec, head_params

BARRIER_TIMEOUT_S = 600  # how long processes wait for each other at a named sync point (first compiles included)
_barriers = itertools.count()  # barrier keys must be unique; every process passes the same sync points in order


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
    init_distributed(config.coordinator_address, config.num_processes, config.process_id)
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    if pipeline is None:
        import convscale_cli.data as pipeline
    primary = jax.process_index() == 0
    rundir = RunDir(config.out, primary=primary)
    config, precision_why = with_precision(config, jax.default_backend(), rundir.saved_config())
    run = resolve(config, registry)
    trackers = choose_trackers(registry, config.trackers, tensorboard=config.tensorboard)  # before compiling
    resolved = resolved_dict(run)
    resuming = rundir.prepare(resolved, force=config.force)
    progress = Progress(run.duration.steps, mode=config.progress if primary else "none")
    previous = rundir.summary() if resuming else None
    if previous and (
        previous.get("status") == "finished"
        or (previous.get("status") == "budget" and previous.get("budget") == config.budget)
        or (previous.get("status") == "paused" and _paused_past(previous, config.stop_step))
    ):
        progress.message(
            f"{config.out}: run already {previous['status']} at step {previous.get('steps')}; nothing to do"
        )
        return previous
    _sync("prepared")
    rundir.remove_summary()
    reset_host_peak_memory()  # the summary's host_peak_memory_bytes is this run's, not the sweep's before it
    initial = functools.partial(_initial_params, config, run, registry) if config.initial_checkpoint else None
    progress.message(header(run, precision_why, jax.device_count(), jax.default_backend()))

    enable_compilation_cache()
    built = build(config, run)
    hardware, peak = device_peak(config.hardware, config.peak_flops)
    ledger = Ledger(
        flops_per_example=run.flops_per_example, num_devices=built.mesh.size, hardware=hardware, peak_flops=peak
    )
    checkpoints = Checkpoints(rundir.checkpoints, keep=config.keep, keep_steps=config.keep_steps)
    # XLA:CPU compiles the partitionable threefry (jax's default) very slowly: ~6 s per random op on 2 cores, over a
    # minute for an NFNet's initialiser. The classic threefry gives the same values under any sharding, so CPU runs
    # use it; accelerators keep the default.
    rng_mode = jax.threefry_partitionable(False) if jax.default_backend() == "cpu" else contextlib.nullcontext()
    try:
        with rng_mode:
            try:
                return _train(
                    config, run, rundir, resolved, progress, pipeline, built, ledger, checkpoints, trackers, initial
                )
            except loop.RestoredCheckpointDiverged as exc:
                # Corruption the checksums cannot see (a step saved before them, or damaged before it was sealed)
                # shows as a loss that is non-finite at once; a run that diverges later keeps its checkpoints.
                warnings.warn(
                    f"checkpoint of step {exc.step} in {checkpoints.directory} gives a non-finite loss at its first "
                    "step; setting it aside and trying the previous one",
                    CheckpointWarning,
                    stacklevel=2,
                )
                checkpoints.set_aside([exc.step])
                return _train(
                    config, run, rundir, resolved, progress, pipeline, built, ledger, checkpoints, trackers, initial
                )
    finally:
        with interrupts.deferred():  # pending saves complete even when a signal arrives now
            checkpoints.close()


def primary_process() -> bool:
    """Whether this process writes the run's files and trackers (process 0)."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp
        from jax.experimental import multihost_utils

        # The coordination service's barrier first: it waits as long as a slow process needs, whereas the gloo set-up
        # of the first cross-process collective gives up after 30 s (seen once in CI, 2 processes on 2 cores).
        barrier = ocp.multihost.get_barrier_sync_fn()
        barrier(key=f"convscale/{name}/{next(_barriers)}", timeout_ms=BARRIER_TIMEOUT_S * 1000)
        multihost_utils.sync_global_devices(name)


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


def _restore_or_init(
    config: PretrainConfig,
    run: ResolvedRun,
    rundir: RunDir,
    progress: Progress,
    built: Built,
    ledger: Ledger,
    checkpoints: Checkpoints,
    initial: Callable[[], Any] | None = None,
) -> tuple[Any, int, dict[str, Any] | None, Ledger, bool]:
    """``(state, start_step, data_state, ledger, resumed)`` from the newest readable checkpoint, else from the trunk's
    branch point (``branch_from``), else a fresh state (from ``initial()``'s parameters when given); ``resumed`` says
    the state is this run's own checkpoint."""
    restored = checkpoints.restore(built.abstract)
    if restored is None:
        rundir.truncate_metrics(0)
        if config.branch_from is not None and config.branch_step is not None:
            state, data_state, ledger = branch_start(config, run, built, ledger)
            progress.message(f"branching {config.out} from {config.branch_from} at step {config.branch_step}")
            return state, config.branch_step, data_state, ledger, False
        if initial is not None:
            params = initial()
            want = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), built.abstract.params)
            got = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), str(np.asarray(a).dtype)), params)
            if want != got:
                raise UsageError(
                    f"initial_checkpoint {config.initial_checkpoint!r} does not fit this run's model (other build "
                    "options or resolution-dependent shapes); train from it with matching --set model_options"
                )
            with ledger.timed("compile"):
                state = jax.block_until_ready(jax.device_put(built.from_params(params), built.shardings))
            progress.message(f"initialised from {config.initial_checkpoint} (parameters only: a fresh optimizer)")
            return state, 0, None, ledger, False
        with ledger.timed("compile"):
            state = jax.block_until_ready(built.fresh_state())
        return state, 0, None, ledger, False
    step, state, data_state, saved = restored
    lost = lost_seconds(rundir.live_ledger(), saved)
    # Counters continue; the device count, hardware and peak are this invocation's (it may run elsewhere).
    resumed = Ledger.from_dict(
        {**saved, "num_devices": ledger.num_devices, "hardware": ledger.hardware, "peak_flops": ledger.peak_flops}
    )
    resumed.device_seconds["lost"] += lost
    rundir.truncate_metrics(step)
    progress.message(f"resuming {config.out} from step {step} ({lost:.1f} device-seconds lost)")
    return state, step, data_state, resumed, True


def _train(
    config: PretrainConfig,
    run: ResolvedRun,
    rundir: RunDir,
    resolved: dict[str, Any],
    progress: Progress,
    pipeline: Any,
    built: Built,
    ledger: Ledger,
    checkpoints: Checkpoints,
    trackers: list[TrackerSpec],
    initial: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    state, start_step, data_state, ledger, resumed = _restore_or_init(
        config, run, rundir, progress, built, ledger, checkpoints, initial
    )
    train_source, eval_source = open_sources(
        run.data, config.data_options, holdout=config.holdout, eval_examples=config.eval_examples
    )
    eval_batch = eval_batch_size(run.batch_size, len(eval_source), built.mesh.size, jax.process_count())
    with ledger.timed("compile"):
        train_fn, eval_fn = compile_steps(built, run, pipeline, eval_batch)
    ledger.xla_flops_per_step = xla_flops(train_fn) * built.mesh.size  # cost analysis is per device

    def to_device(batch: dict[str, Any]) -> Any:
        return pipeline.to_global(host_batch(batch, run.info.multi_label, run.num_classes), built.data_sharding)

    evaluate = make_evaluate(
        eval_fn,
        eval_source,
        pipeline=pipeline,
        batch_size=eval_batch,
        resolution=run.eval_resolution,
        crop_fraction=run.eval_crop,
        worker_count=config.worker_count,
        to_device=to_device,
        ledger=ledger,
    )
    loader = pipeline.train_loader(
        train_source,
        global_batch_size=run.batch_size,
        resolution=run.resolution,
        seed=config.seed,
        num_examples=run.duration.examples,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.worker_count,
        augment=pipeline.augment_from_dict(run.augment) if run.augment else None,
    )
    if data_state:
        loader.set_state(data_state)
    log = MetricsLog(rundir, trackers=open_trackers(trackers, rundir.path, resolved) if primary_process() else [])
    ctx = loop.LoopContext(
        restored_step=start_step if resumed else None,
        run=run,
        rundir=rundir,
        log=log,
        checkpoints=checkpoints,
        ledger=ledger,
        train_fn=train_fn,
        evaluate=evaluate,
        to_device=to_device,
        progress=progress,
    )
    try:
        with progress:
            state, status, step = loop.train(ctx, state, loader, start_step)
            with interrupts.deferred():  # a signal now is honoured once the final checkpoint is on disk
                if ctx.saved_step != step and step != start_step:
                    loop.save(ctx, state, loader, step)
                checkpoints.wait()
            if interrupts.received():
                status = "interrupted"
            if status == "interrupted":
                rundir.write_live_ledger(ledger.to_dict())
                raise RunInterrupted(
                    f"interrupted at step {step}; checkpoint saved in {config.out}, rerun the same command to resume"
                )
            # A paused trunk is not a result: its branches are evaluated at their own ends.
            final = None if status == "paused" else loop.evaluate_and_log(ctx, state.params, step)
            final_ema = None
            if final is not None and state.ema is not None:
                final_ema = evaluate(state.ema)
                log.write({"step": step, "split": "eval_ema", **final_ema, "time": time.time()})
                progress.message(
                    f"EMA eval @ step {step}: loss {final_ema['eval_loss']:.4f}  top-1 {final_ema['eval_top1']:.4f}"
                )
            rundir.write_live_ledger(ledger.to_dict())
            if final is not None:
                loop.check_final(ctx, final, step)
    finally:
        log.close()
    summary = _summary(run, resolved, status, step, final, ledger, state.params)
    if final_ema is not None:
        summary["final_ema"] = final_ema
    rundir.write_summary(summary)
    _sync("summary")
    if final is None:
        progress.message(f"paused at step {step} of {run.duration.steps}: rerun with a later stop_step to continue")
    else:
        progress.message(
            f"{status}: step {step}, eval loss {final['eval_loss']:.4f}, top-1 {final['eval_top1']:.4f}, "
            f"{ledger.core_hours:.3g} TPU-v4 core-hours"
        )
    return summary


def _summary(
    run: ResolvedRun,
    resolved: dict[str, Any],
    status: str,
    step: int,
    final: dict[str, float] | None,
    ledger: Ledger,
    params: Any,
) -> dict[str, Any]:
    config = run.config
    train_size = max(int(run.info.split_sizes.get("train", 0)), 1)
    total_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    out = {
        "kind": "pretrain",
        "status": status,
        "run": str(config.out),
        "model": run.arch.name,
        "family": run.arch.family,
        "dataset": run.data.name,
        "epochs": run.duration.epochs,
        "epochs_seen": ledger.examples / train_size,
        "lr": run.recipe.lr,
        "peak_lr": run.peak_lr,
        "batch_size": run.batch_size,
        "seed": config.seed,
        "params": total_params,
        # Without the classifier head: the model-size axis of the scaling-law fits (convscale_cli.report.runs).
        "params_body": max(1, total_params - head_params(run.arch.count, run.resolution, run.num_classes)),
        "macs_per_image": run.macs_per_image,
        "train_resolution": run.resolution,
        "eval_resolution": run.eval_resolution,
        "num_classes": run.num_classes,
        "examples_seen": ledger.examples,
        "steps": step,
        "total_steps": run.duration.steps,
        "budget": config.budget,
        "final": final,
        "ledger": ledger.summary(),
        "config": resolved,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if run.budget is not None:
        out["budget_spent"] = ledger.spent(run.budget)
    if config.stop_step is not None:
        out["stop_step"] = config.stop_step
    return out


__all__ = ["PretrainConfig", "pretrain"]
