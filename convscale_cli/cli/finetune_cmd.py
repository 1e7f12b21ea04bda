"""``convscale finetune``: fine-tune a pre-trained run or imported weights with the paper's transfer recipe.

Only options live here; the command builds a :class:`~convscale_cli.finetune.config.FinetuneConfig` (TOML file, then
flags, then ``--set`` overrides) and calls :func:`convscale_cli.finetune.api.finetune`, imported inside the command so
``convscale --help`` never loads jax.
"""

from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli import run_options as opt
from convscale_cli.cli._output import print_json, progress_to_stderr
from convscale_cli.errors import UsageError

_HELP = """Fine-tune a pre-trained model on a labelled dataset (Smith et al. 2023 §3: 50 epochs with SAM,
stochastic depth and dropout, train at 384 px and evaluate at 480 px; optional repeated augmentation x4).

--from takes a pre-training run directory (its newest checkpoint), a checkpoint directory inside it
(RUN/checkpoints/STEP), or an imported-weights directory (`convscale import-weights`). The classifier is replaced by
a new one sized for --dataset (N(0, 0.01) weights, zero bias); every other tensor must match the model.

Defaults follow the NFNet transfer recipe: SAM rho 0.05 on 20% of the batch, stochastic depth 0.1, dropout 0.25,
weight decay 1e-5, parameter EMA 0.9999 (evaluated as final_ema), batch 2048, lr alpha = 1/8 of the family recipe's
alpha, not of the alpha the pre-training run was tuned to (0.2 at batch 4096 for NFNets, scaled linearly with the
batch); --lr and --weight-decay replace them. With --repeat-aug k each image appears k times
per batch stream with independent augmentations and the duration counts augmented samples, so the compute stays
the same with k times fewer passes.

It runs on the same engine as pretrain: --fsdp shards the parameters and optimizer state over the devices (the
paper's 384 px F7+ fine-tune does not fit one accelerator), --coordinator-address/--num-processes/--process-id
run it on several hosts, and --budget stops it at a compute budget (counting the SAM ascent pass) or, given alone,
sets its duration.

Rerunning the same command resumes; a finished run says so and exits 0. Writes OUT/config.json, metrics.jsonl,
checkpoints/ and summary.json (kind "finetune": final, final_ema, and the pre-training cost under pretrain)."""


def _randaugment(text: str) -> list[float]:
    """``"L,M"`` -> ``[L, M]`` (layers, magnitude)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        layers, magnitude = int(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"--randaugment {text!r} must look like LAYERS,MAGNITUDE, e.g. 4,15") from None
    return [layers, magnitude]


@app.command(help=_HELP)
def finetune(
    from_: Annotated[
        str | None, typer.Option("--from", help="Pre-training run dir, a checkpoint in it, or imported weights.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Target dataset, e.g. digits (see `convscale datasets`).")] = None,
    out: opt.Out = None,
    model: Annotated[str | None, typer.Option(help="Check that the checkpoint holds this architecture.")] = None,
    scratch: Annotated[
        bool,
        typer.Option(
            "--scratch",
            help="Baseline: train --from's architecture from a random initialisation with the same recipe and compute.",
        ),
    ] = False,
    config: opt.ConfigFile = None,
    epochs: Annotated[float | None, typer.Option(help="Duration: augmented samples / train size (50).")] = None,
    steps: opt.Steps = None,
    examples: Annotated[int | None, typer.Option(help="Duration in (augmented) training examples.")] = None,
    budget: opt.Budget = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak lr alpha at the recipe's base batch (4096 for NFNets), scaled linearly; default alpha/8."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (default 2048).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training resolution (paper: 384).")] = None,
    eval_resolution: Annotated[int | None, typer.Option(help="Evaluation resolution (paper: 480).")] = None,
    eval_crop: Annotated[
        float | None,
        typer.Option(help="Central fraction kept at evaluation (default: the dataset's, else 0.875; 1.0: all of it)."),
    ] = None,
    sam_rho: Annotated[float | None, typer.Option(help="SAM radius rho (default 0.05; 0 disables SAM).")] = None,
    sam_fraction: Annotated[
        float | None, typer.Option(help="Fraction of the batch for the SAM ascent step, in (0, 1] (default 0.2).")
    ] = None,
    stochdepth_rate: Annotated[float | None, typer.Option(help="Stochastic depth rate (default 0.1).")] = None,
    drop_rate: Annotated[float | None, typer.Option(help="Dropout before the classifier (default 0.25).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default 1e-5).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="Parameter EMA decay (default 0.9999; 0 disables).")] = None,
    repeat_aug: Annotated[
        int | None, typer.Option("--repeat-aug", help="Repeated-augmentation multiplicity k (paper: 4).")
    ] = None,
    randaugment: Annotated[
        str | None, typer.Option(help="RandAugment LAYERS,MAGNITUDE, e.g. 4,15 (default off).")
    ] = None,
    mixup: Annotated[float | None, typer.Option(help="MixUp alpha (default 0: off).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (default 0: off).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Softmax label smoothing (default 0).")] = None,
    precision: opt.Precision = None,
    seed: Annotated[int | None, typer.Option(help="Head initialisation, data order and dropout seed.")] = None,
    eval_every: opt.EvalEvery = None,
    checkpoint_every: opt.CheckpointEvery = None,
    log_every: opt.LogEvery = None,
    data_option: opt.DataOptions = None,
    set_: opt.Sets = None,
    tracker: opt.Trackers = None,
    force: opt.Force = False,
    fsdp: opt.Fsdp = False,
    workers: opt.Workers = None,
    coordinator_address: opt.CoordinatorAddress = None,
    num_processes: opt.NumProcesses = None,
    process_id: opt.ProcessId = None,
    json_: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout at the end.")] = False,
) -> None:
    from convscale_cli.config import command_config
    from convscale_cli.finetune.config import FinetuneConfig

    flags = {
        "pretrained": from_,
        "dataset": dataset,
        "out": out,
        "model": model,
        "epochs": epochs,
        "steps": steps,
        "examples": examples,
        "budget": budget,
        "lr": lr,
        "batch_size": batch_size,
        "resolution": resolution,
        "eval_resolution": eval_resolution,
        "eval_crop_fraction": eval_crop,
        "sam_rho": sam_rho,
        "sam_fraction": sam_fraction,
        "stochdepth_rate": stochdepth_rate,
        "drop_rate": drop_rate,
        "weight_decay": weight_decay,
        "ema_decay": ema_decay,
        "repeat_aug": repeat_aug,
        "randaugment": _randaugment(randaugment) if randaugment is not None else None,
        "mixup": mixup,
        "cutmix": cutmix,
        "label_smoothing": label_smoothing,
        "precision": precision,
        "seed": seed,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
        "worker_count": workers,
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    flags |= {
        "trackers": list(tracker) if tracker else None,
        "force": force or None,
        "scratch": scratch or None,
        "fsdp": fsdp or None,
    }
    run_config = command_config(FinetuneConfig, "finetune", config, flags, data_options=data_option, sets=set_)

    from convscale_cli.finetune.api import finetune as run_finetune

    with progress_to_stderr(json_):
        summary = run_finetune(run_config)
    if json_:
        print_json(summary)
