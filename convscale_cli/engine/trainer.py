"""The one run engine that pre-training and fine-tuning both drive (big_vision's single ``train.py``).

:func:`open_run` starts the processes and claims the run directory; :func:`train_run` builds the mesh, model,
optimiser and state layout, restores the newest readable checkpoint (or starts the run), trains with
:mod:`~convscale_cli.engine.loop`, evaluates the raw parameters and the EMA, and writes ``summary.json``. A kind of
run is a :class:`RunKind`: how a run without a checkpoint of its own starts (fresh, from a trunk, from a pre-trained
backbone with a new head), the training step's static extras (SAM, on-device mixing), and the summary's extra keys.
Everything else (evaluation, checkpoints, ledger, the CPU random-number choice, the final save) is this module's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from convscale_cli import interrupts
from convscale_cli.engine import loop
from convscale_cli.engine.build import Built, Evaluate, build, compile_steps, host_batch
from convscale_cli.engine.cache import enable_compilation_cache
from convscale_cli.engine.checkpoint import Checkpoints, CheckpointWarning
from convscale_cli.engine.hardware import device_peak
from convscale_cli.engine.ledger import Ledger, lost_seconds, reset_host_peak_memory, xla_flops
from convscale_cli.engine.mesh import init_distributed
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.resolve import RunSettings, RunSpec, with_precision
from convscale_cli.engine.rundir import MetricsLog, RunDir
from convscale_cli.engine.sources import eval_batch_size, open_sources
from convscale_cli.engine.state import param_count
from convscale_cli.engine.summary import versions
from convscale_cli.engine.tracking import choose_trackers, open_trackers
from convscale_cli.errors import RunInterrupted, TrainingError
from convscale_cli.registry import Registry, head_params

BARRIER_TIMEOUT_S = 600  # how long processes wait for each other at a named sync point (first compiles included)
_barriers = itertools.count()  # barrier keys must be unique; every process passes the same sync points in order


class Start(NamedTuple):
    """Where a run without a checkpoint of its own begins: its state, step, data-iterator state and ledger."""

    state: Any
    step: int
    data_state: dict[str, Any] | None
    ledger: Ledger


@dataclasses.dataclass(frozen=True)
class RunKind:
    """What one kind of run adds to the engine.

    Attributes:
        name: ``pretrain`` or ``finetune``: the summary's ``kind`` and the marker of ``config.json``.
        start: ``start(built, ledger, progress) -> Start`` for a run that has no checkpoint of its own.
        step_options: static options of :func:`~convscale_cli.engine.step.train_step` besides the model, optimiser,
            loss and normalisation (label smoothing, EMA decay, SAM, mixing, gradient accumulation); hashable.
        summary: ``summary(run, ledger) -> dict``: the summary's keys of this kind, added to the common ones.
        done: ``done(previous) -> bool``: a rerun finds this ``summary.json`` and has nothing to do (a run that
            stopped at the same compute budget has nothing to do whatever its kind).
        header: printed before anything compiles.
        augment: the training loader's augmentation (None: the pipeline's default).
        holdout: fraction of the train split held out when the dataset has no ``eval`` split.
        accum_steps: gradient-accumulation micro-batches per step.
        stop_step: pause after this step (a trunk of a branching sweep); None: the end.
        keep_steps: steps whose checkpoints are kept beyond ``keep``.
    """

    name: str
    start: Callable[[Built, Ledger, Progress], Start]
    step_options: Mapping[str, Any]
    summary: Callable[[Any, Ledger], dict[str, Any]]
    done: Callable[[dict[str, Any]], bool]
    header: str
    augment: Any = None
    holdout: float = 0.0
    accum_steps: int = 1
    stop_step: int | None = None
    keep_steps: tuple[int, ...] = ()


def open_run(
    config: Any, kind: str, registry: Registry | None, pipeline: Any
) -> tuple[Any, str, RunDir, Registry, Any]:
    """Join the other processes, find the registry and pipeline, and open the run directory.

    Returns:
        ``(config, precision_why, rundir, registry, pipeline)``: the config with its precision filled in (a resumed
        run keeps its own) and why, in words for the header.
    """
    init_distributed(config.coordinator_address, config.num_processes, config.process_id)
    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    if pipeline is None:
        import convscale_cli.data as pipeline
    rundir = RunDir(config.out, primary=primary_process(), kind=kind)
    config, precision_why = with_precision(config, jax.default_backend(), rundir.saved_config())
    return config, precision_why, rundir, registry, pipeline


def primary_process() -> bool:
    """Whether this process writes the run's files and trackers (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait for every process at the sync point ``name`` (nothing with one process)."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp
        from jax.experimental import multihost_utils

        # The coordination service's barrier first: it waits as long as a slow process needs, whereas the gloo set-up
        # of the first cross-process collective gives up after 30 s (seen once in CI, 2 processes on 2 cores).
        barrier = ocp.multihost.get_barrier_sync_fn()
        barrier(key=f"convscale/{name}/{next(_barriers)}", timeout_ms=BARRIER_TIMEOUT_S * 1000)
        multihost_utils.sync_global_devices(name)


