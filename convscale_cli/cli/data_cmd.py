"""``convscale data ...``: dataset tools (``convert`` an image folder into ArrayRecord shards)."""

from pathlib import Path
from typing import Annotated

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json

data_app = typer.Typer(help="Dataset tools: convert image folders into ArrayRecord shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@data_app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Image folder holding train/CLASS/*.jpg|png and optionally val/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist; written atomically).")],
    shard_size: Annotated[int, typer.Option(help="Examples per ArrayRecord shard.")] = 4096,
    workers: Annotated[
        int | None, typer.Option(help="Parallel shard writers (0 or unset: one per CPU, at most 16).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Convert an image folder into ArrayRecord shards for the `arrayrecord` dataset (root=OUT)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from convscale_cli.data.convert import convert_imagefolder

    console = Console(stderr=True)
    columns = (TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=json_ or not console.is_terminal) as bar:
        task = bar.add_task("convert", total=None)
        report = convert_imagefolder(
            src,
            out,
            shard_size=shard_size,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    notes = []
    if "eval" not in report.counts:
        # pretrain and finetune evaluate on a held-out split; without one they refuse to start, so say it now.
        notes.append(
            f"{src} has no val/ split, so {report.out} holds no held-out split: pretrain and finetune need one to "
            f"evaluate on; add {src}/val/CLASS/ images (a few per class) and convert again, or pretrain with "
            "--set holdout=0.01 to hold out 1% of train"
        )
    if json_:
        print_json(
            {
                "notes": notes,
                "out": str(report.out),
                "counts": report.counts,
                "skipped": report.skipped,
                "shards": report.shards,
                "bytes": report.bytes,
                "num_classes": report.num_classes,
            }
        )
        return
    for split, count in report.counts.items():
        skipped = len(report.skipped[split])
        note = f", skipped {skipped} corrupt (first: {report.skipped[split][0]})" if skipped else ""
        print(f"{split}: {count} images in {report.shards[split]} shards{note}")
    print(
        f"wrote {report.out} ({_size(report.bytes)}, {report.num_classes} classes); use --dataset arrayrecord "
        f"with root={report.out}"
    )
    for note in notes:
        print(f"Note: {note}")
