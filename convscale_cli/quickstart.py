"""The main job: a complete small scaling study on the embedded data, on a laptop CPU, in minutes.

``convscale quickstart`` does what a user would do by hand with four commands, by calling the library functions behind
them in one process (so compiled programs are shared), and uses what each returns:

1. :func:`~convscale_cli.sweep.run_sweep` (``convscale sweep``) over the packaged study
   (``convscale_cli/studies/powerlaw.toml``): a width-only NFNet ladder x epoch budgets 0.5-8 on ``shapes``, two
   learning rates per cell, every shorter budget a cooldown branch of its (model, lr)'s longest run. Its cells reach
   the power-law regime (held-out losses at ~25-30% of chance, as the paper's are), where the paper's findings can
   show and can fail; ``--study quickstart`` runs the same job on a 4-minute study in the early transient;
2. :func:`~convscale_cli.finetune.api.finetune` (``convscale finetune``) of the lowest-loss pre-trained run on the
   real ``digits`` data, and of the same architecture from a random initialisation with the same recipe and compute
   (``--scratch``), the baseline pre-training must beat;
3. :func:`~convscale_cli.report.build_report` (``convscale report``) over the runs (scaling-law fits, verdicts on the
   paper's findings, HTML with plots);
4. :func:`~convscale_cli.plan_fit.plan_fitted` (``convscale plan --from``) for a budget 10x the study's largest run.

It ends with a short summary: runs used by the rule vs a full grid, the verdicts, the digits top-1 with and without
pre-training, and where the report is. Training progress is printed as it runs; how each step's result is shown
(the commands' own tables, from the CLI) is the caller's choice (:class:`Display`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convscale_cli import interrupts
from convscale_cli.errors import UsageError
from convscale_cli.runs_dir import FINISHED, RunRecord, load_runs, scan_runs

if TYPE_CHECKING:
    from convscale_cli.finetune.config import FinetuneConfig
    from convscale_cli.planner import Plan
    from convscale_cli.registry import Registry
    from convscale_cli.sweep import CellPlan, StudyConfig, SweepResult

STUDY = "powerlaw.toml"  # the main job's study
FINETUNE_DATASET = "digits"
PLAN_BUDGET_FACTOR = 10.0


def default_study() -> Path:
    """The packaged study the main job runs (``powerlaw``)."""
    return Path(str(resources.files("convscale_cli.studies").joinpath(STUDY)))


def packaged_studies() -> dict[str, Path]:
    """The studies shipped with convscale, by name: ``powerlaw`` (the main job's) and ``quickstart`` (4 minutes)."""
    root = resources.files("convscale_cli.studies")
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir() if e.name.endswith(".toml")}


def study_file(study: str | Path | None) -> Path:
    """The study file ``--study`` names: a path, or the name of a packaged study; None is the main job's own.

    Raises:
        UsageError: a bare name that is neither a file nor a packaged study.
    """
    if study is None:
        return default_study()
    path = Path(study)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path  # a file (load_study reports one that cannot be read)
    packaged = packaged_studies()
    if path.name not in packaged:
        raise UsageError(
            f"unknown study {path.name!r}: name a packaged study ({', '.join(sorted(packaged))}) or a study TOML file"
        )
    return packaged[path.name]


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How the best pre-trained run is fine-tuned on ``digits`` (small, so the whole job stays within minutes)."""

    # 10 epochs: from scratch the model is still short of converged (95-97% on digits), so the comparison shows what
    # pre-training buys; at 30 epochs both sides reach ~98.5% and the gap is within one or two images.
    epochs: float = 10.0
    batch_size: int = 64
    # alpha at batch 4096, scaled linearly (25.6 x 64 / 4096 = 0.4), the alpha the study keeps for its best cells;
    # on digits at 30 epochs alpha 6.4, 12.8 and 25.6 all reached 98.1% (one seed, an earlier study run).
    lr: float = 25.6
    sam_rho: float = 0.05
    ema_decay: float = 0.999
    # Augmentation and the evaluation crop are digits' own defaults (no flips or crops: a mirrored 2 is no digit).

    def config(self, source: Path, out: Path, *, scratch: bool = False) -> FinetuneConfig:
        """The run config: ``source`` fine-tuned (or, with ``scratch``, its architecture trained from a random
        initialisation) on the quickstart's dataset into ``out``."""
        from convscale_cli.finetune.config import FinetuneConfig

        return FinetuneConfig(
            pretrained=str(source), dataset=FINETUNE_DATASET, out=str(out), scratch=scratch, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, sam_rho=self.sam_rho, ema_decay=self.ema_decay, precision="fp32",
        )  # fmt: skip


