"""``convscale pretrain``: pre-train a model with the paper's recipe.

Only options live here; the command builds a :class:`~convscale_cli.engine.config.PretrainConfig` (TOML file, then
flags, then ``--set`` overrides) and calls :func:`convscale_cli.engine.api.pretrain`, imported inside the command so
``convscale --help`` never loads jax.
"""

from typing import TYPE_CHECKING, Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli import run_options as opt
from convscale_cli.cli._output import print_json, progress_to_stderr

if TYPE_CHECKING:
    from convscale_cli.engine.config import PretrainConfig

_HELP = """Pre-train a model on a dataset with its family's recipe (Smith et al. 2023: SGD + Nesterov + AGC,
cosine schedule; bf16 activations on GPU/TPU, fp32 on CPU).

The learning rate follows the paper's convention: --lr is the peak rate alpha quoted at batch 4096 (alpha ~ 1.6 for
small epoch budgets) and is scaled linearly with the batch size, lr_actual = alpha x batch / 4096.

Give one duration: --epochs, --steps, --examples, or a FLOP / core-hour --budget. Running the same command again
resumes the run from its newest checkpoint; a finished run says so and exits 0; a different config in the same --out
is refused (naming the differing keys) unless --force. SIGINT/SIGTERM save a checkpoint and exit with code 130; a
non-finite loss stops the run with exit code 3.

Writes OUT/config.json, OUT/metrics.jsonl, OUT/checkpoints/, OUT/tb/ and, at the end, OUT/summary.json.

Examples:

\b
  convscale pretrain --model nfnet-tiny-l1 --dataset shapes --epochs 1 \\
      --batch-size 64 --lr 25.6 --data-option size=16384 --out runs/l1
  convscale pretrain --config run.toml --set recipe.weight_decay=1e-5 --out runs/wd
  convscale pretrain --model nfnet-f0 --dataset imagefolder \\
      --data-option root=/data/images --budget 2-h100-hours --out runs/f0"""


@app.command(help=_HELP)
def pretrain(
    config: opt.ConfigFile = None,
    model: Annotated[str | None, typer.Option(help="Architecture, e.g. nfnet-f0 (see `convscale models`).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset, e.g. shapes (see `convscale datasets`).")] = None,
    out: opt.Out = None,
    epochs: Annotated[
        float | None, typer.Option(help="Duration in passes over the train split (fractional allowed).")
    ] = None,
    steps: opt.Steps = None,
    examples: Annotated[int | None, typer.Option(help="Duration in training examples.")] = None,
    budget: opt.Budget = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak lr alpha at batch 4096, scaled by batch/4096 (default: recipe, 1.6).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (default: recipe, 4096).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training resolution in pixels.")] = None,
    eval_resolution: Annotated[int | None, typer.Option(help="Held-out evaluation resolution.")] = None,
    precision: opt.Precision = None,
    loss: Annotated[str | None, typer.Option(help="softmax or sigmoid cross-entropy.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Softmax label smoothing.")] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation, data order and dropout seed (default 0).")] = None,
    eval_every: opt.EvalEvery = None,
    eval_examples: Annotated[int | None, typer.Option(help="Evaluate on the first N held-out examples.")] = None,
    checkpoint_every: opt.CheckpointEvery = None,
    checkpoint_minutes: Annotated[
        float | None, typer.Option(help="...and at least every M minutes (default 30).")
    ] = None,
    keep: Annotated[int | None, typer.Option(help="Checkpoints to keep (default 3).")] = None,
    log_every: opt.LogEvery = None,
    data_option: opt.DataOptions = None,
    set_: opt.Sets = None,
    initial_checkpoint: Annotated[
        str | None,
        typer.Option(help="Start from this run's, checkpoint's or weights' parameters (fresh optimizer, step 0)."),
    ] = None,
    grad_accum_steps: Annotated[
        int | None,
        typer.Option(help="Micro-batches per step whose gradients sum to the batch's: less memory (default 1)."),
    ] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(help="EMA of the parameters with this decay, e.g. 0.9999 (default 0: none, as the paper)."),
    ] = None,
    tracker: opt.Trackers = None,
    force: opt.Force = False,
    fsdp: opt.Fsdp = False,
    workers: opt.Workers = None,
    hardware: Annotated[str | None, typer.Option(help="Hardware for MFU (default: detected).")] = None,
    coordinator_address: opt.CoordinatorAddress = None,
    num_processes: opt.NumProcesses = None,
    process_id: opt.ProcessId = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the resolved run (steps, examples, peak lr, every default) and exit: no compiling."
        ),
    ] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print summary.json (with --dry-run: the resolved config) to stdout.")
    ] = False,
) -> None:
    from convscale_cli.config import command_config
    from convscale_cli.engine.config import PretrainConfig

    flags = {
        "model": model,
        "dataset": dataset,
        "out": out,
        "epochs": epochs,
        "steps": steps,
        "examples": examples,
        "budget": budget,
        "lr": lr,
        "batch_size": batch_size,
        "resolution": resolution,
        "eval_resolution": eval_resolution,
        "precision": precision,
        "loss": loss,
        "label_smoothing": label_smoothing,
        "seed": seed,
        "eval_every": eval_every,
        "eval_examples": eval_examples,
        "checkpoint_every": checkpoint_every,
        "checkpoint_minutes": checkpoint_minutes,
        "keep": keep,
        "log_every": log_every,
        "worker_count": workers,
        "hardware": hardware,
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "initial_checkpoint": initial_checkpoint,
        "grad_accum_steps": grad_accum_steps,
        "ema_decay": ema_decay,
    }
    flags |= {"trackers": list(tracker) if tracker else None, "force": force or None, "fsdp": fsdp or None}
    run_config = command_config(PretrainConfig, "pretrain", config, flags, data_options=data_option, sets=set_)
    if dry_run:
        _dry_run(run_config, json_)
        return
    from convscale_cli.engine.api import pretrain as run_pretrain  # jax: only once there is something to train

    with progress_to_stderr(json_):
        summary = run_pretrain(run_config)
    if json_:
        print_json(summary)


def _dry_run(config: "PretrainConfig", json_: bool) -> None:
    """The run as ``config.json`` would record it, resolved without jax (so without choosing the devices)."""
    from convscale_cli.engine.header import header
    from convscale_cli.engine.resolve import resolve, resolved_dict
    from convscale_cli.plugins import get_registry

    run = resolve(config, get_registry())
    if json_:
        print_json(resolved_dict(run))
        return
    why = "given" if config.precision is not None else "none given: fp32 on CPU, bf16 on GPU/TPU"
    print(header(run, why, None, None))
    print(f"  {run.duration.examples} training examples; nothing compiled, {config.out} not created (--dry-run)")
