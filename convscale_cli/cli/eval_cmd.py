"""``convscale eval``: evaluate any checkpoint on a dataset split, at any resolution (timm's ``validate.py``)."""

from pathlib import Path
from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json

_HELP = """Evaluate a checkpoint on a dataset: held-out loss, top-1, top-5 and images/s.

PATH is a pre-training or fine-tuning run directory (its newest checkpoint; a fine-tuning run's EMA parameters unless
--no-ema), one checkpoint RUN/checkpoints/STEP, or a weights checkpoint (import-weights, export --format safetensors).
The evaluation is training's own, sharded over the local devices: a run evaluated at its own resolution reproduces
the numbers its summary.json records. The dataset must have as many classes as the model's classifier."""


@app.command("eval", help=_HELP)
def eval_(
    path: Annotated[Path, typer.Argument(help="Run directory, checkpoint directory or weights checkpoint.")],
    dataset: Annotated[str, typer.Option(help="Dataset to evaluate on (see `convscale datasets`).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "eval",
    resolution: Annotated[
        int | None, typer.Option(help="Image side in pixels (default: the run's evaluation resolution).")
    ] = None,
    eval_crop: Annotated[
        float | None, typer.Option(help="Central fraction kept after resizing (default: the run's, else 0.875).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch, a multiple of the device count.")] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use a fine-tuning run's EMA parameters.")] = True,
    precision: Annotated[
        str | None, typer.Option(help="bf16 or fp32 activations (default: the run's; fp32 for weights).")
    ] = None,
    data_option: Annotated[
        list[str] | None,
        typer.Option("--data-option", metavar="KEY=VALUE", help="Dataset option key=value, e.g. root=/data (repeat)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Input-pipeline worker processes.")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    from convscale_cli.config import parse_overrides
    from convscale_cli.evaluate import evaluate  # jax: only once there is something to evaluate

    result = evaluate(
        path,
        dataset,
        split=split,
        resolution=resolution,
        crop_fraction=eval_crop,
        batch_size=batch_size,
        ema=ema,
        precision=precision,
        data_options=parse_overrides(data_option),
        worker_count=workers,
    )
    if json_:
        print_json(result)
        return
    ckpt = result["checkpoint"]
    step = f", step {ckpt['step']}" if ckpt["step"] is not None else ""
    which = " (EMA)" if ckpt["parameters"] == "ema" else ""
    print(
        f"{ckpt['model']}{which} from {ckpt['path']}{step} on {result['dataset']} {result['split']} "
        f"({result['examples']} images, {result['resolution']} px, crop {result['crop_fraction']:g}):\n"
        f"  loss {result['eval_loss']:.4f}  top-1 {result['eval_top1']:.4f}  top-5 {result['eval_top5']:.4f}  "
        f"{result['images_per_sec']:.1f} images/s on {result['devices']} devices"
    )
