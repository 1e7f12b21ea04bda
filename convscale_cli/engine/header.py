"""The header every run prints before anything compiles: what runs, for how long, at what rate, on what.

The first compilation takes minutes on a CPU, so the header is the first thing a user sees; dry runs print it too,
without devices (they never start jax). jax-free.
"""

from __future__ import annotations

from convscale_cli.engine.resolve import ResolvedRun, RunSpec


def header(run: ResolvedRun, precision_why: str, devices: int | None, backend: str | None) -> str:
    """What is about to run, printed before anything compiles (the first compile takes minutes on CPU).

    ``devices`` None (a dry run, which never starts jax) leaves the devices out.
    """
    config = run.config
    train_size = int(run.info.split_sizes.get("train", 0))
    notes = ""
    if config.grad_accum_steps > 1:
        notes = f"; {config.grad_accum_steps} micro-batches of {run.batch_size // config.grad_accum_steps} per step"
    title = f"pretrain {run.arch.name} on {run.data.name} ({train_size} training examples) -> {config.out}"
    return run_header(run, title, notes, precision_why, devices, backend)


def run_header(
    run: RunSpec, title: str, notes: str, precision_why: str, devices: int | None, backend: str | None
) -> str:
    """The header of any run: ``title``, then its duration (with ``notes``), learning rate, resolution, precision
    and devices (``devices`` None leaves them out)."""
    config, duration, recipe = run.config, run.duration, run.recipe
    if config.budget:
        notes = f"; stops at budget {config.budget}{notes}"
    chosen = config.precision or "auto"
    precision = chosen if precision_why == "given" else f"{chosen} ({precision_why})"
    return "\n".join(
        (
            title,
            f"  {duration.steps} {'step' if duration.steps == 1 else 'steps'} = {duration.epochs:.4g} epochs of batch "
            f"{run.batch_size}{notes}",
            f"  peak lr {run.peak_lr:.4g} (alpha {recipe.lr:g} x {run.batch_size}/{recipe.base_batch_size}, "
            f"{recipe.optimizer} {recipe.schedule}), {run.resolution} px",
            f"  precision {precision}"
            + ("" if devices is None else f"; {devices} {backend} {'device' if devices == 1 else 'devices'}"),
        )
    )


__all__ = ["header", "run_header"]