def _sweep_quietly(study: StudyConfig, registry: Registry) -> SweepResult:
    from convscale_cli.sweep import run_sweep

    return run_sweep(study, registry)


def _nothing(*_: Any) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Display:
    """How the steps run and show their results. The defaults show only the engine's progress lines; ``convscale
    quickstart`` passes the sweep, report and plan commands' own tables.

    Attributes:
        sweep: runs the study, ``sweep(study, registry) -> SweepResult`` (a live table around
            :func:`~convscale_cli.sweep.run_sweep`, say).
        report: shows the report, ``report(fit, out_dir)`` with ``fit`` the content of ``fit.json``.
        plan: shows the plan.
    """

    sweep: Callable[[StudyConfig, Registry], SweepResult] = _sweep_quietly
    report: Callable[[dict[str, Any], Path], None] = _nothing
    plan: Callable[[Plan], None] = _nothing


@dataclasses.dataclass(frozen=True)
class QuickstartResult:
    """What each step of the job returned, and where its files are.

    Attributes:
        study: the study file the job ran.
        sweep: the study's decisions, one per cell.
        best: the lowest-loss finished pre-training run, the fine-tuning source.
        finetune: the fine-tuning run's summary (``summary.json``).
        scratch: the from-scratch baseline's summary.
        fit: the report's analysis (``fit.json``).
        plan: the plan for a budget :data:`PLAN_BUDGET_FACTOR` times the largest run.
        finetune_dir: the fine-tuning run's directory.
        scratch_dir: the baseline's directory.
        report_html: the HTML report.
        finetune_epochs: the fine-tuning duration.
    """

    study: Path
    sweep: SweepResult
    best: RunRecord
    finetune: Mapping[str, Any]
    scratch: Mapping[str, Any]
    fit: Mapping[str, Any]
    plan: Plan
    finetune_dir: Path
    scratch_dir: Path
    report_html: Path
    finetune_epochs: float

    @property
    def top1(self) -> dict[str, float | None]:
        """Held-out top-1 of the fine-tuned run, raw and EMA weights."""
        return _top1(self.finetune)

    @property
    def top1_scratch(self) -> dict[str, float | None]:
        """Held-out top-1 of the from-scratch baseline, raw and EMA weights."""
        return _top1(self.scratch)

    def to_dict(self) -> dict[str, Any]:
        """The summary ``convscale quickstart --json`` prints."""
        return {
            "study": str(self.study),
            "cells": len(self.sweep.results),
            "runs_used": self.sweep.runs_used,
            "full_grid_runs": self.sweep.full_grid_runs,
            "verdicts": list(self.fit.get("verdicts", [])),
            "regime": self.fit.get("regime"),
            "best_pretrain_run": self.best.path.name,
            "finetune": {
                "dataset": FINETUNE_DATASET,
                "epochs": self.finetune_epochs,
                **self.top1,
                "run": str(self.finetune_dir),
                "scratch": {**self.top1_scratch, "run": str(self.scratch_dir)},
            },
            "report": str(self.report_html),
        }


def best_pretrain_run(runs_dir: Path) -> RunRecord:
    """The finished pre-training run with the lowest held-out loss (the fine-tuning source).

    Only runs that finished their schedule count: a budget-stopped run ended before its schedule did.

    Raises:
        UsageError: no finished pre-training run with a finite loss in ``runs_dir``.
    """
    runs = [r for r in load_runs(runs_dir, statuses=FINISHED) if math.isfinite(r.eval_loss)]
    if not runs:
        raise UsageError(f"no finished pre-training run in {str(runs_dir)!r} to fine-tune")
    return min(runs, key=lambda r: r.eval_loss)


