"""The training loop: short, and made of small helpers (flax examples/imagenet).

The loop never blocks on the device between log points: per-step metrics stay on device until a *flush*, where
they are fetched together, checked for non-finite loss (naming the exact step), logged, and the elapsed wall time
is charged to the ledger. A flush always precedes a checkpoint, so a checkpoint never holds a diverged state; the
last step's update is seen by the final evaluation alone, which :func:`check_final` checks the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from convscale_cli import interrupts
from convscale_cli.engine.checkpoint import Checkpoints
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.progress import Progress
from convscale_cli.engine.resolve import RunSpec
from convscale_cli.engine.rundir import MetricsLog, RunDir
from convscale_cli.errors import TrainingError


@dataclasses.dataclass
class LoopContext:
    """What the loop needs besides the state and the data iterator.

    Attributes:
        run: the resolved run.
        rundir: the run directory.
        log: metrics.jsonl / TensorBoard writer.
        checkpoints: the Orbax checkpoints.
        ledger: the compute ledger (mutated in place).
        train_fn: the compiled training step ``(state, batch) -> (state, metrics)``.
        evaluate: ``evaluate(params) -> {"eval_loss", "eval_top1", "eval_top5"}`` (blocks, charges the ledger).
        to_device: per-process numpy batch -> global device batch.
        progress: the progress display.
        saved_step: the step of the newest checkpoint this process started saving (None before the first).
        restored_step: the step of the checkpoint the run resumed from (None for a fresh start).
        stop_step: pause after this step (a trunk of a branching sweep); None: train to the end.
        keep_steps: steps that are always saved (a trunk's branch points).
    """

    run: RunSpec
    rundir: RunDir
    log: MetricsLog
    checkpoints: Checkpoints
    ledger: Ledger
    train_fn: Callable[[Any, Any], tuple[Any, Any]]
    evaluate: Callable[[Any], dict[str, float]]
    to_device: Callable[[dict[str, np.ndarray]], Any]
    progress: Progress
    saved_step: int | None = None
    restored_step: int | None = None
    stop_step: int | None = None
    keep_steps: frozenset[int] = frozenset()


class RestoredCheckpointDiverged(TrainingError):
    """The first step after restoring a checkpoint gave a non-finite loss: the checkpoint itself is suspect."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(
            f"non-finite loss ({loss}) at step {step + 1}, the first step after restoring the checkpoint of step {step}"
        )


class StopSignals:
    """SIGTERM and SIGINT ask the loop to save and stop at the next step instead of killing it mid-step.

    A signal the process was started with ignored (``nohup``, a background job of a script) stays ignored.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        # A signal before the loop (while compiling) whose KeyboardInterrupt was swallowed.
        self.received = interrupts.received()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if interrupts.taken(sig):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def examples_in_step(step: int, batch_size: int, total_examples: int) -> int:
    """Real examples in (1-based) ``step``: a full batch except the padded last one. Known on the host, no sync."""
    return max(0, min(batch_size, total_examples - (step - 1) * batch_size))


def budget_spent(ctx: LoopContext) -> bool:
    """Whether the run's compute budget is used up (model FLOPs, counted in examples: see ``Ledger.spent``)."""
    budget = ctx.run.budget
    return budget is not None and ctx.ledger.train_flops >= budget.to_flops()


def _status_fields(ctx: LoopContext, loss: float) -> dict[str, Any]:
    ledger, budget = ctx.ledger, ctx.run.budget
    fields: dict[str, Any] = {
        "epoch": ledger.examples / max(ctx.run.info.split_sizes.get("train", 1), 1),
        "loss": loss,
        "img/s": ledger.img_per_sec_per_device * ledger.num_devices,
        "mfu": ledger.mfu,
        "core-h": ledger.core_hours,
    }
    if budget is not None:
        fields["budget"] = f"{budget.format(ledger.spent(budget))} / {budget}"
    return fields


def flush(ctx: LoopContext, pending: list[tuple[int, Any]], since: float) -> float:
    """Fetch the pending step metrics, check them, log them, charge the train time; return the new time origin.

    Raises:
        TrainingError: a non-finite loss, naming the first bad step and the last good checkpoint.
    """
    ctx.checkpoints.check()  # a failed background save stops the run at the next log point, not at the next save
    if not pending:
        return since
    values = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    ctx.ledger.charge("train", now - since)
    for (step, _), v in zip(pending, values, strict=True):
        if not math.isfinite(float(v["loss"])):
            ctx.checkpoints.wait()
            if ctx.restored_step is not None and step == ctx.restored_step + 1:
                raise RestoredCheckpointDiverged(ctx.restored_step, float(v["loss"]))
            good = ctx.checkpoints.latest_step()
            kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was saved"
            raise TrainingError(f"non-finite loss ({float(v['loss'])}) at step {step}; stopped, {kept}")
    step = pending[-1][0]
    loss = float(np.mean([float(v["loss"]) for v in values]))
    record = {
        "step": step,
        "split": "train",
        "loss": loss,
        "top1": float(np.mean([float(v["top1"]) for v in values])),
        "lr": float(values[-1]["lr"]),
        "grad_norm": float(values[-1]["grad_norm"]),
        "examples": ctx.ledger.examples,
        "epoch": ctx.ledger.examples / max(ctx.run.info.split_sizes.get("train", 1), 1),
        "img_per_sec_per_device": ctx.ledger.img_per_sec_per_device,
        "mfu": ctx.ledger.mfu,
        "train_flops": ctx.ledger.train_flops,
        "core_hours": ctx.ledger.core_hours,
        "device_seconds": ctx.ledger.total_device_seconds,
        "time": time.time(),
    }
    ctx.log.write(record)
    ctx.rundir.write_live_ledger(ctx.ledger.to_dict())
    ctx.progress.update(step, _status_fields(ctx, loss))
    return time.perf_counter()