def train_run(
    run: RunSpec,
    kind: RunKind,
    *,
    rundir: RunDir,
    resolved: dict[str, Any],
    registry: Registry,
    pipeline: Any,
) -> dict[str, Any]:
    """Claim ``rundir`` for ``run`` and train it to its end (or its budget, pause or a signal).

    Returns:
        The ``summary.json`` contents; those of the earlier run when ``kind.done`` says it has nothing to do.

    Raises:
        UsageError: a run directory holding another run, an indivisible batch.
        TrainingError: a non-finite loss (exit code 3).
        RunInterrupted: SIGTERM/SIGINT, after saving a checkpoint (exit code 130).
        CheckpointError: a checkpoint save failed (the previous checkpoint is intact).
    """
    config = run.config
    trackers = choose_trackers(registry, config.trackers, tensorboard=config.tensorboard)  # before compiling
    resuming = rundir.prepare(resolved, force=config.force)
    progress = Progress(run.duration.steps, mode=config.progress if primary_process() else "none")
    previous = rundir.summary() if resuming else None
    if previous and (kind.done(previous) or spent_this_budget(previous, config.budget)):
        progress.message(
            f"{config.out}: run already {previous['status']} at step {previous.get('steps')}; nothing to do"
        )
        return previous
    sync("prepared")
    rundir.remove_summary()
    reset_host_peak_memory()  # the summary's host_peak_memory_bytes is this run's, not the sweep's before it
    progress.message(kind.header)

    enable_compilation_cache()  # a rerun, or another run of the same model, loads its compiled steps from disk
    built = build(run, accum_steps=kind.accum_steps)
    hardware, peak = device_peak(config.hardware, config.peak_flops)
    ledger = Ledger(
        flops_per_example=run.flops_per_example, num_devices=built.mesh.size, hardware=hardware, peak_flops=peak
    )
    checkpoints = Checkpoints(rundir.checkpoints, keep=config.keep, keep_steps=kind.keep_steps)
    session = _Session(run, kind, rundir, resolved, progress, pipeline, built, checkpoints, trackers)
    # XLA:CPU compiles the partitionable threefry (jax's default) very slowly: ~6 s per random op on 2 cores, over a
    # minute for an NFNet's initialiser. The classic threefry gives the same values under any sharding, so CPU runs
    # use it; accelerators keep the default.
    rng_mode = jax.threefry_partitionable(False) if jax.default_backend() == "cpu" else contextlib.nullcontext()
    try:
        with rng_mode:
            try:
                return session.train(ledger)
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
                return session.train(ledger)
    except TrainingError as exc:
        rundir.record_failure(str(exc))
        raise
    finally:
        with interrupts.deferred():  # pending saves complete even when a signal arrives now
            checkpoints.close()