def check_runs_are_the_studys(runs_dir: Path, cells: Sequence[CellPlan]) -> None:
    """Refuse a runs directory that holds pre-training runs of none of the study's cells, before anything trains.

    Such runs come from another study or from an earlier convscale's quickstart (whose study was another); the job's
    report could not fit them with this study's runs (their held-out losses are on other data), and its fine-tuning
    would start from whichever run is lowest. Runs of the study's own cells, finished or not, are resumed as usual.

    Raises:
        UsageError: naming the first foreign runs and the way out.
    """
    if not runs_dir.is_dir():
        return
    mine = {(c.model, float(c.epochs)) for c in cells}
    found, _ = scan_runs(runs_dir, statuses=None, kinds=("pretrain",), max_depth=1)
    foreign = [r.name for r in found if (r.summary.get("model"), _float(r.summary.get("epochs"))) not in mine]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(
            f"{str(runs_dir)!r} holds pre-training runs that are not this study's ({shown}), from another study or an "
            "earlier convscale's quickstart: give another `out`, or move them"
        )


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def largest_flops(runs_dir: Path) -> float:
    """Training FLOPs of the largest finished pre-training run (the plan's budget is a multiple of it)."""
    return max((r.train_flops for r in load_runs(runs_dir, statuses=FINISHED)), default=0.0)