def evaluate_and_log(ctx: LoopContext, params: Any, step: int) -> dict[str, float]:
    """Held-out evaluation at the eval resolution, logged as an ``eval`` record."""
    result = ctx.evaluate(params)
    ctx.log.write({"step": step, "split": "eval", **result, "core_hours": ctx.ledger.core_hours, "time": time.time()})
    ctx.progress.message(
        f"eval @ step {step}: loss {result['eval_loss']:.4f}  top-1 {result['eval_top1']:.4f}  "
        f"top-5 {result['eval_top5']:.4f}"
    )
    return result


def check_final(ctx: LoopContext, result: dict[str, float], step: int) -> None:
    """Stop a run whose final evaluation is not finite, setting aside the checkpoint of its last step.

    The loss of a step is computed before its update, so the flush after the last step cannot see an update that
    diverged: the final evaluation is the first to use those parameters. As a non-finite loss mid-run does, this
    stops the run without a summary, and the checkpoint holding them is moved out of the way, so a rerun neither
    calls it finished nor resumes from it (convscale_cli.engine.checkpoint.Checkpoints.set_aside).

    Raises:
        TrainingError: the held-out loss after ``step`` is NaN or infinite.
    """
    loss = float(result["eval_loss"])
    if math.isfinite(loss):
        return
    ctx.checkpoints.wait()
    if step in ctx.checkpoints.steps():
        ctx.checkpoints.set_aside([step])
    good = ctx.checkpoints.latest_step()
    kept = f"the last good checkpoint is step {good}" if good is not None else "no good checkpoint is left"
    raise TrainingError(f"non-finite held-out loss ({loss}) after the last step ({step}); stopped, {kept}")


def save(ctx: LoopContext, state: Any, loader: Any, step: int) -> None:
    """Start an asynchronous checkpoint of ``step`` holding the state, the data-iterator state and the ledger."""
    with ctx.ledger.timed("checkpoint"):
        ctx.checkpoints.save(step, state, loader.get_state(), ctx.ledger.to_dict())
    ctx.saved_step = step
    ctx.rundir.write_live_ledger(ctx.ledger.to_dict())


def agree(flags: tuple[bool, ...]) -> tuple[bool, ...]:
    """Flags true on *any* process, so every process takes the same branch (a save or a stop is collective)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
    return tuple(bool(x) for x in gathered.reshape(-1, len(flags)).any(axis=0))


def train(ctx: LoopContext, state: Any, loader: Any, start_step: int) -> tuple[Any, str, int]:
    """Train from ``start_step`` to the end of the run, a spent budget, or a stop signal.

    Decisions that depend on the clock or on signals (time-based checkpoints, SIGTERM) are
    taken at log points and agreed across processes, since saving and stopping are collective operations.

    A run with ``stop_step`` pauses there (a trunk of a branching sweep); ``keep_steps`` are always saved.

    Returns:
        ``(state, status, step)`` with status ``finished``, ``paused``, ``budget`` or ``interrupted`` (the caller
        saves the final checkpoint and writes the summary).
    """
    config, total = ctx.run.config, ctx.run.duration.steps
    end = min(total, ctx.stop_step or total)
    keep = ctx.keep_steps
    step = start_step
    status = "budget" if budget_spent(ctx) else "finished"  # the checkpoint's ledger: the same on every process
    pending: list[tuple[int, Any]] = []
    batches: Iterator[dict[str, np.ndarray]] = iter(loader)
    if step < end and status == "finished":
        # The first batch waits for the loader to start (worker processes, the first decode): not training time.
        with ctx.ledger.timed("loader_startup"):
            first = next(batches)
        batches = itertools.chain([first], batches)
    since, last_save = time.perf_counter(), time.monotonic()
    with StopSignals() as signals:
        while step < end and status == "finished":
            state, metrics = ctx.train_fn(state, ctx.to_device(next(batches)))
            step += 1
            ctx.ledger.add_steps(1, examples_in_step(step, ctx.run.batch_size, ctx.run.duration.examples))
            pending.append((step, metrics))
            # Budgets are counted in examples: the same on every process at every step.
            over_budget = budget_spent(ctx)
            timed_save = stop = False
            if jax.process_count() == 1 or step % config.log_every == 0 or step == end:
                minutes = config.checkpoint_minutes
                timed_save, stop = agree(
                    (bool(minutes and time.monotonic() - last_save >= 60.0 * minutes), signals.received is not None)
                )
            save_due = bool(config.checkpoint_every and step % config.checkpoint_every == 0) or timed_save
            save_due = save_due or step in keep
            eval_due = bool(config.eval_every and step % config.eval_every == 0 and step < total)
            if step % config.log_every == 0 or save_due or eval_due or stop or over_budget or step == end:
                since = flush(ctx, pending, since)
                pending = []
            if stop:
                ctx.progress.message(f"{signals.received or 'stop signal'} received: saving step {step} and stopping")
                status = "interrupted"
            elif over_budget:
                status = "budget"
            if eval_due and status == "finished":
                evaluate_and_log(ctx, state.params, step)
                since = time.perf_counter()
            if save_due and step < end and status == "finished":
                save(ctx, state, loader, step)
                last_save = time.monotonic()
                since = time.perf_counter()
    flush(ctx, pending, since)
    if status == "finished" and step < total:
        status = "paused"
    return state, status, step