@dataclasses.dataclass
class _Session:
    """One invocation's training of a run: what :func:`train_run` has built, and the steps after it."""

    run: RunSpec
    kind: RunKind
    rundir: RunDir
    resolved: dict[str, Any]
    progress: Progress
    pipeline: Any
    built: Built
    checkpoints: Checkpoints
    trackers: list[Any]

    def restore_or_start(self, ledger: Ledger) -> tuple[Start, bool]:
        """The newest readable checkpoint of this run, else the kind's start; and whether it was a checkpoint."""
        restored = self.checkpoints.restore(self.built.abstract)
        if restored is None:
            self.rundir.truncate_metrics(0)
            return self.kind.start(self.built, ledger, self.progress), False
        step, state, data_state, saved = restored
        lost = lost_seconds(self.rundir.live_ledger(), saved)
        # Counters continue; the device count, hardware and peak are this invocation's (it may run elsewhere).
        resumed = Ledger.from_dict(
            {**saved, "num_devices": ledger.num_devices, "hardware": ledger.hardware, "peak_flops": ledger.peak_flops}
        )
        resumed.device_seconds["lost"] += lost
        self.rundir.truncate_metrics(step)
        self.progress.message(f"resuming {self.run.config.out} from step {step} ({lost:.1f} device-seconds lost)")
        return Start(state, step, data_state, resumed), True

    def train(self, ledger: Ledger) -> dict[str, Any]:
        run, built, config, pipeline = self.run, self.built, self.run.config, self.pipeline
        (state, start_step, data_state, ledger), resumed = self.restore_or_start(ledger)
        train_source, eval_source = open_sources(
            run.data, config.data_options, holdout=self.kind.holdout, eval_examples=config.eval_examples
        )
        eval_batch = eval_batch_size(run.batch_size, len(eval_source), built.mesh.size, jax.process_count())
        with ledger.timed("compile"):  # once per process for each distinct program (engine/cache.py)
            train_fn, eval_fn = compile_steps(built, run, pipeline, eval_batch, options=self.kind.step_options)
        ledger.xla_flops_per_step = xla_flops(train_fn) * built.mesh.size  # cost analysis is per device

        def to_device(batch: dict[str, Any]) -> Any:
            return pipeline.to_global(host_batch(batch, run.info.multi_label, run.num_classes), built.data_sharding)

        evaluate = Evaluate(
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
            augment=self.kind.augment,
        )
        if data_state:
            loader.set_state(data_state)
        trackers = open_trackers(self.trackers, self.rundir.path, self.resolved) if primary_process() else []
        log = MetricsLog(self.rundir, trackers=trackers)
        ctx = loop.LoopContext(
            restored_step=start_step if resumed else None,
            run=run,
            rundir=self.rundir,
            log=log,
            checkpoints=self.checkpoints,
            ledger=ledger,
            train_fn=train_fn,
            evaluate=evaluate,
            to_device=to_device,
            progress=self.progress,
            stop_step=self.kind.stop_step,
            keep_steps=frozenset(self.kind.keep_steps),
        )
        try:
            with self.progress:
                state, status, step = loop.train(ctx, state, loader, start_step)
                final, final_ema = self.finish(ctx, state, loader, status, start_step, step)
        finally:
            evaluate.close()
            log.close()
        summary = build_summary(run, self.resolved, self.kind, status, step, final, final_ema, ledger, state)
        self.rundir.write_summary(summary)
        sync("summary")
        if final is None:
            self.progress.message(
                f"paused at step {step} of {run.duration.steps}: rerun with a later stop_step to continue"
            )
        else:
            ema = f" (EMA {final_ema['eval_top1']:.4f})" if final_ema is not None else ""
            self.progress.message(
                f"{status}: step {step}, eval loss {final['eval_loss']:.4f}, top-1 {final['eval_top1']:.4f}{ema}, "
                f"{ledger.core_hours:.3g} TPU-v4 core-hours"
            )
        return summary

    def finish(
        self, ctx: loop.LoopContext, state: Any, loader: Any, status: str, start_step: int, step: int
    ) -> tuple[dict[str, float] | None, dict[str, float] | None]:
        """Save the last step, then evaluate the raw parameters and the EMA: ``(final, final_ema)``, both None for a
        paused trunk (its branches are evaluated at their own ends).

        Raises:
            RunInterrupted: a stop signal, once the checkpoint is on disk.
            TrainingError: the final held-out loss is not finite.
        """
        ledger = ctx.ledger
        with interrupts.deferred():  # a signal now is honoured once the final checkpoint is on disk
            if ctx.saved_step != step and step != start_step:
                loop.save(ctx, state, loader, step)
            self.checkpoints.wait()
        if interrupts.received():
            status = "interrupted"
        if status == "interrupted":
            self.rundir.write_live_ledger(ledger.to_dict())
            raise RunInterrupted(
                f"interrupted at step {step}; checkpoint saved in {self.run.config.out}, rerun the same command to "
                "resume"
            )
        final = final_ema = None
        if status != "paused":
            final = loop.evaluate_and_log(ctx, state.params, step)
            if state.ema is not None:
                final_ema = ctx.evaluate(state.ema)
                ctx.log.write({"step": step, "split": "eval_ema", **final_ema, "time": time.time()})
                self.progress.message(
                    f"EMA eval @ step {step}: loss {final_ema['eval_loss']:.4f}  top-1 {final_ema['eval_top1']:.4f}"
                )
        self.rundir.write_live_ledger(ledger.to_dict())
        if final is not None:
            loop.check_final(ctx, final, step)
        return final, final_ema


def spent_this_budget(previous: dict[str, Any], budget: str | None) -> bool:
    """Whether the run whose ``summary.json`` is ``previous`` stopped at ``budget`` (a rerun has nothing to do; a
    rerun with a larger budget continues it)."""
    return previous.get("status") == "budget" and previous.get("budget") == budget


def build_summary(
    run: RunSpec,
    resolved: dict[str, Any],
    kind: RunKind,
    status: str,
    step: int,
    final: dict[str, float] | None,
    final_ema: dict[str, float] | None,
    ledger: Ledger,
    state: Any,
) -> dict[str, Any]:
    """``summary.json``: the keys every run has, then the kind's own (:attr:`RunKind.summary`)."""
    config = run.config
    train_size = max(int(run.info.split_sizes.get("train", 0)), 1)
    total_params = param_count(state.params)
    out: dict[str, Any] = {
        "kind": kind.name,
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
        "final": final,
        "budget": config.budget,
        **({"budget_spent": ledger.spent(run.budget)} if run.budget is not None else {}),
        **kind.summary(run, ledger),
        "ledger": ledger.summary(),
        "config": resolved,
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if final_ema is not None:  # a run that keeps an EMA
        out["final_ema"] = final_ema
    return out


__all__ = [
    "RunKind",
    "RunSettings",
    "Start",
    "build_summary",
    "open_run",
    "primary_process",
    "spent_this_budget",
    "sync",
    "train_run",
]
