"""Starting a run from another run's checkpoint: a cooldown branch of a warm-up-stable-decay trunk.

Hägele et al. (2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", §3): with a
warm-up-stable-decay schedule every training length shares the constant phase, so one long run at constant learning
rate (the trunk) gives every shorter budget by a short cooldown from the trunk's state at that budget's cooldown
start. A branch here is an ordinary run whose first state is the trunk's checkpoint of ``branch_step`` rather than a
fresh initialisation; everything after it (the compiled step, the loop, checkpoints, the summary) is the engine's
usual path.

The branch equals the same run trained from scratch, bit for bit, when the two runs take the same steps up to the
branch point: the same model, data, seed, batch and recipe (checked against the trunk's ``config.json``), the same
peak and warm-up (checked against the trunk's optimiser state, which holds its schedule's numbers), and a branch
point in both runs' constant phase. The input stream is a pure function of the step (:mod:`convscale_cli.data`), so
only the data loader's step carries over; the run's own length sets where its last batch is padded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convscale_cli.config import diff
from convscale_cli.engine.build import Built
from convscale_cli.engine.checkpoint import Checkpoints
from convscale_cli.engine.config import MUTABLE_KEYS, PretrainConfig
from convscale_cli.engine.ledger import Ledger
from convscale_cli.engine.optim import WarmupStableDecay
from convscale_cli.engine.resolve import ResolvedRun, resolved_dict
from convscale_cli.engine.rundir import MARKER, is_run_config, read_json, with_defaults
from convscale_cli.errors import UsageError

# Config keys a branch may differ from its trunk in: where it writes, how long it runs, where it starts.
_BRANCH_KEYS = frozenset({"epochs", "examples", "steps", "derived", "branch_from", "branch_step", MARKER})


def check_trunk_config(trunk: Path, resolved: dict[str, Any]) -> None:
    """Refuse a trunk trained with other settings than the branch's (model, data, seed, batch, recipe, ...).

    Raises:
        UsageError: ``trunk`` is not a convscale run, or names the first settings that differ.
    """
    saved = read_json(trunk / "config.json")
    if not is_run_config(saved):
        raise UsageError(f"branch_from {str(trunk)!r} is not a convscale run directory (no run config.json)")
    assert saved is not None
    changed = [k for k in diff(with_defaults(saved), resolved) if k.split(".")[0] not in MUTABLE_KEYS | _BRANCH_KEYS]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UsageError(
            f"branch_from {str(trunk)!r} was trained with other settings ({shown} "
            f"{'differs' if len(changed) == 1 else 'differ'}): a branch continues its trunk's run and must match it"
        )


def continue_schedule(state: Any, schedule: Any, step: int, trunk: Path) -> Any:
    """The trunk's state with this run's schedule numbers in its optimiser state.

    Raises:
        UsageError: the trunk's schedule differs from this one before ``step`` (another peak or warm-up), or
            ``step`` lies in the trunk's cooldown.
    """
    hyperparams = getattr(state.opt_state, "hyperparams", None)
    if not isinstance(schedule, WarmupStableDecay) or not isinstance(hyperparams, dict):
        raise UsageError("a branch needs the wsd schedule, whose numbers the optimiser state holds")
    theirs = {k: np.asarray(v).item() for k, v in jax.device_get(hyperparams).items()}
    mine = schedule.hyperparams()
    if set(theirs) != set(mine):
        raise UsageError(f"branch_from {str(trunk)!r} was not trained with the wsd schedule")
    same_peak = np.float32(theirs["peak_lr"]) == np.float32(mine["peak_lr"])
    if not same_peak or theirs["warmup_steps"] != mine["warmup_steps"]:
        raise UsageError(
            f"branch_from {str(trunk)!r} warms up over {theirs['warmup_steps']} steps to a peak lr of "
            f"{theirs['peak_lr']:g}, this run over {mine['warmup_steps']} steps to {mine['peak_lr']:g}: their "
            "schedules differ before the branch point; give both the same recipe.warmup_steps"
        )
    trunk_stable = theirs["total_steps"] - theirs["cooldown_steps"]
    if step > trunk_stable:
        raise UsageError(
            f"step {step} of branch_from {str(trunk)!r} lies in its cooldown (after step {trunk_stable}): a branch "
            "starts from the trunk's constant phase"
        )
    numbers = {k: jax.device_put(jnp.asarray(mine[k], dtype=v.dtype), v.sharding) for k, v in hyperparams.items()}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=numbers))


def branch_start(
    config: PretrainConfig, run: ResolvedRun, built: Built, ledger: Ledger
) -> tuple[Any, dict[str, Any], Ledger]:
    """``(state, data_state, ledger)`` of a branch at ``config.branch_step`` of the trunk ``config.branch_from``.

    The ledger continues the trunk's counters, marked as the trunk's share (:meth:`Ledger.branch`); the device count,
    hardware and peak are this invocation's.

    Raises:
        UsageError: a missing or mismatched trunk (settings, schedule, data stream).
        CheckpointError: the trunk holds no readable checkpoint of the branch step.
    """
    assert config.branch_from is not None and config.branch_step is not None
    trunk, step = Path(config.branch_from).expanduser(), config.branch_step
    check_trunk_config(trunk, resolved_dict(run))
    if not (trunk / "checkpoints").is_dir():
        raise UsageError(f"branch_from {str(trunk)!r} holds no checkpoints: train the trunk to step {step} first")
    checkpoints = Checkpoints(trunk / "checkpoints", keep=1, use_async=False, read_only=True)
    try:
        state, data_state, saved = checkpoints.restore_step(step, built.abstract)
    finally:
        checkpoints.close()
    state = continue_schedule(state, built.schedule, step, trunk)
    if data_state.get("step") != step:
        raise UsageError(
            f"branch_from {str(trunk)!r}: its checkpoint of step {step} holds the data position "
            f"{data_state.get('step')!r}"
        )
    # The same stream (Loader.set_state checks seed, batch, dataset size and repeats); this run's own length.
    data_state = {**data_state, "num_examples": run.duration.examples}
    resumed = Ledger.from_dict(
        {**saved, "num_devices": ledger.num_devices, "hardware": ledger.hardware, "peak_flops": ledger.peak_flops}
    )
    resumed.branch(str(trunk), step)
    return state, data_state, resumed