def _top1(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """Held-out top-1 of a fine-tuning summary, raw and EMA weights."""
    return {
        "top1": (summary.get("final") or {}).get("eval_top1"),
        "top1_ema": (summary.get("final_ema") or {}).get("eval_top1"),
    }


def _percent(top1: Mapping[str, float | None]) -> str:
    raw, ema = top1["top1"], top1["top1_ema"]
    text = f"{100 * raw:.1f}%" if raw is not None else "n/a"
    return text + (f" (EMA {100 * ema:.1f}%)" if ema is not None else "")


def plan_from_runs(study: StudyConfig, registry: Registry, runs_dir: Path, budget_flops: float) -> Plan:
    """The plan ``convscale plan --from RUNS`` makes for ``budget_flops`` on a CPU, for the study's data setting."""
    from convscale_cli import plan_data, planner
    from convscale_cli.budget import get_hardware, parse_budget
    from convscale_cli.plan_fit import plan_fitted, runs_batch_size

    family = plan_data.family_of(registry, study.models)
    size = study.data_options.get("size")
    options = {k: v for k, v in study.data_options.items() if k != "size"}
    request = planner.PlanRequest(
        budget=parse_budget(f"{budget_flops:.4g}-flops"),  # as the command line would give it
        hardware=get_hardware("cpu"),
        dataset=plan_data.dataset_plan(
            registry,
            study.dataset,
            size=int(size) if size else None,
            resolution=study.resolution or 32,
            options=options,
        ),
        family=family,
        batch_size=study.batch_size or runs_batch_size(runs_dir, family) or planner.PAPER_BATCH_SIZE,
        models=_ladder_of(registry, family, study.models),
    )
    return plan_fitted(request, registry, runs_dir)


def _rule_text(study: StudyConfig) -> str:
    if study.rule == "grid":
        if isinstance(study.lr_grid, dict):
            grids = "; ".join(f"{f} {', '.join(f'{lr:g}' for lr in g)}" for f, g in study.lr_grid.items())
            return f"learning rates alpha {grids} on every cell"
        grid = ", ".join(f"{lr:g}" for lr in study.lr_grid) if study.lr_grid else "of the recipe's grid"
        return f"learning rates alpha {grid} on every cell"
    return f"learning rates tuned by the {study.rule} rule"


def _ladder_of(registry: Registry, family: str, models: Sequence[str]) -> tuple[str, ...]:
    """The plan's candidates: every model of ``family`` that carries all the tags the study's models share (the
    study's ladder, larger rungs included), so the plan does not extrapolate the fitted law to another ladder."""
    specs = {s.name: s for s in registry.architectures if s.family == family}
    shared = set.intersection(*(set(specs[m].tags) for m in models if m in specs) or [set()])
    return tuple(name for name, s in specs.items() if shared <= set(s.tags)) if shared else ()


def run(
    out: Path,
    *,
    study: str | Path | None = None,
    seed: int | None = None,
    finetune: FinetuneSettings = FinetuneSettings(),
    registry: Registry | None = None,
    display: Display = Display(),
    echo: Callable[[str], None] = print,
) -> QuickstartResult:
    """Run the whole job into ``out`` (``out/runs``, ``out/report``), print its summary and return its results.

    Args:
        out: output directory; rerunning with the same ``out`` resumes (finished runs are skipped).
        study: a study TOML, or the name of a packaged study (:func:`packaged_studies`), instead of the main job's.
        seed: the study's training seed instead of its own (its runs then go to ``out/runs`` as usual: use another
            ``out`` per seed).
        finetune: fine-tuning settings.
        registry: models and datasets (default: the installed plugins).
        display: how the steps run and show their results.
        echo: where section headers and the summary go.

    Raises:
        ConvscaleError: a step failed (a bad study, a diverged run, too few runs to fit, ...).
    """
    from convscale_cli.finetune.api import finetune as run_finetune
    from convscale_cli.report import build_report
    from convscale_cli.report.document import regime_line
    from convscale_cli.sweep import load_study, plan_cells

    if registry is None:
        from convscale_cli.plugins import get_registry

        registry = get_registry()
    study_path = study_file(study)
    runs_dir, report_dir = out / "runs", out / "report"
    overrides: dict[str, Any] = {"out": str(runs_dir)} | ({} if seed is None else {"seed": seed})
    loaded = load_study(study_path, overrides)  # validates the study before anything runs
    cells = plan_cells(loaded, registry)  # and its model and dataset names, in one line of their own
    check_runs_are_the_studys(runs_dir, cells)

    echo(
        f"[1/4] pre-training: {len(loaded.models)} models x {len(loaded.epochs)} epoch budgets on {loaded.dataset}, "
        f"seed {loaded.seed}, {_rule_text(loaded)}"
    )
    swept = display.sweep(loaded, registry)
    interrupts.check()

    best = best_pretrain_run(runs_dir)
    ft_dir = runs_dir / f"finetune-{FINETUNE_DATASET}"
    scratch_dir = runs_dir / f"scratch-{FINETUNE_DATASET}"
    echo(
        f"[2/4] fine-tuning the lowest-loss run ({best.path.name}, held-out loss {best.eval_loss:.4f}) on the "
        f"real {FINETUNE_DATASET} data"
    )
    tuned = run_finetune(finetune.config(best.path, ft_dir), registry)
    interrupts.check()
    echo(f"      baseline: the same {best.model} from a random initialisation, same recipe and fine-tuning compute")
    scratch = run_finetune(finetune.config(best.path, scratch_dir, scratch=True), registry)
    interrupts.check()

    echo("[3/4] fitting scaling laws and writing the report")
    fit = build_report(runs_dir, report_dir, dataset=loaded.dataset)
    display.report(fit, report_dir)
    interrupts.check()

    budget_flops = PLAN_BUDGET_FACTOR * largest_flops(runs_dir)
    echo(
        f"[4/4] planning a budget {PLAN_BUDGET_FACTOR:g}x the largest run ({budget_flops:.3g} FLOPs) from the "
        "fitted runs"
    )
    plan = plan_from_runs(loaded, registry, runs_dir, budget_flops)
    display.plan(plan)
    interrupts.check()

    result = QuickstartResult(
        study=study_path,
        sweep=swept,
        best=best,
        finetune=tuned,
        scratch=scratch,
        fit=fit,
        plan=plan,
        finetune_dir=ft_dir,
        scratch_dir=scratch_dir,
        report_html=report_dir / "report.html",
        finetune_epochs=finetune.epochs,
    )
    grid = swept.full_grid_runs
    echo("")
    echo("Quickstart summary")
    if loaded.rule == "grid":
        echo(f"  lr grid of {swept.grid_size or 'each family'}: {swept.runs_used} runs for {len(swept.results)} cells")
    else:
        cells = len(swept.results)
        echo(f"  {loaded.rule} rule: {swept.runs_used} runs for {cells} cells ({swept.full_grid_text} needs {grid})")
    for verdict in fit.get("verdicts", []):
        echo(f"  {verdict.get('claim') or verdict.get('finding')}: {verdict.get('text')}")
    regime = fit.get("regime")
    if regime:
        hint = f"; a study past it: convscale quickstart --study powerlaw --out {out.parent / 'powerlaw'}"
        echo(f"  regime: {regime_line(regime)}" + (hint if regime["early_transient"] else ""))
    short = [v for v in fit.get("verdicts", []) if v.get("status") != "supported"]
    if regime and not regime["early_transient"] and short:
        # Past the transient a verdict can go either way, and one seed's run is one draw of the training noise.
        echo(
            f"  seed {loaded.seed} only: each verdict is one draw of the training noise; for a steadier reading pool "
            "several seeds' jobs in one report (README, \"The main job's study\")"
        )
    echo(
        f"  {FINETUNE_DATASET} top-1 on the held-out split after {finetune.epochs:g} epochs: "
        f"{_percent(result.top1)} fine-tuned from {best.path.name}, {_percent(result.top1_scratch)} from scratch "
        "(same fine-tuning compute)"
    )
    echo(f"  report: {result.report_html}")
    return result
