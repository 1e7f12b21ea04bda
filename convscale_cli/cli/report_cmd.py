"""``convscale report``: scaling-law fits, plots and an HTML report over a directory of runs."""

from pathlib import Path
from typing import Annotated, Any

import typer

from convscale_cli.cli import app
from convscale_cli.cli._output import print_json


@app.command()
def report(
    runs_dir: Annotated[Path, typer.Argument(help="Directory of run directories (each with summary.json).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (default: RUNS_DIR/report).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Data setting to report on when the runs span several: a dataset name, or a setting as the error "
            "quotes it (dataset, options, resolution, classes)."
        ),
    ] = None,
    size: Annotated[
        str,
        typer.Option(help="Model size N of the fits: params (without the classifier head) or macs (MACs per image)."),
    ] = "params",
    bootstrap: Annotated[
        int,
        typer.Option(
            help="Bootstrap replicates over runs; each recomputes the whole analysis (0: no intervals, and the "
            "verdicts that need one are inconclusive)."
        ),
    ] = 200,
    level: Annotated[float, typer.Option(help="Confidence level of every interval.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Bootstrap seed (reports are reproducible).")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="Print fit.json to stdout instead of the summary.")] = False,
) -> None:
    """Fit scaling laws to finished runs and write report.md, a self-contained report.html, PNGs and fit.json."""
    from convscale_cli.config import check_seed
    from convscale_cli.report import build_report

    check_seed(seed, "--seed")
    out_dir = out if out is not None else runs_dir / "report"
    result = build_report(
        runs_dir,
        out_dir,
        dataset=dataset,
        size_axis=size,
        bootstrap=bootstrap,
        level=level,
        seed=seed,
    )
    if json_:
        print_json(result)
        return
    show_report(result, out_dir)


def show_report(result: dict[str, Any], out_dir: Path) -> None:
    """Print what ``convscale report`` wrote: the verdicts, the runs skipped and where the files are."""
    from convscale_cli.report.document import regime_line

    for verdict in result["verdicts"]:
        print(f"({verdict['finding']}) {verdict['text']}")
    if result.get("regime"):
        print(f"(regime) {regime_line(result['regime'])}")
    if result["skipped"]:
        count = len(result["skipped"])
        print(f"skipped {count} run {'directory' if count == 1 else 'directories'} (listed in the report)")
    files = result["files"]
    print(f"report: {files['report_html']}")
    print(f"        {files['report_md']}")
    print(f"fits:   {files['fit_json']}")
    print(f"plots:  {', '.join(Path(p).name for p in files['plots'].values())} in {out_dir}")
